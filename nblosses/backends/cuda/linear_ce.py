"""Linear cross-entropy on CUDA: the chunked driver of :mod:`nblosses.backends._linear_ce` with
cuBLAS products (``cupy.cublas.gemm``, ``beta = 1`` for the accumulated gradients) and the
kernels of ``linear_ce.cu`` (block statistics, gradient in place, column sums), compiled and
launched like every other source (:mod:`._loader`, arguments by :func:`._kernels.pack`).

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

from typing import Any, ClassVar

import cupy

from .. import _linear_ce as G
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L

SOURCE = "linear_ce.cu"


def instantiations(ctype: str) -> list[str]:
    """The template instantiations ``linear_ce.cu`` is compiled for, per element type."""
    return K.instantiations(SOURCE, ctype)


def source() -> str:
    """The translation unit NVRTC compiles (the same for float and double)."""
    return L.source_for(SOURCE, "float")


def _launch(kernel: str, z, units: int, **args) -> None:
    """Launch ``kernel`` on block ``z``: ``units`` rows (``lce_stats``, a block per row) or
    elements / columns (a thread each)."""
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


class _CudaLinearCE(G.ChunkedLinearCE):
    """The driver's hooks on CuPy arrays."""

    xp: ClassVar[Any] = cupy
    host_scalars: ClassVar[bool] = False

    def gemm(self, a, b, c, beta: float) -> None:
        from cupy import cublas  # loads libcublas: not at import (CI has no CUDA libraries)

        cublas.gemm("N", "N", a, b, out=c, beta=beta)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Class indices are checked (recorded) by lce_stats; probabilities need no record.
        self.err = None if self.probs else E.record_for_launch(cupy.cuda.get_current_stream())

    def _block(self, r0: int, r1: int, c0: int, c1: int) -> tuple[Any, Any, Any, dict]:
        """``(bias, target, weight, keywords)`` of the block operations on a block."""
        bias, w = self.slices(c0, c1)
        t = self.target[r0:r1, c0:c1] if self.probs else self.target[r0:r1]
        return bias, t, w, dict(c0=c0, ignore_index=self.ignore, n_classes=self.v,
                                label_smoothing=self.eps, softcap=self.cap)

    def merge(self, z, st: dict, r0: int, r1: int, c0: int, c1: int) -> None:
        bias, t, w, kw = self._block(r0, r1, c0, c1)
        block_stats(z, bias, t, w, st, row0=r0, err=self.err, **kw)

    def gradient_block(self, z, raw: bool, r0: int, r1: int, c0: int, c1: int, st: dict,
                       coefs) -> None:
        bias, t, w, kw = self._block(r0, r1, c0, c1)
        block_grad(z, bias, t, w, st["m"], coefs, raw=raw, **kw)

    def col_sums(self, z, out) -> None:
        _launch("lce_col_sums", z, z.shape[1], out=out)


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
