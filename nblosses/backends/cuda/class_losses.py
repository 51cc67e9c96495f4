"""NLL and cross-entropy (class indices and class probabilities) on CUDA, gradient fused.

Kernels in ``cross_entropy.cu``, ``cross_entropy_probs.cu`` and ``nll.cu``; same protocol and
semantics as the CPU backend (:mod:`nblosses.backends.cpu.class_losses`).

No host round trip inside a call: every launch is asynchronous on the current stream.

- ``mean`` with class indices: the denominator (summed weights of the non-ignored targets)
  is computed on device first (``class_denom`` [+ ``denom_finalize``]) into two float64 device
  scalars ``[D, g / D]``; the fused kernel reads ``g / D`` through a pointer, and
  ``loss_finalize`` divides the summed loss by ``D``.
- Reduced losses: each block of the fused kernel writes one float64 partial; ``loss_finalize``
  (one block) sums them in a fixed order, so results are deterministic, and writes the 0-d
  result in the input dtype.
- ``grad_buffer`` may be the logits themselves: the kernels read every logit of a row before
  writing any gradient of that row.

Synchronisation outside this module: :func:`nblosses._args.check_targets` reads the targets'
min/max back to the host once per call (one device sync, O(N) work) to raise ``IndexError``
before any kernel runs; the kernels additionally never use a target outside ``[0, C)`` as an
address (such a position gets a NaN loss and a zero gradient). A ``grad_output`` given as a
device array for a reduced loss is converted to a Python float by ``_args`` (another sync).
"""

from __future__ import annotations

import math

import cupy

from . import _kernels as K
from . import _loader as L
from .softmax import row_vec, rows_launch

SRC_CE = "cross_entropy.cu"
SRC_PROBS = "cross_entropy_probs.cu"
SRC_NLL = "nll.cu"

#: Up to this many target positions the denominator is summed by a single block (one launch).
SINGLE_BLOCK_POSITIONS = 1 << 16
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _grad_array(x3, want_grad: bool, grad_buffer):
    if not want_grad:
        return None
    return grad_buffer if grad_buffer is not None else cupy.empty_like(x3)


def _ignore(ignore_index: int) -> int:
    # Targets are int64: an ignore_index outside that range matches nothing (and a target equal
    # to the clamped value was already rejected by check_targets, being outside [0, C)).
    return min(max(int(ignore_index), _I64_MIN), _I64_MAX)


def _g_scalar(want_grad: bool, reduction: str, grad_output) -> float:
    return float(grad_output) if want_grad and reduction != "none" else 0.0


def _empty_loss(reduction: str, dt, n: int, inner: int, mean_value: float):
    """Loss of an input without elements: no kernel runs."""
    if reduction == "none":
        return cupy.zeros((n, inner), dt)
    return cupy.full((), mean_value if reduction == "mean" else 0.0, dt)


def mean_scalars(src: str, dt, t2, weight, ignore: int, n_classes: int, g: float):
    """Float64 device array ``[D, g / D]`` (``g / 0 -> +inf``) for ``reduction="mean"``."""
    ct = K.ctype_of(dt.name)
    npos = t2.size
    scal = cupy.empty(2, cupy.float64)
    block = K.COL_BLOCK
    grid = 1 if npos <= SINGLE_BLOCK_POSITIONS else L.grid_for(npos, block, block)
    part = scal if grid == 1 else cupy.empty(grid, cupy.float64)
    L.launch(src, dt, K.class_denom(ct), grid, block,
             (t2, L.i64(npos), L.i64(n_classes), L.i64(ignore), L.ptr(weight), L.f64(g), part,
              scal))
    if grid > 1:
        L.launch(src, dt, K.DENOM_FINALIZE, 1, K.FINAL_BLOCK, (part, L.i32(grid), L.f64(g), scal))
    return scal


def finish_loss(src: str, dt, reduction: str, loss_out, part, scal, div: float):
    """The loss to return: per-position losses, or the 0-d reduction of the block partials."""
    if reduction == "none":
        return loss_out
    out = cupy.empty((), dt)
    L.launch(src, dt, K.loss_finalize(K.ctype_of(dt.name)), 1, K.FINAL_BLOCK,
             (part, L.i32(part.size), L.ptr(scal), L.f64(div), out))
    return out


# ----------------------------------------------------------------------------- cross-entropy
@L.on_input_device
def cross_entropy(x3, t2, weight, *, ignore_index, label_smoothing, reduction, want_grad,
                  grad_output, grad_buffer):
    """Cross-entropy with class-index targets (kernel protocol in :mod:`nblosses.backends`)."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    gx = _grad_array(x3, want_grad, grad_buffer)
    if x3.size == 0:
        return _empty_loss(reduction, dt, n, inner, math.nan), gx
    ignore = _ignore(ignore_index)
    eps = float(label_smoothing)
    g_scalar = _g_scalar(want_grad, reduction, grad_output)
    scal = (mean_scalars(SRC_CE, dt, t2, weight, ignore, C, g_scalar)
            if reduction == "mean" else None)
    g_rows = grad_output if want_grad and reduction == "none" else None
    g_dev = scal[1:] if want_grad and reduction == "mean" else None
    wsum_dev = weight.sum(dtype=cupy.float64) if weight is not None and eps > 0 else None
    loss_out = cupy.empty((n, inner), dt) if reduction == "none" else None
    if inner == 1:
        vec = row_vec(ct, C, x3, gx)
        name, grid, block = rows_launch(n, C, ct, vec, K.ce_cached, K.ce_looped)
    else:
        block = K.COL_BLOCK
        grid = L.grid_for(n * inner, block, block)
        name = K.ce_cols(ct)
    part = cupy.empty(grid, cupy.float64) if reduction != "none" else None
    L.launch(SRC_CE, dt, name, grid, block,
             (x3, t2, L.i64(n), L.i64(C), L.i64(inner), L.ptr(weight), L.ptr(wsum_dev),
              L.f64(C), L.i64(ignore), L.f64(eps), L.i32(1 if want_grad else 0), L.ptr(g_rows),
              L.ptr(g_dev), L.f64(g_scalar), L.ptr(gx), L.ptr(loss_out), L.ptr(part)))
    return finish_loss(SRC_CE, dt, reduction, loss_out, part, scal, 1.0), gx


# ----------------------------------------------------------------------------- probabilities
@L.on_input_device
def cross_entropy_probs(x3, p3, weight, *, label_smoothing, reduction, want_grad, grad_output,
                        grad_buffer):
    """Cross-entropy with class-probability targets (``mean`` divides by ``N * inner``)."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    gx = _grad_array(x3, want_grad, grad_buffer)
    npos = n * inner
    denom = float(npos) if reduction == "mean" else 1.0
    if x3.size == 0:  # C == 0 with positions: every row loss is 0 (as the CPU backend)
        return _empty_loss(reduction, dt, n, inner, 0.0 if npos else math.nan), gx
    g_scalar = _g_scalar(want_grad, reduction, grad_output) / denom
    g_rows = grad_output if want_grad and reduction == "none" else None
    loss_out = cupy.empty((n, inner), dt) if reduction == "none" else None
    if inner == 1:
        vec = row_vec(ct, C, x3, p3, gx)
        g, block = K.looped_config(C // vec)
        grid = L.grid_for(n, K.rows_per_block(g, block), block)
        name = K.probs_rows(ct, vec, g, block)
    else:
        block = K.COL_BLOCK
        grid = L.grid_for(npos, block, block)
        name = K.probs_cols(ct)
    part = cupy.empty(grid, cupy.float64) if reduction != "none" else None
    L.launch(SRC_PROBS, dt, name, grid, block,
             (x3, p3, L.i64(n), L.i64(C), L.i64(inner), L.ptr(weight),
              L.f64(float(label_smoothing)), L.i32(1 if want_grad else 0), L.ptr(g_rows),
              L.f64(g_scalar), L.ptr(gx), L.ptr(loss_out), L.ptr(part)))
    return finish_loss(SRC_PROBS, dt, reduction, loss_out, part, None, denom), gx


# ----------------------------------------------------------------------------- nll
@L.on_input_device
def nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer):
    """NLL on log-probabilities; the gradient is zero but at the target classes."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    gx = _grad_array(x3, want_grad, grad_buffer)
    if x3.size == 0:
        return _empty_loss(reduction, dt, n, inner, math.nan), gx
    ignore = _ignore(ignore_index)
    npos = n * inner
    g_scalar = _g_scalar(want_grad, reduction, grad_output)
    scal = (mean_scalars(SRC_NLL, dt, t2, weight, ignore, C, g_scalar)
            if reduction == "mean" else None)
    loss_out = cupy.empty((n, inner), dt) if reduction == "none" else None
    block = K.COL_BLOCK
    grid = L.grid_for(npos, block, block)
    part = cupy.empty(grid, cupy.float64) if reduction != "none" else None
    L.launch(SRC_NLL, dt, K.nll_fwd(ct), grid, block,
             (x3, t2, L.i64(n), L.i64(C), L.i64(inner), L.ptr(weight), L.i64(ignore),
              L.ptr(loss_out), L.ptr(part)))
    if want_grad:
        # Stream order: nll_fwd has read x before the memset, so gx may be x itself.
        gx.data.memset_async(0, gx.nbytes)
        g_rows = grad_output if reduction == "none" else None
        g_dev = scal[1:] if reduction == "mean" else None
        L.launch(SRC_NLL, dt, K.nll_grad(ct), grid, block,
                 (t2, L.i64(n), L.i64(C), L.i64(inner), L.ptr(weight), L.i64(ignore),
                  L.ptr(g_rows), L.ptr(g_dev), L.f64(g_scalar), gx))
    return finish_loss(SRC_NLL, dt, reduction, loss_out, part, scal, 1.0), gx
