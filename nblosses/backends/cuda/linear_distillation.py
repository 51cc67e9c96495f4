"""linear_distillation_loss on CUDA: the block kernels of ``linear_distillation.cu`` (the
student's and the teacher's logits blocks: statistics, the JSD's sums, the student's gradient
in place), compiled and launched like every other source (:mod:`._loader`, arguments by
:func:`._kernels.pack`); the per-row algebra between them is
:mod:`nblosses.backends._linear_distillation`'s, on CuPy vectors.

Class indices are never used as addresses: one outside ``[0, V)`` that is not
``ignore_index`` is recorded by ``ld_stats`` in the device error record (``IndexError`` at the
next call or at ``synchronize``) and its row gets a NaN loss and gradient. Nothing here reads
a device value back.
"""

from __future__ import annotations

import cupy

from .. import _linear_distillation as LD
from . import _kernels as K
from . import _loader as L

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
