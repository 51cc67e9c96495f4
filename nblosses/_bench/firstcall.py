"""First-call latency in a fresh process, with a cold and a warm compilation cache.

Each measurement starts a new Python process (the same interpreter) that imports nblosses,
builds a small input, and times its first and second calls of one op. ``cold``: the process
gets an empty ``NUMBA_CACHE_DIR`` (and ``CUPY_CACHE_DIR``), so every kernel it needs is
compiled. ``warm``: a second process with the same directory, so kernels load from disk. The
worker loads :mod:`cases` from its file path and imports only NumPy and nblosses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FIRST_CALL_SHAPE", "first_call", "run_worker"]

#: Small: first-call latency is about compilation and loading, not arithmetic.
FIRST_CALL_SHAPE = "64x[1000]"

_WORKER = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np
import nblosses
from nblosses import functional
t1 = time.perf_counter()
import importlib.util, json
spec = importlib.util.spec_from_file_location("_nblosses_bench_cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cases
spec.loader.exec_module(cases)
op, shape, dtype, backend = sys.argv[2:6]
inputs = cases.make_inputs(op, shape, dtype)
sync = None
if backend == "cuda":
    import cupy
    inputs = inputs.to(cupy)
    sync = cupy.cuda.get_current_stream().synchronize
fn = cases.nblosses_callable(inputs, backend)
t2 = time.perf_counter()
fn()
if sync: sync()
t3 = time.perf_counter()
fn()
if sync: sync()
t4 = time.perf_counter()
print("NBLOSSES_FIRST_CALL " + json.dumps(
    {"import_s": t1 - t0, "first_call_s": t3 - t2, "second_call_s": t4 - t3}))
"""


def run_worker(op: str, cache_dir: str, *, shape: str = FIRST_CALL_SHAPE,
               dtype: str = "float32", backend: str = "cpu", timeout: float = 600,
               python: str | None = None) -> dict[str, Any]:
    """One fresh process with ``cache_dir`` as its compile cache; returns its timings."""
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = cache_dir
    env["CUPY_CACHE_DIR"] = os.path.join(cache_dir, "cupy")
    cases_path = str(Path(__file__).with_name("cases.py"))
    proc = subprocess.run(
        [python or sys.executable, "-c", _WORKER, cases_path, op, shape, dtype, backend],
        capture_output=True, text=True, env=env, cwd=cache_dir, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("NBLOSSES_FIRST_CALL "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"first-call worker for {op} failed (rc {proc.returncode}): "
                       + " | ".join(tail))


def first_call(op: str, *, shape: str = FIRST_CALL_SHAPE, dtype: str = "float32",
               backend: str = "cpu", timeout: float = 600) -> dict[str, Any]:
    """``{"cold": {...}, "warm": {...}}`` for ``op``: two fresh processes sharing a new cache."""
    cache_dir = tempfile.mkdtemp(prefix="nblosses-first-call-")
    try:
        cold = run_worker(op, cache_dir, shape=shape, dtype=dtype, backend=backend,
                          timeout=timeout)
        warm = run_worker(op, cache_dir, shape=shape, dtype=dtype, backend=backend,
                          timeout=timeout)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"op": op, "shape": shape, "dtype": dtype, "backend": backend, "cold": cold,
            "warm": warm}
