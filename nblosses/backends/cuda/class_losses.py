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

import math

import cupy

from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from . import _scratch as S
from .softmax import row_vec, rows_launch

SRC_CE = "cross_entropy.cu"
SRC_PROBS = "cross_entropy_probs.cu"
SRC_NLL = "nll.cu"

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _grad_array(x3, want_grad: bool, grad_buffer):
    if not want_grad:
        return None
    return grad_buffer if grad_buffer is not None else cupy.empty_like(x3)


def _ignore(ignore_index: int) -> int:
    # Targets are int64: an ignore_index outside that range matches nothing.
    return min(max(int(ignore_index), _I64_MIN), _I64_MAX)


def _g_scalar(want_grad: bool, reduction: str, grad_output) -> float:
    return float(grad_output) if want_grad and reduction != "none" else 0.0


def _empty_loss(reduction: str, dt, n: int, inner: int, mean_value: float):
    """Loss of an input without elements: no kernel runs."""
    if reduction == "none":
        return cupy.zeros((n, inner), dt)
    return cupy.full((), mean_value if reduction == "mean" else 0.0, dt)


def reduce_args(scr, out, *, rmode: int = 0, div: float = 1.0, scal: bool = False,
                err=None) -> dict:
    """The reduction parameters shared by every loss kernel (``REDUCE_PARAMS``).

    ``out``: the 0-d result (``None`` for ``reduction="none"``: no partials); ``rmode`` 0 divides
    by ``div``, 1 by the ``mean`` denominator; ``scal``: whether the prep kernel ran.
    """
    return dict(part=scr.part if out is not None else None,
                counter=scr.counter if out is not None else None, out=out, rmode=rmode,
                div=div, scal=scr.scal if scal else None, err=err)


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


def _outputs(reduction: str, dt, n: int, inner: int):
    """``(loss_out, out)``: per-position losses or the 0-d reduced loss."""
    if reduction == "none":
        return cupy.empty((n, inner), dt), None
    return None, cupy.empty((), dt)


def _fill_lse_empty(lse_out) -> None:
    # No classes: logsumexp of nothing is -inf (positions exist only when C == 0).
    if lse_out is not None and lse_out.size:
        lse_out.fill(-math.inf)


def _prepare(src: str, dt, t2, weight, ignore: int, n_classes: int, reduction: str,
             want_grad: bool, grad_output, with_w: bool):
    """``(g scalar, stream, scratch, prep queued?)`` of a class-index launch. The prep kernel
    is queued when the main kernel needs a global scalar first (``mean`` with a gradient, or
    the class weights' sum for label smoothing)."""
    g_scalar = _g_scalar(want_grad, reduction, grad_output)
    stream = cupy.cuda.get_current_stream()
    prep = (reduction == "mean" and want_grad) or with_w
    scr = S.scratch(stream, L.sm_count()) if prep or reduction != "none" else None
    if prep:
        class_prep(src, dt, t2, weight, ignore=ignore, n_classes=n_classes, g=g_scalar,
                   with_w=with_w, scr=scr)
    return g_scalar, stream, scr, prep


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
    gx = _grad_array(x3, want_grad, grad_buffer)
    if x3.size == 0:
        _fill_lse_empty(lse_out)
        return _empty_loss(reduction, dt, n, inner, math.nan), gx
    ignore = _ignore(ignore_index)
    eps = float(label_smoothing)
    ext = int(float(z_loss) != 0.0 or float(softcap) != 0.0 or lse_out is not None)
    with_w = weight is not None and eps > 0
    g_scalar, stream, scr, prep = _prepare(SRC_CE, dt, t2, weight, ignore, C, reduction,
                                           want_grad, grad_output, with_w)
    loss_out, out = _outputs(reduction, dt, n, inner)
    err = E.record_for_launch(stream)
    args = dict(x=x3, t=t2, nrows=n, C=C, w=weight, wsum=float(C), ignore=ignore, eps=eps,
                want_grad=int(want_grad),
                g_rows=grad_output if want_grad and reduction == "none" else None,
                g_scalar=g_scalar, gx=gx, loss_out=loss_out, z_loss=float(z_loss),
                softcap=float(softcap), lse_out=lse_out,
                **reduce_args(scr, out, rmode=int(reduction == "mean"), scal=prep, err=err))
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
    return (loss_out if out is None else out), gx


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
    gx = _grad_array(x3, want_grad, grad_buffer)
    npos = n * inner
    denom = float(npos) if reduction == "mean" else 1.0
    if x3.size == 0:  # C == 0 with positions: every row loss is 0 (as the CPU backend)
        _fill_lse_empty(lse_out)
        return _empty_loss(reduction, dt, n, inner, 0.0 if npos else math.nan), gx
    ext = int(float(z_loss) != 0.0 or float(softcap) != 0.0 or lse_out is not None)
    stream = cupy.cuda.get_current_stream()
    scr = S.scratch(stream, L.sm_count()) if reduction != "none" else None
    loss_out, out = _outputs(reduction, dt, n, inner)
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
        want_grad=int(want_grad),
        g_rows=grad_output if want_grad and reduction == "none" else None,
        g_scalar=_g_scalar(want_grad, reduction, grad_output) / denom, gx=gx,
        loss_out=loss_out, z_loss=float(z_loss), softcap=float(softcap), lse_out=lse_out,
        **reduce_args(scr, out, div=denom)))
    return (loss_out if out is None else out), gx


# ----------------------------------------------------------------------------- nll
@L.on_input_device
def nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer):
    """NLL on log-probabilities; the gradient is zero but at the target classes."""
    n, C, inner = x3.shape
    dt = x3.dtype
    gx = _grad_array(x3, want_grad, grad_buffer)
    if x3.size == 0:
        return _empty_loss(reduction, dt, n, inner, math.nan), gx
    ignore = _ignore(ignore_index)
    g_scalar, stream, scr, prep = _prepare(SRC_NLL, dt, t2, weight, ignore, C, reduction,
                                           want_grad, grad_output, False)
    loss_out, out = _outputs(reduction, dt, n, inner)
    err = E.record_for_launch(stream)
    rmode = int(reduction == "mean")
    common = dict(x=x3, t=t2, nrows=n, C=C, inner=inner, w=weight, ignore=ignore,
                  g_rows=grad_output if want_grad and reduction == "none" else None,
                  g_scalar=g_scalar, gx=gx, loss_out=loss_out)
    block = K.COL_BLOCK
    grid = L.grid_for(n * inner, block, block)
    name = K.nll_fused(K.ctype_of(dt.name))
    in_place = want_grad and gx.data.ptr == x3.data.ptr
    if want_grad and not in_place:
        gx.data.memset_async(0, gx.nbytes)
    L.launch(SRC_NLL, dt, name, grid, block, K.pack(
        "nll", want_loss=1, want_grad=int(want_grad and not in_place), **common,
        **reduce_args(scr, out, rmode=rmode, scal=prep, err=err)))
    if in_place:  # stream order: the loss launch has read x before the memset clears it
        gx.data.memset_async(0, gx.nbytes)
        L.launch(SRC_NLL, dt, name, grid, block, K.pack(
            "nll", want_loss=0, want_grad=1, **common,
            **reduce_args(scr, None, rmode=rmode, scal=prep, err=err)))
    E.after_launch(stream)
    return (loss_out if out is None else out), gx
