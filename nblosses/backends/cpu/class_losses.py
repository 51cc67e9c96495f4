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
from ._math import JIT, JIT_EXACT, block_stats, fast_exp, like, row_max, sum_exp, vlog
from ._parallel import guarded, parallel_kernel
from .softmax import SMALL_C, TILE, _width, tile_stats



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
        return np.empty((0, 0, 1), x3.dtype), np.empty((0, 0), x3.dtype), 0.0, False
    gx = grad_buffer if grad_buffer is not None else np.empty_like(x3)
    if reduction == "none":
        return gx, grad_output, 1.0, True
    with np.errstate(divide="ignore"):
        scale = grad_output / denom if denom else np.inf
    return gx, np.empty((0, 0), x3.dtype), float(scale), False


def _weights(weight, n_classes, dtype):
    return (weight, True) if weight is not None else (np.ones(n_classes, dtype), False)


# ----------------------------------------------------------------------------- cross-entropy
# Every layout reduces a position to (m, ls = log sum exp(x - m), x_t, sum_c w_c x_c); _ce_point
# turns those into the loss (float64, lse = m + ls) and the gradient's coefficients:
# g_c = coef * exp((x_c - m) - ls) - b * w_c, then g_t -= a.
@njit(**JIT)
def _ce_point(lse, x_t, swx, wt, eps, n_classes, w_total, scale):
    loss = (1.0 - eps) * wt * (lse - x_t)
    if eps > 0:
        loss += eps / n_classes * (lse * w_total - swx)
    a = scale * (1.0 - eps) * wt
    b = scale * eps / n_classes
    return loss, a, a + b * w_total, b


@njit(**JIT_EXACT)
def _ce_grad_row(out, row, m, ls, coef, b, w, smooth):
    """``out = coef * exp((row - m) - ls) - b * w``; ``out`` may be ``row`` (each read precedes
    its write)."""
    ls = like(ls, row)
    coef = like(coef, row)
    if smooth:
        b = like(b, row)
        for c in range(row.size):
            out[c] = coef * fast_exp((row[c] - m) - ls) - b * w[c]
    else:
        for c in range(row.size):
            out[c] = coef * fast_exp((row[c] - m) - ls)


@parallel_kernel(**JIT)
def _ce_rows(x, t, w, has_w, ignore, eps, w_total, want_grad, g_rows, use_g_rows, g_scalar, gx,
             rowloss):
    n, n_classes = x.shape
    smooth = eps > 0
    for i in prange(n):
        ti = t[i]
        if ti == ignore:
            if want_grad:
                gx[i, :] = 0
            continue
        row = x[i]
        m = row_max(row)
        ls = np.log(sum_exp(row, m))
        swx = 0.0
        if smooth:
            for c in range(n_classes):
                swx += w[c] * row[c]
        scale = g_rows[i, 0] if use_g_rows else g_scalar
        loss, a, coef, b = _ce_point(m + ls, row[ti], swx, w[ti] if has_w else 1.0, eps,
                                     n_classes, w_total, scale)
        rowloss[i] = loss
        if want_grad:
            _ce_grad_row(gx[i], row, m, ls, coef, b, w, smooth)
            gx[i, ti] -= like(a, row)


@parallel_kernel(**JIT)
def _ce_tiles(x, t, w, has_w, ignore, eps, w_total, want_grad, g_rows, use_g_rows, g_scalar, gx,
              rowloss):
    """Short rows (C < SMALL_C): statistics on transposed tiles, as in softmax's tiles."""
    n, n_classes = x.shape
    for tile in prange((n + TILE - 1) // TILE):
        r0 = tile * TILE
        nr = min(n, r0 + TILE) - r0
        xt = np.empty((n_classes, TILE), x.dtype)
        m = np.empty(TILE, x.dtype)
        s = np.empty(TILE, x.dtype)
        tile_stats(x, r0, nr, xt, m, s)
        vlog(s[:nr])
        for r in range(nr):
            i = r0 + r
            ti = t[i]
            if ti == ignore:
                if want_grad:
                    gx[i, :] = 0
                continue
            swx = 0.0
            if eps > 0:
                for c in range(n_classes):
                    swx += w[c] * xt[c, r]
            scale = g_rows[i, 0] if use_g_rows else g_scalar
            loss, a, coef, b = _ce_point(np.float64(m[r]) + s[r], xt[ti, r], swx,
                                         w[ti] if has_w else 1.0, eps, n_classes, w_total, scale)
            rowloss[i] = loss
            if want_grad:
                _ce_grad_row(gx[i], x[i], m[r], s[r], coef, b, w, eps > 0)
                gx[i, ti] -= like(a, x)


@njit(**JIT)
def _vaxpy(acc, alpha, xc):
    """``acc += alpha * xc``."""
    alpha = like(alpha, xc)
    for j in range(acc.size):
        acc[j] += alpha * xc[j]


@njit(**JIT_EXACT)
def _vce_grad(out, xc, m, ls, coef, b, wc):
    """``out = coef * exp((xc - m) - ls) - b * wc`` along an inner block."""
    wc = like(wc, xc)
    for j in range(out.size):
        out[j] = coef[j] * fast_exp((xc[j] - m[j]) - ls[j]) - b[j] * wc


@parallel_kernel(**JIT)
def _ce_blocks(x, t, w, has_w, ignore, eps, w_total, want_grad, g_pos, use_g_pos, g_scalar, gx,
               rowloss, width):
    n, n_classes, inner = x.shape
    nblk = (inner + width - 1) // width
    for task in prange(n * nblk):
        o = task // nblk
        j0 = (task % nblk) * width
        wd = min(width, inner - j0)
        xo = x[o]
        ls = np.empty(wd, x.dtype)
        m = np.empty(wd, x.dtype)
        block_stats(xo, j0, wd, m, ls)
        vlog(ls)
        swx = np.zeros(wd, x.dtype)
        if eps > 0:
            for c in range(n_classes):
                _vaxpy(swx, w[c], xo[c, j0:j0 + wd])
        acoef = np.zeros(wd, x.dtype)  # subtracted at the target class
        coef = np.zeros(wd, x.dtype)  # multiplies exp((x - m) - ls)
        bcoef = np.zeros(wd, x.dtype)  # multiplies w[c] (label smoothing)
        for j in range(wd):
            tj = t[o, j0 + j]
            if tj == ignore:
                continue
            scale = g_pos[o, j0 + j] if use_g_pos else g_scalar
            loss, a, cf, b = _ce_point(np.float64(m[j]) + ls[j], xo[tj, j0 + j], swx[j],
                                       w[tj] if has_w else 1.0, eps, n_classes, w_total, scale)
            rowloss[o * inner + j0 + j] = loss
            acoef[j] = a
            coef[j] = cf
            bcoef[j] = b
        if not want_grad:
            continue
        go = gx[o]
        for c in range(n_classes):
            _vce_grad(go[c, j0:j0 + wd], xo[c, j0:j0 + wd], m, ls, coef, bcoef, w[c])
        for j in range(wd):
            tj = t[o, j0 + j]
            if tj == ignore:
                go[:, j0 + j] = 0
            else:
                go[tj, j0 + j] -= acoef[j]


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
            rows = _ce_tiles if n_classes < SMALL_C else _ce_rows
            rows(x3[:, :, 0], t2[:, 0], w, has_w, ignore_index, label_smoothing, w_total,
                 want_grad, g_pos, use_g, g_scalar, gx[:, :, 0], rowloss)
        else:
            _ce_blocks(x3, t2, w, has_w, ignore_index, label_smoothing, w_total, want_grad, g_pos,
                       use_g, g_scalar, gx, rowloss, _width(x3))
    elif want_grad:
        gx[...] = 0
    return _reduce(rowloss, reduction, denom, x3.dtype), (gx if want_grad else None)


# ----------------------------------------------------------------------------- probabilities
@parallel_kernel(**JIT)
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


@njit(**JIT)
def _vprob_sums(a_sum, b_sum, xc, yc, wc, keep, spread):
    """``a += w y'``, ``b += w y' x`` with ``y' = y (1 - eps) + eps / C``."""
    wc, keep, spread = like(wc, xc), like(keep, xc), like(spread, xc)
    for j in range(a_sum.size):
        wy = wc * (yc[j] * keep + spread)
        a_sum[j] += wy
        b_sum[j] += wy * xc[j]


@njit(**JIT_EXACT)
def _vprob_grad(out, xc, yc, m, ls, coef, scale, wc, keep, spread):
    """``out = coef * exp((x - m) - ls) - scale * w y'``."""
    wc, keep, spread = like(wc, xc), like(keep, xc), like(spread, xc)
    for j in range(out.size):
        out[j] = (coef[j] * fast_exp((xc[j] - m[j]) - ls[j])
                  - scale[j] * wc * (yc[j] * keep + spread))


@parallel_kernel(**JIT)
def _ce_probs_blocks(x, y, w, eps, want_grad, g_pos, use_g_pos, g_scalar, gx, rowloss, width):
    n, n_classes, inner = x.shape
    nblk = (inner + width - 1) // width
    keep = 1.0 - eps
    spread = eps / n_classes
    for task in prange(n * nblk):
        o = task // nblk
        j0 = (task % nblk) * width
        wd = min(width, inner - j0)
        xo = x[o]
        yo = y[o]
        m = np.empty(wd, x.dtype)
        ls = np.empty(wd, x.dtype)
        block_stats(xo, j0, wd, m, ls)
        vlog(ls)
        a_sum = np.zeros(wd, x.dtype)
        b_sum = np.zeros(wd, x.dtype)
        for c in range(n_classes):
            _vprob_sums(a_sum, b_sum, xo[c, j0:j0 + wd], yo[c, j0:j0 + wd], w[c], keep, spread)
        for j in range(wd):
            rowloss[o * inner + j0 + j] = (np.float64(a_sum[j]) * (np.float64(m[j]) + ls[j])
                                           - b_sum[j])
            scale = g_pos[o, j0 + j] if use_g_pos else g_scalar
            a_sum[j] = scale * a_sum[j]  # now: coefficient of exp((x - m) - ls)
            b_sum[j] = scale  # now: scale of the w * y' term
        if want_grad:
            for c in range(n_classes):
                _vprob_grad(gx[o, c, j0:j0 + wd], xo[c, j0:j0 + wd], yo[c, j0:j0 + wd], m, ls,
                            a_sum, b_sum, w[c], keep, spread)


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
                             rowloss, _width(x3))
    elif want_grad:
        gx[...] = 0
    return _reduce(rowloss, reduction, denom, x3.dtype), (gx if want_grad else None)


# ----------------------------------------------------------------------------- nll
@parallel_kernel(**JIT)
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
