"""Numba threading-layer choice and a guard for layers that are not thread-safe.

Numba's ``workqueue`` layer aborts the process when two Python threads launch parallel kernels
at once. We ask for a thread-safe layer first (OpenMP, then TBB); only if Numba ends up on
``workqueue`` are kernel calls serialised by a lock.

OpenMP's threads wait *passively* (``OMP_WAIT_POLICY=PASSIVE``, unless the environment says
otherwise): GNU OpenMP's default spins for a while after each parallel region, and on a machine
whose cores are also busy with other work, or with BLAS threads between our kernels (the
linear cross-entropy alternates OpenBLAS products and Numba passes), the spinning threads take
the cores the others need. Measured on a 2-core machine with another process running: softmax
4096x[1000] float32 7.2 ms spinning vs 1.5 ms passive; linear_cross_entropy 256x128x[4096]
1.5 s vs 0.016 s (OpenBLAS threads starved by the spin); (32, 1000) calls unchanged (13 us).
"""

from __future__ import annotations

import functools
import os
import threading
import types
from collections.abc import Callable
from typing import Any

import numba

# Read by the OpenMP runtime when it starts (the first parallel kernel): an explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
