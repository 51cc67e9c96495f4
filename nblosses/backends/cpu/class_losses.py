"""NLL and cross-entropy (class indices and class probabilities) on the CPU, with fused gradients.

Cross-entropy never materialises log-probabilities: per row it finds the max, sums
``exp(x - max)`` (one read of the row, kept in cache), and, when a gradient is wanted, writes
``dL/dx`` in a last pass over the same cached row. Per-row losses go to an ``O(N)`` float64
buffer that the reduction sums. The ``mean`` denominator depends only on targets and weights,
so it is known before the kernel and the gradient is written final in one go. The gradient may
be written into the logits themselves: each logit is read before its slot is overwritten.

Layouts as in :mod:`.softmax`: contiguous rows when ``inner == 1``, blocks of inner positions
(vectorised along ``inner``) otherwise.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..._registry import register_kernel
from ._math import JIT, fast_exp, like, row_max, sum_exp
from ._parallel import guarded
from .softmax import BLOCK, _block_max

PJIT = dict(JIT, parallel=True)


# ----------------------------------------------------------------------------- shared pieces
def _reduce(rowloss: np.ndarray, reduction: str, denom: float, dtype) -> np.ndarray:
    """Per-position float64 losses -> the result array in ``dtype``."""
    if reduction == "none":
        return rowloss.astype(dtype)
    total = rowloss.sum()
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / denom  # 0/0 -> NaN for empty or all-ignored batches, as torch
    return np.asarray(total, dtype=dtype)


def _index_denominator(t2: np.ndarray, weight, ignore_index: int, reduction: str) -> float:
    """torch's ``mean`` denominator: the summed weights (or count) of non-ignored targets."""
    if reduction != "mean":
        return 1.0
    valid = t2 != ignore_index
    if weight is None:
        return float(np.count_nonzero(valid))
    return float(weight[t2[valid]].sum(dtype=np.float64))


def _grad_setup(x3, reduction, want_grad, grad_output, grad_buffer, denom):
    """Gradient buffer, per-position upstream gradients (or a dummy) and the scalar scale."""
    n, _, inner = x3.shape
    if not want_grad:
        return np.empty((0, 0, 0), x3.dtype), np.empty((0, 0), x3.dtype), 0.0, False
    gx = grad_buffer if grad_buffer is not None else np.empty_like(x3)
    if reduction == "none":
        return gx, grad_output, 1.0, True
    with np.errstate(divide="ignore"):
        scale = grad_output / denom if denom else np.inf
    return gx, np.empty((0, 0), x3.dtype), float(scale), False


def _weights(weight, n_classes, dtype):
    return (weight, True) if weight is not None else (np.ones(n_classes, dtype), False)


# ----------------------------------------------------------------------------- cross-entropy
@njit(**PJIT)
def _ce_rows(x, t, w, has_w, ignore, eps, w_total, want_grad, g_rows, use_g_rows, g_scalar, gx,
             rowloss):
    n, n_classes = x.shape
    smooth = eps > 0
    for i in prange(n):
        ti = t[i]
        if ti == ignore:
            rowloss[i] = 0.0
            if want_grad:
                for c in range(n_classes):
                    gx[i, c] = 0
            continue
        row = x[i]
        m = row_max(row)
        s = sum_exp(row, m)
        swx = 0.0
        if smooth:
            for c in range(n_classes):
                swx += w[c] * row[c]
        lse = m + np.log(s)
        wt = w[ti] if has_w else 1.0
        loss = (1.0 - eps) * wt * (lse - row[ti])
        if smooth:
            loss += eps / n_classes * (lse * w_total - swx)
        rowloss[i] = loss
        if want_grad:
            scale = g_rows[i, 0] if use_g_rows else g_scalar
            a = scale * (1.0 - eps) * wt
            b = scale * eps / n_classes
            coef = like((a + b * w_total) / s, row)
            mc = like(m, row)
            g_row = gx[i]  # may alias row: each x[c] is read before gx[c] is written
            if smooth:
                bc = like(b, row)
                for c in range(n_classes):
                    g_row[c] = coef * fast_exp(row[c] - mc) - bc * w[c]
            else:
                for c in range(n_classes):
                    g_row[c] = coef * fast_exp(row[c] - mc)
            g_row[ti] -= like(a, row)


@njit(**PJIT)
def _ce_blocks(x, t, w, has_w, ignore, eps, w_total, want_grad, g_pos, use_g_pos, g_scalar, gx,
               rowloss):
    n, n_classes, inner = x.shape
    nblk = (inner + BLOCK - 1) // BLOCK
    smooth = eps > 0
    for task in prange(n * nblk):
        o = task // nblk
        j0 = (task % nblk) * BLOCK
        wd = min(BLOCK, inner - j0)
        m = np.empty(wd, x.dtype)
        s = np.zeros(wd, x.dtype)
        swx = np.zeros(wd, x.dtype)
        _block_max(x, o, j0, wd, m)
        for c in range(n_classes):
            for j in range(wd):
                s[j] += fast_exp(x[o, c, j0 + j] - m[j])
        if smooth:
            for c in range(n_classes):
                wc = w[c]
                for j in range(wd):
                    swx[j] += wc * x[o, c, j0 + j]
        coef = np.zeros(wd, x.dtype)  # per position: multiplies exp(x - m) in the gradient
        bcoef = np.zeros(wd, x.dtype)  # per position: multiplies w[c] (label smoothing)
        acoef = np.zeros(wd, x.dtype)  # per position: subtracted at the target class
        for j in range(wd):
            tj = t[o, j0 + j]
            if tj == ignore:
                rowloss[o * inner + j0 + j] = 0.0
                continue
            lse = m[j] + np.log(np.float64(s[j]))
            wt = w[tj] if has_w else 1.0
            loss = (1.0 - eps) * wt * (lse - x[o, tj, j0 + j])
            if smooth:
                loss += eps / n_classes * (lse * w_total - swx[j])
            rowloss[o * inner + j0 + j] = loss
            if want_grad:
                scale = g_pos[o, j0 + j] if use_g_pos else g_scalar
                a = scale * (1.0 - eps) * wt
                b = scale * eps / n_classes
                coef[j] = (a + b * w_total) / s[j]
                bcoef[j] = b
                acoef[j] = a
        if not want_grad:
            continue
        for c in range(n_classes):
            wc = w[c]
            for j in range(wd):
                gx[o, c, j0 + j] = coef[j] * fast_exp(x[o, c, j0 + j] - m[j]) - bcoef[j] * wc
        for j in range(wd):
            tj = t[o, j0 + j]
            if tj == ignore:
                for c in range(n_classes):
                    gx[o, c, j0 + j] = 0
            else:
                gx[o, tj, j0 + j] -= acoef[j]


@register_kernel("cross_entropy", "cpu")
@guarded
def cross_entropy(x3, t2, weight, *, ignore_index, label_smoothing, reduction, want_grad,
                  grad_output, grad_buffer):
    """Cross-entropy with class-index targets (kernel protocol in :mod:`nblosses.backends`)."""
    n, n_classes, inner = x3.shape
    denom = _index_denominator(t2, weight, ignore_index, reduction)
    w, has_w = _weights(weight, n_classes, x3.dtype)
    w_total = float(w.sum(dtype=np.float64))
    gx, g_pos, g_scalar, use_g = _grad_setup(x3, reduction, want_grad, grad_output, grad_buffer,
                                             denom)
    rowloss = np.zeros(n * inner, np.float64)
    if x3.size:
        if inner == 1:
            _ce_rows(x3[:, :, 0], t2[:, 0], w, has_w, ignore_index, label_smoothing, w_total,
                     want_grad, g_pos, use_g, g_scalar, gx[:, :, 0], rowloss)
        else:
            _ce_blocks(x3, t2, w, has_w, ignore_index, label_smoothing, w_total, want_grad, g_pos,
                       use_g, g_scalar, gx, rowloss)
    elif want_grad:
        gx[...] = 0
    return _reduce(rowloss, reduction, denom, x3.dtype), (gx if want_grad else None)


# ----------------------------------------------------------------------------- probabilities
@njit(**PJIT)
def _ce_probs_rows(x, y, w, eps, want_grad, g_rows, use_g_rows, g_scalar, gx, rowloss):
    n, n_classes = x.shape
    keep = 1.0 - eps
    spread = eps / n_classes
    for i in prange(n):
        row = x[i]
        yr = y[i]
        m = row_max(row)
        s = sum_exp(row, m)
        lse = m + np.log(s)
        a_sum = 0.0  # sum_c w_c y'_c
        b_sum = 0.0  # sum_c w_c y'_c x_c
        for c in range(n_classes):
            wy = w[c] * (yr[c] * keep + spread)
            a_sum += wy
            b_sum += wy * row[c]
        rowloss[i] = a_sum * lse - b_sum
        if want_grad:
            scale = g_rows[i, 0] if use_g_rows else g_scalar
            coef = like(scale * a_sum / s, row)
            mc = like(m, row)
            sc = like(scale, row)
            kc = like(keep, row)
            pc = like(spread, row)
            g_row = gx[i]
            for c in range(n_classes):
                g_row[c] = coef * fast_exp(row[c] - mc) - sc * w[c] * (yr[c] * kc + pc)


@njit(**PJIT)
def _ce_probs_blocks(x, y, w, eps, want_grad, g_pos, use_g_pos, g_scalar, gx, rowloss):
    n, n_classes, inner = x.shape
    nblk = (inner + BLOCK - 1) // BLOCK
    keep = like(1.0 - eps, x)
    spread = like(eps / n_classes, x)
    for task in prange(n * nblk):
        o = task // nblk
        j0 = (task % nblk) * BLOCK
        wd = min(BLOCK, inner - j0)
        m = np.empty(wd, x.dtype)
        s = np.zeros(wd, x.dtype)
        a_sum = np.zeros(wd, x.dtype)
        b_sum = np.zeros(wd, x.dtype)
        _block_max(x, o, j0, wd, m)
        for c in range(n_classes):
            wc = w[c]
            for j in range(wd):
                v = x[o, c, j0 + j]
                wy = wc * (y[o, c, j0 + j] * keep + spread)
                s[j] += fast_exp(v - m[j])
                a_sum[j] += wy
                b_sum[j] += wy * v
        for j in range(wd):
            lse = m[j] + np.log(np.float64(s[j]))
            rowloss[o * inner + j0 + j] = a_sum[j] * lse - b_sum[j]
            if want_grad:
                scale = g_pos[o, j0 + j] if use_g_pos else g_scalar
                a_sum[j] = scale * a_sum[j] / s[j]  # now: coefficient of exp(x - m)
                b_sum[j] = scale  # now: scale of the w * y' term
        if not want_grad:
            continue
        for c in range(n_classes):
            wc = w[c]
            for j in range(wd):
                gx[o, c, j0 + j] = (a_sum[j] * fast_exp(x[o, c, j0 + j] - m[j])
                                    - b_sum[j] * wc * (y[o, c, j0 + j] * keep + spread))


@register_kernel("cross_entropy_probs", "cpu")
@guarded
def cross_entropy_probs(x3, p3, weight, *, label_smoothing, reduction, want_grad, grad_output,
                        grad_buffer):
    """Cross-entropy with class-probability targets (``mean`` divides by ``N * inner``)."""
    n, n_classes, inner = x3.shape
    denom = float(n * inner) if reduction == "mean" else 1.0
    w, _ = _weights(weight, n_classes, x3.dtype)
    gx, g_pos, g_scalar, use_g = _grad_setup(x3, reduction, want_grad, grad_output, grad_buffer,
                                             denom)
    rowloss = np.zeros(n * inner, np.float64)
    if x3.size:
        if inner == 1:
            _ce_probs_rows(x3[:, :, 0], p3[:, :, 0], w, label_smoothing, want_grad, g_pos, use_g,
                           g_scalar, gx[:, :, 0], rowloss)
        else:
            _ce_probs_blocks(x3, p3, w, label_smoothing, want_grad, g_pos, use_g, g_scalar, gx,
                             rowloss)
    elif want_grad:
        gx[...] = 0
    return _reduce(rowloss, reduction, denom, x3.dtype), (gx if want_grad else None)


# ----------------------------------------------------------------------------- nll
@njit(**PJIT)
def _nll(x, t, w, has_w, ignore, want_grad, g_pos, use_g_pos, g_scalar, gx, rowloss):
    n, n_classes, inner = x.shape
    for o in prange(n):
        for j in range(inner):  # losses first: an in-place gradient overwrites x below
            tj = t[o, j]
            if tj != ignore:
                rowloss[o * inner + j] = -(w[tj] if has_w else 1.0) * x[o, tj, j]
        if not want_grad:
            continue
        for c in range(n_classes):
            for j in range(inner):
                gx[o, c, j] = 0
        for j in range(inner):
            tj = t[o, j]
            if tj != ignore:
                scale = g_pos[o, j] if use_g_pos else g_scalar
                gx[o, tj, j] = -(w[tj] if has_w else 1.0) * scale


@register_kernel("nll_loss", "cpu")
@guarded
def nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer):
    """NLL on log-probabilities; the gradient is zero but at the target classes."""
    n, n_classes, inner = x3.shape
    denom = _index_denominator(t2, weight, ignore_index, reduction)
    w, has_w = _weights(weight, n_classes, x3.dtype)
    gx, g_pos, g_scalar, use_g = _grad_setup(x3, reduction, want_grad, grad_output, grad_buffer,
                                             denom)
    rowloss = np.zeros(n * inner, np.float64)
    if want_grad and x3.size == 0:
        gx[...] = 0
    _nll(x3, t2, w, has_w, ignore_index, want_grad, g_pos, use_g, g_scalar, gx, rowloss)
    return _reduce(rowloss, reduction, denom, x3.dtype), (gx if want_grad else None)
