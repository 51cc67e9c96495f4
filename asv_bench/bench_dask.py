"""Chunked (dask) cross-entropy against the same call on one NumPy array.

Layouts: ``numpy`` (one array, no dask), ``dask-rows`` (chunks of whole rows: each block is one
call of the compiled kernel) and ``dask-rows-classes`` (the class axis split in 4 too:
vocabulary-parallel, per-chunk max / sum-exp merged exactly). Threaded scheduler. Skipped when
dask is not installed. The shape parameter uses the bracket notation of the other modules
(``"4096x[32000]"``: the bracketed axis is the class axis).
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:  # asv < 0.6, or running without asv
    SkipNotImplemented = NotImplementedError

LAYOUTS = ["numpy", "dask-rows", "dask-rows-classes"]
OPS = ["cross_entropy", "cross_entropy_grad"]


def _dims(label: str) -> tuple[int, int]:
    n, c = (int(part.strip("[]")) for part in label.replace(",", "x").split(":")[0].split("x")[:2])
    return n, c


class DaskCrossEntropy:
    """Mean cross-entropy of float32 logits with class-index targets (and its gradient)."""

    params = [OPS, LAYOUTS, ["4096x[32000]"]]
    param_names = ["op", "layout", "shape"]
    timeout = 300

    def setup(self, op, layout, shape):
        import numpy as np

        from nblosses import functional as F

        n, c = _dims(shape)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        want_grad = op == "cross_entropy_grad"
        if layout == "numpy":
            self.fn = lambda: F.cross_entropy(x, t, return_grad=want_grad)
        else:
            try:
                import dask
                import dask.array as da
            except ImportError as exc:
                raise SkipNotImplemented(f"dask is not installed: {exc}") from exc
            rows = max(1, n // 4)
            cols = c if layout == "dask-rows" else max(1, -(-c // 4))
            dx = da.from_array(x, chunks=(rows, cols))
            dt = da.from_array(t, chunks=rows)

            def fn():
                out = F.cross_entropy(dx, dt, return_grad=want_grad)
                return dask.compute(out, scheduler="threads")

            self.fn = fn
        self.fn()  # warm-up: JIT compilation, thread pools

    def time_cross_entropy(self, op, layout, shape):
        self.fn()

    def peakmem_cross_entropy(self, op, layout, shape):
        self.fn()

    def teardown(self, *args):
        self.fn = None
