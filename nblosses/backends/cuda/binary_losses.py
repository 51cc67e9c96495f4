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

import cupy

from .._host import LossCall
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
    call = LossCall(cupy, x.shape, x.shape, dt, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, denom=float(n), device_total=True)
    if n == 0:
        call.fill_empty()
        return call.result(), call.grad
    vec = flat_vec(ct, x, y, *extra, call.g_rows, call.losses, call.grad)
    block = K.COL_BLOCK
    grid = L.grid_for(-(-n // vec), block, block)
    stream = cupy.cuda.get_current_stream()
    scr = None if call.total is None else S.scratch(stream, L.sm_count())
    w, pw = (*extra, None)[:2]
    # Only the probability kernel checks its input (logits take any value).
    err = E.record_for_launch(stream) if kernel == "bce_fwd" else None
    L.launch(SRC, dt, K.elementwise(kernel, ct, vec), grid, block, K.pack(
        "bce", x=x, y=y, w=w, pw=pw, n=n, g_rows=call.g_rows, g_scalar=call.g_scalar,
        gx=call.grad, loss_out=call.losses, **reduce_args(scr, call, err=err)))
    if err is not None:
        E.after_launch(stream)
    return call.result(), call.grad


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
