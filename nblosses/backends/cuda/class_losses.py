"""NLL and cross-entropy (class indices and class probabilities) on CUDA, gradient fused.

Kernels in ``cross_entropy.cu``, ``cross_entropy_probs.cu`` and ``nll.cu``; same protocol and
semantics as the CPU backend (:mod:`nblosses.backends.cpu.class_losses`).

No host round trip and no device-to-host copy inside a call; every launch is asynchronous on
CuPy's current stream (a ``cupy.cuda.ExternalStream`` wrapping torch's included), so a call can
be captured into a CUDA graph. Launches per call:

- cross_entropy / cross_entropy_probs: one (loss, gradient and reduction fused: the kernel's
  last block sums the per-block partials in a fixed order, deterministic, and writes the 0-d
  result). Class indices with few long rows (fewer rows than resident blocks): two, each row
  split across blocks (chunk statistics, then combine, loss and gradient), so every SM
  streams. With class indices, a small prep kernel (``class_prep``) runs first only when the
  main kernel needs a global scalar before it writes gradients: ``mean`` with a gradient
  (``g / D``), or label smoothing with class weights (``W = sum(weight)``).
- nll_loss: the gradient is zero-filled (``cudaMemsetAsync``), then one fused launch (plus the
  prep kernel for ``mean`` with a gradient; a second launch when the gradient overwrites the
  logits, which must be read before they are cleared).

Class indices are checked on the device (see :mod:`._device_errors`): a target outside
``[0, C)`` that is not ``ignore_index`` gets a NaN loss and gradient and is reported by the next
call or by ``synchronize``. Scratch for the reductions: one buffer per device and stream
(:mod:`._scratch`), no per-call allocation besides the outputs.
"""

from __future__ import annotations

import cupy

from .._host import LossCall, ignore_value
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from . import _scratch as S
from .softmax import row_vec, rows_launch

SRC_CE = "cross_entropy.cu"
SRC_PROBS = "cross_entropy_probs.cu"
SRC_NLL = "nll.cu"


def _loss_call(x3, reduction: str, want_grad: bool, grad_output, grad_buffer,
               denom) -> LossCall:
    """The host plan of a class-loss call (:class:`.._host.LossCall`): CuPy outputs, a reduced
    loss finished by the kernel in a 0-d array (no read back)."""
    n, _, inner = x3.shape
    return LossCall(cupy, x3.shape, (n, inner), x3.dtype, reduction=reduction,
                    want_grad=want_grad, grad_output=grad_output, grad_buffer=grad_buffer,
                    denom=denom, device_total=True)


def reduce_args(scr, call: LossCall, *, finish: bool = True, scal: bool = False,
                err=None) -> dict:
    """The reduction parameters shared by every loss kernel (``REDUCE_PARAMS``), from the call.

    ``out``: the call's 0-d result (none for ``reduction="none"``, or with ``finish=False``: a
    launch that does not reduce); ``rmode`` 1 when the kernel finds the ``mean`` denominator
    itself (the call's ``denom`` is None), else 0, dividing by ``div`` (the call's host
    denominator); ``scal``: whether the prep kernel ran.
    """
    out = call.total if finish else None
    found = call.denom is None
    return dict(part=scr.part if out is not None else None,
                counter=scr.counter if out is not None else None, out=out, rmode=int(found),
                div=1.0 if found else float(call.denom), scal=scr.scal if scal else None,
                err=err)


def class_prep(src: str, dt, t2, weight, *, ignore: int, n_classes: int, g: float, with_w: bool,
               scr) -> None:
    """Queue ``class_prep``: scratch ``scal = [D, g / D, W]`` (``W`` only when ``with_w``)."""
    npos = t2.size
    block = K.COL_BLOCK
    grid = L.grid_for(max(npos, n_classes if with_w else 0), block, block)
    L.launch(src, dt, K.class_prep(K.ctype_of(dt.name)), grid, block,
             K.pack("class_prep", t=t2, npos=npos, C=n_classes, ignore=ignore, w=weight,
                    nw=n_classes if with_w else 0, g=g, part=scr.part, counter=scr.counter,
                    scal=scr.scal))


def _prepare(src: str, dt, t2, weight, ignore: int, n_classes: int, call: LossCall,
             with_w: bool):
    """``(stream, scratch, prep queued?)`` of a class-index launch. The prep kernel is queued
    when the main kernel needs a global scalar first (the upstream gradient over the ``mean``
    denominator the device finds, or the class weights' sum for label smoothing)."""
    stream = cupy.cuda.get_current_stream()
    prep = (call.denom is None and call.grad is not None) or with_w
    scr = S.scratch(stream, L.sm_count()) if prep or call.total is not None else None
    if prep:
        class_prep(src, dt, t2, weight, ignore=ignore, n_classes=n_classes, g=call.g_scalar,
                   with_w=with_w, scr=scr)
    return stream, scr, prep


# ----------------------------------------------------------------------------- cross-entropy
@L.on_input_device
def cross_entropy(x3, t2, weight, *, ignore_index, label_smoothing, reduction, want_grad,
                  grad_output, grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None):
    """Cross-entropy with class-index targets (kernel protocol in :mod:`nblosses.backends`).

    ``z_loss``, ``softcap`` and ``lse_out`` select the EXT instantiations; the defaults run the
    plain ones.
    """
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    # The device finds the mean denominator (rmode 1): no read back.
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer, None)
    if x3.size == 0:
        call.fill_empty(lse_out)
        return call.result(), call.grad
    gx = call.grad
    ignore = ignore_value(ignore_index)
    eps = float(label_smoothing)
    ext = int(float(z_loss) != 0.0 or float(softcap) != 0.0 or lse_out is not None)
    with_w = weight is not None and eps > 0
    stream, scr, prep = _prepare(SRC_CE, dt, t2, weight, ignore, C, call, with_w)
    err = E.record_for_launch(stream)
    args = dict(x=x3, t=t2, nrows=n, C=C, w=weight, wsum=float(C), ignore=ignore, eps=eps,
                want_grad=int(want_grad), g_rows=call.g_rows, g_scalar=call.g_scalar, gx=gx,
                loss_out=call.losses, z_loss=float(z_loss), softcap=float(softcap),
                lse_out=lse_out, **reduce_args(scr, call, scal=prep, err=err))
    vec = row_vec(ct, C, x3, gx) if inner == 1 else 1
    nsplit = (K.split_count(n, C // vec, L.sm_count())
              if inner == 1 and K.cached_config(C // vec, ct, vec) is None else 1)
    if nsplit > 1:
        _ce_split(x3, ct, vec, nsplit, ext, args)
    elif inner == 1:
        name, grid, block = rows_launch(
            n, C, ct, vec, lambda c_, v, g, nv, b: K.ce_cached(c_, v, g, nv, b, ext),
            lambda c_, v: K.ce_looped(c_, v, ext), packed=True)
        L.launch(SRC_CE, dt, name, grid, block, K.pack("ce", inner=1, **args))
    else:
        block = K.COL_BLOCK
        L.launch(SRC_CE, dt, K.ce_cols(ct, ext), L.grid_for(n * inner, block, block), block,
                 K.pack("ce", inner=inner, **args))
    E.after_launch(stream)
    return call.result(), gx


def _ce_split(x3, ct: str, vec: int, nsplit: int, ext: int, args: dict) -> None:
    """Few long rows: ``nsplit`` blocks per row, chunk statistics then the combine, loss and
    gradient (two launches; the statistics come from CuPy's memory pool). The reduction and
    the error record belong to the second launch only."""
    n, C, _ = x3.shape
    nsplit, chunk = K.split_chunks(C // vec, nsplit)
    stats = cupy.empty(4 * n * nsplit, cupy.float64)
    split = dict(nsplit=nsplit, chunk_vec=chunk, stats=stats)
    first = dict(args, out=None, part=None, counter=None, err=None)
    for kernel, kw in zip(K.CE_SPLIT_KERNELS, (first, args)):
        L.launch(SRC_CE, x3.dtype, K.ce_split(kernel, ct, vec, ext), n * nsplit, K.LONG_ROW_G,
                 K.pack("ce_split", **kw, **split))


# ----------------------------------------------------------------------------- probabilities
@L.on_input_device
def cross_entropy_probs(x3, p3, weight, *, label_smoothing, reduction, want_grad, grad_output,
                        grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None):
    """Cross-entropy with class-probability targets (``mean`` divides by ``N * inner``)."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    npos = n * inner
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer, float(npos))
    if x3.size == 0:  # C == 0 with positions: every row loss is 0 (as the CPU backend)
        call.fill_empty(lse_out)
        return call.result(), call.grad
    gx = call.grad
    ext = int(float(z_loss) != 0.0 or float(softcap) != 0.0 or lse_out is not None)
    stream = cupy.cuda.get_current_stream()
    scr = S.scratch(stream, L.sm_count()) if call.total is not None else None
    if inner == 1:
        vec = row_vec(ct, C, x3, p3, gx)
        g, block = K.looped_config(C // vec)
        grid = L.grid_for(n, K.rows_per_block(g, block), block)
        name = K.probs_rows(ct, vec, g, block, ext)
    else:
        block = K.COL_BLOCK
        grid = L.grid_for(npos, block, block)
        name = K.probs_cols(ct, ext)
    L.launch(SRC_PROBS, dt, name, grid, block, K.pack(
        "probs", x=x3, p=p3, nrows=n, C=C, inner=inner, w=weight, eps=float(label_smoothing),
        want_grad=int(want_grad), g_rows=call.g_rows, g_scalar=call.g_scalar, gx=gx,
        loss_out=call.losses, z_loss=float(z_loss), softcap=float(softcap), lse_out=lse_out,
        **reduce_args(scr, call)))
    return call.result(), gx


# ----------------------------------------------------------------------------- nll
@L.on_input_device
def nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer):
    """NLL on log-probabilities; the gradient is zero but at the target classes."""
    n, C, inner = x3.shape
    dt = x3.dtype
    call = _loss_call(x3, reduction, want_grad, grad_output, grad_buffer, None)
    if x3.size == 0:
        call.fill_empty()
        return call.result(), call.grad
    gx = call.grad
    ignore = ignore_value(ignore_index)
    stream, scr, prep = _prepare(SRC_NLL, dt, t2, weight, ignore, C, call, False)
    err = E.record_for_launch(stream)
    common = dict(x=x3, t=t2, nrows=n, C=C, inner=inner, w=weight, ignore=ignore,
                  g_rows=call.g_rows, g_scalar=call.g_scalar, gx=gx, loss_out=call.losses)
    block = K.COL_BLOCK
    grid = L.grid_for(n * inner, block, block)
    name = K.nll_fused(K.ctype_of(dt.name))
    in_place = want_grad and gx.data.ptr == x3.data.ptr
    if want_grad and not in_place:
        gx.data.memset_async(0, gx.nbytes)
    L.launch(SRC_NLL, dt, name, grid, block, K.pack(
        "nll", want_loss=1, want_grad=int(want_grad and not in_place), **common,
        **reduce_args(scr, call, scal=prep, err=err)))
    if in_place:  # stream order: the loss launch has read x before the memset clears it
        gx.data.memset_async(0, gx.nbytes)
        L.launch(SRC_NLL, dt, name, grid, block, K.pack(
            "nll", want_loss=0, want_grad=1, **common,
            **reduce_args(scr, call, finish=False, scal=prep, err=err)))
    E.after_launch(stream)
    return call.result(), gx
