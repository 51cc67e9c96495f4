"""Linear cross-entropy on CUDA: the chunked LM-head driver (:mod:`nblosses.backends._lm_head`,
the loss's host side :mod:`nblosses.backends._linear_ce`) with the products and column sums of
:mod:`.lm_head` and the block kernels of ``linear_ce.cu`` (statistics, gradient in place),
compiled and launched like every other source (:mod:`._loader`, arguments by
:func:`._kernels.pack`).

float32 and float64 run natively. float16 inputs are computed in float32 (inputs upcast once,
results cast back): the float32 copy of the weight is the one allocation beyond the chunk
budget.

No read back inside a call: the ``mean`` denominator and the summed class weights stay 0-d
device arrays (``host_scalars = False``). Class indices are never used as addresses by the
kernels; one outside ``[0, V)`` that is not ``ignore_index`` gives its row a NaN loss and NaN
``dL/dz`` (hence NaN in ``grad_W`` and ``grad_b``) and is recorded in the device error record
(IndexError at the next call or at ``synchronize``, :mod:`._device_errors`); the front end
checks them before the call only for ``validate="sync"``, as for the other class losses.
Status: compiled by NVRTC in CI, never run on a device yet.
"""

from __future__ import annotations

import cupy

from .. import _linear_ce as G
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from .lm_head import CudaHead

SOURCE = "linear_ce.cu"


def instantiations(ctype: str) -> list[str]:
    """The template instantiations ``linear_ce.cu`` is compiled for, per element type."""
    return K.instantiations(SOURCE, ctype)


def source() -> str:
    """The translation unit NVRTC compiles (the same for float and double)."""
    return L.source_for(SOURCE, "float")


def _launch(kernel: str, z, units: int, **args) -> None:
    """Launch ``kernel`` on block ``z``: ``units`` rows (``lce_stats``, a block per row) or
    elements (a thread each)."""
    stats = kernel == "lce_stats"
    block = K.LCE_STATS_BLOCK if stats else K.COL_BLOCK
    rows, cols = z.shape
    L.launch(SOURCE, z.dtype, K.lce(kernel, K.ctype_of(z.dtype.name)),
             L.grid_for(units, 1 if stats else block, block), block,
             K.pack(kernel, z=z, rows=rows, cols=cols, **args))


def _target_args(bias, target, weight, *, c0: int, ignore_index, n_classes: int,
                 label_smoothing: float, softcap: float) -> dict:
    """The kernels' target (``t``, or ``y`` of row stride ``ldy``) and per-class options."""
    common = dict(bias=bias, cap=softcap, c0=c0, w=weight, keep=1.0 - label_smoothing,
                  spread=label_smoothing / n_classes,
                  ignore=0 if ignore_index is None else ignore_index)
    if target.ndim == 2:
        return dict(common, t=None, y=target, ldy=target.strides[0] // target.itemsize)
    return dict(common, t=target, y=None, ldy=0)


@L.on_input_device
def block_stats(z, bias, target, weight, stats: dict, *, row0: int = 0, err=None,
                **kw) -> None:
    """Prepare the logits block ``z`` in place and merge its row statistics into ``stats``
    (kernel protocol: ``linear_cross_entropy.block_stats``, keywords ``c0``,
    ``ignore_index``, ``n_classes``, ``label_smoothing``, ``softcap``). The driver adds the
    block's first row ``row0`` and the device error record ``err``, where a class index
    outside ``[0, n_classes)`` is recorded (``None``: not recorded, the caller checked)."""
    probs = target.ndim == 2
    sa, sb = (stats["a_sum"], stats["b_sum"]) if probs else (stats["swx"], None)
    _launch("lce_stats", z, z.shape[0], **_target_args(bias, target, weight, **kw),
            smoothing=int(kw["label_smoothing"] > 0 and not probs), m=stats["m"],
            s=stats["s"], xt=None if probs else stats["xt"], sa=sa, sb=sb, row0=row0,
            n_classes=kw["n_classes"], err=err)


@L.on_input_device
def block_grad(z, bias, target, weight, m, coefs: tuple, *, raw: bool, **kw) -> None:
    """Overwrite the block ``z`` with ``dL/dz`` (kernel protocol:
    ``linear_cross_entropy.block_grad``, keywords as :func:`block_stats`)."""
    coef, b, a = coefs
    _launch("lce_grad", z, z.size, **_target_args(bias, target, weight, **kw), raw=int(raw),
            m=m, coef=coef, b=b, a=a)


class _CudaLinearCE(CudaHead, G.LinearCE):
    """The loss's block operations on CuPy arrays."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Class indices are checked (recorded) by lce_stats; probabilities need no record.
        self.err = None if self.probs else E.record_for_launch(cupy.cuda.get_current_stream())

    def merge(self, step: int, zs: tuple, raw: bool, st: dict, r0: int, r1: int, c0: int,
              c1: int) -> None:
        bias, t, w, kw = self.block_args(r0, r1, c0, c1)
        block_stats(zs[0], bias, t, w, st, row0=r0, err=self.err, **kw)

    def gradient_block(self, zs: tuple, raw: bool, st: dict, coefs, r0: int, r1: int, c0: int,
                       c1: int) -> None:
        bias, t, w, kw = self.block_args(r0, r1, c0, c1)
        block_grad(zs[0], bias, t, w, st["m"], coefs, raw=raw, **kw)


def _upcast(a):
    return None if a is None or a.dtype.kind != "f" else a.astype(cupy.float32)


def linear_cross_entropy(x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse,
                         chunk_rows=None, chunk_classes=None):
    """Kernel protocol as :func:`nblosses.backends.cpu.linear_ce.linear_cross_entropy`."""
    half = x2.dtype.name not in ("float32", "float64")
    if half:
        target = target if target.dtype.kind == "i" else _upcast(target)
        x2, w2, bias, weight = (_upcast(a) for a in (x2, w2, bias, weight))
        if reduction == "none" and grad_output is not None:
            grad_output = _upcast(grad_output)
    with x2.device:
        loss, lse, grads = G.run(
            _CudaLinearCE, x2, w2, bias, target, weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
            softcap=softcap, want_grad=want_grad, grad_output=grad_output, want_lse=want_lse,
            chunk_rows=chunk_rows, chunk_classes=chunk_classes)
        if target.ndim == 1:  # queue the error record's copy-back after the last launch
            E.after_launch(cupy.cuda.get_current_stream())
    if half:
        # lse stays float32 for half inputs (the front end's convention); the rest goes back.
        loss = loss.astype(cupy.float16)
        grads = None if grads is None else tuple(
            None if g is None else g.astype(cupy.float16) for g in grads)
    return loss, lse, grads


# The block operations of the protocol, reached as attributes of the kernel.
vars(linear_cross_entropy).update(block_stats=block_stats, block_grad=block_grad)
