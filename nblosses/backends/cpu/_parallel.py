"""Numba threading-layer choice and a guard for layers that are not thread-safe.

Numba's ``workqueue`` layer aborts the process when two Python threads launch parallel kernels
at once. We ask for a thread-safe layer first (OpenMP, then TBB); only if Numba ends up on
``workqueue`` are kernel calls serialised by a lock.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import numba

# Must be set before the first parallel kernel runs; an explicit NUMBA_THREADING_LAYER wins.
if numba.config.THREADING_LAYER == "default":  # type: ignore[attr-defined]
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]  # type: ignore[attr-defined]

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


#: Below this many elements a kernel runs its serial build: waking the thread pool costs more
#: than the work (torch uses the same grain, 32768).
GRAIN = 32768


class ParallelKernel:
    """A kernel compiled twice from one Python function: serially and with ``parallel=True``.

    Calls run the parallel build when the first argument has at least ``grain`` elements,
    else the serial one (``prange`` is a plain ``range`` there).
    """

    def __init__(self, py_func: Callable[..., Any], options: dict[str, Any],
                 grain: int = GRAIN) -> None:
        self.grain = grain
        serial_opts = {k: v for k, v in options.items() if k != "parallel"}
        self.parallel = numba.njit(**dict(serial_opts, parallel=True))(py_func)
        # Numba's on-disk cache keys entries by qualified name and bytecode, not by flags:
        # the serial build needs a copy of the function under a name of its own.
        twin = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__,
                                  py_func.__defaults__, py_func.__closure__)
        twin.__qualname__ = py_func.__qualname__ + "__serial"
        twin.__module__ = py_func.__module__
        self.serial = numba.njit(**serial_opts)(twin)
        functools.update_wrapper(self, py_func)

    def __call__(self, *args: Any) -> Any:
        build = self.parallel if args[0].size >= self.grain else self.serial
        return build(*args)


def parallel_kernel(grain: int = GRAIN,
                    **options: Any) -> Callable[[Callable[..., Any]], ParallelKernel]:
    """Decorator: ``@parallel_kernel(**jit_options)`` builds a :class:`ParallelKernel`;
    ``grain``: the first argument's size from which the parallel build runs."""

    def deco(py_func: Callable[..., Any]) -> ParallelKernel:
        return ParallelKernel(py_func, options, grain)

    return deco
