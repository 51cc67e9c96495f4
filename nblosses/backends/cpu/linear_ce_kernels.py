"""Numba kernels of the chunked linear cross-entropy: statistics and gradient of one logits block.

A block is ``z = x[rows] @ W[cols].T`` (C-contiguous ``(R, Vc)``, columns ``c0:c0+Vc`` of the
vocabulary), written by BLAS. Rows run in parallel; every per-row loop runs along the
contiguous row, vectorised (``fast_exp_nonpos``). Per-row running statistics live in float64 arrays
of the row chunk and are merged across vocabulary blocks (online softmax):

``m`` (running max), ``s`` (sum of ``exp(z - m)``), ``xt`` (the target's logit, class
indices), ``swx`` (``sum_c w_c z_c``, label smoothing), ``a_sum`` / ``b_sum`` (``sum_c w_c y'_c``
and ``sum_c w_c y'_c z_c``, probability targets with ``y' = y (1 - eps) + eps / V``).

"Prepare" turns raw products into the loss's logits in place: ``z += bias``, then
``z = cap * tanh(z / cap)`` when softcapping (``cap > 0``). The gradient kernels overwrite the
block with ``dL/dz`` (softcap chain rule included), ready for the two gradient products.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._math import JIT, SUM_BLOCK, fast_exp_nonpos, fast_tanh, like, row_max, sum_exp
from ._parallel import parallel_kernel

#: Columns per task of the column-sum (bias gradient) kernel.
_COLS = 512


@njit(**JIT)
def _prepare_row(row, bias, cap):
    """``row += bias`` (when given), then the softcap ``cap * tanh(row / cap)`` (``cap > 0``)."""
    if bias is not None:
        for c in range(row.size):
            row[c] += bias[c]
    if cap > 0:
        capf = like(cap, row)
        inv = like(1.0 / cap, row)
        for c in range(row.size):
            row[c] = capf * fast_tanh(row[c] * inv)


@njit(**JIT)
def _merge_row(row, m, s, i):
    """Fold ``row``'s max and sum of exponentials into the running ``m[i]``, ``s[i]``."""
    m_old = m[i]
    m_new = max(m_old, np.float64(row_max(row)))
    s[i] = s[i] * math.exp(m_old - m_new) + sum_exp(row, like(m_new, row))
    m[i] = m_new


@njit(**JIT)
def _weighted_sum(row, w):
    """``sum_c w_c row_c`` in float64 (``sum_c row_c`` without weights): blocks of
    ``SUM_BLOCK`` in the row's precision, their sums in float64."""
    total = 0.0
    for c0 in range(0, row.size, SUM_BLOCK):
        part = like(0, row)
        for c in range(c0, min(row.size, c0 + SUM_BLOCK)):
            part += row[c] if w is None else w[c] * row[c]
        total += part
    return total


@parallel_kernel(**JIT)
def stats_class(z, bias, cap, t, c0, w, smoothing, m, s, xt, swx):
    """Prepare ``z`` and merge its statistics (class-index targets; ``w`` and ``bias`` are the
    block's slices of the class weights and the bias, or None)."""
    n, nc = z.shape
    for i in prange(n):
        row = z[i]
        _prepare_row(row, bias, cap)
        _merge_row(row, m, s, i)
        ti = t[i] - c0
        if 0 <= ti < nc:
            xt[i] = row[ti]
        if smoothing:
            swx[i] += _weighted_sum(row, w)


@njit(**JIT)
def _prob_sums(row, yr, w, keep, spread):
    """``(sum_c w_c y'_c, sum_c w_c y'_c z_c)`` in float64 (blocks as :func:`_weighted_sum`)."""
    keep, spread, one = like(keep, row), like(spread, row), like(1, row)
    a_total = 0.0
    b_total = 0.0
    for c0 in range(0, row.size, SUM_BLOCK):
        a = like(0, row)
        b = like(0, row)
        for c in range(c0, min(row.size, c0 + SUM_BLOCK)):
            wy = (one if w is None else w[c]) * (yr[c] * keep + spread)
            a += wy
            b += wy * row[c]
        a_total += a
        b_total += b
    return a_total, b_total


@parallel_kernel(**JIT)
def stats_probs(z, bias, cap, y, w, keep, spread, m, s, a_sum, b_sum):
    """Prepare ``z`` and merge its statistics (probability targets ``y``: the block's columns)."""
    for i in prange(z.shape[0]):
        row = z[i]
        _prepare_row(row, bias, cap)
        _merge_row(row, m, s, i)
        a, b = _prob_sums(row, y[i], w, keep, spread)
        a_sum[i] += a
        b_sum[i] += b


@njit(**JIT)
def _grad_row(row, m, coef, b, w, yr, keep, spread, cap):
    """``row = (coef * exp(row - m) - b * w_c * y'_c) * (1 - (row / cap)^2)`` in place, with
    ``y'_c = 1`` for class-index targets (``yr`` None) and no chain factor when ``cap == 0``."""
    m, coef, b = like(m, row), like(coef, row), like(b, row)
    keep, spread, one = like(keep, row), like(spread, row), like(1, row)
    inv = like(1.0 / cap if cap > 0 else 0.0, row)
    for c in range(row.size):
        v = row[c]
        wy = one if w is None else w[c]
        if yr is not None:
            wy = wy * (yr[c] * keep + spread)
        g = coef * fast_exp_nonpos(v - m) - b * wy
        if cap > 0:
            u = v * inv
            g = g * (one - u * u)
        row[c] = g


@njit(**JIT)
def _chain(v, cap):
    """The softcap's derivative at a capped logit ``v``: ``1 - (v / cap)^2`` (1 when off)."""
    if cap > 0:
        u = v / cap
        return 1.0 - u * u
    return 1.0


@njit(**JIT)
def _start_grad_row(row, target, ignore, c0, bias, cap, raw):
    """The start of a class-target row's gradient, before its pass over ``row``: ``(kept, ti,
    vt)``. An ignored row (``target == ignore``) is zeroed and not kept; a kept row's raw
    products are prepared (``raw``), ``ti`` is the target's column in this block (outside
    ``[0, row.size)`` where another block holds it) and ``vt`` its capped logit, read before
    the gradient overwrites it (0 elsewhere)."""
    if target == ignore:
        row[:] = 0
        return False, 0, 0.0
    if raw:
        _prepare_row(row, bias, cap)
    ti = target - c0
    return True, ti, np.float64(row[ti]) if 0 <= ti < row.size else 0.0


@njit(**JIT)
def _add_at_target(row, ti, value, vt, cap):
    """``row[ti] += value`` times the soft cap's derivative at the target's capped logit
    ``vt``, where this block holds the target (``0 <= ti < row.size``)."""
    if 0 <= ti < row.size:
        row[ti] += like(value * _chain(vt, cap), row)


@parallel_kernel(**JIT)
def grad_class(z, bias, cap, raw, t, c0, ignore, w, m, coef, b, a):
    """Overwrite ``z`` with ``dL/dz`` (class-index targets). ``raw``: ``z`` holds raw products
    (prepare first). Per row: ``coef`` multiplies ``exp(z - m)`` (softmax and z-loss, over the
    sum of exponentials), ``b`` the class weight (smoothing), ``a`` is subtracted at the target;
    all three include the upstream gradient. Ignored rows become zero."""
    for i in prange(z.shape[0]):
        row = z[i]
        kept, ti, vt = _start_grad_row(row, t[i], ignore, c0, bias, cap, raw)
        if not kept:
            continue
        _grad_row(row, m[i], coef[i], b[i], w, None, 0.0, 0.0, cap)
        _add_at_target(row, ti, -a[i], vt, cap)


@parallel_kernel(**JIT)
def grad_probs(z, bias, cap, raw, y, w, keep, spread, m, coef, b):
    """Overwrite ``z`` with ``dL/dz`` (probability targets; ``b`` scales ``w_c y'_c``)."""
    for i in prange(z.shape[0]):
        row = z[i]
        if raw:
            _prepare_row(row, bias, cap)
        _grad_row(row, m[i], coef[i], b[i], w, y[i], keep, spread, cap)


@njit(**JIT)
def _vadd(acc, row):
    for j in range(acc.size):
        acc[j] += row[j]


@parallel_kernel(**JIT)
def add_col_sums(z, out):
    """``out += z.sum(0)``: float64 partial sums per column block, then one add into ``out``."""
    n, nc = z.shape
    for blk in prange((nc + _COLS - 1) // _COLS):
        j0 = blk * _COLS
        j1 = min(nc, j0 + _COLS)
        part = np.zeros(j1 - j0, np.float64)
        for i in range(n):
            _vadd(part, z[i, j0:j1])
        for j in range(j1 - j0):
            out[j0 + j] += part[j]
