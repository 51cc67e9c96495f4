"""softmax, log_softmax, sigmoid, their backwards and the row statistic logsumexp on CUDA
(kernels in ``softmax.cu``, ``softmax_backward.cu`` and ``binary.cu``).

Inputs arrive canonical (:mod:`nblosses.backends`): C-contiguous CuPy arrays of a native dtype,
``(outer, C, inner)`` for the softmax family, flat for sigmoid. Every launch is asynchronous on
the current stream; nothing here synchronises with the device.

Kernel choice for ``inner == 1`` (rows contiguous): rows that fit in registers go to the cached
kernel (one read, one write per element; the group of threads per row grows with ``C``), longer
rows to the looped kernel (online max/sum pass, then a write pass that re-reads the row, mostly
from L2). ``inner > 1`` (softmax along a middle axis) runs the cols kernel, one thread per
position, without a transposed copy. 16-byte vector access when every pointer is 16-byte
aligned and ``C`` is a multiple of the vector width; scalar access otherwise.
"""

from __future__ import annotations

import math

import cupy

from . import _kernels as K
from . import _loader as L

SRC = "softmax.cu"
SRC_BWD = "softmax_backward.cu"
SRC_EW = "binary.cu"


def row_vec(ct: str, C: int, *arrays) -> int:
    """Vector width for rows of ``C`` elements: 16 bytes if the rows and pointers allow it."""
    v = K.vec_width(ct)
    return v if C % v == 0 and L.aligned(*arrays) else 1


def rows_launch(nrows: int, C: int, ct: str, vec: int, cached, looped, packed: bool = False):
    """``(name, grid, block)`` of a kernel pair for ``nrows`` rows of ``C`` elements (inner == 1):
    the ``cached`` name builder when a row fits in registers, else ``looped`` (a block per row).
    ``packed``: ``cached`` keeps half-precision rows packed (see ``K.cached_config``)."""
    cfg = K.cached_config(C // vec, ct, vec, packed)
    if cfg is not None:
        g, nv, block = cfg
        grid = L.grid_for(nrows, K.rows_per_block(g, block), block)
        return cached(ct, vec, g, nv, block), grid, block
    block = K.LONG_ROW_G
    grid = L.grid_for(nrows, 1, block)
    return looped(ct, vec), grid, block


def flat_vec(ct: str, *arrays) -> int:
    """Vector width for flat elementwise kernels (a scalar tail handles ``n % VEC``)."""
    return K.vec_width(ct) if L.aligned(*arrays) else 1


def _split_rows(x3, y3, ct: str, vec: int, nsplit: int, mode: int) -> None:
    """Few long rows: ``nsplit`` blocks per row, statistics then combine-and-write (two launches;
    the per-chunk statistics come from CuPy's memory pool)."""
    outer, C, _ = x3.shape
    nsplit, chunk = K.split_chunks(C // vec, nsplit)
    stats = cupy.empty(2 * outer * nsplit, cupy.float64)
    args = K.pack("softmax_split", x=x3, y=y3, C=C, log_mode=mode, nsplit=nsplit, chunk_vec=chunk,
                  stats=stats)
    for kernel in K.SPLIT_KERNELS:
        L.launch(SRC, x3.dtype, K.softmax_split(kernel, ct, vec), outer * nsplit, K.LONG_ROW_G,
                 args)


def _start(a):
    """``(output like a, outer, C, inner, C type)`` of a softmax-family launch."""
    outer, C, inner = a.shape
    return cupy.empty_like(a), outer, C, inner, K.ctype_of(a.dtype.name)


def _forward(x3, log: bool):
    y3, outer, C, inner, ct = _start(x3)
    if x3.size == 0:
        return y3
    dt, mode = x3.dtype, int(log)
    if inner == 1:
        vec = row_vec(ct, C, x3, y3)
        nsplit = (K.split_count(outer, C // vec, L.sm_count())
                  if K.cached_config(C // vec, ct, vec) is None else 1)
        if nsplit > 1:
            _split_rows(x3, y3, ct, vec, nsplit, mode)
            return y3
        name, grid, block = rows_launch(outer, C, ct, vec, K.softmax_cached, K.softmax_looped)
        L.launch(SRC, dt, name, grid, block,
                 K.pack("softmax_rows", x=x3, y=y3, nrows=outer, C=C, log_mode=mode))
    else:
        block = K.COL_BLOCK
        grid = L.grid_for(outer * inner, block, block)
        L.launch(SRC, dt, K.softmax_cols(ct), grid, block,
                 K.pack("softmax_cols", x=x3, y=y3, outer=outer, C=C, inner=inner, log_mode=mode))
    return y3


@L.on_input_device
def softmax(x3):
    """Softmax over axis 1 of ``(outer, C, inner)``."""
    return _forward(x3, False)


@L.on_input_device
def log_softmax(x3):
    """Log-softmax over axis 1 of ``(outer, C, inner)``."""
    return _forward(x3, True)


@L.on_input_device
def logsumexp(x3, out=None):
    """``log(sum(exp(x)))`` over axis 1 of ``(outer, C, inner)``: ``(outer, inner)`` of the
    input's dtype, or written into the float64 ``out`` and returned. The kernels write float64
    (``lse_rows``: a group of threads per row, sized as the backward's; ``lse_cols``: a thread
    per position)."""
    outer, C, inner = x3.shape
    lse = cupy.empty((outer, inner), cupy.float64) if out is None else out
    if lse.size and C == 0:  # the sum of no exponentials
        lse.fill(-math.inf)
    elif lse.size:
        ct = K.ctype_of(x3.dtype.name)
        args = K.pack("lse", x=x3, out=lse, outer=outer, C=C, inner=inner)
        if inner == 1:
            vec = row_vec(ct, C, x3)
            g, block = K.looped_config(C // vec)
            L.launch(SRC, x3.dtype, K.lse_rows(ct, vec, g, block),
                     L.grid_for(outer, K.rows_per_block(g, block), block), block, args)
        else:
            L.launch(SRC, x3.dtype, K.lse_cols(ct), L.grid_for(outer * inner, K.COL_BLOCK,
                                                                 K.COL_BLOCK), K.COL_BLOCK, args)
    return lse if out is not None else lse.astype(x3.dtype)


def _backward(g3, y3, log: bool):
    gx, outer, C, inner, ct = _start(y3)
    if y3.size == 0:
        return gx
    dt, mode = y3.dtype, int(log)
    if inner == 1:
        vec = row_vec(ct, C, g3, y3, gx)
        g, block = K.looped_config(C // vec)
        grid = L.grid_for(outer, K.rows_per_block(g, block), block)
        L.launch(SRC_BWD, dt, K.softmax_bwd_rows(ct, vec, g, block), grid, block,
                 K.pack("softmax_bwd", g=g3, y=y3, gx=gx, outer=outer, C=C, inner=1,
                        log_mode=mode))
    else:
        block = K.COL_BLOCK
        grid = L.grid_for(outer * inner, block, block)
        L.launch(SRC_BWD, dt, K.softmax_bwd_cols(ct), grid, block,
                 K.pack("softmax_bwd", g=g3, y=y3, gx=gx, outer=outer, C=C, inner=inner,
                        log_mode=mode))
    return gx


@L.on_input_device
def softmax_backward(g3, y3):
    """``y * (g - sum_C(g * y))`` over axis 1."""
    return _backward(g3, y3, False)


@L.on_input_device
def log_softmax_backward(g3, y3):
    """``g - exp(y) * sum_C(g)`` over axis 1."""
    return _backward(g3, y3, True)


@L.on_input_device
def sigmoid(x):
    """Elementwise ``1 / (1 + exp(-x))`` on a flat array."""
    y = cupy.empty_like(x)
    n = x.size
    if n == 0:
        return y
    ct = K.ctype_of(x.dtype.name)
    vec = flat_vec(ct, x, y)
    block = K.COL_BLOCK
    grid = L.grid_for(-(-n // vec), block, block)
    L.launch(SRC_EW, x.dtype, K.elementwise("sigmoid_fwd", ct, vec), grid, block,
             K.pack("ew1", x=x, y=y, n=n))
    return y


@L.on_input_device
def sigmoid_backward(g, y):
    """Elementwise ``g * y * (1 - y)`` on flat arrays."""
    gx = cupy.empty_like(y)
    n = y.size
    if n == 0:
        return gx
    ct = K.ctype_of(y.dtype.name)
    vec = flat_vec(ct, g, y, gx)
    block = K.COL_BLOCK
    grid = L.grid_for(-(-n // vec), block, block)
    L.launch(SRC_EW, y.dtype, K.elementwise("sigmoid_bwd", ct, vec), grid, block,
             K.pack("ew2", g=g, y=y, gx=gx, n=n))
    return gx
