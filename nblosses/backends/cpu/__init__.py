"""The ``"cpu"`` backend: NumPy arrays, Numba kernels (``parallel=True``, cached on disk).

Imported on the first call that needs the backend (:meth:`nblosses.backends.CpuBackend.build`).
Kernels compile per dtype on first use and are cached (``cache=True``), so a new process loads
them from disk instead of recompiling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._registry import Backend, Runtime
from .. import collect_kernels
from . import (
    _parallel,  # noqa: F401  (chooses the threading layer before any kernel runs)
    class_losses,
)

KERNELS: dict[str, Callable[..., Any]] = collect_kernels(__name__)


def _to_host(array: Any, dtype: Any = None) -> np.ndarray:
    """``np.asarray``, but device arrays (CuPy's ``.get()``) are copied to the host first, so
    ``backend="cpu"`` accepts them ("inputs are moved if needed")."""
    if type(array) is np.ndarray and dtype is None:  # the common case, first
        return array
    if type(array).__module__.partition(".")[0] == "cupy":
        array = array.get()
    return np.asarray(array, dtype=dtype)


def runtime(backend: Backend) -> Runtime:
    """The CPU backend's runtime (kernels compile lazily, on first call per dtype)."""
    return Runtime(backend, xp=np, asarray=_to_host, kernels=KERNELS,
                   index_range=class_losses.index_range)
