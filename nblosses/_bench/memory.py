"""Extra peak memory of one call: how much memory a call needs beyond its inputs.

CPU, two measurements of the same call:

- ``rss``: the rise of the process's resident-set high-water mark during the call. Just
  before the call, glibc returns every free page to the OS (``malloc_trim(0)``) and the mark
  is reset (Linux ``/proc/self/clear_refs``); glibc is also told to serve allocations above
  128 KiB with their own mmap (``mallopt``). So every byte the call allocates, reused or not,
  must be faulted in and shows up. Sees every allocator: NumPy, Numba, torch. ``None`` where
  the OS does not allow it.
- ``traced``: the peak of :mod:`tracemalloc` during the call; sees NumPy's and Numba's
  allocations (both report to tracemalloc), not torch's.

CUDA: ``device``, the peak of bytes taken from CuPy's memory pool during the call (a
``cupy.cuda.MemoryHook``), or torch's ``max_memory_allocated`` for torch.

Both include the call's outputs (softmax's result, the gradient); ``out_bytes`` says how big
they were, so reports can show the extra memory beyond the outputs. The function is called
once untimed first, so one-off costs (compilation, thread stacks) are not counted. The CPU
measurements run with :data:`nblosses.output_cache` off, so that the outputs are new
allocations rather than blocks freed by earlier calls.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

__all__ = ["extra_peak", "nbytes_of"]

_MALLOC_FIXED = [False]
_LIBC: list[Any] = []


def nbytes_of(result: Any) -> int:
    """Total bytes of the arrays in a result (array, tensor, or tuple of them)."""
    if isinstance(result, (tuple, list)):
        return sum(nbytes_of(r) for r in result)
    n = getattr(result, "nbytes", None)
    if n is None and hasattr(result, "element_size"):  # torch tensors
        n = result.element_size() * result.nelement()
    return int(n or 0)


def _fix_malloc() -> None:
    """Serve allocations >= 128 KiB with mmap (fixed threshold): freed memory leaves the RSS."""
    if _MALLOC_FIXED[0] or not sys.platform.startswith("linux"):
        return
    _MALLOC_FIXED[0] = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also stops its dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _LIBC.append(libc)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """Give free heap pages back to the OS, so reusing them counts as new resident memory."""
    if _LIBC:
        _LIBC[0].malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak(fn: Callable[[], Any], warmed: bool) -> dict[str, Any]:
    # What the call itself needs: with the output cache on, the output would reuse a block
    # freed by an earlier call and not show up. (The public name, imported here: asv loads this
    # module from the working tree, outside the package.)
    from nblosses import output_cache

    previous_limit = output_cache.set_limit(0)
    try:
        return _cpu_peak_uncached(fn, warmed)
    finally:
        output_cache.set_limit(previous_limit)


def _cpu_peak_uncached(fn: Callable[[], Any], warmed: bool) -> dict[str, Any]:
    _fix_malloc()
    if not warmed:
        fn()  # one-off costs out of the way
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        base_traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        _trim()
        ok = _reset_hwm()
        rss0 = _status_kb("VmRSS") if ok else None
        out = fn()
        hwm = _status_kb("VmHWM") if ok else None
        traced = tracemalloc.get_traced_memory()[1] - base_traced
        out_bytes = nbytes_of(out)
        del out
    finally:
        if started:
            tracemalloc.stop()
    rss = (hwm - rss0) * 1024 if (hwm is not None and rss0 is not None) else None
    return {"rss": rss, "traced": int(traced), "out_bytes": out_bytes}


def _cupy_peak(fn: Callable[[], Any], sync: Callable[[], None] | None) -> dict[str, Any]:
    import cupy

    class PeakHook(cupy.cuda.MemoryHook):
        name = "nblosses_bench_peak"

        def __init__(self) -> None:
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            self.current += kw["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kw: Any) -> None:
            self.current -= kw["mem_size"]

    fn()
    if sync:
        sync()
    hook = PeakHook()
    with hook:
        out = fn()
        if sync:
            sync()
    return {"device": hook.peak, "out_bytes": nbytes_of(out)}


def _torch_cuda_peak(fn: Callable[[], Any]) -> dict[str, Any]:
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return {"device": torch.cuda.max_memory_allocated() - base, "out_bytes": nbytes_of(out)}


def extra_peak(fn: Callable[[], Any], *, backend: str = "cpu", peer: str | None = None,
               sync: Callable[[], None] | None = None, warmed: bool = False) -> dict[str, Any]:
    """Peak memory one call of ``fn`` adds (bytes), measured as the module docstring says.

    ``warmed``: the op already ran in this process (its one-off costs are paid), so the CPU
    measurement skips the untimed first call (for ops that take seconds per call).
    """
    if backend == "cpu":
        return _cpu_peak(fn, warmed)
    if peer == "torch":
        return _torch_cuda_peak(fn)
    return _cupy_peak(fn, sync)
