"""Linear cross-entropy (a language-model head: ``cross_entropy(x @ W.T + b, target)``) on the
CPU, with all three gradients, never materialising the ``(N, V)`` logits.

The batch is processed in blocks of rows (and, for huge vocabularies only, of vocabulary
columns; see :func:`nblosses.backends._linear_ce.plan_chunks`). Per block:

1. ``z = x[rows] @ W[cols].T`` by BLAS (NumPy's OpenBLAS, its threads) into one reused buffer;
2. a Numba kernel (rows in parallel) adds the bias, softcaps, and merges each row's max, sum of
   exponentials, target logit and smoothing sums into running float64 statistics;
3. with the whole vocabulary in the block, the row's losses are final at once and a second
   kernel overwrites the block with ``dL/dz`` while it is still the logits;
4. ``grad_x[rows] = g @ W`` (computed transposed, see :meth:`_Call.backward`) and
   ``grad_W += g.T @ x[rows]`` by BLAS (``beta = 1``: the accumulation happens inside the
   product), ``grad_b += g.sum(0)`` by a Numba kernel.

So the work is the unchunked computation's three products plus two passes over each block;
with vocabulary chunks the first product runs twice (statistics, then gradient). Extra memory:
the block, the rows' transposed ``grad_x`` and O(rows) statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _linear_ce as G
from . import linear_ce_kernels as K
from ._parallel import guarded
from .linear_ce_blas import gemm

_CLASS_STATS = ("m", "s", "xt", "swx")
_PROB_STATS = ("m", "s", "a_sum", "b_sum")


class _Call:
    """One call's configuration, reused block buffer and running statistics."""

    def __init__(self, x2, w2, bias, target, weight, ignore_index, eps, z_loss, softcap,
                 plan: G.Plan) -> None:
        self.x, self.w, self.bias, self.target, self.weight = x2, w2, bias, target, weight
        self.probs = target.ndim == 2
        self.ignore, self.eps, self.z_loss, self.cap = ignore_index, eps, z_loss, softcap
        self.plan = plan
        self.v = w2.shape[0]
        self.w_total = float(self.v if weight is None else weight.sum(dtype=np.float64))
        self.block = np.empty(plan.rows * plan.cols, x2.dtype)
        self.gx_t = np.empty(plan.rows * x2.shape[1], x2.dtype)
        names = _PROB_STATS if self.probs else _CLASS_STATS
        self.stats = {k: np.empty(plan.rows, np.float64) for k in names}

    def cols(self):
        """``(c0, c1)`` of each vocabulary block."""
        step = self.plan.cols
        return [(c0, min(self.v, c0 + step)) for c0 in range(0, self.v, step)]

    def logits(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The block ``x[r0:r1] @ W[c0:c1].T`` (raw products), C-contiguous."""
        z = self.block[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        gemm(self.x[r0:r1], self.w[c0:c1].T, z, 0.0)
        return z

    def _slices(self, c0: int, c1: int):
        return (None if self.bias is None else self.bias[c0:c1],
                None if self.weight is None else self.weight[c0:c1])

    def merge(self, z, r0: int, r1: int, c0: int, c1: int) -> None:
        """Prepare block ``z`` in place and merge its statistics."""
        st = {k: a[:r1 - r0] for k, a in self.stats.items()}
        bias, w = self._slices(c0, c1)
        if self.probs:
            K.stats_probs(z, bias, self.cap, self.target[r0:r1, c0:c1], w, 1.0 - self.eps,
                          self.eps / self.v, st["m"], st["s"], st["a_sum"], st["b_sum"])
        else:
            K.stats_class(z, bias, self.cap, self.target[r0:r1], c0, w, self.eps > 0, st["m"],
                          st["s"], st["xt"], st["swx"])

    def row_stats(self, r0: int, r1: int) -> dict:
        """Statistics of rows ``r0:r1`` over the whole vocabulary (leaves the last block
        prepared in the buffer: with one vocabulary block, the gradient starts from it)."""
        for k, a in self.stats.items():
            a[:r1 - r0] = -np.inf if k == "m" else 0.0
        for c0, c1 in self.cols():
            self.merge(self.logits(r0, r1, c0, c1), r0, r1, c0, c1)
        return {k: a[:r1 - r0] for k, a in self.stats.items()}

    def finish(self, st: dict, r0: int, r1: int, scale: Any, want_grad: bool):
        """``(loss, lse, coef, b, a)`` of rows ``r0:r1`` (see :mod:`.._linear_ce`)."""
        sc = scale if np.ndim(scale) == 0 else np.asarray(scale[r0:r1], np.float64)
        if self.probs:
            return G.finish_probs(np, st, self.z_loss, sc, want_grad)
        return G.finish_class(np, st, self.target[r0:r1], self.weight, self.ignore, self.eps,
                              self.v, self.w_total, self.z_loss, sc, want_grad)

    def gradient_block(self, z, raw: bool, r0: int, r1: int, c0: int, c1: int, st: dict,
                       coefs) -> None:
        """Overwrite block ``z`` with ``dL/dz`` (``raw``: it holds unprepared products)."""
        coef, b, a = coefs
        bias, w = self._slices(c0, c1)
        if self.probs:
            K.grad_probs(z, bias, self.cap, raw, self.target[r0:r1, c0:c1], w, 1.0 - self.eps,
                         self.eps / self.v, st["m"], coef, b)
        else:
            K.grad_class(z, bias, self.cap, raw, self.target[r0:r1], c0, self.ignore, w,
                         st["m"], coef, b, a)

    def backward(self, r0: int, r1: int, st: dict, coefs, grads) -> None:
        """Rows ``r0:r1``'s share of the three gradients (``grads`` = gx, gw, gb)."""
        gx, gw, gb = grads
        xr = self.x[r0:r1]
        # grad_x of the rows, transposed: OpenBLAS runs (d, V) @ (V, rows) 5-10x faster
        # than (rows, V) @ (V, d) when rows is small (the block's rows are).
        gxt = self.gx_t[:self.x.shape[1] * (r1 - r0)].reshape(self.x.shape[1], r1 - r0)
        for c0, c1 in self.cols():
            if self.plan.split:
                z = self.logits(r0, r1, c0, c1)
            else:  # the statistics pass left this block's prepared logits in the buffer
                z = self.block[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            self.gradient_block(z, self.plan.split, r0, r1, c0, c1, st, coefs)
            gemm(self.w[c0:c1].T, z.T, gxt, 0.0 if c0 == 0 else 1.0)
            gemm(z.T, xr, gw[c0:c1], 0.0 if r0 == 0 else 1.0)
            if gb is not None:
                K.add_col_sums(z, gb[c0:c1])
        gx[r0:r1] = gxt.T


def _outputs(n: int, d: int, v: int, dtype, reduction: str, want_grad: bool, want_lse: bool,
             has_bias: bool):
    """Per-row losses ("none"), lse and the gradients, allocated."""
    out = np.empty(n, dtype) if reduction == "none" else None
    lse = np.empty(n, dtype) if want_lse else None
    grads = None
    if want_grad:
        # grad_W is written (beta = 0) by the first row block: zeros only when there is none.
        gw = np.zeros((v, d), dtype) if n == 0 else np.empty((v, d), dtype)
        gx = np.zeros((n, d), dtype) if v == 0 else np.empty((n, d), dtype)
        grads = (gx, gw, np.zeros(v, dtype) if has_bias else None)
    return out, lse, grads


@guarded
def linear_cross_entropy(x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse,
                         chunk_rows=None, chunk_classes=None):
    """``cross_entropy(x2 @ w2.T + bias, target)`` and its gradients, chunked.

    Kernel protocol: ``x2`` ``(N, d)``, ``w2`` ``(V, d)``, ``bias`` ``(V,)`` or None, all of
    the compute dtype and C-contiguous; ``target`` ``(N,)`` int64 class indices (each in
    ``[0, V)`` or ``ignore_index``) or ``(N, V)`` probabilities; ``weight`` ``(V,)`` or None.
    ``softcap`` 0.0 is off; ``z_loss`` adds ``z_loss * lse**2`` per kept row.
    ``grad_output``: None unless ``want_grad``; a float for reduced losses, ``(N,)`` for
    ``"none"``. ``chunk_rows`` / ``chunk_classes`` override the block shape.

    Returns ``(loss, lse, grads)``: ``loss`` 0-d or ``(N,)``, ``lse`` ``(N,)`` (every row) or
    None, ``grads`` ``(grad_x, grad_w, grad_bias or None)`` or None.
    """
    n, d = x2.shape
    v = w2.shape[0]
    probs = target.ndim == 2
    ignore = None if probs else int(ignore_index)
    denom = G.mean_denominator(np, target, weight, ignore) if reduction == "mean" else 1.0
    scale = G.upstream_scale(reduction, grad_output, denom) if want_grad else 0.0
    out, lse_out, grads = _outputs(n, d, v, x2.dtype, reduction, want_grad, want_lse,
                                   bias is not None)
    call = _Call(x2, w2, bias, target, weight, ignore, float(label_smoothing), float(z_loss),
                 float(softcap), G.plan_chunks(n, v, d, chunk_rows, chunk_classes))
    total = 0.0
    for r0 in range(0, n if v else 0, call.plan.rows):
        r1 = min(n, r0 + call.plan.rows)
        st = call.row_stats(r0, r1)
        loss, lse, *coefs = call.finish(st, r0, r1, scale, want_grad)
        total += float(loss.sum())
        if out is not None:
            out[r0:r1] = loss
        if lse_out is not None:
            lse_out[r0:r1] = lse
        if grads is not None:
            call.backward(r0, r1, st, coefs, grads)
    if reduction == "none":
        return out, lse_out, grads
    if reduction == "mean":
        total = G.upstream_scale("mean", total, denom)
    return np.asarray(total, x2.dtype), lse_out, grads
