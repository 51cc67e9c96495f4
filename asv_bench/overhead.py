"""Per-call Python cost of every functional op (argument checks, dispatch, result shaping).

Select with ``-b '^overhead\\.'``. The kernels belong to a no-op backend that returns its
input at once, so what is timed is nblosses' own Python path, the part a GPU call cannot hide
(the goal: <= 10 us per call). The backend defers class-index checks to its "kernels", as the
CUDA backend does, so the host never reads the targets.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

import numpy as np

import nblosses
from nblosses import functional as F


def _loss(x, t, w, *args, want_grad=False, **kwargs):
    return np.zeros(()), (x if want_grad else None)


class NoopBackend(nblosses.Backend):
    """Kernels that do nothing: the call's cost is the front end's."""

    name = "noop"

    def build(self) -> nblosses.Runtime:
        def same(x, *rest):
            return x

        kernels = {op: same for op in ("softmax", "log_softmax", "softmax_backward",
                                       "log_softmax_backward", "sigmoid", "sigmoid_backward")}
        kernels.update({op: _loss for op in ("nll_loss", "cross_entropy", "cross_entropy_probs",
                                             "binary_cross_entropy",
                                             "binary_cross_entropy_with_logits")})
        return nblosses.Runtime(self, xp=np, asarray=np.asarray, kernels=kernels,
                                kernel_checks={"class_index", "probability_range"})


def _calls(x, t, y):
    return {
        "softmax": lambda: F.softmax(x, 1, backend="noop"),
        "log_softmax": lambda: F.log_softmax(x, 1, backend="noop"),
        "softmax_backward": lambda: F.softmax_backward(x, x, 1, backend="noop"),
        "sigmoid": lambda: F.sigmoid(x, backend="noop"),
        "nll_loss": lambda: F.nll_loss(x, t, backend="noop"),
        "cross_entropy": lambda: F.cross_entropy(x, t, backend="noop"),
        "cross_entropy_grad": lambda: F.cross_entropy(x, t, return_grad=True, backend="noop"),
        "cross_entropy_probs": lambda: F.cross_entropy(x, y, backend="noop"),
        "binary_cross_entropy": lambda: F.binary_cross_entropy(y, y, backend="noop"),
        "bce_with_logits_grad": lambda: F.binary_cross_entropy_with_logits(
            x, y, return_grad=True, backend="noop"),
    }


OPS = list(_calls(None, None, None))


class Overhead:
    """Wall time of one call at (32, 1000) float32 with no-op kernels."""

    params = [OPS]
    param_names = ["op"]
    number = 2000
    repeat = (3, 10, 2.0)

    def setup(self, op: str) -> None:
        nblosses.register_backend(NoopBackend())
        r = np.random.default_rng(0)
        x = r.standard_normal((32, 1000), dtype=np.float32)
        t = r.integers(0, 1000, 32)
        y = r.uniform(0, 1, (32, 1000)).astype(np.float32)
        self.fn = _calls(x, t, y)[op]
        self.fn()

    def teardown(self, op: str) -> None:
        nblosses.unregister_backend("noop")

    def time_call(self, op: str) -> None:
        self.fn()
