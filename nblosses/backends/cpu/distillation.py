"""Distillation losses on the CPU: student and teacher logits in one fused pass per row.

A row's student logits ``s`` and teacher logits ``t`` (soft-capped first when asked: then the
row is a capped copy, O(C) scratch per task) give ``zs = s / T``, ``zt = t / T`` and the
softmaxes ``p_s``, ``p_t``. Per row, while the row is in cache:

1. both maxima, in one loop (the only pass that reads the row from memory);
2. ``sum exp(zs - Ms)``, ``sum exp(zt - Mt)`` and the divergence's own sum (forward KL:
   ``sum e_t (zt - zs)``; reverse KL: ``sum e_s (zs - zt)``), float32 (float64) blocks into
   float64 totals; JSD takes one more pass for ``sum`` of its terms with ``log m``;
3. the gradient, written once. The forward KL and the top-k teacher (without a separate
   hard softmax) store ``e_s`` in the gradient row during pass 2 (the forward KL ``e_t`` in
   an O(C) scratch row), so pass 3 takes no exponential; the other modes recompute theirs.
   The gradient may be written into the logits themselves: each logit is read before its
   slot is overwritten, through loops over the one array (LLVM vectorises a loop over two
   arrays only behind an overlap check, which identical arrays fail).

Gradients with respect to ``z`` (then times ``1 / T`` and the soft cap's slope
``1 - (cap(s) / c)^2``)::

    forward KL(p_t || p_s):  p_s - p_t
    reverse KL(p_s || p_t):  p_s (zs - zt - sum_c p_s (zs - zt))
    JSD_beta:               (1 - beta) p_s (log(p_s / m) - KL(p_s || m)),
                            m = beta p_t + (1 - beta) p_s
    top-k teacher:          Q p_s - q_j at idx_j,  q_j = exp(lp_j), Q = sum_j q_j

plus the hard cross-entropy ``w (softmax(cap(s)) - onehot(target))``, whose softmax is ``p_s``
itself when ``T == 1`` and needs its own exponentials otherwise. Zero probabilities contribute 0
to every sum (the ``xlogy`` convention: a ``-inf`` teacher logit is a masked class, not NaN).

Rows run in parallel (``prange``); a middle class axis (``inner > 1``) is transposed to rows
first (copies of both inputs: O(N C inner) extra memory for that layout only).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..._output_cache import empty
from .._host import LossCall, ignore_value
from ._math import JIT, SUM_BLOCK, fast_exp_nonpos, fast_log, fmax, like, row_max
from ._parallel import guarded, parallel_kernel
from .class_losses import _capped_row, _denominator

#: Mode tokens (compile-time: ``len(mode)``): forward KL, reverse KL, generalised JSD, and a
#: top-k teacher (the student's terms only). ``sep``: ``(0,)`` when the hard loss needs its own
#: (untempered) softmax, ``()`` when it shares the student's (``T == 1``) or is off.
FORWARD, REVERSE, JSD, TOPK = (), (0,), (0, 0), (0, 0, 0)
SEPARATE, SHARED = (0,), ()
#: Mixture probabilities below float32's smallest normal count as 0 (both flushed).
_TINY = float(np.finfo(np.float32).tiny)


class DistillScalars(NamedTuple):
    """The scalars of the distillation kernels (one argument, a named tuple in Numba)."""

    ignore: int  # ignore_index (int64); positions whose target equals it count nowhere
    inv_t: float  # 1 / temperature
    beta: float  # JSD's mixture weight (modes FORWARD / REVERSE ignore it)
    soft: float  # 1 - hard_weight
    hard: float  # hard_weight
    g_scalar: float  # a reduced loss's upstream gradient over its denominator


# ----------------------------------------------------------------------------- row passes
@njit(**JIT)
def _max2(s, t):
    """``(max s, max t)`` in one loop (NaN propagates)."""
    ms, mt = s[0], t[0]
    for c in range(1, s.size):
        ms = fmax(ms, s[c])
        mt = fmax(mt, t[c])
    return ms, mt


@njit(**JIT)
def _pair_sums(s, t, it, ms, mt, mode, sep, hm):
    """float64 ``(Ss, St, W, Sh)``: ``Ss = sum exp(zs - ms)``, ``St = sum exp(zt - mt)``
    (``z = x * it``; ``ms``, ``mt`` the tempered maxima; TOPK: no teacher row, ``St = 0``),
    ``W`` the divergence's sum (FORWARD: ``sum e_t (zt - zs)``, REVERSE: ``sum e_s (zs - zt)``,
    else 0) and, with ``sep``, ``Sh = sum exp(s - hm)`` (the hard loss's untempered softmax)."""
    zero = like(0, s)
    tot_s = tot_t = tot_w = tot_h = 0.0
    for b0 in range(0, s.size, SUM_BLOCK):
        sb, tb = s[b0:b0 + SUM_BLOCK], t[b0:b0 + SUM_BLOCK]
        a = b = w = h = zero
        for c in range(sb.size):
            zs = sb[c] * it
            es = fast_exp_nonpos(zs - ms)
            a += es
            if len(mode) != 3:
                zt = tb[c] * it
                et = fast_exp_nonpos(zt - mt)
                b += et
                if len(mode) == 0:
                    w += et * (zt - zs) if et > zero else zero
                elif len(mode) == 1:
                    w += es * (zs - zt) if es > zero else zero
            if len(sep):
                h += fast_exp_nonpos(sb[c] - hm)
        tot_s += a
        tot_t += b
        tot_w += w
        tot_h += h
    return tot_s, tot_t, tot_w, tot_h


@njit(inline="always", **JIT)
def _sum_point(sv, tv, it, ms, mt, mode):
    """One class of :func:`_sums_store`: ``(e_s, e_t, e_t (zt - zs))`` (TOPK: no teacher)."""
    zero = like(0, sv)
    zs = sv * it
    es = fast_exp_nonpos(zs - ms)
    if len(mode) == 3:
        return es, zero, zero
    zt = tv * it
    et = fast_exp_nonpos(zt - mt)
    return es, et, et * (zt - zs) if et > zero else zero


# Inlined at Numba's level: called with the gradient block as its source, the inlined loop
# reads and writes the one array, which LLVM vectorises with no overlap check (a call would
# take two array arguments, and identical arrays fail that check: the loop would run scalar).
@njit(inline="always", **JIT)
def _store_block(src, tb, it, ms, mt, mode, gb, eb):
    """One block of :func:`_sums_store`: ``gb = e_s`` from the student logits ``src`` (``gb``
    itself, or another array) and, unless ``eb`` is None, ``eb = e_t`` from the teacher's
    ``tb``; returns the block's ``(sum e_s, sum e_t, sum e_t (zt - zs))`` in the input's
    precision."""
    a = b = w = like(0, gb)
    for c in range(gb.size):
        es, et, wc = _sum_point(src[c], tb[c], it, ms, mt, mode)
        gb[c] = es
        if eb is not None:
            eb[c] = et
        a += es
        b += et
        w += wc
    return a, b, w


@njit(**JIT)
def _sums_store(s, t, it, ms, mt, mode, go, eto):
    """:func:`_pair_sums` of FORWARD / TOPK without a separate hard softmax, ``(Ss, St, W)``,
    storing ``e_s = exp(zs - ms)`` into the gradient row ``go`` (which may be ``s``: then the
    loop reads and writes the one array) and, FORWARD, ``e_t`` into the scratch row ``eto``:
    the gradient pass then takes no exponential."""
    same = go.ctypes.data == s.ctypes.data
    tot_s = tot_t = tot_w = 0.0
    for b0 in range(0, s.size, SUM_BLOCK):
        gb, sb, tb = go[b0:b0 + SUM_BLOCK], s[b0:b0 + SUM_BLOCK], t[b0:b0 + SUM_BLOCK]
        eb = None if eto is None else eto[b0:b0 + SUM_BLOCK]
        # two calls, not one on "gb if same else sb": each inlined loop keeps its own aliasing
        if same:
            a, b, w = _store_block(gb, tb, it, ms, mt, mode, gb, eb)
        else:
            a, b, w = _store_block(sb, tb, it, ms, mt, mode, gb, eb)
        tot_s += a
        tot_t += b
        tot_w += w
    return tot_s, tot_t, tot_w


# Inlined at Numba's level, as _grad_point: as calls (LLVM judged the float64 bodies too big
# to inline), the loops calling them ran scalar.
@njit(inline="always", **JIT)
def _jsd_point(zs, zt, lse_s, lse_t, beta):
    """One class of the JSD: ``(p_s, log(p_s / m), beta p_t log(p_t / m) + (1 - beta) p_s
    log(p_s / m))``, each 0 where its probability is 0 (and where ``m`` is below the smallest
    normal: both probabilities flushed)."""
    zero = like(0, zs)
    one = like(1, zs)
    lps = zs - lse_s
    lpt = zt - lse_t
    ps = fast_exp_nonpos(lps)
    pt = fast_exp_nonpos(lpt)
    m = beta * pt + (one - beta) * ps
    ok = m >= like(_TINY, zs)
    lm = fast_log(m if ok else one)
    ds = lps - lm if ok and ps > zero else zero
    dt = lpt - lm if ok and pt > zero else zero
    return ps, ds, beta * (pt * dt) + (one - beta) * (ps * ds)


@njit(**JIT)
def _jsd_sums(s, t, it, lse_s, lse_t, beta):
    """float64 ``(J, K)``: the JSD ``sum_c`` of :func:`_jsd_point`'s last term and
    ``K = KL(p_s || m) = sum_c p_s log(p_s / m)``."""
    tot_j = tot_k = 0.0
    for b0 in range(0, s.size, SUM_BLOCK):
        sb, tb = s[b0:b0 + SUM_BLOCK], t[b0:b0 + SUM_BLOCK]
        j = k = like(0, s)
        for c in range(sb.size):
            ps, ds, term = _jsd_point(sb[c] * it, tb[c] * it, lse_s, lse_t, beta)
            j += term
            k += ps * ds
        tot_j += j
        tot_k += k
    return tot_j, tot_k


class RowCoef(NamedTuple):
    """A row's gradient coefficients (input precision), for :func:`_grad_point`:
    ``g = es * (a [* (zs - zt - k) | * (log(p_s / m) - k)] + h) - b * et + c * eh``."""

    ms: float  # tempered student max (es = exp(zs - ms))
    mt: float  # tempered teacher max (et = exp(zt - mt))
    hm: float  # untempered student max (eh = exp(s - hm), separate hard softmax)
    a: float
    b: float
    c: float
    h: float
    k: float
    lse_s: float  # JSD's log-probabilities
    lse_t: float
    beta: float


@njit(inline="always", **JIT)
def _grad_point(sv, tv, it, r, mode, sep, cap):
    """The gradient of one class before the one-hot terms, from its student ``sv`` and
    teacher ``tv`` (capped) logits (see :class:`RowCoef`; TOPK reads no ``tv``), times the
    soft cap's slope."""
    zero = like(0, sv)
    zs = sv * it
    zt = tv * it
    es = fast_exp_nonpos(zs - r.ms)
    if len(mode) == 3:
        v = es * (r.a + r.h)
    elif len(mode) == 0:
        v = es * (r.a + r.h) - r.b * fast_exp_nonpos(zt - r.mt)
    elif len(mode) == 1:
        v = es * (r.a * (zs - zt - r.k) + r.h) if es > zero else zero
    else:
        ps, ds, _ = _jsd_point(zs, zt, r.lse_s, r.lse_t, r.beta)
        v = es * (r.a * (ds - r.k) + r.h) if ps > zero else es * r.h
    if len(sep):
        v += r.c * fast_exp_nonpos(sv - r.hm)
    if cap is not None:
        q = sv / like(cap, sv)
        v *= like(1, sv) - q * q
    return v


@njit(**JIT)
def _grad_pass(go, s, t, it, r, mode, sep, cap):
    """``go = _grad_point(s, t)`` along the row; ``go`` may be ``s`` itself (the gradient
    written into the logits): then the loop reads and writes the one array."""
    if go.ctypes.data == s.ctypes.data:
        for c in range(go.size):
            go[c] = _grad_point(go[c], t[c], it, r, mode, sep, cap)
    else:
        for c in range(go.size):
            go[c] = _grad_point(s[c], t[c], it, r, mode, sep, cap)


@njit(inline="always", **JIT)
def _stored_point(es, et, sv, r, cap):
    """:func:`_grad_point` of FORWARD / TOPK from the stored ``es`` and ``et`` (``et`` 0 for
    TOPK; ``sv``: the capped student logit, read only for the soft cap's slope)."""
    v = es * (r.a + r.h) - r.b * et
    if cap is not None:
        q = sv / like(cap, sv)
        v *= like(1, sv) - q * q
    return v


@njit(**JIT)
def _stored_pass(go, eto, s, r, cap):
    """``go = _stored_point(go, eto, s)`` along the row (``eto`` None for TOPK; ``s`` read
    only with a soft cap: it is then a capped copy, never ``go``)."""
    zero = like(0, go)
    for c in range(go.size):
        et = zero if eto is None else eto[c]
        go[c] = _stored_point(go[c], et, go[c] if cap is None else s[c], r, cap)


@njit(**JIT)
def _slope(v, cap):
    """The soft cap's slope at the capped logit ``v`` (1 without a cap)."""
    if cap is None:
        return 1.0
    q = np.float64(v) / cap
    return 1.0 - q * q


# ----------------------------------------------------------------------------- rows
@njit(**JIT)
def _coef(s, ms, mt, xs, ss, st, sh, k, scale, mode, sep, kk, lse_s, lse_t, mass):
    """A row's :class:`RowCoef` from its sums (``kk``: REVERSE's ``sum p_s (zs - zt)``, JSD's
    ``KL(p_s || m)``; ``mass``: TOPK's teacher mass ``Q``, which scales ``p_s``, else 1)."""
    g = scale * k.soft * k.inv_t
    a = g * mass / ss * (1.0 - k.beta if len(mode) == 2 else 1.0)
    c = scale * k.hard / sh if len(sep) else 0.0
    h = 0.0 if len(sep) else scale * k.hard / ss
    return RowCoef(ms, mt, xs, like(a, s), like(g / st, s), like(c, s), like(h, s),
                   like(kk, s), like(lse_s, s), like(lse_t, s), like(k.beta, s))


@njit(**JIT)
def _hard_onehot(go, s, ti, k, scale, cap):
    """The hard loss's ``-w`` at the target, times the soft cap's slope there."""
    go[ti] -= like(scale * k.hard * _slope(s[ti] if cap is not None else 0.0, cap), s)


@njit(**JIT)
def _pair_row(s, t, ti, k, scale, mode, sep, cap, go):
    """One kept row of a logits teacher (``s``, ``t`` already capped): its loss (float64);
    the gradient into ``go`` (None: none; it may be ``s``)."""
    it = like(k.inv_t, s)
    xs, xt = _max2(s, t)
    ms, mt = xs * it, xt * it
    s_t = np.float64(s[ti]) if k.hard > 0 else 0.0  # read before go overwrites s
    # the forward KL stores e_s in the gradient row and e_t in a scratch row: no exponential
    # in the gradient pass (20-40% faster at 512x[32000] and 64x[128256], 10% at 4096x[1000])
    store = go is not None and len(mode) == 0 and len(sep) == 0
    if store:
        eto = np.empty(s.size, s.dtype)
        ss, st, w = _sums_store(s, t, it, ms, mt, mode, go, eto)
        sh = 0.0
    else:
        ss, st, w, sh = _pair_sums(s, t, it, ms, mt, mode, sep, xs)
    lse_s = np.float64(ms) + np.log(ss)
    lse_t = np.float64(mt) + np.log(st)
    kk = 0.0
    if len(mode) == 0:
        soft = w / st - lse_t + lse_s
    elif len(mode) == 1:
        soft = w / ss - lse_s + lse_t
        kk = w / ss
    else:
        soft, kk = _jsd_sums(s, t, it, like(lse_s, s), like(lse_t, s), like(k.beta, s))
    hard = (np.float64(xs) + np.log(sh) if len(sep) else lse_s) - s_t
    if go is not None:
        r = _coef(s, ms, mt, xs, ss, st, sh, k, scale, mode, sep, kk, lse_s, lse_t, 1.0)
        if store:
            _stored_pass(go, eto, s, r, cap)
        else:
            _grad_pass(go, s, t, it, r, mode, sep, cap)
        if k.hard > 0:
            _hard_onehot(go, s, ti, k, scale, cap)
    return k.soft * soft + (k.hard * hard if k.hard > 0 else 0.0)


@njit(**JIT)
def _topk_row(s, idx, lp, ti, k, scale, sep, cap, go):
    """One kept row against a top-k teacher (``idx`` checked, ``lp`` its log-probabilities):
    forward KL on the teacher's support; the gradient into ``go`` (None: none; may be ``s``)."""
    it = like(k.inv_t, s)
    xs = row_max(s)
    ms = xs * it
    s_t = np.float64(s[ti]) if k.hard > 0 else 0.0
    s_idx = np.empty(idx.size)  # the student's logits there, read before go overwrites s
    for j in range(idx.size):
        s_idx[j] = s[idx[j]]
    # without a separate hard softmax, e_s is stored in the gradient row: the gradient pass is
    # then a scaling (no exponential)
    store = go is not None and len(sep) == 0
    if store:
        ss, _, _ = _sums_store(s, s, it, ms, ms, TOPK, go, None)
        sh = 0.0
    else:
        ss, _, _, sh = _pair_sums(s, s, it, ms, ms, TOPK, sep, xs)
    lse_s = np.float64(ms) + np.log(ss)
    soft = 0.0
    mass = 0.0  # Q: the teacher's probability on its support
    for j in range(idx.size):
        q = np.exp(np.float64(lp[j]))
        if q > 0:  # a zero probability contributes 0 (lp = -inf is not NaN)
            soft += q * (np.float64(lp[j]) - (s_idx[j] * k.inv_t - lse_s))
            mass += q
    hard = (np.float64(xs) + np.log(sh) if len(sep) else lse_s) - s_t
    if go is not None:
        # dz = Q p_s - q at idx: the Q p_s part along the row, then the q_j
        r = _coef(s, ms, ms, xs, ss, 1.0, sh, k, scale, TOPK, sep, 0.0, lse_s, 0.0, mass)
        if store:
            _stored_pass(go, None, s, r, cap)
        else:
            _grad_pass(go, s, s, it, r, TOPK, sep, cap)
        g = scale * k.soft * k.inv_t
        for j in range(idx.size):
            c = idx[j]
            go[c] -= like(g * np.exp(np.float64(lp[j]))
                          * _slope(s[c] if cap is not None else 0.0, cap), s)
        if k.hard > 0:
            _hard_onehot(go, s, ti, k, scale, cap)
    return k.soft * soft + (k.hard * hard if k.hard > 0 else 0.0)


@njit(**JIT)
def _open_row(t, g, out, gx, k, i):
    """Row ``i``'s ``(kept, target, scale)`` (``t`` the targets or None; ``scale`` its upstream
    gradient, ``g[i]`` or the reduced loss's scalar); an ignored row (its target ``k.ignore``)
    is not kept and gets loss 0 and gradient 0 here."""
    if t is not None and t[i] == k.ignore:
        if out is not None:
            out[i] = 0
        if gx is not None:
            gx[i, :] = 0
        return False, 0, 0.0
    return True, 0 if t is None else t[i], k.g_scalar if g is None else np.float64(g[i])


def _row_of(a, i):  # pragma: no cover - replaced by the overload inside Numba code
    """Row ``i`` of ``a``, or None without ``a``."""
    return None if a is None else a[i]


# An overload, chosen by the type of ``a``: a jitted "None if a is None else a[i]" returns an
# Optional array for an array ``a`` (Numba prunes "is None" only on a None argument), and the
# row kernels would then compile against an Optional gradient row.
@overload(_row_of, jit_options=JIT)
def _row_of_overload(a, i):
    if isinstance(a, types.NoneType):
        return lambda a, i: None
    return lambda a, i: a[i]


@parallel_kernel(**JIT)
def _pair_rows(x, tch, t, g, out, gx, cap, k, mode, sep):
    """Rows of student ``x`` and teacher ``tch`` logits (``(N, C)``); ``t`` the targets or
    None (every row kept)."""
    total = 0.0
    for i in prange(x.shape[0]):
        kept, ti, scale = _open_row(t, g, out, gx, k, i)
        if not kept:
            continue
        s, tr = x[i], tch[i]
        if cap is not None:  # capped copies: O(C) scratch per task
            s, tr = _capped_row(s, cap), _capped_row(tr, cap)
        loss = _pair_row(s, tr, ti, k, scale, mode, sep, cap, _row_of(gx, i))
        total += loss
        if out is not None:
            out[i] = loss
    return total


@parallel_kernel(**JIT)
def _topk_rows(x, idx, lp, t, g, out, gx, cap, k, sep):
    """Rows of student logits ``x`` (``(N, C)``) against a top-k teacher ``idx``, ``lp``
    (``(N, k)``); ``t`` the targets or None."""
    total = 0.0
    for i in prange(x.shape[0]):
        kept, ti, scale = _open_row(t, g, out, gx, k, i)
        if not kept:
            continue
        s = x[i] if cap is None else _capped_row(x[i], cap)
        loss = _topk_row(s, idx[i], lp[i], ti, k, scale, sep, cap, _row_of(gx, i))
        total += loss
        if out is not None:
            out[i] = loss
    return total


# ----------------------------------------------------------------------------- host
def _as_rows(a3):
    """``(N, K, inner)`` as ``(N * inner, K)`` rows: a view when ``inner == 1``, else a
    transposed copy."""
    n, kk, inner = a3.shape
    if inner == 1:
        return a3[:, :, 0]
    return np.ascontiguousarray(a3.transpose(0, 2, 1)).reshape(n * inner, kk)


def _scalars(k_ignore, temperature, beta, hard_weight, g_scalar):
    return DistillScalars(int(k_ignore), 1.0 / float(temperature), float(beta),
                          1.0 - float(hard_weight), float(hard_weight), float(g_scalar))


def _run(kernel, x3, teacher, t2, *, temperature, beta, ignore_index, hard_weight, softcap,
         reduction, want_grad, grad_output, grad_buffer, extra):
    """The host side shared by both kernels: ``teacher`` is a tuple of ``(N, K, inner)``
    arrays, ``extra`` the kernel's trailing arguments."""
    n, _, inner = x3.shape
    ignore = ignore_value(ignore_index)
    denom = (_denominator(t2, None, ignore, reduction) if t2 is not None
             else float(n * inner))
    call = LossCall(np, x3.shape, (n, inner), x3.dtype, reduction=reduction,
                    want_grad=want_grad, grad_output=grad_output, grad_buffer=grad_buffer,
                    denom=denom, empty=empty)
    if not x3.size:
        call.fill_empty()
        return call.result(), call.grad
    k = _scalars(ignore, temperature, beta, hard_weight, call.g_scalar)
    rows = [_as_rows(a) for a in (x3, *teacher)]
    t = None if t2 is None else t2.reshape(-1)
    g = None if call.g_rows is None else call.g_rows.reshape(-1)
    out = None if call.losses is None else call.losses.reshape(-1)
    gx = None
    if call.grad is not None:
        gx = _as_rows(call.grad) if inner == 1 else np.empty_like(rows[0])
    total = kernel(*rows, t, g, out, gx, float(softcap) if softcap else None, k, *extra)
    if gx is not None and inner > 1:
        call.grad[...] = gx.reshape(n, inner, -1).transpose(0, 2, 1)
    return call.result(total), call.grad


def _separate(hard_weight, temperature):
    """SEPARATE when the hard loss needs its own softmax (on, and ``T != 1``)."""
    return SEPARATE if hard_weight > 0 and temperature != 1 else SHARED


@guarded
def distillation(x3, teacher3, t2, *, beta, temperature, ignore_index, hard_weight, softcap,
                 reduction, want_grad, grad_output, grad_buffer):
    """Distillation from teacher logits (kernel protocol in :mod:`nblosses.backends`)."""
    mode = FORWARD if beta == 0 else REVERSE if beta == 1 else JSD
    return _run(_pair_rows, x3, (teacher3,), t2, temperature=temperature, beta=beta,
                ignore_index=ignore_index, hard_weight=hard_weight, softcap=softcap,
                reduction=reduction, want_grad=want_grad, grad_output=grad_output,
                grad_buffer=grad_buffer,
                extra=(mode, _separate(hard_weight, temperature)))


@guarded
def distillation_topk(x3, idx3, lp3, t2, *, temperature, ignore_index, hard_weight, softcap,
                      reduction, want_grad, grad_output, grad_buffer):
    """Distillation from a top-k teacher: indices (checked) and log-probabilities."""
    return _run(_topk_rows, x3, (idx3, lp3), t2, temperature=temperature, beta=0.0,
                ignore_index=ignore_index, hard_weight=hard_weight, softcap=softcap,
                reduction=reduction, want_grad=want_grad, grad_output=grad_output,
                grad_buffer=grad_buffer, extra=(_separate(hard_weight, temperature),))
