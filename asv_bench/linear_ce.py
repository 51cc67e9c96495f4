"""Linear cross-entropy (a language-model head): forward and all three gradients, float32, CPU,
at the two target shapes (N x d x V) and a small one; torch's references side by side:
``F.linear`` + ``F.cross_entropy`` + backward, and ``F.linear_cross_entropy`` with its chunked
path (``options=LinearCrossEntropyOptions()``).

nblosses is called through ``F.linear_cross_entropy`` when this commit has it, else through the
CPU kernel; commits with neither skip. The target shapes take seconds per call (and torch's
reference ~1.5 GB): a long timeout, one repeat.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

import importlib

import numpy as np

from .common import SkipNotImplemented

SIZES = ["256x64x4000", "4096x1024x32000", "1024x1024x128256"]
IMPLS = ["nblosses", "torch", "torch_chunked"]


def _nblosses_fn():
    """``fn(x, w, t) -> (loss, grads)`` through the public API, else the kernel."""
    functional = importlib.import_module("nblosses.functional")
    public = getattr(functional, "linear_cross_entropy", None)
    if public is not None:
        return lambda x, w, t: public(x, w, t, return_grad=True)
    try:
        kernel = importlib.import_module("nblosses.backends.cpu.linear_ce").linear_cross_entropy
    except ImportError as exc:
        raise SkipNotImplemented("no linear_cross_entropy in this commit") from exc

    def call(x, w, t):
        loss, _, grads = kernel(x, w, None, t, None, ignore_index=-100, label_smoothing=0.0,
                                reduction="mean", z_loss=0.0, softcap=0.0, want_grad=True,
                                grad_output=1.0, want_lse=False)
        return loss, grads

    return call


def _torch_fn(chunked: bool):
    try:
        torch = importlib.import_module("torch")
    except ImportError as exc:
        raise SkipNotImplemented("torch is not installed") from exc
    functional = torch.nn.functional
    if chunked and not hasattr(functional, "linear_cross_entropy"):
        raise SkipNotImplemented("torch has no linear_cross_entropy")

    def call(x, w, t):
        xt = torch.from_numpy(x).requires_grad_()
        wt = torch.from_numpy(w).requires_grad_()
        tt = torch.from_numpy(t)
        if chunked:
            loss = functional.linear_cross_entropy(
                xt, wt, tt, options=torch.nn.LinearCrossEntropyOptions())
        else:
            loss = functional.cross_entropy(functional.linear(xt, wt), tt)
        loss.backward()
        return loss, (xt.grad, wt.grad)

    return call


class LinearCrossEntropy:
    """Forward + grad_x + grad_W, class indices, mean; float32 on the CPU."""

    params = [SIZES, IMPLS]
    param_names = ["NxdxV", "impl"]
    timeout = 900
    number = 1
    repeat = 1
    warmup_time = 0

    def setup(self, size, impl):
        n, d, v = (int(p) for p in size.split("x"))
        self.fn = _nblosses_fn() if impl == "nblosses" else _torch_fn(impl == "torch_chunked")
        r = np.random.default_rng(0)
        self.x = r.standard_normal((n, d), dtype=np.float32)
        self.w = r.standard_normal((v, d), dtype=np.float32) * np.float32(d ** -0.5)
        self.t = r.integers(0, v, n)
        # compile / start thread pools on a slice, outside the timing
        self.fn(self.x[:64], self.w[:1000], self.t[:64] % 1000)

    def time_forward_backward(self, size, impl):
        self.fn(self.x, self.w, self.t)
