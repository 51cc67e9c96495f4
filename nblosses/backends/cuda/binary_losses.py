"""Binary cross-entropy (on probabilities and on logits) on CUDA, gradient fused.

One elementwise kernel per call (``binary.cu``) reads the inputs once and writes the per-element
loss (``"none"``) or the 0-d reduced loss, and the gradient when asked: the reduction ends in the
same launch (the last block sums the per-block partials in a fixed order: deterministic; scratch
per device and stream, :mod:`._scratch`). The ``mean`` denominator is the element count, known on
the host, so nothing here synchronises with the device.

``binary_cross_entropy`` checks its input on the device (``"probability_range"`` in the
runtime's ``kernel_checks``, so the front end does not read the input's min/max back): an
element outside ``[0, 1]`` or NaN gets a NaN loss and gradient, and the first one is recorded
in the device error record and raised as ``ValueError`` by the next call or by
``synchronize`` (:mod:`._device_errors`).
"""

from __future__ import annotations

import math

import cupy

from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from . import _scratch as S
from .class_losses import reduce_args
from .softmax import flat_vec

SRC = "binary.cu"


def _binary(kernel: str, x, y, extra, *, reduction, want_grad, grad_output):
    n = x.size
    dt = x.dtype
    ct = K.ctype_of(dt.name)
    keep = reduction == "none"
    out = cupy.empty_like(x) if keep else None
    gx = cupy.empty_like(x) if want_grad else None
    g_arr = grad_output if want_grad and keep else None
    g_scalar = 0.0
    if want_grad and not keep:
        g_scalar = float(grad_output) / (n if reduction == "mean" and n else 1)
    if n == 0:
        if keep:
            return out, gx
        return cupy.full((), math.nan if reduction == "mean" else 0.0, dt), gx
    vec = flat_vec(ct, x, y, *extra, g_arr, out, gx)
    block = K.COL_BLOCK
    grid = L.grid_for(-(-n // vec), block, block)
    red = None if keep else cupy.empty((), dt)
    stream = cupy.cuda.get_current_stream()
    scr = None if keep else S.scratch(stream, L.sm_count())
    w, pw = (*extra, None)[:2]
    # Only the probability kernel checks its input (logits take any value).
    err = E.record_for_launch(stream) if kernel == "bce_fwd" else None
    L.launch(SRC, dt, K.elementwise(kernel, ct, vec), grid, block, K.pack(
        "bce", x=x, y=y, w=w, pw=pw, n=n, g_rows=g_arr, g_scalar=g_scalar, gx=gx, loss_out=out,
        **reduce_args(scr, red, div=float(n) if reduction == "mean" else 1.0, err=err)))
    if err is not None:
        E.after_launch(stream)
    return (out if keep else red), gx


@L.on_input_device
def binary_cross_entropy(x, y, weight, *, reduction, want_grad, grad_output):
    """BCE on probabilities (kernel protocol in :mod:`nblosses.backends`)."""
    return _binary("bce_fwd", x, y, (weight,), reduction=reduction, want_grad=want_grad,
                   grad_output=grad_output)


@L.on_input_device
def binary_cross_entropy_with_logits(x, y, weight, pos_weight, *, reduction, want_grad,
                                     grad_output):
    """BCE on logits with the stable log-sigmoid."""
    return _binary("bce_logits_fwd", x, y, (weight, pos_weight), reduction=reduction,
                   want_grad=want_grad, grad_output=grad_output)
