"""Binary cross-entropy (on probabilities and on logits) on the CPU, gradient fused.

Elementwise over flat arrays, in parallel chunks; each chunk adds its losses into a float64
partial sum, so reduced losses need no input-sized temporary.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..._output_cache import empty
from .._host import LossCall
from ._blocks import chunk_span, chunk_sums, n_chunks
from ._math import JIT, fast_exp_nonpos, fast_log, fast_log1p, like
from ._parallel import guarded, parallel_kernel

_TINY = float(np.finfo(np.float64).tiny)
#: torch clamps x(1-x) at its float EPSILON = 1e-12f, the float32 value, for every dtype.
_EPS = float(np.float32(1e-12))


@njit(**JIT)
def _log_clamped(v):
    """torch's ``max(log(v), -100)`` for ``v`` in [0, 1], computed in float64 (vectorised);
    0 (and anything below float64's smallest normal, whose log is < -708) gives -100."""
    return max(fast_log(max(v, _TINY)), -100.0) if v >= _TINY else -100.0


# Inlined at Numba's level: as a call (LLVM judged the float64 body too big to inline) the BCE
# loop ran scalar, 7x slower.
@njit(inline="always", **JIT)
def _log1m_clamped(x):
    """torch's ``max(log1p(-x), -100)`` for ``x`` in [0, 1], in float64: below 2^-7 the series
    (``log(1 - x)`` loses ``x``'s low digits there, and all of ``x`` below 2^-53), else
    :func:`_log_clamped` of ``1 - x``, which is exact for float32 ``x`` (a float64 ``x``
    loses at most 2^-47 of the result to the rounding of ``1 - x``). Both computed and one
    selected: the loop stays vectorised, with no division (:func:`._math.fast_log1p` takes
    one; here ``1 - x`` is exact for the float32 inputs it serves most)."""
    series = -x - x * x * (0.5 + x * (1 / 3 + x * (0.25 + x * (0.2 + x * (
        1 / 6 + x * (1 / 7 + x * (0.125 + x / 9)))))))
    return series if x < 0.0078125 else _log_clamped(1.0 - x)


# Optional arrays arrive as None, not as flags: Numba prunes ``if a is None`` branches at compile
# time, so each combination compiles to a branch-free loop (flags in the loop cost 6x here).
@njit(**JIT)
def _weigh_and_store(loss, gi, w, j, out):
    """``(w[j] * loss, w[j] * gi)`` (unchanged without weights), the loss stored in ``out[j]``
    when per-element losses are wanted."""
    if w is not None:
        loss *= w[j]
        gi *= w[j]
    if out is not None:
        out[j] = loss
    return loss, gi


@njit(**JIT)
def _pos_weight(pw, j, yi):
    """``(p, 1 + (p - 1) yi)``: the positive class's weight ``p = pw[j]`` (1 without
    ``pos_weight``) and the log-sigmoid's coefficient for the target ``yi``."""
    one = like(1, yi)
    p = one if pw is None else pw[j]
    return p, one + (p - one) * yi


@parallel_kernel(**JIT)
def _bce(x, y, w, g, g_scalar, out, gx, partial):
    n = x.size
    for k in prange(partial.size):
        lo, hi = chunk_span(k, n)
        xs, ys = x[lo:hi], y[lo:hi]
        acc = 0.0
        for i in range(hi - lo):
            xi = np.float64(xs[i])
            yi = np.float64(ys[i])
            loss = -(yi * _log_clamped(xi) + (1.0 - yi) * _log1m_clamped(xi))
            gi = g_scalar if g is None else np.float64(g[lo + i])
            loss, gi = _weigh_and_store(loss, gi, w, lo + i, out)
            acc += loss
            if gx is not None:
                gx[lo + i] = gi * (xi - yi) / max(xi * (1.0 - xi), _EPS)
        partial[k] = acc


@parallel_kernel(**JIT)
def _bce_logits(x, y, w, pw, g, g_scalar, out, gx, partial):
    for k in prange(partial.size):
        partial[k], _ = chunk_sums(_bce_logits_block, k, x, y, (w, pw), g, like(g_scalar, x),
                                   out, gx)


@njit(**JIT)
def _bce_logits_block(x, y, weights, g, gs, out, gx, lo, hi):
    """Losses (and gradient) of ``lo:hi``, ``weights`` the pair ``(weight, pos_weight)`` (each
    or None): ``(sum of the losses, 0)`` in the input's precision (the block protocol of
    :func:`._blocks.chunk_sums`; no input is flagged)."""
    # used only as call arguments (_weigh_and_store, _pos_weight): Numba prunes "is None"
    # branches on a function's arguments, not on an unpacked local (pw[j] would not type)
    w, pw = weights
    xs, ys = x[lo:hi], y[lo:hi]  # slices: range-indexed loops vectorise
    one = like(1, x)
    zero = like(0, x)
    acc = zero
    for i in range(hi - lo):
        xi = xs[i]
        yi = ys[i]
        e = fast_exp_nonpos(-abs(xi))  # in (0, 1]: no overflow
        log_sig = min(xi, zero) - fast_log1p(e)
        pwi, lw = _pos_weight(pw, lo + i, yi)
        loss = (one - yi) * xi - lw * log_sig
        gi = gs if g is None else g[lo + i]
        loss, gi = _weigh_and_store(loss, gi, w, lo + i, out)
        acc += loss
        if gx is not None:
            sig = (one if xi >= zero else e) / (one + e)
            gx[lo + i] = gi * (lw * sig - pwi * yi)
    return acc, zero


def _binary(kernel, x, extra, *, reduction, want_grad, grad_output):
    """Run an elementwise loss kernel (host plan :class:`.._host.LossCall`, ``mean`` over the
    element count); optional outputs are None when not wanted."""
    n = x.size
    call = LossCall(np, x.shape, x.shape, x.dtype, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, denom=float(n), empty=empty)
    partial = np.zeros(n_chunks(n), np.float64)
    kernel(x, *extra, call.g_rows, call.g_scalar, call.losses, call.grad, partial)
    return call.result(partial.sum()), call.grad


@guarded
def binary_cross_entropy(x, y, weight, *, reduction, want_grad, grad_output):
    """BCE on probabilities (kernel protocol in :mod:`nblosses.backends`)."""
    return _binary(_bce, x, (y, weight), reduction=reduction, want_grad=want_grad,
                   grad_output=grad_output)


@guarded
def binary_cross_entropy_with_logits(x, y, weight, pos_weight, *, reduction, want_grad,
                                     grad_output):
    """BCE on logits with the stable log-sigmoid."""
    return _binary(_bce_logits, x, (y, weight, pos_weight), reduction=reduction,
                   want_grad=want_grad, grad_output=grad_output)
