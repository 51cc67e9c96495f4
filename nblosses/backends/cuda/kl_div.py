"""torch's ``kl_div`` on CUDA, gradient fused (kernel in ``kl_div.cu``).

One elementwise launch per call reads both arrays once and writes the per-element loss
(``"none"``) or the 0-d reduced loss, and the gradient when asked; the reduction ends in the
same launch (deterministic, scratch per device and stream). The ``mean`` denominator is the
element count, known on the host: nothing here synchronises with the device.

A ``+inf`` log-target (``log_target=True``) gets a NaN loss and gradient and is recorded in the
device error record (kind ``NBL_ERR_LOG_TARGET`` = 2, position in the flat array) for
:func:`nblosses.synchronize` and the next call's poll.
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

SRC = "kl_div.cu"


def kl_div_name(ct: str, vec: int, log_target: bool) -> str:
    """The instantiation ``kl_div_fwd<ct, vec, log_target>``."""
    return K.name("kl_div_fwd", ct, vec, int(log_target))


def _instantiations(ct: str) -> tuple[str, ...]:
    return tuple(kl_div_name(ct, v, log) for v in K.vec_choices(ct) for log in (False, True))


K.register(K.Source(
    SRC,
    params={"kl": (("x", "const T*"), ("t", "const T* __restrict__"),
                   ("n", "i64"), ("g_rows", "const T* __restrict__"), ("g_scalar", "double"),
                   ("gx", "T*"), ("loss_out", "T* __restrict__"), *K.REDUCE_PARAMS)},
    kernels={"kl_div_fwd": "kl"},
    instantiations=_instantiations))


@L.on_input_device
def kl_div(x, t, *, log_target, reduction, want_grad, grad_output, grad_buffer):
    """``kl_div`` on flat arrays of one length (kernel protocol in :mod:`nblosses.backends`).
    ``grad_buffer`` may be ``x`` (each element is read before its gradient is written)."""
    n = x.size
    dt = x.dtype
    ct = K.ctype_of(dt.name)
    call = LossCall(cupy, x.shape, x.shape, dt, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, grad_buffer=grad_buffer, denom=float(n),
                    device_total=True)
    if n == 0:
        call.fill_empty()
        return call.result(), call.grad
    vec = flat_vec(ct, x, t, call.g_rows, call.losses, call.grad)
    block = K.COL_BLOCK
    stream = cupy.cuda.get_current_stream()
    scr = None if call.total is None else S.scratch(stream, L.sm_count())
    err = E.record_for_launch(stream) if log_target else None
    L.launch(SRC, dt, kl_div_name(ct, vec, log_target), L.grid_for(-(-n // vec), block, block),
             block, K.pack("kl", x=x, t=t, n=n, g_rows=call.g_rows, g_scalar=call.g_scalar,
                           gx=call.grad, loss_out=call.losses,
                           **reduce_args(scr, call, err=err)))
    if err is not None:
        E.after_launch(stream)
    return call.result(), call.grad
