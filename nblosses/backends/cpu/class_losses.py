"""NLL and cross-entropy (class indices and class probabilities) on the CPU, with fused gradients.

Cross-entropy never materialises log-probabilities: per row it finds the max, sums
``exp(x - max)`` (the row stays in cache), and, when a gradient is wanted, stores those
exponentials in the gradient during the sum and rescales them in a last pass over the same
cached row (one exp per logit). Reduced losses are summed inside the kernels (float64),
so a reduced loss allocates nothing of the batch's size. The ``mean`` denominator depends only
on targets and weights, so a small pass over the targets finds it first and the gradient is
written final in one go. The gradient may be written into the logits themselves: each logit is
read before its slot is overwritten.

Optional arrays (weights, per-position outputs, the gradient) are passed as ``None`` when absent:
Numba prunes those branches at compile time, leaving branch-free loops.

Layouts as in :mod:`.softmax`: contiguous rows when ``inner == 1`` (transposed tiles when
``C < SMALL_C``), blocks of inner positions (vectorised along ``inner``) otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..._output_cache import empty
from ...errors import class_index_error
from .._formulas import ce_point, probs_point
from .._host import LossCall, div, ignore_value
from . import _blocks as B
from ._math import (
    JIT,
    JIT_EXACT,
    fast_exp_nonpos,
    like,
    prefetch_next_row,
    row_max,
    softcapped,
    sum_exp,
    sum_exp_store,
)
from ._parallel import POOL_SPINS, guarded, parallel_kernel

# ----------------------------------------------------------------------------- shared pieces
#: The passes over targets alone do a load and a compare per position: below this many the
#: thread pool's fork and join (and, on a busy machine, waiting for the second thread to be
#: scheduled) cost more than the pass.
TARGET_GRAIN = 1 << 20


@parallel_kernel(grain=TARGET_GRAIN, **JIT)
def _target_weight_sum(t, w, ignore):
    """torch's ``mean`` denominator: the summed weights (or count) of non-ignored targets.

    Selects, not a branch around the sum: the branch kept the count scalar (65536 targets:
    75 us, against 3.3 us vectorised; 2-core Zen 5)."""
    total = 0.0
    for i in prange(t.size):
        ti = t[i]
        keep = ti != ignore
        if w is None:
            total += 1.0 if keep else 0.0
        else:
            total += np.float64(w[ti if keep else 0]) if keep else 0.0
    return total


@parallel_kernel(grain=TARGET_GRAIN, **JIT)
def _index_range(t):
    """``(min, max)`` of a flat int64 array in one parallel pass."""
    lo = t[0]
    hi = t[0]
    for i in prange(t.size):
        lo = min(lo, t[i])
        hi = max(hi, t[i])
    return lo, hi


def index_range(t2) -> tuple[int, int]:
    """The backend's ``index_range`` hook: one pass over the targets instead of NumPy's two."""
    lo, hi = _index_range(t2.reshape(-1))
    return int(lo), int(hi)


def _loss_call(x3, reduction: str, want_grad: bool, grad_output, grad_buffer,
               denom) -> LossCall:
    """The host plan of a class-loss call (:class:`.._host.LossCall`): outputs from the output
    cache, the total summed by the kernels on the host."""
    n, _, inner = x3.shape
    return LossCall(np, x3.shape, (n, inner), x3.dtype, reduction=reduction,
                    want_grad=want_grad, grad_output=grad_output, grad_buffer=grad_buffer,
                    denom=denom, empty=empty)


def _denominator(t2, weight, ignore: int, reduction: str) -> float | None:
    """torch's ``mean`` denominator (None for the other reductions, which have none)."""
    return _target_weight_sum(t2.reshape(-1), weight, ignore) if reduction == "mean" else None


def _rows(a):
    """Drop the unit ``inner`` axis (``(N, C, 1)`` -> ``(N, C)``, ``(N, 1)`` -> ``(N,)``);
    None passes through."""
    return None if a is None else a[..., 0]


# ----------------------------------------------------------------------------- cross-entropy
# Every layout reduces a position to (m, ls = log sum exp(x - m), x_t, sum_c w_c x_c); _ce_point
# (the algebra of :mod:`.._formulas`) turns those into the loss (float64, lse = m + ls) and the
# gradient's coefficients: g_c = coef * exp((x_c - m) - ls) - b * w_c, then g_t -= a.
#
# The kernels take their arguments in one order: the inputs (logits, targets, class weights,
# per-position upstream gradient), the outputs (per-position losses, gradient, lse), the soft
# cap, the scalars (one named tuple), then the layout's own. Optional arrays and the soft cap
# are None when absent, each its own argument: Numba prunes those branches at compile time.
# ``cap`` is None or the logit soft cap (x' = cap tanh(x / cap) replaces x everywhere; the
# gradient is then multiplied by 1 - tanh(x / cap)^2); ``lse_out`` receives lse for every
# position.
class CEScalars(NamedTuple):
    """The scalars of the class-index cross-entropy kernels, one argument.

    The host passes it as a plain tuple (``tuple(CEScalars(...))``) and each kernel starts
    with ``k = CEScalars(*scalars)``, then reads the fields by name (Numba compiles the named tuple;
    a name it lacks fails the compilation). The plain tuple crosses Numba's dispatcher without
    a Python-level type lookup: a named tuple argument cost 0.6 us more per call (Zen 4).
    """

    ignore: int  # ignore_index (int64)
    eps: float  # label smoothing
    w_total: float  # sum of the class weights (C without weights)
    g_scalar: float  # a reduced loss's upstream gradient over its denominator
    z: float  # z-loss weight (0.0: off): z lse^2 per kept position


class ProbScalars(NamedTuple):
    """The scalars of the class-probability cross-entropy kernels (passed as
    :class:`CEScalars` is)."""

    eps: float  # label smoothing
    g_scalar: float  # a reduced loss's upstream gradient over its denominator
    z: float  # z-loss weight (0.0: off)


_ce_point = njit(**JIT)(ce_point)
_probs_point = njit(**JIT)(probs_point)


@njit(**JIT)
def _coef_scratch(gx, n, dtype):
    """The gradient's per-position coefficients ``(a, cs, b)`` for ``n`` positions: ``a``
    (subtracted at the target), ``cs`` (``coef / sum(exp(x - m))``, multiplies ``exp(x - m)``),
    ``b`` (multiplies ``w_c``); None without a gradient (``gx`` None: pruned at compile time)."""
    if gx is None:
        return None
    a = np.empty(n, dtype)
    return a, np.empty_like(a), np.empty_like(a)


@njit(**JIT)
def _weighted_sum(w, row):
    """``sum_c w_c x_c`` (``sum_c x_c`` without weights), float64."""
    s = 0.0
    for c in range(row.size):
        s += row[c] if w is None else w[c] * row[c]
    return s


@njit(**JIT)
def _ce_grad_row(out, scale, b, w):
    """``out = scale * out - b * w``: ``out`` holds ``exp(x - m)`` from :func:`sum_exp_store` and
    ``scale`` is ``coef / sum(exp(x - m))``, so the gradient costs no second exp per logit."""
    scale = like(scale, out)
    b = like(b, out)
    one = like(1, out)
    for c in range(out.size):
        out[c] = scale * out[c] - b * (one if w is None else w[c])


@njit(**JIT)
def _vce_grad(out, scale, b, wc):
    """``out = scale * out - b * wc`` along a vector of positions: ``out`` holds ``exp(x - m)``
    and ``scale`` is ``coef / sum(exp(x - m))`` (as :func:`_ce_grad_row`)."""
    wc = like(wc, out)
    for j in range(out.size):
        out[j] = scale[j] * out[j] - b[j] * wc


@njit(**JIT)
def _capped_row(xr, cap):
    """A fresh row ``cap * tanh(xr / cap)``."""
    out = np.empty(xr.size, xr.dtype)
    for c in range(xr.size):
        out[c] = softcapped(xr[c], cap)
    return out


@njit(**JIT)
def _capped_block(xb, cap):
    """A fresh ``(C, width)`` block ``cap * tanh(xb / cap)``."""
    out = np.empty(xb.shape, xb.dtype)
    for c in range(xb.shape[0]):
        out[c] = _capped_row(xb[c], cap)
    return out


@njit(**JIT)
def _block_source(x, o, j0, wd, cap):
    """``(src, sj0)``: the block's logits are ``src[:, sj0:sj0 + wd]``: ``x[o]`` itself, or with
    a soft cap their capped copy (a ``(C, wd)`` scratch of this task)."""
    if cap is None:
        return x[o], j0
    return _capped_block(x[o, :, j0:j0 + wd], cap), 0


@njit(**JIT)
def _vcap_slope(gc, xcap, cap):
    """``gc *= 1 - (xcap / cap)^2``: the soft cap's slope from the capped logits."""
    c = like(cap, gc)
    one = like(1, gc)
    for j in range(gc.size):
        t = xcap[j] / c
        gc[j] *= one - t * t


@njit(**JIT)
def _ce_row(row, ti, w, k, scale, cap, go):
    """One row (``row`` already soft-capped): ``(loss, lse)``, the gradient into ``go`` (None:
    no gradient; ``go`` may be ``row``: x_t and the smoothing sum are read first)."""
    kept = ti != k.ignore
    x_t = np.float64(row[ti]) if kept else 0.0
    swx = _weighted_sum(w, row) if k.eps > 0 and kept else 0.0
    m = row_max(row)
    # With a gradient, exp(x - m) is stored in its row (one exp per logit, not two).
    if go is None:
        s = sum_exp(row, m)
    elif kept:
        s = sum_exp_store(row, go, m)
    else:
        s = sum_exp(row, m)
        go[:] = 0
    lse = m + np.log(s)
    if not kept:
        return 0.0, lse
    loss, a, coef, b = _ce_point(lse, x_t, swx, 1.0 if w is None else w[ti], k.eps, row.size,
                                 k.w_total, scale, k.z)
    if go is not None:
        _ce_grad_row(go, coef / s, b, w)
        go[ti] -= like(a, row)
        if cap is not None:
            _vcap_slope(go, row, cap)
    return loss, lse


@parallel_kernel(**JIT)
def _ce_rows(x, t, w, g, out, gx, lse_out, cap, scalars):
    """Long rows (``C >= SMALL_C``), one row per step along the contiguous row."""
    k = CEScalars(*scalars)
    total = 0.0
    for i in prange(x.shape[0]):
        prefetch_next_row(x, i)
        ti = t[i]
        if ti == k.ignore and lse_out is None:  # nothing to compute
            if out is not None:
                out[i] = 0
            if gx is not None:
                gx[i, :] = 0
        else:
            scale = k.g_scalar if g is None else np.float64(g[i])
            if cap is None:
                row = x[i]
            else:  # one capped row per task: O(C) scratch
                row = _capped_row(x[i], cap)
            if gx is None:
                loss, lse = _ce_row(row, ti, w, k, scale, cap, None)
            else:
                loss, lse = _ce_row(row, ti, w, k, scale, cap, gx[i])
            total += loss
            if out is not None:
                out[i] = loss
            if lse_out is not None:
                lse_out[i] = lse
    return total


@parallel_kernel(**JIT)
def _ce_tiles(x, t, w, g, out, gx, lse_out, cap, scalars, ngroups):
    """Short rows (C < SMALL_C): statistics, and the gradient, on transposed tiles, in
    ``ngroups`` parallel tasks (:func:`._blocks.tile_tasks`)."""
    k = CEScalars(*scalars)
    n, n_classes = x.shape
    total = 0.0
    ntiles = B.n_tiles(n)
    for group in prange(ngroups):
        xt, m, s = B.tile_scratch(n_classes, x.dtype)
        stats = (m, s, np.empty(B.TILE, x.dtype))  # and log s
        coefs = _coef_scratch(gx, B.TILE, x.dtype)
        t0, t1 = B.group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            # With a gradient, xt is left holding exp(x - m) (one exp per logit); x_t and the
            # smoothing sum are then read from x, which this tile writes back to at the end.
            r0, nr = B.tile_stats(x, tile, gx is not None, cap, xt, m, s)
            total += _ce_tile_rows(x, t, w, g, out, lse_out, cap, k, r0, nr, stats, coefs)
            if gx is not None:
                _tile_ce_grad(x, t, w, gx, cap, k.ignore, r0, nr, xt, coefs)
    return total


@parallel_kernel(**JIT)
def _ce_split_tiles(xf, x, t, w, g, out, gf, lse_out, scalars, ngroups, part_token,
                    n_parts_token):
    """:func:`_ce_tiles` without a soft cap, for ``C = part * n_parts`` classes: ``xf`` the
    logits ``x`` flat, ``gf`` the flat gradient or None. Each tile is transposed by loops of
    compile-time length and reduced by :func:`._blocks.split_stats`, as softmax's split tiles
    (vector shuffles where the general tiles gather); the gradient is formed in that layout and
    written back through the same fixed pattern. Each logit is read (transposed, and by
    :func:`_ce_tile_rows`) before its slot of ``gf`` is written: ``gf`` may be ``xf``."""
    k = CEScalars(*scalars)
    part = len(part_token)
    n_parts = len(n_parts_token)
    n, n_classes = x.shape
    total = 0.0
    ntiles = B.n_tiles(n)
    grad = gf is not None
    for group in prange(ngroups):
        xt = np.empty((part, n_parts * B.TILE), x.dtype)
        m = np.empty(B.TILE, x.dtype)
        s = np.empty(B.TILE, x.dtype)
        mk = np.empty(n_parts * B.TILE, x.dtype)
        # log s goes into mk once split_stats is done with it: the scratch stays within the
        # 1% of the logits (65536x[10] float32 with the gradient: 1.02% with its own array).
        stats = (m, s, mk[:B.TILE])
        no_exps = np.empty(0, x.dtype)  # split_stats leaves the exps in xt
        coefs = _coef_scratch(gf, B.TILE, x.dtype)
        # w_c in the split layout: wk[c, j] = w[j * part + c] (class c of run j).
        wk = np.empty((part if grad and w is not None else 0, n_parts), x.dtype)
        if w is not None:  # pruned when compiling without weights
            for c in range(wk.shape[0]):
                for j in range(n_parts):
                    wk[c, j] = w[j * part + c]
        t0, t1 = B.group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            r0, nr = B.tile_rows(n, tile)
            nh = nr * n_parts
            src = xf[r0 * n_classes:(r0 + nr) * n_classes]
            # The transposition inline, as in softmax's split tiles (a helper was slower).
            for h in range(nh):
                for c in range(part):
                    xt[c, h] = src[h * part + c]
            B.split_stats(xt, m, s, mk, no_exps, nr, False, part_token, n_parts_token)
            total += _ce_tile_rows(x, t, w, g, out, lse_out, None, k, r0, nr, stats, coefs)
            if grad:
                _split_ce_grad(xt, t, w, gf[r0 * n_classes:(r0 + nr) * n_classes], k.ignore,
                               r0, nr, coefs, wk, part_token, n_parts_token)
    return total


@njit(**JIT)
def _split_ce_grad(xt, t, w, dst, ignore, r0, nr, coefs, wk, part_token, n_parts_token):
    """The gradient of one split tile from ``exp(x - m)`` in ``xt``: ``cs * e - b * w_c``,
    minus ``a`` at the target, zero for an ignored row; written to the tile's flat rows
    ``dst``. A row's coefficients apply to its ``n_parts`` runs in a loop of constant length
    (no spread copies: the scratch stays that of the general tiles, under 1% of the logits)."""
    part = len(part_token)
    n_parts = len(n_parts_token)
    nh = nr * n_parts
    a, cs, b = coefs
    for c in range(part):
        xc = xt[c]
        for r in range(nr):
            csr = cs[r]
            br = b[r]
            for j in range(n_parts):
                wcj = like(1, xc) if w is None else wk[c, j]
                xc[r * n_parts + j] = csr * xc[r * n_parts + j] - br * wcj
    for r in range(nr):
        ti = t[r0 + r]
        if ti == ignore:
            for c in range(part):
                for j in range(n_parts):
                    xt[c, r * n_parts + j] = 0
        else:
            xt[ti % part, r * n_parts + ti // part] -= a[r]
    for h in range(nh):
        for c in range(part):
            dst[h * part + c] = xt[c, h]


@njit(**JIT)
def _ce_tile_rows(x, t, w, g, out, lse_out, cap, k, r0, nr, stats, coefs):
    """Losses of one tile's rows ``r0:r0 + nr`` (their sum is returned; per-row into ``out``,
    lse into ``lse_out``) from their ``stats = (m, s, ls)`` (``ls`` receives log s) and, with a
    gradient (``coefs`` not None, see :func:`_coef_scratch`), its coefficients."""
    n_classes = x.shape[1]
    m, s, ls = stats
    total = 0.0
    B.vlog(s[:nr], ls[:nr])
    for r in range(nr):
        ti = t[r0 + r]
        lse = np.float64(m[r]) + ls[r]
        if lse_out is not None:
            lse_out[r0 + r] = lse
        if ti == k.ignore:
            if out is not None:
                out[r0 + r] = 0
        else:
            swx = _tile_weighted_sum(w, x[r0 + r], cap) if k.eps > 0 else 0.0
            scale = k.g_scalar if g is None else np.float64(g[r0 + r])
            loss, ar, cf, br = _ce_point(lse, softcapped(x[r0 + r, ti], cap), swx,
                                         1.0 if w is None else w[ti], k.eps, n_classes,
                                         k.w_total, scale, k.z)
            total += loss
            if out is not None:
                out[r0 + r] = loss
            if coefs is not None:
                a, cs, b = coefs
                a[r], cs[r], b[r] = ar, cf / s[r], br
    return total


@njit(**JIT)
def _tile_weighted_sum(w, row, cap):
    """:func:`_weighted_sum` of the soft-capped row (a short row: no scratch)."""
    s = 0.0
    for c in range(row.size):
        v = softcapped(row[c], cap)
        s += v if w is None else w[c] * v
    return s


@njit(**JIT)
def _tile_ce_grad(x, t, w, gx, cap, ignore, r0, nr, xt, coefs):
    """The gradient of one tile from ``exp(x - m)`` in ``xt``, written back transposed (each
    logit is read, for the soft cap's slope, before its slot of ``gx`` is written)."""
    a, cs, b = coefs
    for c in range(xt.shape[0]):  # inline, as in _softmax_tiles: calls cost more here
        wc = like(1.0 if w is None else w[c], x)
        xc = xt[c]  # 1-D, indexed from 0: see tile_stats
        for r in range(nr):
            xc[r] = cs[r] * xc[r] - b[r] * wc
    for r in range(nr):
        ti = t[r0 + r]
        if ti == ignore:
            xt[:, r] = 0
        else:
            xt[ti, r] -= a[r]
    B.tile_store(gx, r0, nr, xt, None if cap is None else x, cap)


@njit(**JIT)
def _vaxpy(acc, alpha, xc):
    """``acc += alpha * xc``."""
    alpha = like(alpha, xc)
    for j in range(acc.size):
        acc[j] += alpha * xc[j]


@parallel_kernel(**JIT)
def _ce_blocks(x, t, w, g, out, gx, lse_out, cap, scalars, width):
    """A middle axis (``inner > 1``): blocks of ``width`` inner positions, the classes walked
    with the contiguous block as the vector."""
    k = CEScalars(*scalars)
    n, n_classes, inner = x.shape
    nblk = B.n_blocks(inner, width)
    eps = k.eps
    total = 0.0
    for task in prange(n * nblk):
        o, j0, wd = B.block_task(task, nblk, width, inner)
        src, sj0 = _block_source(x, o, j0, wd, cap)
        # x_t and sum_c w_c x_c first: an in-place gradient overwrites the logits below.
        x_t = _block_targets(src, t[o, j0:j0 + wd], k.ignore, sj0)
        # Scratch (x_t, m, s, ls, swx with smoothing, a, cs, b with a gradient) is the only
        # memory a loss allocates, per running task: O(width), not O(N C).
        swx = np.zeros(wd if eps > 0 else 0, x.dtype)
        if eps > 0:
            for c in range(n_classes):
                _vaxpy(swx, 1.0 if w is None else w[c], src[c, sj0:sj0 + wd])
        m = np.empty(wd, x.dtype)
        s = np.empty(wd, x.dtype)
        if gx is None:
            B.block_stats(src, sj0, wd, m, s)
        else:  # exp(x - m) stored in the gradient: one exp per logit
            B.block_stats_store(src, sj0, wd, m, s, gx[o], j0)
        ls = np.empty(wd, x.dtype)
        B.vlog(s, ls)
        # The gradient's coefficients per position, as in _ce_tiles; arrays of their own here:
        # a tuple unpacked inside this loop of a parallel task lost its stores (Numba 0.68).
        a = np.empty(wd if gx is not None else 0, x.dtype)
        cs = np.empty_like(a)
        b = np.empty_like(a)
        for j in range(wd):
            tj = t[o, j0 + j]
            lse = np.float64(m[j]) + ls[j]
            if lse_out is not None:
                lse_out[o, j0 + j] = lse
            if tj == k.ignore:
                if out is not None:
                    out[o, j0 + j] = 0
            else:
                scale = k.g_scalar if g is None else np.float64(g[o, j0 + j])
                loss, aj, cf, bj = _ce_point(lse, x_t[j], swx[j] if eps > 0 else 0.0,
                                             1.0 if w is None else w[tj], eps, n_classes,
                                             k.w_total, scale, k.z)
                total += loss
                if out is not None:
                    out[o, j0 + j] = loss
                if gx is not None:
                    a[j], cs[j], b[j] = aj, cf / s[j], bj
        if gx is not None:
            _block_ce_grad(gx[o], t[o, j0:j0 + wd], w, k.ignore, j0, (a, cs, b))
            if cap is not None:
                for c in range(n_classes):
                    _vcap_slope(gx[o, c, j0:j0 + wd], src[c], cap)
    return total


@njit(**JIT)
def _block_targets(xo, tb, ignore, j0):
    """``x[t_j, j0 + j]`` for the block's positions (0 where ignored)."""
    x_t = np.empty(tb.size, xo.dtype)
    for j in range(tb.size):
        tj = tb[j]
        x_t[j] = 0 if tj == ignore else xo[tj, j0 + j]
    return x_t


@njit(**JIT)
def _block_ce_grad(go, tb, w, ignore, j0, coefs):
    """The gradient of one block from ``exp(x - m)`` stored in ``go``: ``cs * e - b * w_c``,
    minus ``a`` at the target; zero at ignored positions."""
    a, cs, b = coefs
    wd = tb.size
    for c in range(go.shape[0]):
        _vce_grad(go[c, j0:j0 + wd], cs, b, 1.0 if w is None else w[c])
    for j in range(wd):
        tj = tb[j]
        if tj == ignore:
            go[:, j0 + j] = 0
        else:
            go[tj, j0 + j] -= a[j]


def _cap(softcap: float) -> float | None:
    """The soft cap as the kernels take it: None when off (its branches pruned at compile
    time)."""
    return float(softcap) if softcap else None


@guarded
def cross_entropy(x3, t2, weight, *, ignore_index, label_smoothing, reduction, want_grad,
                  grad_output, grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None):
    """Cross-entropy with class-index targets (kernel protocol in :mod:`nblosses.backends`)."""
    n, n_classes, inner = x3.shape
    ignore = ignore_value(ignore_index)
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer,
                      _denominator(t2, weight, ignore, reduction))
    if not x3.size:
        call.fill_empty(lse_out)
        return call.result(), call.grad
    w_total = float(n_classes if weight is None else weight.sum(dtype=np.float64))
    scalars = tuple(CEScalars(ignore, float(label_smoothing), w_total, call.g_scalar,
                              float(z_loss)))
    cap = _cap(softcap)
    if inner > 1:
        total = _ce_blocks(x3, t2, weight, call.g_rows, call.losses, call.grad, lse_out, cap,
                           scalars, B.width_for(x3))
        return call.result(total), call.grad
    x, t, gx = x3[:, :, 0], t2[:, 0], _rows(call.grad)
    g, out, lse = _rows(call.g_rows), _rows(call.losses), _rows(lse_out)
    parts = B.tile_parts(n_classes, x3.itemsize) if n_classes < B.SMALL_C else None
    flat = x3.flags.c_contiguous and (gx is None or call.grad.flags.c_contiguous)
    if parts is not None and cap is None and flat:
        total = _ce_split_tiles(x3.reshape(-1), x, t, weight, g, out,
                                None if gx is None else call.grad.reshape(-1), lse, scalars,
                                B.tile_tasks(n), *parts)
    elif n_classes < B.SMALL_C:
        total = _ce_tiles(x, t, weight, g, out, gx, lse, cap, scalars, B.tile_tasks(n))
    else:
        total = _ce_rows(x, t, weight, g, out, gx, lse, cap, scalars)
    return call.result(total), call.grad


# ----------------------------------------------------------------------------- probabilities
@parallel_kernel(**JIT)
def _ce_probs_rows(x, y, w, g, out, gx, lse_out, cap, scalars):
    """Rows (``inner == 1``), one per step."""
    k = ProbScalars(*scalars)
    n, n_classes = x.shape
    keep = 1.0 - k.eps
    spread = k.eps / n_classes
    total = 0.0
    for i in prange(n):
        if cap is None:
            row = x[i]
        else:  # one capped row per task: O(C) scratch
            row = _capped_row(x[i], cap)
        yr = y[i]
        m = row_max(row)
        s = sum_exp(row, m)
        lse = m + np.log(s)
        a_sum = 0.0  # sum_c w_c y'_c
        b_sum = 0.0  # sum_c w_c y'_c x_c
        for c in range(n_classes):
            wy = (1.0 if w is None else w[c]) * (yr[c] * keep + spread)
            a_sum += wy
            b_sum += wy * row[c]
        scale = k.g_scalar if g is None else np.float64(g[i])
        loss, coef = _probs_point(lse, a_sum, b_sum, scale, k.z)
        total += loss
        if out is not None:
            out[i] = loss
        if lse_out is not None:
            lse_out[i] = lse
        if gx is not None:
            _vprob_grad_row(gx[i], row, yr, m, like(coef / s, row), like(scale, row), w,
                            like(keep, row), like(spread, row))
            if cap is not None:
                _vcap_slope(gx[i], row, cap)
    return total


@njit(**JIT)
def _vprob_grad_row(out, row, yr, m, coef, scale, w, keep, spread):
    """``out = coef * exp(x - m) - scale * w y'`` along a row (``coef`` holds ``1/s``); ``out``
    may be ``row``."""
    one = like(1, row)
    if out.ctypes.data == row.ctypes.data:
        for c in range(out.size):
            wc = one if w is None else w[c]
            out[c] = coef * fast_exp_nonpos(out[c] - m) - scale * wc * (yr[c] * keep + spread)
    else:
        for c in range(out.size):
            wc = one if w is None else w[c]
            out[c] = coef * fast_exp_nonpos(row[c] - m) - scale * wc * (yr[c] * keep + spread)


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
    if out.ctypes.data == xc.ctypes.data:
        for j in range(out.size):
            out[j] = (coef[j] * fast_exp_nonpos((out[j] - m[j]) - ls[j])
                      - scale[j] * wc * (yc[j] * keep + spread))
    else:
        for j in range(out.size):
            out[j] = (coef[j] * fast_exp_nonpos((xc[j] - m[j]) - ls[j])
                      - scale[j] * wc * (yc[j] * keep + spread))


@parallel_kernel(**JIT)
def _ce_probs_blocks(x, y, w, g, out, gx, lse_out, cap, scalars, width):
    """A middle axis (``inner > 1``): blocks as :func:`_ce_blocks`."""
    k = ProbScalars(*scalars)
    n, n_classes, inner = x.shape
    nblk = B.n_blocks(inner, width)
    keep = 1.0 - k.eps
    spread = k.eps / n_classes
    total = 0.0
    for task in prange(n * nblk):
        o, j0, wd = B.block_task(task, nblk, width, inner)
        src, sj0 = _block_source(x, o, j0, wd, cap)
        yo = y[o]
        m = np.empty(wd, x.dtype)
        s = np.empty(wd, x.dtype)
        B.block_stats(src, sj0, wd, m, s)
        ls = np.empty(wd, x.dtype)
        B.vlog(s, ls)
        a_sum = np.zeros(wd, x.dtype)  # sum_c w_c y'_c
        b_sum = np.zeros(wd, x.dtype)  # sum_c w_c y'_c x_c
        for c in range(n_classes):
            _vprob_sums(a_sum, b_sum, src[c, sj0:sj0 + wd], yo[c, j0:j0 + wd],
                        1.0 if w is None else w[c], keep, spread)
        coef = np.empty(wd if gx is not None else 0, x.dtype)  # of exp((x - m) - ls)
        scale = np.empty_like(coef)  # of the w y' term
        for j in range(wd):
            lse = np.float64(m[j]) + ls[j]
            sc = k.g_scalar if g is None else np.float64(g[o, j0 + j])
            loss, cf = _probs_point(lse, np.float64(a_sum[j]), b_sum[j], sc, k.z)
            total += loss
            if out is not None:
                out[o, j0 + j] = loss
            if lse_out is not None:
                lse_out[o, j0 + j] = lse
            if gx is not None:
                scale[j] = sc
                coef[j] = cf
        if gx is not None:
            for c in range(n_classes):
                gc = gx[o, c, j0:j0 + wd]
                _vprob_grad(gc, src[c, sj0:sj0 + wd], yo[c, j0:j0 + wd], m, ls, coef, scale,
                            1.0 if w is None else w[c], keep, spread)
                if cap is not None:
                    _vcap_slope(gc, src[c], cap)
    return total


@guarded
def cross_entropy_probs(x3, p3, weight, *, label_smoothing, reduction, want_grad, grad_output,
                        grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None):
    """Cross-entropy with class-probability targets (``mean`` divides by ``N * inner``)."""
    n, _, inner = x3.shape
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer, float(n * inner))
    if not x3.size:
        call.fill_empty(lse_out)
        return call.result(), call.grad
    scalars = tuple(ProbScalars(float(label_smoothing), call.g_scalar, float(z_loss)))
    cap = _cap(softcap)
    if inner == 1:
        total = _ce_probs_rows(x3[:, :, 0], p3[:, :, 0], weight, _rows(call.g_rows),
                               _rows(call.losses), _rows(call.grad), _rows(lse_out), cap, scalars)
    else:
        total = _ce_probs_blocks(x3, p3, weight, call.g_rows, call.losses, call.grad, lse_out,
                                 cap, scalars, B.width_for(x3))
    return call.result(total), call.grad


# ----------------------------------------------------------------------------- nll
#: The NLL pass gathers one logit per position, a cache (and often TLB) miss each. In a
#: spinning pool (torch's, torch imported first) two threads halve that from about 4096
#: positions on; in Numba's own pool a region first waits ~35 us for its threads. 2-core
#: Zen 4, us, serial / parallel build: torch first, 2048x[1000] 3.9 / 4.1, 4096x[1000] 10.9 /
#: 5.8, 4096x[10] 7.2 / 6.8, 8192x[1024] 31.1 / 19.2; without torch, 4096x[1000] 10.9 / 44.9,
#: 65536x[10] 110 / 94.
GATHER_GRAIN = 4096 if POOL_SPINS else TARGET_GRAIN


@parallel_kernel(grain=GATHER_GRAIN, **JIT)
def _nll_loss(t, x, inner, w, ignore, out):
    """Summed losses ``-w_t x_t``, torch's mean denominator (the summed ``w_t`` of kept
    targets) and the first position whose target is neither ignored nor in ``[0, C)`` (``t``'s
    size if none), in one pass over the targets (work: one gather per position, hence ``t``
    first for the grain). A bad target is never used as an address.

    Flat views, so that ``(N, C)`` input passes as it is: ``t`` ``(N * inner,)``, ``x``
    ``(N, C * inner)``, ``out`` ``(N * inner,)`` or None.
    """
    n = x.shape[0]
    n_classes = x.shape[1] // inner if inner else 0
    total = 0.0
    w_kept = 0.0
    first_bad = t.size
    for o in prange(n):
        for j in range(inner):
            i = o * inner + j
            tj = t[i]
            loss = 0.0
            if tj != ignore:
                if tj < 0 or tj >= n_classes:
                    first_bad = min(first_bad, i)
                    loss = np.nan
                else:
                    wt = 1.0 if w is None else np.float64(w[tj])
                    loss = -wt * x[o, tj * inner + j]
                    w_kept += wt
            total += loss
            if out is not None:
                out[i] = loss
    return total, w_kept, first_bad


_nll_loss_threaded = guarded(_nll_loss)
_nll_loss_serial = _nll_loss.serial
_ce_rows_locked = guarded(_ce_rows)


def _checked_rows(x2, t, ignore: int, out):
    """:func:`_nll_loss` over the rows of ``(N, C)`` ``x2`` as they are (``ignore`` clipped by
    :func:`ignore_value`): ``(summed losses, kept count)``; ``IndexError`` for the first bad
    target."""
    n = len(t)
    # Below the grain the serial build, called directly: no thread pool, hence no lock.
    kernel = _nll_loss_serial if n < GATHER_GRAIN else _nll_loss_threaded
    total, w_kept, first_bad = kernel(t, x2, 1, None, ignore, out)
    if first_bad != n:
        raise class_index_error(int(t[first_bad]), x2.shape[1])
    return total, w_kept


def _plain_result(out, total: float, kept: float, reduction: str, dtype):
    """A plain call's loss as :meth:`LossCall.result` gives it, without the object (a
    microsecond of a small call)."""
    if out is not None:
        return out
    if reduction == "mean":  # div's IEEE quotient only where nothing was kept
        total = total / kept if kept else div(total, kept)
    return np.asarray(total, dtype)


def nll_loss_rows(x2, t, ignore_index: int, reduction: str):
    """The plain call ``nll_loss(x2, t, ignore_index=..., reduction=...)`` of an ``(N, C)``
    float32/float64 array and ``(N,)`` int64 targets, as they are (no canonical copies): the
    fast path of :mod:`nblosses._fast`, where every 0.1 us counts (64 rows of kernel take
    0.4 us). Checks the targets itself (``IndexError``)."""
    out = np.empty(len(t), x2.dtype) if reduction == "none" else None
    total, kept = _checked_rows(x2, t, ignore_value(ignore_index), out)
    return _plain_result(out, total, kept, reduction, x2.dtype)


def cross_entropy_rows(x2, t, ignore_index: int, reduction: str):
    """The plain call ``cross_entropy(x2, t, ignore_index=..., reduction=...)`` of a
    C-contiguous ``(N, C)`` float32/float64 array with ``C >= SMALL_C`` and ``(N,)`` int64
    targets, for :mod:`nblosses._fast`: the row kernel :func:`cross_entropy` runs on such
    input (the same results bit for bit) without its host plan; None for any other input.

    The targets are checked, and the kept ones counted (``mean``'s denominator), by the NLL
    pass: one kernel call instead of the two target passes, and the logits it gathers are
    read again at once by the loss pass."""
    n, n_classes = x2.shape
    if n_classes < B.SMALL_C or not n or not x2.flags.c_contiguous:
        return None
    ignore = ignore_value(ignore_index)
    _, kept = _checked_rows(x2, t, ignore, None)
    out = np.empty(n, x2.dtype) if reduction == "none" else None
    # CEScalars as cross_entropy passes them without weights, smoothing, gradient or z-loss.
    total = _ce_rows_locked(x2, t, None, None, out, None, None, None,
                            (ignore, 0.0, float(n_classes), 0.0, 0.0))
    return _plain_result(out, total, kept, reduction, x2.dtype)


@parallel_kernel(**JIT)
def _nll_grad(gx, t, w, ignore, g, g_scalar):
    """The whole gradient: each row of ``gx`` cleared, then ``-w_t * g`` at its targets while
    it is in cache (``gx`` first: clearing it is the work). A fresh ``np.empty`` plus this
    beats ``np.zeros``, whose pages fault in zeroed one by one on first write."""
    n, inner = t.shape
    for o in prange(n):
        gx[o] = 0
        for j in range(inner):
            tj = t[o, j]
            if tj != ignore:
                scale = g_scalar if g is None else np.float64(g[o, j])
                gx[o, tj, j] = -(1.0 if w is None else w[tj]) * scale


@guarded
def nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer):
    """NLL on log-probabilities; the gradient is zero but at the target classes."""
    n, c, inner = x3.shape
    ignore = ignore_value(ignore_index)
    # The mean denominator comes with the losses: the loss pass sums the kept weights.
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer, None)
    # The losses read x before an in-place gradient buffer is cleared.
    total, w_kept, first_bad = _nll_loss(t2.reshape(-1), x3.reshape(n, c * inner), inner,
                                         weight, ignore,
                                         None if call.losses is None else call.losses.reshape(-1))
    if first_bad != t2.size:
        raise class_index_error(int(t2.reshape(-1)[first_bad]), c)
    call.set_denominator(w_kept)
    if call.grad is not None:
        _nll_grad(call.grad, t2, weight, ignore, call.g_rows, call.g_scalar)
    return call.result(total), call.grad
