"""token_logprobs on the CPU: each position's log-probability of its target and the entropy of
``softmax(cap(x) / T)``, with the logits' gradient fused (kernel protocol in
:mod:`nblosses.backends`).

Per position, with the logits ``y = cap(x)`` (``x`` without a soft cap), ``M = max_c y``,
``d_c = (y_c - M) / T``, ``e_c = exp(d_c)``, ``s = sum_c e_c`` and ``q = sum_c e_c d_c``::

    logp = d_t - log s                      (clamped to <= 0)
    H    = log s - q / s                    (clamped to [0, log C])
    d(go logp + ge H) / dx_c = (e_c (a + b d_c) + [c == t] go / T) * cap'(x_c)
        a = -(go - ge q / s) / (s T),   b = -ge / (s T)

since ``dH/dz_c = -p_c (log p_c + H) = -p_c (d_c - q / s)`` for ``z = y / T``. ``d`` is formed
from ``y - M`` (exact for nearby logits) rather than ``y / T - M / T``: at ``|x| ~ 1e4`` and
``T = 0.3`` a float32 ``z`` carries an absolute rounding error of ~2e-3, ``y - M`` none. The
clamps only absorb roundings (``log p <= 0`` and ``0 <= H <= log C`` hold exactly): a caller's
policy ratio ``exp(logp_new - logp_old)`` never sees a positive log-probability. ``d`` itself is
clamped at :data:`D_MIN`, so that masked logits (-inf) add nothing.

Rows (``inner == 1``) take the cross-entropy's row scheme: the max pass, then one pass of
exponentials over the cached row (``s`` and ``q`` together; with a gradient ``e`` is stored in
it), then the gradient pass over the same cached row. A middle class axis (``inner > 1``) takes
blocks of inner positions vectorised along ``inner`` (:mod:`._blocks`). Short rows take the row
kernel: vocabularies are long, and the transposed tiles of the cross-entropy would not pay.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..._output_cache import empty
from .._host import ignore_value
from . import _blocks as B
from ._math import JIT, SUM_BLOCK, fast_exp_nonpos, fmax, like, prefetch_next_row, row_max
from ._parallel import guarded, parallel_kernel
from .class_losses import _block_source, _block_targets, _capped_row, _rows, _vcap_slope

# ----------------------------------------------------------------------------- per position
#: ``d`` is clamped here: ``exp`` is 0 below it in float32 and float64, so a logit of -inf (a
#: masked token) adds ``e d = 0`` (0 log 0) rather than ``0 * -inf = NaN``, and its gradient
#: ``e (a + b d)`` is 0.
D_MIN = -1000.0


@njit(**JIT)
def _shift(v, big, inv):
    """``d = (v - big) * inv`` clamped at :data:`D_MIN` (NaN stays NaN: ``fmax``)."""
    return fmax((v - big) * inv, like(D_MIN, v))


@njit(**JIT)
def _stats(y_t, big, s, q, inv_t, log_c):
    """``(logp, H, ls)`` of a position from its sums (float64; ``y_t - big`` exact)."""
    ls = math.log(s)
    logp = min((np.float64(y_t) - np.float64(big)) * inv_t - ls, 0.0)
    h = min(max(ls - q / s, 0.0), log_c)
    return logp, h


@njit(**JIT)
def _coefficients(s, q, inv_t, gor, ger):
    """``(a, b)`` of the gradient ``e (a + b d)`` (``ger`` None: no entropy term, b = 0)."""
    if ger is None:
        return -gor / s * inv_t, 0.0
    return -(gor - ger * q / s) / s * inv_t, -ger / s * inv_t


# ----------------------------------------------------------------------------- rows
# Inlined at Numba's level (as distillation's point helpers), so that each loop of _exp_sums
# compiles as if written out.
@njit(inline="always", **JIT)
def _exp_point(v, big, inv):
    """``(e, e d)`` of one logit ``v``: ``d = (v - big) * inv`` (:func:`_shift`),
    ``e = exp(d)``."""
    d = _shift(v, big, inv)
    e = fast_exp_nonpos(d)
    return e, e * d


@njit(**JIT)
def _exp_sums(row, big, inv_t, out):
    """``(s, q)`` of ``d = (row - big) * inv_t`` in float64 (blocks summed in the row's
    precision, as :func:`._math.sum_exp`); ``out`` (None, or a row that may be ``row``
    itself) receives ``exp(d)``. Separate loops per case: LLVM vectorises a two-array loop only
    behind an overlap check, which identical arrays fail."""
    inv = like(inv_t, row)
    s_total = 0.0
    q_total = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        rb = row[b0:b0 + SUM_BLOCK]
        s = like(0, row)
        q = like(0, row)
        if out is None:
            for c in range(rb.size):
                e, ed = _exp_point(rb[c], big, inv)
                s += e
                q += ed
        else:
            ob = out[b0:b0 + SUM_BLOCK]
            if ob.ctypes.data == rb.ctypes.data:
                for c in range(ob.size):
                    e, ed = _exp_point(ob[c], big, inv)
                    ob[c] = e
                    s += e
                    q += ed
            else:
                for c in range(ob.size):
                    e, ed = _exp_point(rb[c], big, inv)
                    ob[c] = e
                    s += e
                    q += ed
        s_total += s
        q_total += q
    return s_total, q_total


@njit(**JIT)
def _grad_row(out, row, big, inv_t, a, b, stored):
    """``out = e (a + b d)`` along a row, ``d = (row - big) * inv_t``, ``e = exp(d)``.

    ``b`` None: no entropy term, ``out`` holds ``e`` (``stored``) and is scaled in place.
    ``stored``: ``out`` holds ``e`` and ``row`` is another array (``d`` is recomputed from it,
    no second exp); else ``out`` is ``row`` itself (in place) and ``e`` is recomputed.
    """
    inv = like(inv_t, out)
    a = like(a, out)
    if b is None:
        for c in range(out.size):
            out[c] *= a
        return
    b = like(b, out)
    if stored:
        for c in range(out.size):
            out[c] *= a + b * _shift(row[c], big, inv)
    else:
        for c in range(out.size):
            d = _shift(out[c], big, inv)
            out[c] = fast_exp_nonpos(d) * (a + b * d)


@njit(**JIT)
def _row_grad(row, gr, ti, big, inv_t, log_c, gor, ger, cap):
    """``(logp, H)`` of one kept row (``row`` already soft-capped) and its gradient into
    ``gr`` (``ger`` None: no entropy term). ``e`` is stored in ``gr`` during the sums (one exp
    per logit) unless ``gr`` is the uncapped logits themselves and the entropy term needs ``d``
    from them: then the gradient pass computes the exps again."""
    y_t = row[ti]  # first: gr may be row, and the sums may store e into it
    stored = ger is None or cap is not None or gr.ctypes.data != row.ctypes.data
    if stored:
        s, q = _exp_sums(row, big, inv_t, gr)
    else:
        s, q = _exp_sums(row, big, inv_t, None)
    a, b = _coefficients(s, q, inv_t, gor, ger)
    if ger is None:
        _grad_row(gr, row, big, inv_t, a, None, True)
    else:
        _grad_row(gr, row, big, inv_t, a, b, stored)
    gr[ti] += like(gor * inv_t, row)
    if cap is not None:
        _vcap_slope(gr, row, cap)
    return _stats(y_t, big, s, q, inv_t, log_c)


@parallel_kernel(**JIT)
def _tlp_rows(x, t, ignore, inv_t, cap, log_c, logp, ent, go, ge, gx):
    for i in prange(x.shape[0]):
        prefetch_next_row(x, i)
        ti = t[i]
        if ti == ignore:
            logp[i] = 0
            ent[i] = 0
            if gx is not None:
                gx[i, :] = 0
        else:
            # One capped row per task with a soft cap (O(C) scratch): its slope then comes
            # from the capped values, and an in-place gradient may overwrite x freely.
            if cap is None:
                row = x[i]
            else:
                row = _capped_row(x[i], cap)
            big = row_max(row)
            if gx is None:
                s, q = _exp_sums(row, big, inv_t, None)
                logp[i], ent[i] = _stats(row[ti], big, s, q, inv_t, log_c)
            else:
                gor = 1.0 if go is None else np.float64(go[i])
                if ge is None:
                    logp[i], ent[i] = _row_grad(row, gx[i], ti, big, inv_t, log_c, gor, None,
                                                cap)
                else:
                    logp[i], ent[i] = _row_grad(row, gx[i], ti, big, inv_t, log_c, gor,
                                                np.float64(ge[i]), cap)


# ----------------------------------------------------------------------------- middle axis
@njit(**JIT)
def _vexp_sums(s, q, yc, big, inv_t, out):
    """``s += e``, ``q += e d`` along a block of positions, ``d = (yc - big) * inv_t``;
    ``out`` (None, or another array than ``yc``) receives ``e``."""
    inv = like(inv_t, yc)
    for j in range(s.size):
        d = _shift(yc[j], big[j], inv)
        e = fast_exp_nonpos(d)
        s[j] += e
        q[j] += e * d
        if out is not None:
            out[j] = e


@njit(**JIT)
def _vgrad(out, yc, big, inv_t, a, b, stored):
    """``out = e (a + b d)`` along a block of positions: ``stored``, ``out`` holds ``e`` and
    ``d`` comes from ``yc``; else ``out`` is ``yc`` itself (in place) and ``e`` is computed
    again (a one-array loop: see :func:`_exp_sums`)."""
    inv = like(inv_t, yc)
    if stored:
        for j in range(out.size):
            out[j] *= a[j] + b[j] * _shift(yc[j], big[j], inv)
    else:
        for j in range(out.size):
            d = _shift(out[j], big[j], inv)
            out[j] = fast_exp_nonpos(d) * (a[j] + b[j] * d)


@parallel_kernel(**JIT)
def _tlp_blocks(x, t, ignore, inv_t, cap, log_c, logp, ent, go, ge, gx, width):
    n, n_classes, inner = x.shape
    nblk = B.n_blocks(inner, width)
    for task in prange(n * nblk):
        o, j0, wd = B.block_task(task, nblk, width, inner)
        src, sj0 = _block_source(x, o, j0, wd, cap)
        tb = t[o, j0:j0 + wd]
        # The target logits first: an in-place gradient overwrites the logits below.
        y_t = _block_targets(src, tb, ignore, sj0)
        big = np.empty(wd, x.dtype)
        B.block_max(src, sj0, wd, big)
        s = np.zeros(wd, x.dtype)
        q = np.zeros(wd, x.dtype)
        # With a gradient, e goes into it during the sums (one exp per logit), unless the
        # gradient overwrites the uncapped logits, whose d the gradient pass needs.
        stored = False
        if gx is None:
            for c in range(n_classes):
                _vexp_sums(s, q, src[c, sj0:sj0 + wd], big, inv_t, None)
        else:
            stored = cap is not None or gx[o].ctypes.data != x[o].ctypes.data
            for c in range(n_classes):
                if stored:
                    _vexp_sums(s, q, src[c, sj0:sj0 + wd], big, inv_t, gx[o, c, j0:j0 + wd])
                else:
                    _vexp_sums(s, q, src[c, sj0:sj0 + wd], big, inv_t, None)
        # The gradient's coefficients per position (b stays 0 without an entropy term).
        a = np.empty(wd if gx is not None else 0, x.dtype)
        b = np.zeros_like(a)
        for j in range(wd):
            if tb[j] == ignore:
                logp[o, j0 + j], ent[o, j0 + j] = 0.0, 0.0
            else:
                logp[o, j0 + j], ent[o, j0 + j] = _stats(y_t[j], big[j], np.float64(s[j]),
                                                         np.float64(q[j]), inv_t, log_c)
            if gx is not None:
                gor = 1.0 if go is None else np.float64(go[o, j0 + j])
                sj, qj = np.float64(s[j]), np.float64(q[j])
                if ge is None:
                    a[j] = _coefficients(sj, qj, inv_t, gor, None)[0]
                else:
                    a[j], b[j] = _coefficients(sj, qj, inv_t, gor, np.float64(ge[o, j0 + j]))
        if gx is not None:
            go_o = gx[o]
            for c in range(n_classes):
                _vgrad(go_o[c, j0:j0 + wd], src[c, sj0:sj0 + wd], big, inv_t, a, b, stored)
            for j in range(wd):
                tj = tb[j]
                if tj == ignore:
                    go_o[:, j0 + j] = 0
                else:
                    go_o[tj, j0 + j] += (1.0 if go is None else go[o, j0 + j]) * inv_t
            if cap is not None:
                for c in range(n_classes):
                    _vcap_slope(go_o[c, j0:j0 + wd], src[c, sj0:sj0 + wd], cap)


# ----------------------------------------------------------------------------- entry point
@guarded
def token_logprobs(x3, t2, *, ignore_index, temperature, softcap, want_entropy, want_grad,
                   grad_output, grad_entropy, grad_buffer):
    """Per-position target log-probabilities and entropies (kernel protocol in
    :mod:`nblosses.backends`); the entropy is always computed (one FMA per logit) and
    returned only when asked for."""
    n, n_classes, inner = x3.shape
    logp = np.empty((n, inner), x3.dtype)
    ent = np.empty((n, inner), x3.dtype)
    gx = None
    if want_grad:
        gx = empty(x3.shape, x3.dtype) if grad_buffer is None else grad_buffer
    go = grad_output if want_grad else None
    ge = grad_entropy if want_grad else None
    cap = float(softcap) if softcap else None
    inv_t = 1.0 / float(temperature)
    log_c = math.log(n_classes) if n_classes else 0.0
    if x3.size == 0:  # no logits: every position is ignored (others fail the target check)
        logp[...] = 0
        ent[...] = 0
        if gx is not None:
            gx[...] = 0
    elif inner == 1:
        _tlp_rows(x3[:, :, 0], t2[:, 0], ignore_value(ignore_index), inv_t, cap, log_c, logp[:, 0],
                  ent[:, 0], _rows(go), _rows(ge), _rows(gx))
    else:
        _tlp_blocks(x3, t2, ignore_value(ignore_index), inv_t, cap, log_c, logp, ent, go, ge, gx,
                    B.width_for(x3))
    return logp, (ent if want_entropy else None), gx
