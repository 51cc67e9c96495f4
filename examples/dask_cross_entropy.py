#!/usr/bin/env python
"""Mean cross-entropy (and its gradient) over float32 logits larger than memory, with dask.

The logits never exist as one array: every ``(chunk_rows, C / class_chunks)`` block is generated
on demand, deterministically from ``(seed, row block, class block)``, consumed, and dropped.
With ``--class-chunks > 1`` the vocabulary axis is split too (vocabulary-parallel cross-entropy:
per-chunk maxima and sums of exponentials merged exactly, no row ever gathered).

After the dask pass, the script recomputes the same loss chunk by chunk in float64 with plain
NumPy (an online log-sum-exp over the class blocks of each row block) and reports the agreement,
the time, the throughput and the peak resident memory of the dask pass.

Smoke test (0.25 GiB of logits, a few seconds)::

    python examples/dask_cross_entropy.py

The issue's run: 33.3 GiB of float32 logits (69632 rows x the 128256-token Llama-3 vocabulary)
on a 24 GiB machine::

    python examples/dask_cross_entropy.py --rows 69632 --classes 128256 \\
        --chunk-rows 1024 --class-chunks 4

Add ``--grad-dir DIR`` to also write the gradient, one ``.npy`` file per block
(``grad_<row block>_<class block>.npy`` plus ``layout.json``), and check its first row block
against the float64 reference (needs as much free disk as the logits take).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import dask
import dask.array as da

from nblosses import functional as F

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- data
def logits_block(seed: int, i: int, j: int, rows: int, cols: int, row0: int) -> np.ndarray:
    """Block ``(i, j)`` of the logits: uniform in [-6, 6) plus a per-row offset (up to +-40,
    so that the max subtraction matters), float32, the same on every call."""
    bits = np.random.SFC64(np.random.SeedSequence([seed, i, j]))  # the fastest NumPy generator
    x = np.random.Generator(bits).random((rows, cols), dtype=np.float32)
    x *= 12.0
    x += (((np.arange(row0, row0 + rows) % 9) - 4) * 10.0 - 6.0).astype(np.float32)[:, None]
    return x


def targets_block(seed: int, i: int, rows: int, n_classes: int, ignore_frac: float) -> np.ndarray:
    """Class indices of row block ``i``; a fraction ``ignore_frac`` is ``IGNORE_INDEX``."""
    rng = np.random.default_rng([seed, i, 1 << 30])
    t = rng.integers(0, n_classes, rows, dtype=np.int64)
    t[rng.random(rows) < ignore_frac] = IGNORE_INDEX
    return t


def _logits_task(seed, block_info=None):
    info = block_info[None]
    (r0, r1), (c0, c1) = info["array-location"]
    i, j = info["chunk-location"]
    return logits_block(seed, i, j, r1 - r0, c1 - c0, r0)


def _targets_task(seed, n_classes, ignore_frac, block_info=None):
    info = block_info[None]
    (r0, r1), = info["array-location"]
    return targets_block(seed, info["chunk-location"][0], r1 - r0, n_classes, ignore_frac)


def split(n: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(n, parts)
    return tuple(base + (k < extra) for k in range(parts))


def row_split(n: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, n - r) for r in range(0, n, size))


# ----------------------------------------------------------------------------- memory
class PeakRSS:
    """Samples the resident memory of this process and its children every ``interval`` s."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # fall back on ru_maxrss alone
            self._proc = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # exited meanwhile
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._thread.join()


def maxrss_bytes() -> int:
    """Peak RSS of this process so far (the kernel's high-water mark)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker_maxrss() -> int:
    return maxrss_bytes()


# ----------------------------------------------------------------------------- float64 reference
def reference(args, row_chunks, class_chunks, keep_rows_of=None):
    """Mean (smoothed) cross-entropy in float64, chunk by chunk with NumPy. Returns the loss,
    the mean denominator, and the per-row (max, log-sum-exp) of row block ``keep_rows_of``."""
    n_classes, eps = args.classes, args.label_smoothing
    row_starts = np.cumsum((0,) + row_chunks[:-1])

    def row_block(i):
        rows, r0 = row_chunks[i], int(row_starts[i])
        t = targets_block(args.seed, i, rows, n_classes, args.ignore_frac)
        valid = t != IGNORE_INDEX
        m = np.full(rows, -np.inf)
        s = np.zeros(rows)
        xt = np.zeros(rows)
        sx = np.zeros(rows)
        c0 = 0
        for j, cols in enumerate(class_chunks):
            x = logits_block(args.seed, i, j, rows, cols, r0).astype(np.float64)
            local = t - c0
            hit = valid & (local >= 0) & (local < cols)
            xt[hit] = x[np.nonzero(hit)[0], local[hit]]
            if eps:
                sx += x.sum(axis=1)
            mj = x.max(axis=1)
            new_m = np.maximum(m, mj)
            x -= new_m[:, None]
            np.exp(x, out=x)
            s = s * np.exp(m - new_m) + x.sum(axis=1)
            m = new_m
            c0 += cols
        lse = m + np.log(s)
        loss = (1 - eps) * (lse - xt) + eps / n_classes * (n_classes * lse - sx)
        kept = (lse, t) if i == keep_rows_of else None
        return float(loss[valid].sum()), int(valid.sum()), kept

    total, count, kept = 0.0, 0, None
    n_blocks, step, start = len(row_chunks), max(1, len(row_chunks) // 10), time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        for done, (part, n, k) in enumerate(pool.map(row_block, range(n_blocks)), 1):
            total += part
            count += n
            kept = k if k is not None else kept
            if args.progress and done % step == 0:
                print(f"  reference: {done}/{n_blocks} row blocks, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    return total / count, count, kept


# ----------------------------------------------------------------------------- gradient on disk
def _save_block(block, grad_dir, block_info=None):
    i, j = block_info[None]["chunk-location"]
    np.save(os.path.join(grad_dir, f"grad_{i:05d}_{j:03d}.npy"), block)
    return np.full((1, 1), block.nbytes, dtype=np.int64)


def check_gradient(args, grad_dir, lse_t, denom, class_chunks):
    """Largest error of the stored gradient of row block 0 against float64, relative to the
    largest gradient entry."""
    lse, t = lse_t
    rows, eps, n_classes = len(t), args.label_smoothing, args.classes
    worst = scale = 0.0
    c0 = 0
    for j, cols in enumerate(class_chunks):
        x = logits_block(args.seed, 0, j, rows, cols, 0).astype(np.float64)
        ref = np.exp(x - lse[:, None]) - eps / n_classes
        local = t - c0
        hit = (t != IGNORE_INDEX) & (local >= 0) & (local < cols)
        ref[np.nonzero(hit)[0], local[hit]] -= 1 - eps
        ref[t == IGNORE_INDEX] = 0
        ref /= denom
        got = np.load(os.path.join(grad_dir, f"grad_{0:05d}_{j:03d}.npy"))
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        c0 += cols
    return worst / scale


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="N, rows of logits (default 2048)")
    p.add_argument("--classes", type=int, default=32000, help="C, vocabulary size (32000)")
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk (512)")
    p.add_argument("--class-chunks", type=int, default=2,
                   help="chunks along the vocabulary axis (2; 1 = whole rows per chunk)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ignore-frac", type=float, default=0.01,
                   help="fraction of targets set to ignore_index=-100 (0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="dask threads (or distributed workers) and reference threads")
    p.add_argument("--scheduler", choices=("threads", "distributed"), default="threads",
                   help="threads (default) or a distributed.LocalCluster of --threads processes")
    p.add_argument("--grad-dir", default=None,
                   help="also write the gradient there as .npy blocks and check row block 0")
    p.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    p.add_argument("--progress", action="store_true", help="report progress every 10 s")
    args = p.parse_args(argv)

    n, c = args.rows, args.classes
    row_chunks = row_split(n, args.chunk_rows)
    class_chunks = split(c, args.class_chunks)
    x = da.map_blocks(_logits_task, args.seed, chunks=(row_chunks, class_chunks),
                      dtype=np.float32, meta=np.empty((0, 0), np.float32))
    t = da.map_blocks(_targets_task, args.seed, c, args.ignore_frac, chunks=(row_chunks,),
                      dtype=np.int64, meta=np.empty((0,), np.int64))
    gib = n * c * 4 / 2**30
    print(f"logits: {n} x {c} float32 = {gib:.2f} GiB, chunks {args.chunk_rows} x "
          f"{class_chunks[0]} ({args.chunk_rows * class_chunks[0] * 4 / 2**20:.0f} MiB), "
          f"{len(row_chunks)} x {len(class_chunks)} blocks; scheduler {args.scheduler} "
          f"({args.threads} workers)")

    if args.grad_dir:
        os.makedirs(args.grad_dir, exist_ok=True)
        loss, grad = F.cross_entropy(x, t, ignore_index=IGNORE_INDEX,
                                     label_smoothing=args.label_smoothing, return_grad=True)
        written = grad.map_blocks(_save_block, args.grad_dir, dtype=np.int64,
                                  chunks=((1,) * len(row_chunks), (1,) * len(class_chunks)),
                                  meta=np.empty((0, 0), np.int64)).sum()
        with open(os.path.join(args.grad_dir, "layout.json"), "w") as fh:
            json.dump({"shape": [n, c], "dtype": "float32", "row_chunks": row_chunks,
                       "class_chunks": class_chunks,
                       "files": "grad_{row_block:05d}_{class_block:03d}.npy"}, fh)
        todo = [loss, written]
    else:
        todo = [F.cross_entropy(x, t, ignore_index=IGNORE_INDEX,
                                label_smoothing=args.label_smoothing)]

    client = cluster = None
    if args.scheduler == "distributed":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.threads, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    start = time.perf_counter()
    progress = None
    if args.progress and client is None:
        from dask.diagnostics import ProgressBar

        progress = ProgressBar(dt=10, out=sys.stdout)
        progress.register()
    with PeakRSS() as sampler:
        if client is not None:
            results = client.gather(client.compute(todo))
        else:
            results = dask.compute(*todo, scheduler="threads", num_workers=args.threads)
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress.unregister()
        print()
    peak_self = maxrss_bytes()
    peak_workers = sum(client.run(_worker_maxrss).values()) if client is not None else 0
    if client is not None:
        client.close()
        cluster.close()
    value = float(results[0])
    print(f"mean cross-entropy (nblosses + dask): {value:.9f}")
    print(f"time: {elapsed:.1f} s, {gib / elapsed:.3f} GiB/s of logits"
          + (f", gradient written: {results[1] / 2**30:.2f} GiB" if args.grad_dir else ""))
    peak = peak_self + peak_workers
    print(f"peak RSS: {peak / 2**30:.3f} GiB (ru_maxrss, main process"
          + (f" + {args.threads} workers" if peak_workers else "") + ")"
          + (f"; sampled process tree: {sampler.peak / 2**30:.3f} GiB" if sampler.peak else ""))

    if args.no_reference:
        return 0
    start = time.perf_counter()
    ref, count, kept = reference(args, row_chunks, class_chunks, keep_rows_of=0)
    rel = abs(value - ref) / abs(ref)
    print(f"float64 reference (NumPy, chunk by chunk): {ref:.9f} over {count} targets "
          f"({time.perf_counter() - start:.1f} s); relative difference {rel:.2e}")
    ok = rel < 1e-5
    if args.grad_dir:
        grad_err = check_gradient(args, args.grad_dir, kept, count, class_chunks)
        print(f"gradient, row block 0 vs float64: max error {grad_err:.2e} of the largest entry")
        ok = ok and grad_err < 1e-4
    print("agreement: OK" if ok else "agreement: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
