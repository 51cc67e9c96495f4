"""Binary cross-entropy (on probabilities and on logits) on the CPU, gradient fused.

Elementwise over flat arrays, in parallel chunks; each chunk adds its losses into a float64
partial sum, so reduced losses need no input-sized temporary.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..._registry import register_kernel
from ._math import JIT, fast_exp, like
from ._parallel import guarded

PJIT = dict(JIT, parallel=True)
CHUNK = 16384


@njit(**JIT)
def _bce_at(x, y):
    """torch's BCE: each log clamped at -100."""
    lx = max(math.log(x), -100.0)
    l1x = max(math.log(1.0 - x), -100.0)
    return -(y * lx + (1.0 - y) * l1x)


@njit(**PJIT)
def _bce(x, y, w, has_w, keep, want_grad, g, use_g, g_scalar, out, gx, partial):
    n = x.size
    for k in prange(partial.size):
        acc = 0.0
        for i in range(k * CHUNK, min(n, (k + 1) * CHUNK)):
            wi = w[i] if has_w else 1.0
            loss = wi * _bce_at(np.float64(x[i]), np.float64(y[i]))
            acc += loss
            if keep:
                out[i] = loss
            if want_grad:
                gi = g[i] if use_g else g_scalar
                xi = np.float64(x[i])
                gx[i] = gi * wi * (xi - y[i]) / max(xi * (1.0 - xi), 1e-12)
        partial[k] = acc


@njit(**PJIT)
def _bce_logits(x, y, w, has_w, pw, has_pw, keep, want_grad, g, use_g, g_scalar, out, gx,
                partial):
    n = x.size
    for k in prange(partial.size):
        acc = 0.0
        for i in range(k * CHUNK, min(n, (k + 1) * CHUNK)):
            xi = x[i]
            yi = y[i]
            e = fast_exp(-abs(xi))  # in (0, 1]: no overflow
            log_sig = min(np.float64(xi), 0.0) - math.log1p(np.float64(e))
            pwi = pw[i] if has_pw else 1.0
            lw = 1.0 + (pwi - 1.0) * yi
            wi = w[i] if has_w else 1.0
            loss = wi * ((1.0 - yi) * xi - lw * log_sig)
            acc += loss
            if keep:
                out[i] = loss
            if want_grad:
                gi = g[i] if use_g else g_scalar
                one = like(1, x)
                sig = one / (one + e) if xi >= 0 else e / (one + e)
                gx[i] = gi * wi * (lw * sig - pwi * yi)
        partial[k] = acc


def _binary(kernel, x, extra, *, reduction, want_grad, grad_output):
    n = x.size
    keep = reduction == "none"
    out = np.empty_like(x) if keep else np.empty(0, x.dtype)
    gx = np.empty_like(x) if want_grad else np.empty(0, x.dtype)
    use_g = want_grad and reduction == "none"
    g = grad_output if use_g else np.empty(0, x.dtype)
    g_scalar = 0.0
    if want_grad and not use_g:
        g_scalar = float(grad_output) / (n if reduction == "mean" and n else 1)
    partial = np.zeros((n + CHUNK - 1) // CHUNK, np.float64)
    kernel(x, *extra, keep, want_grad, g, use_g, g_scalar, out, gx, partial)
    if keep:
        loss = out
    else:
        total = partial.sum()
        if reduction == "mean":
            total = total / n if n else np.nan
        loss = np.asarray(total, x.dtype)
    return loss, (gx if want_grad else None)


def _opt(a, like_x):
    return (a, True) if a is not None else (np.empty(0, like_x.dtype), False)


@register_kernel("binary_cross_entropy", "cpu")
@guarded
def binary_cross_entropy(x, y, weight, *, reduction, want_grad, grad_output):
    """BCE on probabilities (kernel protocol in :mod:`nblosses.backends`)."""
    return _binary(_bce, x, (y, *_opt(weight, x)), reduction=reduction, want_grad=want_grad,
                   grad_output=grad_output)


@register_kernel("binary_cross_entropy_with_logits", "cpu")
@guarded
def binary_cross_entropy_with_logits(x, y, weight, pos_weight, *, reduction, want_grad,
                                     grad_output):
    """BCE on logits with the stable log-sigmoid."""
    return _binary(_bce_logits, x, (y, *_opt(weight, x), *_opt(pos_weight, x)),
                   reduction=reduction, want_grad=want_grad, grad_output=grad_output)
