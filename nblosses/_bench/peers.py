"""Reference implementations the benchmarks compare against: torch, SciPy, cupyx.

Which peers exist, where they run and which ops they cover is benchmark configuration
(``targets.json``, :mod:`.config`); this module holds how each one is called. Every peer is
imported lazily, inside the functions, and is optional: :func:`available_peers` lists those
installed (and usable on the backend's device). :func:`peer_callable` returns a
zero-argument function running the op once on arrays *already converted* outside the timed
region (``torch.from_numpy`` / DLPack: no copies), or ``None`` where the peer lacks the op.

torch runs with as many intra-op threads as Numba (:func:`match_torch_threads`), so the
comparison is like for like. Gradient ops are compared with what torch users run:
``F.cross_entropy`` then ``torch.autograd.grad`` (forward + backward), and torch's own backward
kernels (``aten._softmax_backward_data``...) for the explicit backward functions.
Linear cross-entropy is compared with two torch peers: ``torch``, the reference users write
(``F.linear`` + ``F.cross_entropy``, gradients of input and weight by autograd), and
``torch_chunked``, torch's own ``F.linear_cross_entropy`` on its chunked path
(``options=torch.nn.LinearCrossEntropyOptions()``), which never stores the logits.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from . import config as K
from .cases import Inputs

__all__ = ["available_peers", "match_torch_threads", "peer_callable", "peer_sync",
           "peer_version"]

Config = dict[str, Any] | None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _usable(peer: str, backend: str) -> bool:
    """Whether an installed peer can run on ``backend``'s device here."""
    if peer.startswith("torch") and backend != "cpu":
        import torch

        return bool(torch.cuda.is_available())
    return True


def available_peers(backend: str = "cpu", cfg: Config = None) -> list[str]:
    """The configured peers installed and usable for ``backend``, in table order."""
    cfg = cfg or K.load()
    return [name for name, p in cfg["peers"].items()
            if backend in p["backends"] and _installed(p["module"]) and _usable(name, backend)]


def peer_version(peer: str, cfg: Config = None) -> str | None:
    mod = (cfg or K.load())["peers"][peer]["module"]
    if not _installed(mod):
        return None
    return getattr(importlib.import_module(mod), "__version__", "?")


def match_torch_threads(n: int | None = None) -> int | None:
    """Give torch the same intra-op thread count as Numba (or ``n``); returns it."""
    if not _installed("torch"):
        return None
    import torch

    if n is None:
        import numba

        n = numba.get_num_threads()
    torch.set_num_threads(int(n))
    return torch.get_num_threads()


def peer_sync(peer: str, backend: str) -> Callable[[], None] | None:
    """The device synchronisation to put inside the timed region (``None`` on the CPU)."""
    if backend == "cpu":
        return None
    if peer.startswith("torch"):
        import torch

        return torch.cuda.synchronize
    import cupy

    return lambda: cupy.cuda.get_current_stream().synchronize()


def peer_callable(peer: str, inputs: Inputs, backend: str = "cpu",
                  cfg: Config = None) -> Callable[[], Any] | None:
    """A zero-argument function running ``inputs.op`` with ``peer``, or ``None``.

    ``None`` also where the configuration does not compare ``peer`` on this op or backend.
    """
    spec = (cfg or K.load())["peers"].get(peer)
    if spec is None or peer not in _CALLABLES:
        raise ValueError(f"unknown peer {peer!r}")
    if backend not in spec["backends"]:
        return None
    if spec["ops"] != "all" and inputs.op.name not in spec["ops"]:
        return None
    return _CALLABLES[peer](inputs, backend)


def _torch_tensors(inputs: Inputs, backend: str) -> dict[str, Any]:
    """``inputs.arrays`` as torch tensors sharing their memory (no copies)."""
    import torch

    def tensor(a: Any) -> Any:
        if backend == "cpu":
            return torch.from_numpy(a)
        return torch.as_tensor(a, device="cuda")  # __cuda_array_interface__: no copy

    return {k: tensor(v) for k, v in inputs.arrays.items()}


def _linear_ce_grad(a: dict[str, Any], options: Any) -> Callable[[], Any]:
    """Loss and the gradients of input and linear weight, by autograd.

    ``options=None``: the reference ``F.linear`` + ``F.cross_entropy`` (logits materialised);
    else ``F.linear_cross_entropy(..., options=options)``.
    """
    import torch
    import torch.nn.functional as F

    x = a["x"].detach().requires_grad_(True)
    w = a["w"].detach().requires_grad_(True)
    t = a["t"]

    def run() -> Any:
        if options is None:
            loss = F.cross_entropy(F.linear(x, w), t)
        else:
            loss = F.linear_cross_entropy(x, w, t, options=options)
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach(), (gx, gw)

    return run


def _torch_chunked_callable(inputs: Inputs, backend: str) -> Callable[[], Any] | None:
    import torch

    if inputs.op.kind != "linear":
        return None
    return _linear_ce_grad(_torch_tensors(inputs, backend),
                           torch.nn.LinearCrossEntropyOptions())


def _torch_callable(inputs: Inputs, backend: str) -> Callable[[], Any] | None:
    import torch
    import torch.nn.functional as F

    a = _torch_tensors(inputs, backend)
    d, name = inputs.dim, inputs.op.name

    def with_grad(loss_fn: Callable[[Any], Any], x: Any) -> Callable[[], Any]:
        leaf = x.detach().requires_grad_(True)

        def run() -> Any:
            loss = loss_fn(leaf)
            (gx,) = torch.autograd.grad(loss, leaf)
            return loss.detach(), gx

        return run

    if name == "softmax":
        return lambda: F.softmax(a["x"], d)
    if name == "log_softmax":
        return lambda: F.log_softmax(a["x"], d)
    if name == "sigmoid":
        return lambda: torch.sigmoid(a["x"])
    if name == "softmax_backward":
        g, y = a["g"], a["y"]
        return lambda: torch._softmax_backward_data(g, y, d, y.dtype)
    if name == "log_softmax_backward":
        g, y = a["g"], a["y"]
        return lambda: torch._log_softmax_backward_data(g, y, d, y.dtype)
    if name == "sigmoid_backward":
        g, y = a["g"], a["y"]
        return lambda: torch.ops.aten.sigmoid_backward(g, y)
    # the losses (and their "_grad" cases): torch function and the input holding the target
    losses: dict[str, tuple[Callable[..., Any], str]] = {
        "cross_entropy": (F.cross_entropy, "t"), "nll_loss": (F.nll_loss, "t"),
        "bce": (F.binary_cross_entropy, "y"),
        "bce_with_logits": (F.binary_cross_entropy_with_logits, "y")}
    loss = losses.get(name.removesuffix("_grad"))
    if loss is not None:
        fn, target = loss[0], a[loss[1]]
        if name.endswith("_grad"):
            return with_grad(lambda x: fn(x, target), a["x"])
        return lambda: fn(a["x"], target)
    if name == "linear_cross_entropy_grad":
        return _linear_ce_grad(a, None)
    return None


def _special_callable(special: Any, inputs: Inputs) -> Callable[[], Any] | None:
    """softmax / log_softmax / sigmoid from a ``scipy.special``-like module (SciPy or cupyx)."""
    a, d, name = inputs.arrays, inputs.dim, inputs.op.name
    if name == "softmax":
        return lambda: special.softmax(a["x"], axis=d)
    if name == "log_softmax":
        return lambda: special.log_softmax(a["x"], axis=d)
    if name == "sigmoid":
        return lambda: special.expit(a["x"])
    return None


def _scipy_callable(inputs: Inputs, backend: str) -> Callable[[], Any] | None:
    import scipy.special

    return _special_callable(scipy.special, inputs)


def _cupyx_callable(inputs: Inputs, backend: str) -> Callable[[], Any] | None:
    import cupyx.scipy.special

    return _special_callable(cupyx.scipy.special, inputs)


#: How each peer is called; which ops and backends it covers is in the configuration.
_CALLABLES: dict[str, Callable[[Inputs, str], Callable[[], Any] | None]] = {
    "torch": _torch_callable, "torch_chunked": _torch_chunked_callable,
    "scipy": _scipy_callable, "cupyx": _cupyx_callable,
}
