"""torch's ``kl_div`` on the CPU, gradient fused: elementwise over flat arrays.

Per element (``x`` the input, a log-probability; ``t`` the target), as torch computes it::

    log_target=False:  l = xlogy(t, t) - t x,    dl/dx = -t g
    log_target=True:   l = exp(t) (t - x),       dl/dx = -exp(t) g

``xlogy(t, t)`` is 0 where ``t == 0`` (whatever ``x``: ``0 - 0 * (-inf)`` is still NaN, as in
torch) and NaN for negative or NaN ``t``. Parallel chunks of :data:`._blocks.CHUNK` elements,
each summing its losses in the input's precision per :data:`._math.SUM_BLOCK` block and in
float64 across blocks, so reduced losses need no input-sized temporary. The same pass counts
log-targets equal to ``+inf`` (a select and an add: the loop stays vectorised), which are
refused with ``ValueError`` after it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..._output_cache import empty
from ...ops.kl_div import infinite_log_target_error
from .._host import LossCall
from ._blocks import chunk_sums, n_chunks
from ._math import JIT, fast_exp, fast_log, like
from ._parallel import guarded, parallel_kernel


def xlogx(t):  # pragma: no cover - replaced by the overload inside Numba code
    """torch's ``xlogy(t, t)`` for float32/float64 inside Numba kernels (vectorisable):
    ``t log t``, 0 at ``t == 0``, NaN for ``t < 0`` or NaN."""
    return t * math.log(t) if t > 0 else (0.0 if t == 0 else math.nan)


# Subnormal t are scaled into the normal range first (fast_log reads the exponent bits):
# by 2^24 for float32, 2^54 for float64. Selects only, so the loop stays vectorised.
@overload(xlogx, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _xlogx_overload(t):
    if t not in (types.float32, types.float64):
        return None
    ftype = np.float32 if t == types.float32 else np.float64
    bits = 24 if t == types.float32 else 54
    big, tiny = ftype(2.0**bits), ftype(np.finfo(ftype).tiny)
    shift, zero, nan = ftype(bits * math.log(2.0)), ftype(0.0), ftype(np.nan)

    def impl(t):
        sub = t < tiny
        lg = fast_log(t * big if sub else t) - (shift if sub else zero)
        return t * lg if t > zero else (zero if t == zero else nan)

    return impl


@njit(**JIT)
def _kl_block(x, t, log_token, g, gs, out, gx, lo, hi):
    """Losses (and gradient) of ``lo:hi``: ``(sum of the losses, number of +inf
    log-targets)``, both in the input's precision. ``log_token``: ``(0,)`` for
    ``log_target``, else ``()``."""
    # slices, indexed from 0: an index lo + i keeps Numba's negative-index wraparound in the
    # loop (scattered stores on AVX-512, a scalar loop on AVX2)
    xs, ts = x[lo:hi], t[lo:hi]
    gs_ = None if g is None else g[lo:hi]
    os_ = None if out is None else out[lo:hi]
    gxs = None if gx is None else gx[lo:hi]
    inf = like(np.inf, x)
    zero, one = like(0, x), like(1, x)
    acc = zero
    # counted in the input's precision (exact: a block has SUM_BLOCK elements): an int64
    # counter in a float32 loop kept it scalar on AVX2
    nbad = zero
    for i in range(hi - lo):
        xi = xs[i]
        ti = ts[i]
        if len(log_token):
            e = fast_exp(ti)
            loss = e * (ti - xi)
            coef = e
            nbad += one if ti == inf else zero
        else:
            loss = xlogx(ti) - ti * xi
            coef = ti
        acc += loss
        if os_ is not None:
            os_[i] = loss
        if gxs is not None:
            gxs[i] = -(coef * (gs if gs_ is None else gs_[i]))
    return acc, nbad


@parallel_kernel(**JIT)
def _kl_div(x, t, log_token, g, g_scalar, out, gx, partial, bad):
    for k in prange(partial.size):
        partial[k], bad[k] = chunk_sums(_kl_block, k, x, t, log_token, g, like(g_scalar, x),
                                        out, gx)


@guarded
def kl_div(x, t, *, log_target, reduction, want_grad, grad_output, grad_buffer):
    """``kl_div`` on flat arrays of one length (kernel protocol in :mod:`nblosses.backends`).

    Raises ``ValueError`` after its pass when a log-target is ``+inf`` (its ``exp`` is
    infinite: the loss has no meaning).
    """
    n = x.size
    k = LossCall(np, x.shape, x.shape, x.dtype, reduction=reduction, want_grad=want_grad,
                 grad_output=grad_output, grad_buffer=grad_buffer, denom=float(n), empty=empty)
    nchunks = n_chunks(n)
    partial = np.zeros(nchunks, np.float64)
    bad = np.zeros(nchunks, np.int64)
    _kl_div(x, t, (0,) if log_target else (), k.g_rows, float(k.g_scalar), k.losses, k.grad,
            partial, bad)
    if log_target and bad.any():  # where, found only now: the pass itself just counts
        raise infinite_log_target_error(int(np.argmax(t == np.inf)))
    return k.result(float(partial.sum())), k.grad
