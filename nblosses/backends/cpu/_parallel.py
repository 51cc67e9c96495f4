"""Numba threading-layer choice and a guard for layers that are not thread-safe.

Numba's ``workqueue`` layer aborts the process when two Python threads launch parallel kernels
at once. We ask for a thread-safe layer first (OpenMP, then TBB); only if Numba ends up on
``workqueue`` are kernel calls serialised by a lock.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import numba

# Must be set before the first parallel kernel runs; an explicit NUMBA_THREADING_LAYER wins.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_LOCK = threading.Lock()
_NEEDS_LOCK: list[bool | None] = [None]


def threading_layer() -> str:
    """The layer Numba uses (``"omp"``, ``"tbb"`` or ``"workqueue"``); starts it if needed."""
    try:
        return numba.threading_layer()
    except ValueError:  # not started yet: run a trivial parallel kernel to start it
        _warm()
        return numba.threading_layer()


@numba.njit(parallel=True, cache=True)
def _touch(a):
    for i in numba.prange(a.size):
        a[i] = i


def _warm() -> None:
    import numpy as np

    _touch(np.empty(2))


def guarded(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Serialise calls of ``kernel`` when the threading layer is not thread-safe."""

    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _NEEDS_LOCK[0] is None:
            with _LOCK:  # starting the layer must not race either
                if _NEEDS_LOCK[0] is None:
                    _NEEDS_LOCK[0] = threading_layer() == "workqueue"
        if _NEEDS_LOCK[0]:
            with _LOCK:
                return kernel(*args, **kwargs)
        return kernel(*args, **kwargs)

    return call
