"""Chunked (dask) class-index cases (cross_entropy, nll_loss, ... and their fused gradients)
against the same call on one NumPy array.

Layouts: ``numpy`` (one array, no dask), ``dask-rows`` (chunks of whole rows: each block is one
call of the compiled kernel) and ``dask-rows-classes`` (the class axis split in 4 too:
vocabulary-parallel, per-chunk statistics merged exactly). Threaded scheduler. Skipped when
dask is not installed. The shape parameter uses the bracket notation of the other modules
(``"4096x[32000]"``: the bracketed axis is the class axis).
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

from .common import CLASS_CASES, SkipNotImplemented, cases

LAYOUTS = ["numpy", "dask-rows", "dask-rows-classes"]


class DaskCrossEntropy:
    """Mean over class indices, float32 logits; the cases of :data:`.common.CLASS_CASES`."""

    params = [CLASS_CASES, LAYOUTS, ["4096x[32000]"]]
    param_names = ["op", "layout", "shape"]
    timeout = 300

    def setup(self, op, layout, shape):
        from nblosses import functional as F

        inputs = cases.make_inputs(op, shape)
        arrays, dim, run = inputs.arrays, inputs.dim, inputs.case.run
        if layout == "numpy":
            self.fn = lambda: run(F, arrays, dim, "cpu")
        else:
            try:
                import dask
                import dask.array as da
            except ImportError as exc:
                raise SkipNotImplemented(f"dask is not installed: {exc}") from exc
            # rows in 4 chunks; with "-classes" the class axis (dim 1) in 4 too
            split = layout == "dask-rows-classes"
            chunked = {k: da.from_array(a, chunks=tuple(
                max(1, -(-n // 4)) if i == 0 or (split and i == dim) else n
                for i, n in enumerate(a.shape))) for k, a in arrays.items()}

            def fn():
                return dask.compute(run(F, chunked, dim, "cpu"), scheduler="threads")

            self.fn = fn
        self.fn()  # warm-up: JIT compilation, thread pools

    def time_cross_entropy(self, op, layout, shape):
        self.fn()

    def peakmem_cross_entropy(self, op, layout, shape):
        self.fn()

    def teardown(self, *args):
        self.fn = None
