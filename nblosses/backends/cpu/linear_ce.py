"""Linear cross-entropy (a language-model head: ``cross_entropy(x @ W.T + b, target)``) on the
CPU, with all three gradients, never materialising the ``(N, V)`` logits.

The block loop is :mod:`nblosses.backends._linear_ce`'s; here are its CPU hooks: products by
the BLAS NumPy itself loads (:mod:`.linear_ce_blas`, OpenBLAS threads), per-block passes by
Numba kernels (:mod:`.linear_ce_kernels`, rows in parallel, in place on the block buffer).
The two never run at the same time, so each uses all cores in turn.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .. import _linear_ce as G
from . import linear_ce_kernels as K
from ._parallel import guarded
from .linear_ce_blas import gemm


class _CpuLinearCE(G.ChunkedLinearCE):
    """The driver's hooks: BLAS products, Numba block kernels."""

    xp: ClassVar[Any] = np

    def gemm(self, a, b, c, beta: float) -> None:
        gemm(a, b, c, beta)

    def merge(self, z, st: dict, r0: int, r1: int, c0: int, c1: int) -> None:
        bias, w = self.slices(c0, c1)
        if self.probs:
            K.stats_probs(z, bias, self.cap, self.target[r0:r1, c0:c1], w, 1.0 - self.eps,
                          self.eps / self.v, st["m"], st["s"], st["a_sum"], st["b_sum"])
        else:
            K.stats_class(z, bias, self.cap, self.target[r0:r1], c0, w, self.eps > 0, st["m"],
                          st["s"], st["xt"], st["swx"])

    def gradient_block(self, z, raw: bool, r0: int, r1: int, c0: int, c1: int, st: dict,
                       coefs) -> None:
        coef, b, a = coefs
        bias, w = self.slices(c0, c1)
        if self.probs:
            K.grad_probs(z, bias, self.cap, raw, self.target[r0:r1, c0:c1], w, 1.0 - self.eps,
                         self.eps / self.v, st["m"], coef, b)
        else:
            K.grad_class(z, bias, self.cap, raw, self.target[r0:r1], c0, self.ignore, w,
                         st["m"], coef, b, a)

    def col_sums(self, z, out) -> None:
        K.add_col_sums(z, out)


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
    ``"none"``. ``chunk_rows`` / ``chunk_classes`` override the block shape
    (:func:`nblosses.backends._linear_ce.plan_chunks`).

    Returns ``(loss, lse, grads)``: ``loss`` 0-d or ``(N,)``, ``lse`` ``(N,)`` (every row) or
    None, ``grads`` ``(grad_x, grad_w, grad_bias or None)`` or None.
    """
    return G.run(_CpuLinearCE, x2, w2, bias, target, weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                 softcap=softcap, want_grad=want_grad, grad_output=grad_output,
                 want_lse=want_lse, chunk_rows=chunk_rows, chunk_classes=chunk_classes)
