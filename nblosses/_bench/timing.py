"""Timers with device synchronisation, and the machine's copy bandwidth.

Timing rules (shared by every number ``nblosses bench`` prints):

- warm-up calls first (JIT compilation, thread-pool start, NVRTC), never timed;
- one *sample* runs the function ``number`` times back to back (``number`` chosen so a sample
  lasts at least ``min_sample`` seconds) between two ``time.perf_counter()`` reads; on a
  device the stream is synchronised before the first read and inside the timed region, after
  the last call;
- several functions measured together (ours and each peer) are sampled *round-robin*, in an
  order that alternates between rounds, so slow drifts of a shared machine hit all of them
  alike and their ratios stay meaningful;
- the result is the median over ``repeat`` samples (also kept: min, quartiles, all samples);
  the copy bandwidth takes the best (least disturbed) sample;
- the garbage collector is off while sampling.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BackendUnusable", "Timing", "backend_namespace", "copy_bandwidth", "measure"]

Sync = Callable[[], None] | None


@dataclass
class Timing:
    """Seconds per call."""

    median: float
    min: float
    q1: float
    q3: float
    number: int
    repeat: int
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BackendUnusable(RuntimeError):
    """The requested backend cannot run on this machine."""


def backend_namespace(backend: str) -> tuple[Any, Sync]:
    """``(array module, sync)`` for a backend name (raises :class:`BackendUnusable`)."""
    import nblosses

    if backend not in nblosses.available_backends():
        raise BackendUnusable(f"backend {backend!r} is not available here (available: "
                              f"{', '.join(nblosses.available_backends()) or 'none'}; see "
                              "`nblosses info`)")
    if backend == "cpu":
        import numpy as np

        return np, None
    import cupy

    return cupy, lambda: cupy.cuda.get_current_stream().synchronize()


def _sample(fn: Callable[[], Any], sync: Sync, number: int) -> float:
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) / number


def measure(fns: dict[str, tuple[Callable[[], Any], Sync]], *, repeat: int = 7,
            warmup: int = 1, min_sample: float = 0.02, budget: float = 4.0) -> dict[str, Timing]:
    """Median seconds per call of each function, sampled round-robin.

    Parameters
    ----------
    fns : dict
        ``name -> (fn, sync)``; ``sync`` (or ``None``) synchronises the device.
    repeat : int
        Samples per function (reduced, but never below 3, when ``budget`` would be exceeded).
    warmup : int
        Untimed calls per function before sampling (plus one to size the samples).
    min_sample : float
        Seconds a sample should last at least: fast functions run several times per sample.
    budget : float
        Rough limit, in seconds, for all samples of all functions together.
    """
    if not fns:
        return {}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        numbers: dict[str, int] = {}
        per_round = 0.0
        for name, (fn, sync) in fns.items():
            for _ in range(warmup):
                fn()
            est = _sample(fn, sync, 1)
            numbers[name] = max(1, min(10_000, math.ceil(min_sample / max(est, 1e-9))))
            per_round += est * numbers[name]
        rounds = repeat
        if per_round * repeat > budget:
            rounds = max(min(3, repeat), int(budget / max(per_round, 1e-9)))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                fn, sync = fns[name]
                samples[name].append(_sample(fn, sync, numbers[name]))
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[name] = Timing(statistics.median(s), min(s), q[0], q[2], numbers[name], len(s), s)
    return out


def _parallel_copy() -> Callable[[Any, Any], None]:
    """A Numba ``prange`` copy: the copy bandwidth with as many threads as the kernels use."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def copy(dst, src):  # pragma: no cover - compiled
        for i in numba.prange(src.size):
            dst[i] = src[i]

    return copy


def _best_gbps(fn: Callable[[], Any], sync: Sync, nbytes: int, repeat: int) -> float:
    t = measure({"copy": (fn, sync)}, repeat=repeat, warmup=1, min_sample=0.0, budget=10.0)
    return nbytes / t["copy"].min / 1e9


def copy_bandwidth(backend: str = "cpu", nbytes: int = 128 << 20,
                   repeat: int = 5) -> dict[str, Any]:
    """GB/s of a large array copy, bytes read + written, best of ``repeat`` samples.

    On the CPU, two copies of the same ``nbytes`` float64 array: ``np.copyto`` (one thread)
    and a Numba ``prange`` loop (``numba.get_num_threads()`` threads). ``gbps``, the
    reference for "% of copy bandwidth", is the faster of the two, so a parallel kernel is
    not compared with a one-thread copy. ``fresh_gbps``: ``src.copy()``, a new destination
    each time. On CUDA: ``cupy.copyto``.
    """
    xp, sync = backend_namespace(backend)
    n = max(1, nbytes // 8)
    src = xp.ones(n, dtype="float64")
    dst = xp.zeros_like(src)
    moved = 2 * src.nbytes
    out: dict[str, Any] = {"bytes": int(src.nbytes), "repeat": repeat}
    out["copyto_gbps"] = _best_gbps(lambda: xp.copyto(dst, src), sync, moved, repeat)
    out["copyto_threads"] = 1 if backend == "cpu" else None
    out["gbps"], out["threads"] = out["copyto_gbps"], out["copyto_threads"]
    if backend == "cpu":
        import numba

        copy = _parallel_copy()
        out["parallel_gbps"] = _best_gbps(lambda: copy(dst, src), None, moved, repeat)
        out["parallel_threads"] = numba.get_num_threads()
        if out["parallel_gbps"] > out["gbps"]:
            out["gbps"], out["threads"] = out["parallel_gbps"], out["parallel_threads"]
        # What a call that returns a new array can reach: the copy's destination is fresh
        # memory each time (page faults, pages zeroed by the OS). Information, not the
        # reference.
        out["fresh_gbps"] = _best_gbps(lambda: src.copy(), None, moved, repeat)
    return out
