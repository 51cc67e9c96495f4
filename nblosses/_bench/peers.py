"""The peers the benchmarks compare against: torch, SciPy, cupyx.

Which peers exist, where they run and which cases they cover is benchmark configuration
(``targets.json``, :mod:`.config`); how each one runs a case is the case's own
(:class:`~nblosses._spec.BenchCase`: ``torch``, ``torch_peers``, ``scipy``). Every peer is
imported lazily, inside the functions, and is optional: :func:`available_peers` lists those
installed (and usable on the backend's device). :func:`peer_callable` returns a
zero-argument function running the case once on arrays *already converted* outside the timed
region (``torch.from_numpy`` / DLPack: no copies), or ``None`` where the peer lacks the case.

torch runs with as many intra-op threads as Numba (:func:`match_torch_threads`), so the
comparison is like for like. Gradient cases are compared with what torch users run
(``F.cross_entropy`` then ``torch.autograd.grad``, or torch's own backward kernels for the
explicit backward functions); linear cross-entropy also with ``torch_chunked``, torch's own
``F.linear_cross_entropy`` on its chunked path, which never stores the logits.
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
    """A zero-argument function running ``inputs.case`` with ``peer``, or ``None``.

    ``None`` also where the configuration does not compare ``peer`` on this case or backend.
    """
    spec = (cfg or K.load())["peers"].get(peer)
    if spec is None:
        raise ValueError(f"unknown peer {peer!r}")
    if backend not in spec["backends"]:
        return None
    if spec["ops"] != "all" and inputs.case.name not in spec["ops"]:
        return None
    if spec["module"] == "torch":
        return _torch_callable(peer, inputs, backend)
    return _special_callable(spec["module"], inputs)


def _torch_tensors(inputs: Inputs, backend: str) -> dict[str, Any]:
    """``inputs.arrays`` as torch tensors sharing their memory (no copies)."""
    import torch

    # DLPack carries every dtype CuPy has (bfloat16 too), on the arrays' own device
    convert = torch.from_numpy if backend == "cpu" else torch.from_dlpack
    return {k: convert(v) for k, v in inputs.arrays.items()}


def _torch_callable(peer: str, inputs: Inputs, backend: str) -> Callable[[], Any] | None:
    """The case's ``torch`` (peer ``torch``) or its entry in ``torch_peers``."""
    import torch
    import torch.nn.functional as F

    case = inputs.case
    make = case.torch if peer == "torch" else case.torch_peers.get(peer)
    if make is None:
        return None
    fn: Callable[[], Any] = make(F, torch, _torch_tensors(inputs, backend), inputs.dim)
    return fn


def _special_callable(module: str, inputs: Inputs) -> Callable[[], Any] | None:
    """The case's ``scipy`` on ``module``'s ``special`` (``scipy`` or ``cupyx.scipy``)."""
    if inputs.case.scipy is None:
        return None
    special = importlib.import_module(("cupyx.scipy" if module == "cupy" else module)
                                      + ".special")
    fn: Callable[[], Any] = inputs.case.scipy(special, inputs.arrays, inputs.dim)
    return fn
