"""Concurrent calls from Python threads: 8 threads call softmax and the fused cross-entropy
(with gradient) at once, on different inputs, and every result is right. The same load runs
again in a subprocess forced onto Numba's ``workqueue`` threading layer, which aborts the
process on concurrent parallel launches unless nblosses guards them.

Thread pools that cooperate: the linear cross-entropy (OpenBLAS products between Numba passes)
runs as fast in a process that imported torch first, where Numba shares torch's spinning
OpenMP pool (see ``nblosses.backends.cpu._parallel``), as in a torch-free one.

Run directly (``python tests/test_threads.py``) this file is the subprocesses' worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

N_THREADS = 8
ROUNDS = 15


def _reference(x, t):
    """float64 softmax, mean cross-entropy and its gradient, in NumPy."""
    x64 = x.astype(np.float64)
    m = x64.max(axis=1, keepdims=True)
    e = np.exp(x64 - m)
    p = e / e.sum(axis=1, keepdims=True)
    lse = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]
    n = x.shape[0]
    loss = np.mean(lse - x64[np.arange(n), t])
    grad = p.copy()
    grad[np.arange(n), t] -= 1
    return p, loss, grad / n


def run_concurrently(n_threads: int = N_THREADS, rounds: int = ROUNDS) -> list[str]:
    """Run the load; return a list of failure descriptions (empty when all is well)."""
    from nblosses import functional as F

    r = np.random.default_rng(0)
    cases = []
    for i in range(n_threads):
        n, c = 32 + 8 * i, 500 + 37 * i
        x = (r.standard_normal((n, c)) * 3).astype(np.float32)
        t = r.integers(0, c, n)
        cases.append((x, t, *_reference(x, t)))
    barrier = threading.Barrier(n_threads, timeout=120)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(i):
        x, t, p_ref, loss_ref, grad_ref = cases[i]
        try:
            barrier.wait()
            for k in range(rounds):
                p = F.softmax(x, dim=1)
                loss, grad = F.cross_entropy(x, t, return_grad=True)
                bad = []
                if not np.allclose(p, p_ref, rtol=1e-4, atol=1e-6):
                    bad.append("softmax")
                if not np.allclose(loss, loss_ref, rtol=1e-4, atol=1e-6):
                    bad.append(f"loss {float(loss)} != {loss_ref}")
                if not np.allclose(grad, grad_ref, rtol=1e-3, atol=1e-6):
                    bad.append("grad")
                if bad:
                    with lock:
                        failures.append(f"thread {i} round {k}: {', '.join(bad)}")
                    return
        except Exception as exc:
            with lock:
                failures.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    failures += [f"thread {i} did not finish" for i, th in enumerate(threads) if th.is_alive()]
    return failures


def test_threads_get_correct_results():
    failures = run_concurrently()
    assert not failures, "\n".join(failures)


#: The LM head of the thread-pool test: products small enough that a pool spinning after each
#: Numba pass (milliseconds of a core OpenBLAS needs) stalls every one of them.
LM_SHAPE = (256, 128, 4096)
LM_CALLS = 20
#: Bound on (torch imported first) / (torch-free), the fastest of LM_CALLS calls in each
#: process. Generous, to catch only the spinning pathology on a shared machine: measured on a
#: loaded 2-core Zen 4, 1.0-1.8 with the passes outside parallel regions, 30-50 when they
#: ran parallel on torch's pool (1.45-1.6 s against 28-48 ms).
LM_RATIO = 4.0


def lm_head_seconds(torch_first: bool) -> float:
    """The fastest of :data:`LM_CALLS` fwd+grad calls of ``linear_cross_entropy`` at
    :data:`LM_SHAPE`, in this process, importing torch before nblosses when asked."""
    if torch_first:
        import torch  # noqa: F401  (its OpenMP runtime loads first, globally)
    import time

    from nblosses import functional as F

    n, d, v = LM_SHAPE
    r = np.random.default_rng(0)
    x = r.standard_normal((n, d), dtype=np.float32)
    w = r.standard_normal((v, d), dtype=np.float32) / np.float32(np.sqrt(d))
    t = r.integers(0, v, n)
    F.linear_cross_entropy(x, w, t, return_grad=True)  # compiled or loaded from the cache
    best = float("inf")
    for _ in range(LM_CALLS):
        start = time.perf_counter()
        F.linear_cross_entropy(x, w, t, return_grad=True)
        best = min(best, time.perf_counter() - start)
    return best


def test_lm_head_after_torch_is_as_fast_as_without():
    pytest.importorskip("torch")
    # As a fresh process starts: nblosses, imported here, put OMP_WAIT_POLICY=PASSIVE into
    # this process's environment, which torch's OpenMP runtime would read at its start.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    seconds = {}
    for mode in ("torch-free", "torch-first"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "lm-head", mode],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{mode}: {proc.stderr[-3000:]}"
        seconds[mode] = float(proc.stdout.split()[-1])
    ratio = seconds["torch-first"] / seconds["torch-free"]
    assert ratio <= LM_RATIO, f"{seconds}: torch first is {ratio:.1f}x slower"


def test_threads_under_workqueue_layer():
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (
        f"exit status {proc.returncode} (negative: killed by a signal)\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert "layer=workqueue" in proc.stdout, proc.stdout
    assert "OK" in proc.stdout, proc.stdout


if __name__ == "__main__":
    if sys.argv[1:2] == ["lm-head"]:
        print(lm_head_seconds(sys.argv[2] == "torch-first"))
        sys.exit(0)
    import numba

    fails = run_concurrently()
    print(f"layer={numba.threading_layer()}")
    if fails:
        print("\n".join(fails))
        sys.exit(1)
    print("OK")
