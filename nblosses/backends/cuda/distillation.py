"""Distillation losses on CUDA (kernels in ``distillation.cu``); same protocol and semantics as
the CPU backend (:mod:`nblosses.backends.cpu.distillation`).

One launch per call: ``distill_rows`` for ``inner == 1`` (a group of threads per row, sized by
the row's length as the streamed cross-entropy rows: :func:`._kernels.looped_config`), else
``distill_cols`` (a thread per position). The loss, the gradient and the reduction end in it;
with class targets and ``mean`` with a gradient, ``class_prep`` runs first for the denominator
(``g / D`` on the device: no read back). Nothing here synchronises with the device.

Targets outside ``[0, C)`` and top-k indices outside it are checked in the kernel (NaN loss and
gradient at their position, the device error record, ``IndexError`` at the next poll). The
gradient may be written into the student's logits; with a top-k teacher and a soft cap it is
computed into a fresh array and copied there (the top-k terms re-read the logits after the
gradient pass).
"""

from __future__ import annotations

import cupy

from .._host import LossCall, ignore_value
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from . import _scratch as S
from .class_losses import _prepare, reduce_args
from .softmax import row_vec

SRC = "distillation.cu"
#: ``MODE`` template values (``NBL_DIST_*`` in the source).
FORWARD, REVERSE, JSD, TOPK = 0, 1, 2, 3
MODES = (FORWARD, REVERSE, JSD, TOPK)


def rows_name(ct: str, mode: int, vec: int, g: int, block: int) -> str:
    return K.name("distill_rows", ct, mode, vec, g, block)


def cols_name(ct: str, mode: int) -> str:
    return K.name("distill_cols", ct, mode)


def _instantiations(ct: str) -> tuple[str, ...]:
    names = [rows_name(ct, m, v, g, b) for m in MODES for v in K.vec_choices(ct)
             for g, b in K.LOOPED_GS]
    return (*names, *(cols_name(ct, m) for m in MODES), K.class_prep(ct))


K.register(K.Source(
    SRC,
    params={"distill": (
        ("x", "const T*"), ("teacher", "const T* __restrict__"),
        ("idx", "const long long* __restrict__"), ("lp", "const T* __restrict__"), ("k", "i64"),
        ("t", "const long long* __restrict__"), ("nrows", "i64"), ("C", "i64"),
        ("inner", "i64"), ("inv_t", "double"), ("beta", "double"), ("hard", "double"),
        ("sep", "int"), ("softcap", "double"), ("ignore", "i64"), ("want_grad", "int"),
        ("g_rows", "const T* __restrict__"), ("g_scalar", "double"), ("gx", "T*"),
        ("loss_out", "T* __restrict__"), *K.REDUCE_PARAMS)},
    kernels={"distill_rows": "distill", "distill_cols": "distill"},
    instantiations=_instantiations))


def _launch(x3, teacher, idx3, lp3, t2, mode: int, *, beta, temperature, ignore_index,
            hard_weight, softcap, reduction, want_grad, grad_output, grad_buffer):
    """The launch of either teacher kind (``teacher`` or ``idx3`` / ``lp3`` None)."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    # top-k terms re-read the logits after the gradient pass: not in place with a soft cap
    fresh = (mode == TOPK and softcap and grad_buffer is not None
             and grad_buffer.data.ptr == x3.data.ptr)
    call = LossCall(cupy, x3.shape, (n, inner), dt, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, grad_buffer=None if fresh else grad_buffer,
                    denom=None if t2 is not None else float(n * inner), device_total=True)
    if x3.size == 0:
        call.fill_empty()
        return call.result(), grad_buffer if fresh else call.grad
    ignore = ignore_value(ignore_index)
    if t2 is not None:  # the mean denominator counts kept targets (class_prep when needed)
        stream, scr, prep = _prepare(SRC, dt, t2, None, ignore, C, call, False)
    else:
        stream, prep = cupy.cuda.get_current_stream(), False
        scr = None if call.total is None else S.scratch(stream, L.sm_count())
    err = E.record_for_launch(stream)
    k = 0 if idx3 is None else idx3.shape[1]
    args = K.pack("distill", x=x3, teacher=teacher, idx=idx3, lp=lp3, k=k, t=t2, nrows=n, C=C,
                  inner=inner, inv_t=1.0 / float(temperature), beta=float(beta),
                  hard=float(hard_weight),
                  sep=int(float(hard_weight) > 0 and float(temperature) != 1.0),
                  softcap=float(softcap), ignore=ignore, want_grad=int(want_grad),
                  g_rows=call.g_rows, g_scalar=call.g_scalar, gx=call.grad,
                  loss_out=call.losses, **reduce_args(scr, call, scal=prep, err=err))
    if inner == 1:
        vec = row_vec(ct, C, x3, teacher, call.grad)
        g, block = K.looped_config(C // vec)
        L.launch(SRC, dt, rows_name(ct, mode, vec, g, block),
                 L.grid_for(n, K.rows_per_block(g, block), block), block, args)
    else:
        block = K.COL_BLOCK
        L.launch(SRC, dt, cols_name(ct, mode), L.grid_for(n * inner, block, block), block,
                 args)
    E.after_launch(stream)
    if fresh:
        grad_buffer[...] = call.grad
        return call.result(), grad_buffer
    return call.result(), call.grad


@L.on_input_device
def distillation(x3, teacher3, t2, *, beta, temperature, ignore_index, hard_weight, softcap,
                 reduction, want_grad, grad_output, grad_buffer):
    """Distillation from teacher logits (kernel protocol in :mod:`nblosses.backends`)."""
    mode = FORWARD if beta == 0 else REVERSE if beta == 1 else JSD
    return _launch(x3, teacher3, None, None, t2, mode, beta=beta, temperature=temperature,
                   ignore_index=ignore_index, hard_weight=hard_weight, softcap=softcap,
                   reduction=reduction, want_grad=want_grad, grad_output=grad_output,
                   grad_buffer=grad_buffer)


@L.on_input_device
def distillation_topk(x3, idx3, lp3, t2, *, temperature, ignore_index, hard_weight, softcap,
                      reduction, want_grad, grad_output, grad_buffer):
    """Distillation from a top-k teacher (indices checked on the device)."""
    return _launch(x3, None, idx3, lp3, t2, TOPK, beta=0.0, temperature=temperature,
                   ignore_index=ignore_index, hard_weight=hard_weight, softcap=softcap,
                   reduction=reduction, want_grad=want_grad, grad_output=grad_output,
                   grad_buffer=grad_buffer)
