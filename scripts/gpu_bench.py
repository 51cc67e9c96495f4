#!/usr/bin/env python
"""nblosses (backend "cuda") against torch on one GPU, for the project's anchor shapes.

Timing: CUDA events around each call on the default stream, 3 warm-up calls, median of
``--iters`` timed calls; every input is larger than the L2 cache. "% copy" = effective bytes /
time against a measured device-to-device copy (bytes read + written):
softmax reads and writes the array, cross-entropy forward reads the logits, forward+backward
ideally reads the logits once and writes the gradient once, BCE-with-logits reads input and
target.

Rows for nblosses:
- ``api``: the public functional call (argument checks included; cross_entropy with class
  indices syncs once per call in ``_args.check_targets`` to validate the targets);
- ``kernel``: the registered cuda kernel called with canonical arguments (no checks, no sync);
- ``in-place``: forward+backward with ``grad_buffer=`` the logits (no extra memory).
bfloat16 inputs reach nblosses through DLPack (``cupy.from_dlpack`` of a torch bfloat16 tensor,
CuPy >= 14.2 with ml_dtypes); where that fails the row runs float16 (same bytes) and says so.
``host`` rows: host time of one call queued behind ~100 ms of GPU work (``torch.cuda._sleep``):
about 0 when the call does not wait for the GPU.

Usage: python scripts/gpu_bench.py [--iters 15] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cupy
import torch
import torch.nn.functional as TF

from nblosses import _registry as R
from nblosses import functional as F

MB = 1 << 20


def time_cupy(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    ts = []
    for _ in range(iters):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(ts)


def time_torch(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end))
    return statistics.median(ts)


def _copy_ms(n: int, iters: int) -> float:
    """Median ms of an ``n``-byte device-to-device copy; the buffers are freed on return."""
    a = cupy.ones(n, cupy.uint8)
    b = cupy.empty_like(a)
    return time_cupy(lambda: b.data.copy_from_device_async(a.data, n), iters)


def copy_bandwidth(iters: int) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    n = 1 << 30
    ms = _copy_ms(n, iters)
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * n / (ms * 1e-3)


TORCH_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def nbl_array(shape, dt):
    """A standard-normal CuPy array of ``dt`` and the dtype label nblosses really runs."""
    xt = torch.randn(shape, device="cuda", dtype=TORCH_DT[dt])
    try:
        return cupy.from_dlpack(xt), dt
    except Exception:  # no bfloat16 in this CuPy: same bytes in float16
        return cupy.asarray(xt.float().cpu().numpy()).astype(cupy.float16), "fp16"


def cases(quick: bool):
    sm = [((65536, 1024), "fp32"), ((8192, 32768), "fp32"), ((1024, 262144), "fp32"),
          ((4194304, 16), "fp32"), ((65536, 1024), "bf16"), ((8192, 32768), "bf16"),
          ((4194304, 16), "bf16")]
    ce = [("fwd", (8192, 32000), "fp32", 0.0), ("fwd+bwd", (8192, 32000), "fp32", 0.0),
          ("fwd+bwd", (8192, 32000), "fp32", 0.1), ("fwd", (4096, 128256), "bf16", 0.0),
          ("fwd+bwd", (4096, 128256), "bf16", 0.0), ("fwd+bwd", (65536, 1000), "fp32", 0.0)]
    if quick:
        sm, ce = sm[:1] + sm[4:5], ce[:2]
    return sm, ce


def row(label, shape, dt, nbl_dt, ms_torch, ms_nbl, nbytes, bw, extra=""):
    def pct(ms):
        return f"{100 * nbytes / (ms * 1e-3) / bw:5.1f}" if ms == ms else "  n/a"

    def fmt(ms):
        return f"{ms:8.3f}" if ms == ms else "     n/a"

    speed = f"{ms_torch / ms_nbl:5.2f}x" if ms_nbl == ms_nbl and ms_torch == ms_torch else "   n/a"
    print(f"| {label:34s} | {'x'.join(map(str, shape)):14s} | {dt:4s} | {nbl_dt:4s} | "
          f"{fmt(ms_torch)} | {pct(ms_torch)} | {fmt(ms_nbl)} | {pct(ms_nbl)} | {speed} |{extra}")


def safe(fn):
    try:
        return fn()
    except Exception as exc:  # keep the table going; report the failure
        print(f"    ! {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return float("nan")


# The bench_* functions time torch and nblosses in separate helpers: each helper's arrays are
# freed when it returns, before the next one allocates (and before ``_free`` empties the pools).
def _torch_softmax_ms(shape, dt, iters):
    xt = torch.randn(shape, device="cuda", dtype=TORCH_DT[dt])
    return safe(lambda: time_torch(lambda: torch.softmax(xt, dim=1), iters))


def _nbl_softmax(shape, dt, iters, bw, t_ms):
    xc, ndt = nbl_array(shape, dt)
    n_ms = safe(lambda: time_cupy(lambda: F.softmax(xc, dim=1), iters))
    nbytes = 2 * xc.nbytes
    row("softmax", shape, dt, ndt, t_ms, n_ms, nbytes, bw)


def bench_softmax(shape, dt, iters, bw):
    _nbl_softmax(shape, dt, iters, bw, _torch_softmax_ms(shape, dt, iters))
    _free()


def _torch_ce_ms(kind, shape, dt, ls, iters):
    n, c = shape
    xt = torch.randn(shape, device="cuda", dtype=TORCH_DT[dt])
    tt = torch.randint(0, c, (n,), device="cuda")
    if kind == "fwd":
        return safe(lambda: time_torch(lambda: TF.cross_entropy(xt, tt, label_smoothing=ls),
                                       iters))
    xr = xt.clone().requires_grad_()

    def step():
        xr.grad = None
        TF.cross_entropy(xr, tt, label_smoothing=ls).backward()

    return safe(lambda: time_torch(step, iters))


def bench_ce(kind, shape, dt, ls, iters, bw):
    t_ms = _torch_ce_ms(kind, shape, dt, ls, iters)
    torch.cuda.empty_cache()
    _nbl_ce(kind, shape, dt, ls, iters, bw, t_ms)
    _free()


def _nbl_ce(kind, shape, dt, ls, iters, bw, t_ms):
    n, c = shape
    xc, ndt = nbl_array(shape, dt)
    tc = cupy.random.randint(0, c, (n,)).astype(cupy.int64)
    want = kind != "fwd"
    nbytes = xc.nbytes * (2 if want else 1)
    label = f"cross_entropy {kind}" + (f" ls={ls}" if ls else "")
    api = safe(lambda: time_cupy(lambda: F.cross_entropy(xc, tc, label_smoothing=ls,
                                                         return_grad=want), iters))
    row(label + " (api)", shape, dt, ndt, t_ms, api, nbytes, bw)
    kern = R.load("cuda").kernel("cross_entropy")
    x3, t2 = xc.reshape(n, c, 1), tc.reshape(n, 1)
    base = dict(ignore_index=-100, label_smoothing=ls, reduction="mean", want_grad=want,
                grad_output=1.0 if want else None, grad_buffer=None)
    k_ms = safe(lambda: time_cupy(lambda: kern(x3, t2, None, **base), iters))
    row(label + " (kernel)", shape, dt, ndt, t_ms, k_ms, nbytes, bw)
    if want and not ls:  # the EXT instantiation: z-loss, softcap and lse_out fused
        lse = cupy.empty((n, 1), xc.dtype)
        e_ms = safe(lambda: time_cupy(lambda: kern(x3, t2, None, z_loss=1e-4, softcap=30.0,
                                                   lse_out=lse, **base), iters))
        row(label + " z+cap+lse (kernel)", shape, dt, ndt, t_ms, e_ms, nbytes, bw)
        del lse
    if want:
        xi = xc.copy()  # overwritten by its gradient at every call: same work, no extra memory
        i_ms = safe(lambda: time_cupy(lambda: F.cross_entropy(xi, tc, label_smoothing=ls,
                                                              return_grad=True, grad_buffer=xi),
                                      iters))
        row(label + " (in-place)", shape, dt, ndt, t_ms, i_ms, nbytes, bw)
        del xi


def _torch_bce_logits_ms(shape, iters):
    xt = torch.randn(shape, device="cuda")
    yt = torch.rand(shape, device="cuda")
    return safe(lambda: time_torch(lambda: TF.binary_cross_entropy_with_logits(xt, yt), iters))


def _nbl_bce_logits(shape, iters, bw, t_ms):
    xc = cupy.random.standard_normal(shape, dtype=cupy.float32)
    yc = cupy.random.random(shape, dtype=cupy.float32)
    n_ms = safe(lambda: time_cupy(lambda: F.binary_cross_entropy_with_logits(xc, yc), iters))
    row("bce_with_logits fwd (api)", shape, "fp32", "fp32", t_ms, n_ms, 2 * xc.nbytes, bw)


def bench_bce_logits(shape, iters, bw):
    t_ms = _torch_bce_logits_ms(shape, iters)
    torch.cuda.empty_cache()
    _nbl_bce_logits(shape, iters, bw, t_ms)
    _free()


def host_behind_queue():
    """Host ms of one call queued behind ~100 ms of GPU work (0-ish: asynchronous)."""
    x = cupy.random.standard_normal((32, 1000), dtype=cupy.float32)
    t = cupy.random.randint(0, 1000, (32,)).astype(cupy.int64)
    calls = {"softmax": lambda: F.softmax(x, dim=1),
             "cross_entropy": lambda: F.cross_entropy(x, t),
             "cross_entropy return_grad": lambda: F.cross_entropy(x, t, return_grad=True),
             "cross_entropy kernel": lambda: R.load("cuda").kernel("cross_entropy")(
                 x.reshape(32, 1000, 1), t.reshape(32, 1), None, ignore_index=-100,
                 label_smoothing=0.0, reduction="mean", want_grad=False, grad_output=None,
                 grad_buffer=None)}
    stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)
    for name, fn in calls.items():
        fn()
        cupy.cuda.Device().synchronize()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)  # ~100 ms at ~2 GHz
        t0 = time.perf_counter()
        safe(fn)
        host = (time.perf_counter() - t0) * 1e3
        cupy.cuda.Device().synchronize()
        print(f"host ms of {name} behind ~100 ms of queued GPU work: {host:.2f}")


def _free():
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


FIRST_CALL = r"""
import time, cupy
t0 = time.perf_counter()
from nblosses import functional as F
x = cupy.random.standard_normal((1024, 1000), dtype=cupy.float32)
t1 = time.perf_counter()
F.softmax(x, dim=1); cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
F.softmax(x, dim=1); cupy.cuda.Device().synchronize()
t3 = time.perf_counter()
print(f"{t2 - t1:.3f} {t3 - t2:.4f}")
"""


def first_call():
    """First softmax call in a fresh process: empty kernel cache (NVRTC), then warm disk cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        out = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True,
                               text=True, timeout=120)
            out.append(r.stdout.split() if r.returncode == 0 else ["nan", r.stderr[-200:]])
    print(f"first softmax call (fp32 1024x1000) in a new process: cold cache {out[0][0]} s, "
          f"warm disk cache {out[1][0]} s; second call {out[1][1]} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="two softmax and two CE rows only")
    args = ap.parse_args()
    t0 = time.time()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bw = copy_bandwidth(args.iters)
    print(f"card: {name}; torch {torch.__version__}, cupy {cupy.__version__}; "
          f"device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    print(f"| {'op':34s} | {'shape':14s} | {'dt':4s} | {'nbl':4s} | torch ms | %copy | "
          f"  nbl ms | %copy | speed  |")
    print("|" + "|".join("-" * w for w in (36, 16, 6, 6, 10, 7, 10, 7, 8)) + "|")
    sm, ce = cases(args.quick)
    for shape, dt in sm:
        bench_softmax(shape, dt, args.iters, bw)
    for kind, shape, dt, ls in ce:
        bench_ce(kind, shape, dt, ls, args.iters, bw)
    if not args.quick:
        bench_bce_logits((8192, 32768), args.iters, bw)
    safe(host_behind_queue)
    try:
        first_call()
    except Exception as exc:
        print(f"first-call measurement failed: {exc}")
    print(f"benchmark wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
