#!/usr/bin/env python
"""nblosses (backend "cuda") against torch on one GPU, for the benchmark cases of the op specs.

The cases are those of ``nblosses bench`` (``nblosses/_bench/cases.py``, which reads each op
spec's ``bench`` entries): a new op's cases appear here without an edit. Each runs on the
GPU-sized shapes of its layout (:data:`GPU_SHAPES`, every input larger than an H100's or
H200's L2 cache; the LM heads on their own ``NxDx[V]`` shapes), in float32 and bfloat16.

Timing: CUDA events around each call on the default stream, 3 warm-up calls, median of
``--iters`` timed calls. "% copy" = the case's ideal bytes moved (what ``nblosses bench``
counts: every input read once, plus the output it writes) / time, against a measured
device-to-device copy (bytes read + written). "check" compares nblosses' result with torch's
(the tolerance of ``targets.json``; bfloat16 takes float16's).

bfloat16 inputs reach nblosses through DLPack (``cupy.from_dlpack`` of a torch bfloat16 tensor,
CuPy >= 14.2 with ml_dtypes); where that fails the row runs float16 (same bytes) and says so in
its ``ran`` column. ``host`` lines: host time of one call queued behind ~100 ms of GPU work
(``torch.cuda._sleep``): about 0 when the call does not wait for the GPU. Last, the first call
of the first case in a fresh process, cold and warm compile cache.

Usage: python scripts/gpu_bench.py [--iters 15] [--quick] [--ops all] [--dtype float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from nblosses._bench import cases as C
from nblosses._bench import config as K
from nblosses._bench import firstcall
from nblosses._bench import peers as P
from nblosses._bench.runner import compare

#: The shapes of every layout but the LM heads' (those take their cases' own shapes): rows of
#: a vocabulary and short rows, each larger than the L2 cache in every dtype timed here. Two,
#: so that every case in two dtypes fits the few minutes of a GPU check.
GPU_SHAPES = ("4096x[32000]", "4194304x[16]")
#: Where the host-side cost of a call is measured (small: the GPU work is not the point).
HOST_SHAPE = "32x[1000]"
DTYPES = ("float32", "bfloat16")


def plan(ops: str | None, quick: bool, dtypes: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Every ``(case, shape label, dtype)`` to time, in table order."""
    rows = []
    for dtype in dtypes:
        for name in C.parse_cases(ops):
            own = C.own_shapes(name, quick)
            shapes = [s.label for s in own] or list(GPU_SHAPES[:1] if quick else GPU_SHAPES)
            rows += [(name, shape, dtype) for shape in shapes]
    return rows


def host_shape(name: str) -> str:
    """The shape of a case's host-cost call: small, or its smallest own shape."""
    own = C.own_shapes(name, quick=True)
    return own[0].label if own else HOST_SHAPE


# ----------------------------------------------------------------------------- device
def cuda_events_ms(fn: Callable[[], Any], iters: int, events: Any,
                   sync: Callable[[], Any]) -> float:
    """Median ms of ``fn`` between two CUDA events (``events()`` makes a start/end pair)."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start, end, elapsed = events()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return statistics.median(times)


def cupy_timer(iters: int) -> Callable[[Callable[[], Any]], float]:
    import cupy

    def events() -> tuple[Any, Any, Any]:
        return cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.get_elapsed_time

    sync = cupy.cuda.get_current_stream().synchronize
    return lambda fn: cuda_events_ms(fn, iters, events, sync)


def torch_timer(iters: int) -> Callable[[Callable[[], Any]], float]:
    import torch

    def events() -> tuple[Any, Any, Any]:
        return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                lambda start, end: start.elapsed_time(end))

    return lambda fn: cuda_events_ms(fn, iters, events, torch.cuda.synchronize)


def _copy_ms(n: int, iters: int) -> float:
    """Median ms of an ``n``-byte device-to-device copy; the buffers are freed on return."""
    import cupy

    a = cupy.ones(n, cupy.uint8)
    b = cupy.empty_like(a)
    return cupy_timer(iters)(lambda: b.data.copy_from_device_async(a.data, n))


def copy_bandwidth(iters: int) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    n = 1 << 30
    ms = _copy_ms(n, iters)
    free()
    return 2 * n / (ms * 1e-3)


def device_inputs(name: str, shape: str, dtype: str) -> tuple[C.Inputs, str]:
    """The case's inputs on the GPU, and the dtype they really have. bfloat16: the float16
    inputs (same bytes, so the same bytes moved) converted through torch and DLPack."""
    import cupy
    import torch

    inputs = C.make_inputs(name, shape, "float16" if dtype == "bfloat16" else dtype)
    inputs = inputs.to(cupy)
    if dtype != "bfloat16":
        return inputs, dtype
    try:
        inputs.arrays = {k: cupy.from_dlpack(torch.from_dlpack(a).to(torch.bfloat16))
                         if a.dtype == cupy.float16 else a for k, a in inputs.arrays.items()}
        return inputs, dtype
    except Exception:  # no bfloat16 in this CuPy: the float16 arrays (same bytes) instead
        return inputs, "float16"


def safe(fn: Callable[[], Any]) -> Any:
    """``fn()``, or NaN after printing why it failed (the table goes on)."""
    try:
        return fn()
    except Exception as exc:  # keep the table going; report the failure
        print(f"    ! {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return float("nan")


def free() -> None:
    import cupy
    import torch

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


HEADER = ("| case | shape | dtype | ran | torch ms | % copy | nblosses ms | % copy | speed | "
          "check |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")


def _cell(ms: float, fmt: str) -> str:
    return fmt.format(ms) if ms == ms else "n/a"  # NaN: the call failed


def _measure(name: str, shape: str, dtype: str, iters: int,
             tolerance: dict[str, float]) -> tuple[str, int, float, float, str]:
    """``(dtype run, bytes moved, torch ms, nblosses ms, check)`` of one case; its device
    arrays are freed on return."""
    inputs, ran = device_inputs(name, shape, dtype)
    ours = C.nblosses_callable(inputs, "cuda")
    theirs = P.peer_callable("torch", inputs, "cuda")
    t_ms = safe(lambda: torch_timer(iters)(theirs)) if theirs else float("nan")
    n_ms = safe(lambda: cupy_timer(iters)(ours))
    check = "-"
    if theirs is not None and n_ms == n_ms and t_ms == t_ms:
        err = compare(ours(), theirs())
        check = "ok" if err <= tolerance.get(ran, tolerance["float16"]) else f"MISMATCH {err:.1e}"
    return ran, inputs.nbytes_moved, t_ms, n_ms, check


def bench_row(name: str, shape: str, dtype: str, iters: int, bw: float,
              tolerance: dict[str, float]) -> str:
    """One table row: torch and nblosses on the same device arrays, and a result check."""
    try:
        ran, moved, t_ms, n_ms, check = _measure(name, shape, dtype, iters, tolerance)
    except Exception as exc:  # e.g. out of memory: the row says so, the table goes on
        return (f"| {name} | {shape} | {dtype} | ERROR | | | | | | "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]} |")
    finally:
        free()

    def pct(ms: float) -> str:
        return "n/a" if ms != ms else f"{100 * moved / (ms * 1e-3) / bw:.0f}"

    speed = f"{t_ms / n_ms:.2f}x" if n_ms == n_ms and t_ms == t_ms else "n/a"
    return (f"| {name} | {shape} | {dtype} | {ran} | {_cell(t_ms, '{:.3f}')} | {pct(t_ms)} | "
            f"{_cell(n_ms, '{:.3f}')} | {pct(n_ms)} | {speed} | {check} |")


def host_behind_queue(names: list[str]) -> None:
    """Host ms of one call of each case queued behind ~100 ms of GPU work (0-ish: the call
    does not wait for the GPU)."""
    import cupy
    import torch

    stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)
    for name in names:
        shape = host_shape(name)
        fn = C.nblosses_callable(device_inputs(name, shape, "float32")[0], "cuda")
        fn()
        cupy.cuda.Device().synchronize()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)  # ~100 ms at ~2 GHz
        t0 = time.perf_counter()
        safe(fn)
        host = (time.perf_counter() - t0) * 1e3
        cupy.cuda.Device().synchronize()
        print(f"host ms of {name} {shape} behind ~100 ms of queued GPU work: {host:.2f}")


def first_call(name: str) -> None:
    """The case's first call in a fresh process: empty kernel cache (NVRTC), then warm."""
    shape = host_shape(name)
    r = firstcall.first_call(name, shape=shape, backend="cuda", timeout=300)
    print(f"first {name} call ({shape} float32) in a new process: cold cache "
          f"{r['cold']['first_call_s']:.3f} s, warm disk cache {r['warm']['first_call_s']:.3f} "
          f"s; second call {r['warm']['second_call_s']:.4f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--quick", action="store_true",
                    help="one shape per case (the LM heads: their quick shape)")
    ap.add_argument("--ops", default=None,
                    help="cases and groups as in nblosses bench --ops (default: all, the slow "
                         "cases excepted)")
    ap.add_argument("--dtype", default=",".join(DTYPES), help="comma list (float32,bfloat16)")
    ap.add_argument("--plan", action="store_true", help="list the rows and stop (no GPU)")
    args = ap.parse_args(argv)
    rows = plan(args.ops, args.quick, tuple(d.strip() for d in args.dtype.split(",")))
    if args.plan:
        print("\n".join(" ".join(row) for row in rows))
        return
    import cupy
    import torch

    t0 = time.time()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bw = copy_bandwidth(args.iters)
    print(f"card: {card}; torch {torch.__version__}, cupy {cupy.__version__}; "
          f"device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    print(HEADER)
    tolerance = K.load()["tolerance"]
    for name, shape, dtype in rows:
        print(bench_row(name, shape, dtype, args.iters, bw, tolerance))
    names = list(dict.fromkeys(name for name, _, _ in rows))
    safe(lambda: host_behind_queue(names))
    safe(lambda: first_call(names[0]))
    print(f"benchmark wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
