"""linear_distillation_loss on CUDA: the chunked LM-head driver
(:mod:`nblosses.backends._lm_head`, the loss's host side
:mod:`nblosses.backends._linear_distillation`) with the products and column sums of
:mod:`.lm_head` and the block kernels of ``linear_distillation.cu`` (the student's and the
teacher's logits blocks: statistics, the JSD's sums, the student's gradient in place),
compiled and launched like every other source (:mod:`._loader`, arguments by
:func:`._kernels.pack`); the per-row algebra between them runs on CuPy vectors.

float32 and float64 run natively; float16 inputs are computed in float32 (upcast once, the
loss and gradients cast back), as linear_cross_entropy's. Class indices are never used as
addresses: one outside ``[0, V)`` that is not ``ignore_index`` is recorded by ``ld_stats`` in
the device error record (``IndexError`` at the next call or at ``synchronize``) and its row
gets a NaN loss and gradient. Nothing here reads
a device value back: the ``mean`` denominator stays a 0-d device array. Status: compiled by
NVRTC and launched against fake devices in CI, never run on a device yet.
"""

from __future__ import annotations

import cupy

from .. import _linear_distillation as LD
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from .lm_head import CudaHead

SRC = "linear_distillation.cu"
#: Element types of the kernels (half inputs are computed in float32, as linear_ce's).
CTYPES = K.LCE_CTYPES
#: Threads per block of the row kernels (one block per row).
ROW_BLOCK = 256
#: ``mode`` values of the kernels.
MODES = {LD.FORWARD: 0, LD.REVERSE: 1, LD.JSD: 2}

_BLOCKS = (("zs", "T* __restrict__"), ("zt", "T* __restrict__"), ("rows", "i64"),
           ("cols", "i64"))
_PREPARE = (("bs", "const T* __restrict__"), ("bt", "const T* __restrict__"), ("cap", "double"),
            ("inv_t", "double"))


def _instantiations(ct: str) -> tuple[str, ...]:
    if ct not in CTYPES:
        return ()
    return (K.name("ld_stats", ct, ROW_BLOCK), K.name("ld_jsd", ct, ROW_BLOCK),
            K.name("ld_grad", ct))


K.register(K.Source(
    SRC,
    params={
        "ld_stats": (*_BLOCKS, *_PREPARE, ("mode", "int"), ("sep", "int"),
                     ("t", "const long long* __restrict__"), ("c0", "i64"), ("ignore", "i64"),
                     ("out", "double* __restrict__"), ("row0", "i64"), ("n_classes", "i64"),
                     ("err", "long long*")),
        "ld_jsd": (("zs", "const T* __restrict__"), ("zt", "const T* __restrict__"),
                   ("rows", "i64"), ("cols", "i64"), ("raw", "int"), *_PREPARE,
                   ("beta", "double"), ("lse", "const double* __restrict__"),
                   ("out", "double* __restrict__")),
        "ld_grad": (("zs", "T* __restrict__"), ("zt", "const T* __restrict__"), ("rows", "i64"),
                    ("cols", "i64"), ("raw", "int"), *_PREPARE, ("beta", "double"),
                    ("mode", "int"), ("sep", "int"), ("t", "const long long* __restrict__"),
                    ("c0", "i64"), ("ignore", "i64"), ("coefs", "const double* __restrict__")),
    },
    kernels={"ld_stats": "ld_stats", "ld_jsd": "ld_jsd", "ld_grad": "ld_grad"},
    instantiations=_instantiations))


def _options(opts: LD.DistillOptions) -> dict:
    return dict(cap=float(opts.softcap), inv_t=opts.inv_t)


def _rows_launch(kernel: str, zs, **args) -> None:
    """``kernel`` (a block per row, grid-stride) on the blocks of ``zs``'s shape."""
    rows, cols = zs.shape
    L.launch(SRC, zs.dtype, K.name(kernel, K.ctype_of(zs.dtype.name), ROW_BLOCK),
             L.grid_for(rows, 1, ROW_BLOCK), ROW_BLOCK,
             K.pack(kernel, zs=zs, rows=rows, cols=cols, **args))


@L.on_input_device
def block_stats(zs, zt, bias_s, bias_t, target, opts: LD.DistillOptions, *, c0: int,
                n_classes: int, row0: int = 0, err=None):
    """Prepare the logits blocks in place; their rows' statistics ``(R, 7)`` float64 (as
    :func:`nblosses.backends.cpu.linear_distillation.block_stats`). ``row0``: the block's
    first row, ``err``: the device error record where a bad class index is recorded (``None``:
    not recorded)."""
    out = cupy.empty((zs.shape[0], len(LD.STATS)), cupy.float64)
    _rows_launch("ld_stats", zs, zt=zt, bs=bias_s, bt=bias_t, **_options(opts),
                 mode=MODES[opts.mode], sep=int(opts.separate), t=target, c0=c0,
                 ignore=opts.ignore_index, out=out, row0=row0, n_classes=n_classes, err=err)
    return out


@L.on_input_device
def block_jsd(zs, zt, bias_s, bias_t, lse, out, opts: LD.DistillOptions, *, raw: bool) -> None:
    """``out += (J, K)`` of the blocks' rows (as the CPU's)."""
    _rows_launch("ld_jsd", zs, zt=zt, raw=int(raw), bs=bias_s, bt=bias_t, **_options(opts),
                 beta=opts.beta, lse=lse, out=out)


@L.on_input_device
def block_grad(zs, zt, bias_s, bias_t, target, coefs, opts: LD.DistillOptions, *, c0: int,
               raw: bool) -> None:
    """Overwrite the student block ``zs`` with ``dL/ds`` (as the CPU's)."""
    rows, cols = zs.shape
    name = K.name("ld_grad", K.ctype_of(zs.dtype.name))
    L.launch(SRC, zs.dtype, name, L.grid_for(zs.size, K.COL_BLOCK, K.COL_BLOCK), K.COL_BLOCK,
             K.pack("ld_grad", zs=zs, zt=zt, rows=rows, cols=cols, raw=int(raw), bs=bias_s,
                    bt=bias_t, **_options(opts), beta=opts.beta, mode=MODES[opts.mode],
                    sep=int(opts.separate), t=target, c0=c0, ignore=opts.ignore_index,
                    coefs=coefs))


class _CudaLinearDistillation(CudaHead, LD.LinearDistillation):
    """The loss's block kernels on CuPy arrays (class indices recorded by ``ld_stats``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.err = (None if self.target is None
                    else E.record_for_launch(cupy.cuda.get_current_stream()))

    def block_stats(self, zs, zt, bs, bt, target, c0: int, r0: int):
        return block_stats(zs, zt, bs, bt, target, self.opts, c0=c0, n_classes=self.v, row0=r0,
                           err=self.err)

    def block_jsd(self, zs, zt, bs, bt, lse, out, raw: bool) -> None:
        block_jsd(zs, zt, bs, bt, lse, out, self.opts, raw=raw)

    def block_grad(self, zs, zt, bs, bt, target, coefs, c0: int, raw: bool) -> None:
        block_grad(zs, zt, bs, bt, target, coefs, self.opts, c0=c0, raw=raw)


def _float32(a):
    return None if a is None else a.astype(cupy.float32)


def linear_distillation_loss(x2, w2, bias, tx2, tw2, tbias, target, *, beta, temperature,
                             ignore_index, hard_weight, softcap, reduction, want_grad,
                             grad_output, chunk_rows=None, chunk_classes=None):
    """Kernel protocol as :func:`nblosses.backends.cpu.linear_distillation.
    linear_distillation_loss`."""
    half = x2.dtype.name not in ("float32", "float64")
    if half:
        x2, w2, bias, tx2, tw2, tbias = (_float32(a) for a in (x2, w2, bias, tx2, tw2, tbias))
        if reduction == "none" and grad_output is not None:
            grad_output = _float32(grad_output)
    with x2.device:
        loss, grads = LD.run(_CudaLinearDistillation, x2, w2, bias, tx2, tw2, tbias, target,
                             beta=beta, temperature=temperature, ignore_index=ignore_index,
                             hard_weight=hard_weight, softcap=softcap, reduction=reduction,
                             want_grad=want_grad, grad_output=grad_output,
                             chunk_rows=chunk_rows, chunk_classes=chunk_classes)
        if target is not None:  # queue the error record's copy-back after the last launch
            E.after_launch(cupy.cuda.get_current_stream())
    if half:
        loss = loss.astype(cupy.float16)
        grads = None if grads is None else tuple(
            None if g is None else g.astype(cupy.float16) for g in grads)
    return loss, grads


# The block operations of the protocol, reached as attributes of the kernel.
vars(linear_distillation_loss).update(block_stats=block_stats, block_jsd=block_jsd,
                                      block_grad=block_grad)
