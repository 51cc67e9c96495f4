"""Softmax, log_softmax, sigmoid and their backwards on the CPU (Numba).

Inputs arrive as ``(outer, C, inner)`` (see :mod:`nblosses.backends`). Two layouts, two loops:

- ``inner == 1``: each row of ``C`` is contiguous; rows run in parallel, and each row is
  processed in three short passes (max, sum of exp, write) while it sits in L1/L2.
- ``inner > 1`` (softmax along a middle axis): no transposed copy; each task takes one ``outer``
  index and a block of ``BLOCK`` inner positions, and every pass walks ``c`` with the contiguous
  inner block as the vectorised axis.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..._registry import register_kernel
from ._math import FASTMATH_MAX, JIT, SUM_BLOCK, fast_exp, like, row_max, sum_exp
from ._parallel import guarded

#: Inner positions handled together in the middle-axis layout: long enough to vectorise, short
#: enough that the per-block max/sum scratch stays in L1.
BLOCK = 256
#: Elements per task for the elementwise ops.
CHUNK = 16384

PJIT = dict(JIT, parallel=True)


# ----------------------------------------------------------------------------- contiguous rows
@njit(**JIT)
def _softmax_row(x, y, log):
    m = row_max(x)
    if log:
        lse = m + like(np.log(sum_exp(x, m)), x)
        for c in range(x.size):
            y[c] = x[c] - lse
    else:
        s = 0.0
        for b0 in range(0, x.size, SUM_BLOCK):
            sb = like(0, x)
            for c in range(b0, min(x.size, b0 + SUM_BLOCK)):
                e = fast_exp(x[c] - m)
                y[c] = e
                sb += e
            s += sb
        inv = like(1.0 / s, x)
        for c in range(x.size):
            y[c] *= inv


@njit(**PJIT)
def _softmax_rows(x, y, log):
    for i in prange(x.shape[0]):
        _softmax_row(x[i], y[i], log)


# ----------------------------------------------------------------------------- middle axis
@njit(fastmath=FASTMATH_MAX, cache=True, nogil=True)
def _block_max(x, o, j0, w, m):
    """m[:w] = max over c of x[o, c, j0:j0+w]."""
    for j in range(w):
        m[j] = x[o, 0, j0 + j]
    for c in range(1, x.shape[1]):
        for j in range(w):
            m[j] = max(m[j], x[o, c, j0 + j])


@njit(**PJIT)
def _softmax_blocks(x, y, log):
    outer, n_classes, inner = x.shape
    nblk = (inner + BLOCK - 1) // BLOCK
    for task in prange(outer * nblk):
        o = task // nblk
        j0 = (task % nblk) * BLOCK
        w = min(BLOCK, inner - j0)
        m = np.empty(w, x.dtype)
        s = np.zeros(w, x.dtype)
        _block_max(x, o, j0, w, m)
        for c in range(n_classes):
            for j in range(w):
                e = fast_exp(x[o, c, j0 + j] - m[j])
                s[j] += e
                if not log:
                    y[o, c, j0 + j] = e
        if log:
            for j in range(w):
                s[j] = m[j] + np.log(s[j])  # log-sum-exp
            for c in range(n_classes):
                for j in range(w):
                    y[o, c, j0 + j] = x[o, c, j0 + j] - s[j]
        else:
            for j in range(w):
                s[j] = like(1, s) / s[j]
            for c in range(n_classes):
                for j in range(w):
                    y[o, c, j0 + j] *= s[j]


def _softmax_any(x3: np.ndarray, log: bool) -> np.ndarray:
    y3 = np.empty_like(x3)
    if x3.size == 0:
        return y3
    if x3.shape[2] == 1:
        _softmax_rows(x3[:, :, 0], y3[:, :, 0], log)
    else:
        _softmax_blocks(x3, y3, log)
    return y3


@register_kernel("softmax", "cpu")
@guarded
def softmax(x3: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of ``(outer, C, inner)``."""
    return _softmax_any(x3, False)


@register_kernel("log_softmax", "cpu")
@guarded
def log_softmax(x3: np.ndarray) -> np.ndarray:
    """Log-softmax over axis 1 of ``(outer, C, inner)``."""
    return _softmax_any(x3, True)


# ----------------------------------------------------------------------------- backwards
@njit(**PJIT)
def _softmax_backward_rows(g, y, gx, log):
    for i in prange(g.shape[0]):
        s = like(0, g)
        if log:
            for c in range(g.shape[1]):
                s += g[i, c]
            for c in range(g.shape[1]):
                gx[i, c] = g[i, c] - fast_exp(y[i, c]) * s
        else:
            for c in range(g.shape[1]):
                s += g[i, c] * y[i, c]
            for c in range(g.shape[1]):
                gx[i, c] = y[i, c] * (g[i, c] - s)


@njit(**PJIT)
def _softmax_backward_blocks(g, y, gx, log):
    outer, n_classes, inner = g.shape
    nblk = (inner + BLOCK - 1) // BLOCK
    for task in prange(outer * nblk):
        o = task // nblk
        j0 = (task % nblk) * BLOCK
        w = min(BLOCK, inner - j0)
        s = np.zeros(w, g.dtype)
        for c in range(n_classes):
            for j in range(w):
                s[j] += g[o, c, j0 + j] if log else g[o, c, j0 + j] * y[o, c, j0 + j]
        for c in range(n_classes):
            for j in range(w):
                if log:
                    gx[o, c, j0 + j] = g[o, c, j0 + j] - fast_exp(y[o, c, j0 + j]) * s[j]
                else:
                    gx[o, c, j0 + j] = y[o, c, j0 + j] * (g[o, c, j0 + j] - s[j])


def _backward_any(g3: np.ndarray, y3: np.ndarray, log: bool) -> np.ndarray:
    gx = np.empty_like(y3)
    if y3.size == 0:
        return gx
    if y3.shape[2] == 1:
        _softmax_backward_rows(g3[:, :, 0], y3[:, :, 0], gx[:, :, 0], log)
    else:
        _softmax_backward_blocks(g3, y3, gx, log)
    return gx


@register_kernel("softmax_backward", "cpu")
@guarded
def softmax_backward(g3: np.ndarray, y3: np.ndarray) -> np.ndarray:
    """``y * (g - sum_C(g * y))`` over axis 1."""
    return _backward_any(g3, y3, False)


@register_kernel("log_softmax_backward", "cpu")
@guarded
def log_softmax_backward(g3: np.ndarray, y3: np.ndarray) -> np.ndarray:
    """``g - exp(y) * sum_C(g)`` over axis 1."""
    return _backward_any(g3, y3, True)


# ----------------------------------------------------------------------------- sigmoid
@njit(**PJIT)
def _sigmoid(x, y):
    n = x.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        for i in range(k * CHUNK, min(n, (k + 1) * CHUNK)):
            y[i] = like(1, x) / (like(1, x) + fast_exp(-x[i]))


@njit(**PJIT)
def _sigmoid_backward(g, y, gx):
    n = y.size
    for k in prange((n + CHUNK - 1) // CHUNK):
        for i in range(k * CHUNK, min(n, (k + 1) * CHUNK)):
            gx[i] = g[i] * y[i] * (like(1, y) - y[i])


@register_kernel("sigmoid", "cpu")
@guarded
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise ``1 / (1 + exp(-x))``."""
    y = np.empty_like(x)
    _sigmoid(x, y)
    return y


@register_kernel("sigmoid_backward", "cpu")
@guarded
def sigmoid_backward(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise ``g * y * (1 - y)``."""
    gx = np.empty_like(y)
    _sigmoid_backward(g, y, gx)
    return gx
