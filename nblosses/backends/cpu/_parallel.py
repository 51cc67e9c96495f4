"""Numba threading-layer choice, a guard for layers that are not thread-safe, and the serial /
parallel twin of each kernel.

Numba's ``workqueue`` layer aborts the process when two Python threads launch parallel kernels
at once. We ask for a thread-safe layer first (OpenMP, then TBB); only if Numba ends up on
``workqueue`` are kernel calls serialised by a lock. The layer starts when this module is
imported (the CPU backend's first call), so that :func:`guarded` knows which it is and adds no
wrapper to the calls where none is needed.

Which OpenMP runtime, and how its threads wait
----------------------------------------------
Numba's ``omp`` layer links the system's GNU OpenMP, and its OpenMP threads wait *passively*
(``OMP_WAIT_POLICY=PASSIVE``, set here unless the environment says otherwise): GNU OpenMP's
default spins for a while after each parallel region, and on a machine whose cores are also
busy with other work, or with BLAS threads between our kernels, the spinning threads take the
cores the others need. Measured on a 2-core machine with another process running: softmax
4096x[1000] float32 7.2 ms spinning vs 1.5 ms passive; linear_cross_entropy 256x128x[4096]
1.5 s vs 0.016 s (OpenBLAS threads starved by the spin).

A process that imported torch first is different: torch loads its own ``libgomp.so.1``
globally (``RTLD_GLOBAL``), initialised at ``import torch``, and the dynamic linker binds
Numba's layer to it (``LD_DEBUG=bindings``: ``GOMP_parallel`` of ``omppool`` -> torch's
``libgomp``), whatever this module sets later. Numba and torch then share one OpenMP pool, with
torch's policy: its threads spin up to a few milliseconds after each region. We keep it that
way -- one pool, whose threads never compete with a second one, and whose spinning threads
start the next small kernel without a wake-up -- and code that alternates Numba passes with
OpenBLAS products runs its passes outside parallel regions (the linear cross-entropy:
:mod:`.linear_ce`), so that no spinning OpenMP thread sits on a core that OpenBLAS needs.

The two pools differ in what a parallel region costs, so the size from which a kernel runs
its parallel build (:data:`GRAIN`) follows the pool (:data:`POOL_SPINS`). Measured on a shared
2-core Zen 4, softmax rows, best of 60 interleaved samples, serial / parallel build: in
torch's spinning pool, 16x[1000] float32 7.1 / 6.9 us, float64 14.7 / 10.7 us, 32x[1000]
float32 13.6 / 8.5 us; in a passive pool of Numba's own, 32x[1000] float32 13.8 / 23 us,
64x[1000] 27 / 36 us (the worker's wake-up, some 10 us on a loaded machine, ~2 us on an idle
one).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import types
from collections.abc import Callable
from typing import Any, Protocol, cast

import numba


def _pool_will_spin() -> bool:
    """Whether the OpenMP pool Numba's ``omp`` layer is about to start on spins after each
    region: one the environment asks to be active, or one that another library (torch)
    already started with GNU OpenMP's default policy -- it is then visible in the process's
    global symbol scope, where the layer's ``GOMP_*`` references will bind."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy:
        return policy == "ACTIVE"
    try:
        return hasattr(ctypes.CDLL(None), "GOMP_parallel")
    except (OSError, TypeError):  # no global symbol lookup on this platform
        return False


_SPINS = _pool_will_spin()  # before the setdefault below, which only a new runtime reads
# Read by the OpenMP runtime when it starts: an explicit value wins. Too late for a runtime
# that another library started already (torch's: see the module docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Must be set before the first parallel kernel runs; an explicit NUMBA_THREADING_LAYER wins.
if numba.config.THREADING_LAYER == "default":  # type: ignore[attr-defined]
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]  # type: ignore[attr-defined]

_LOCK = threading.Lock()


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


_LAYER = threading_layer()
#: Whether concurrent calls from Python threads must be serialised (the ``workqueue`` layer).
NEEDS_LOCK = _LAYER == "workqueue"
#: Whether Numba's parallel regions run on an OpenMP pool whose threads spin between regions
#: (torch's, in a process that imported torch first): a region then starts without waking a
#: thread, and small kernels go parallel sooner (see the module docstring).
POOL_SPINS = _SPINS and _LAYER == "omp"


def guarded(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` itself on a thread-safe layer; on ``workqueue``, a wrapper that serialises
    its calls (a wrapper costs ~0.2 us per call, a tenth of a small softmax)."""
    if not NEEDS_LOCK:
        return kernel

    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return kernel(*args, **kwargs)

    return call


#: Below this many elements a kernel runs its serial build: starting a parallel region costs
#: more than the work. In a passive pool (Numba's own) a region waits for a thread to wake,
#: and the grain is torch's, 32768. In a spinning pool (torch's) the region starts at once:
#: most kernels compute an exp or a log per element (softmax, the losses), whose serial build
#: costs ~0.43 ns per float32 element and ~0.9 ns per float64 one (Zen 4, AVX-512), and a
#: parallel region pays for itself from about 16384 float32 / 8192 float64 elements (module
#: docstring).
GRAIN = 16384 if POOL_SPINS else 32768
#: The grain of kernels of a few multiply-adds per element (softmax's and sigmoid's
#: backwards). Spinning pool, same measurement: parallel from about 30000 float32 / 20000
#: float64 elements (softmax's backward rows float32 at 16x[1000] serial 2.9 / parallel 3.2
#: us, 32x[1000] 5.2 / 4.3 us; float64 20x[1000] 7.8 / 6.3 us; sigmoid's backward float32
#: 28000 elements 3.7 / 4.1 us, 32000 4.1 / 3.7 us).
LIGHT_GRAIN = 24576 if POOL_SPINS else 32768


class ParallelKernel(Protocol):
    """A kernel compiled twice from one Python function (:func:`parallel_kernel`): serially
    and with ``parallel=True``. Calls run the parallel build when the first argument has at
    least ``grain`` elements, else the serial one (``prange`` is a plain ``range`` there); both
    builds are attributes, for callers that choose themselves."""

    serial: Any
    parallel: Any
    grain: int

    def __call__(self, *args: Any) -> Any: ...


def parallel_kernel(grain: int = GRAIN,
                    **options: Any) -> Callable[[Callable[..., Any]], ParallelKernel]:
    """Decorator: ``@parallel_kernel(**jit_options)`` builds a :class:`ParallelKernel`;
    ``grain``: the first argument's size from which the parallel build runs."""

    def deco(py_func: Callable[..., Any]) -> ParallelKernel:
        serial_opts = {k: v for k, v in options.items() if k != "parallel"}
        parallel = numba.njit(**dict(serial_opts, parallel=True))(py_func)
        # Numba's on-disk cache keys entries by qualified name and bytecode, not by flags:
        # the serial build needs a copy of the function under a name of its own.
        twin = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__,
                                  py_func.__defaults__, py_func.__closure__)
        twin.__qualname__ = py_func.__qualname__ + "__serial"
        twin.__module__ = py_func.__module__
        serial = numba.njit(**serial_opts)(twin)

        # A closure, not an object with __call__: 0.08 us less per call (of ~2 for a small
        # softmax).
        @functools.wraps(py_func)
        def call(*args: Any) -> Any:
            return (parallel if args[0].size >= grain else serial)(*args)

        kernel = cast(ParallelKernel, call)
        kernel.serial, kernel.parallel, kernel.grain = serial, parallel, grain
        return kernel

    return deco
