"""Softmax, log_softmax, sigmoid, their backwards and the row statistic logsumexp on the CPU
(Numba).

Inputs arrive as ``(outer, C, inner)`` (see :mod:`nblosses.backends`). Three layouts:

- ``inner == 1``, ``C >= SMALL_C``: each row is contiguous; rows run in parallel, each in
  three passes (max; exp, store and sum; scale) while it sits in L1/L2, as torch does.
- ``inner == 1``, ``C < SMALL_C``: tiles of ``TILE`` rows transposed into an L1 scratch, the
  rows as the vectorised axis (2-4x faster than row loops at C = 10; :mod:`._blocks`). When C
  has a divisor from 2 to 8 (to 7 in float64; all but 11, 13, 17, 19, 23), the forward reads
  each row as ``C / part`` rows of ``part`` and transposes them with a loop of constant length,
  which LLVM turns into shuffles: twice as fast again as the gathers of the general tiles.
- ``inner > 1`` (softmax along a middle axis): no transposed copy; each task takes one ``outer``
  index and a block of inner positions, and every pass walks ``c`` with the contiguous inner
  block as the vectorised axis (:mod:`._blocks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from ..._output_cache import empty_like
from ._blocks import (
    SMALL_C,
    TILE,
    block_stats,
    block_stats_store,
    block_task,
    chunk_span,
    group_tiles,
    n_blocks,
    n_chunks,
    n_tiles,
    split_stats,
    spread_runs,
    tile_parts,
    tile_rows,
    tile_scratch,
    tile_stats,
    tile_store,
    tile_tasks,
    vlog,
    vmul,
    vrecip,
    vsub,
    width_for,
)
from ._math import (
    JIT,
    JIT_EXACT,
    fast_exp,
    like,
    row_max,
    sum_exp,
    sum_exp_store,
)
from ._parallel import GRAIN, LIGHT_GRAIN, ParallelKernel, guarded, parallel_kernel


# ----------------------------------------------------------------------------- contiguous rows
@njit(**JIT_EXACT)
def _softmax_row(x, y, log):
    m = row_max(x)
    if log:  # y = x - m, then y -= log s: the same two roundings as (x - m) - log s
        ls = like(np.log(sum_exp_store(x, y, m, True)), x)
        for c in range(x.size):
            y[c] -= ls
    else:
        inv = like(1.0 / sum_exp_store(x, y, m), x)
        for c in range(x.size):
            y[c] *= inv


@parallel_kernel(**JIT)
def _softmax_rows(x, y, log):
    for i in prange(x.shape[0]):  # no prefetch_next_row: see there
        _softmax_row(x[i], y[i], log)


# ----------------------------------------------------------------------------- short rows
@parallel_kernel(**JIT_EXACT)
def _softmax_tiles(x, y, log, ngroups):
    n, n_classes = x.shape
    ntiles = n_tiles(n)
    for group in prange(ngroups):
        xt, m, s = tile_scratch(n_classes, x.dtype)
        ls = np.empty(TILE if log else 0, x.dtype)  # log s
        inv = np.empty(0 if log else TILE, x.dtype)  # 1 / s
        t0, t1 = group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            r0, nr = tile_stats(x, tile, not log, None, xt, m, s)
            if log:
                vlog(s[:nr], ls[:nr])
                # A loop here, not a helper call per class: ten-odd calls per tile on 128-element
                # slices cost more than the arithmetic (9% of the kernel at C = 10).
                for c in range(n_classes):
                    xc = xt[c]  # 1-D, indexed from 0: see tile_stats
                    for r in range(nr):
                        xc[r] = (xc[r] - m[r]) - ls[r]
            else:  # xt holds exp(x - m)
                vrecip(s[:nr], inv[:nr])
                for c in range(n_classes):
                    xc = xt[c]
                    for r in range(nr):
                        xc[r] *= inv[r]
            tile_store(y, r0, nr, xt, None, None)


@njit(**JIT_EXACT)
def _split_log_out(dst, xt, mk, fk, nh, part_token):
    """``dst[h * part + c] = (xt[c, h] - m) - log s`` (its own function: no reassociation;
    ``part`` a compile-time constant again, the tuple's length)."""
    part = len(part_token)
    for h in range(nh):
        for c in range(part):
            dst[h * part + c] = (xt[c, h] - mk[h]) - fk[h]


@parallel_kernel(**JIT)
def _softmax_split_tiles(xf, yf, log, ngroups, part_token, n_parts_token):
    """Short rows of ``C = part * n_parts`` classes, ``xf`` / ``yf`` flat ``(N * C,)``.

    Each tile of ``TILE`` rows is transposed into ``xt[c, h]`` (``h = r * n_parts + j`` holds
    class ``j * part + c`` of row ``r``) by a loop of compile-time length ``part``: vector
    shuffles, not gathers (:func:`._blocks.tile_parts`). Row statistics then reduce over ``c``
    and over the ``n_parts`` neighbouring columns of each row (:func:`._blocks.split_stats`);
    the result is written back through the same fixed pattern.
    """
    part = len(part_token)  # tuples whose lengths are constants when compiling (tile_parts)
    n_parts = len(n_parts_token)
    n_classes = part * n_parts
    n = xf.size // n_classes
    ntiles = n_tiles(n)
    for group in prange(ngroups):
        xt = np.empty((part, n_parts * TILE), xf.dtype)
        m = np.empty(TILE, xf.dtype)
        s = np.empty(TILE, xf.dtype)
        mk = np.empty(n_parts * TILE, xf.dtype)  # each row's max, once per column of it
        fk = np.empty(n_parts * TILE, xf.dtype)  # then 1 / s (softmax) or log s, likewise
        ek = np.empty(n_parts * TILE if log else 0, xf.dtype)  # exps (log_softmax)
        t0, t1 = group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            r0, nr = tile_rows(n, tile)
            nh = nr * n_parts
            src = xf[r0 * n_classes:(r0 + nr) * n_classes]
            # The transposition inline: in a helper (xt an argument) it ran 7-25% slower.
            for h in range(nh):
                for c in range(part):
                    xt[c, h] = src[h * part + c]
            split_stats(xt, m, s, mk, ek, nr, log, part_token, n_parts_token)
            # log s into m (no longer needed: mk has it); out is not s, or the loop would run
            # scalar behind an overlap check.
            if log:
                vlog(s[:nr], m[:nr])
                spread_runs(fk, m, nr, n_parts_token)
            else:  # the division inline: vrecip into m, then spreading, was 15% slower
                for r in range(nr):
                    inv = like(1, xf) / s[r]
                    for j in range(n_parts):
                        fk[r * n_parts + j] = inv
            dst = yf[r0 * n_classes:(r0 + nr) * n_classes]
            if log:
                _split_log_out(dst, xt, mk, fk, nh, part_token)
            else:
                for h in range(nh):
                    for c in range(part):
                        dst[h * part + c] = xt[c, h] * fk[h]


# ----------------------------------------------------------------------------- middle axis
@parallel_kernel(**JIT)
def _softmax_blocks(x, y, log, width):
    outer, n_classes, inner = x.shape
    nblk = n_blocks(inner, width)
    for task in prange(outer * nblk):
        o, j0, w = block_task(task, nblk, width, inner)
        m = np.empty(w, x.dtype)
        s = np.empty(w, x.dtype)
        xo = x[o]
        yo = y[o]
        # y = exp(x - m), or x - m for log_softmax (as in the row kernel)
        block_stats_store(xo, j0, w, m, s, yo, j0, log)
        if log:
            ls = np.empty(w, x.dtype)
            vlog(s, ls)
            for c in range(n_classes):
                vsub(yo[c, j0:j0 + w], ls)
        else:
            inv = np.empty(w, x.dtype)
            vrecip(s, inv)
            for c in range(n_classes):
                vmul(yo[c, j0:j0 + w], inv)


def _softmax_any(x3: np.ndarray, log: bool) -> np.ndarray:
    y3 = empty_like(x3)
    outer, n_classes, inner = x3.shape
    if y3.size == 0:
        return y3
    if inner == 1 and n_classes >= SMALL_C:  # the common case first: a small call is ~2 us
        _softmax_rows(x3.reshape(outer, n_classes), y3.reshape(outer, n_classes), log)
    elif inner == 1:
        parts = tile_parts(n_classes, x3.itemsize)
        if parts is not None:
            _softmax_split_tiles(x3.reshape(-1), y3.reshape(-1), log, tile_tasks(outer), *parts)
        else:
            _softmax_tiles(x3[:, :, 0], y3[:, :, 0], log, tile_tasks(outer))
    else:
        # 3 scratch rows (max, sum, 1/sum or log sum); 4096 wide ran 15% faster than 2048 at
        # 32x[21]x4096 (fewer, longer class rows per task for the prefetcher).
        _softmax_blocks(x3, y3, log, width_for(x3, widest=4096, scratch_rows=3))
    return y3


_softmax_rows_locked = guarded(_softmax_rows)


def softmax_last_axis(x: np.ndarray, log: bool) -> np.ndarray | None:
    """The plain call: (log-)softmax over the last axis of a C-contiguous float32/float64
    array, for :mod:`nblosses._fast`. The row kernel that :func:`softmax` runs on such input
    (the same results bit for bit) without the canonical ``(outer, C, inner)`` views; None
    where that is not the kernel (short rows, no elements)."""
    n_classes = x.shape[-1]
    if n_classes < SMALL_C or not x.size:
        return None
    y = empty_like(x)
    if x.ndim == 2:  # a reshape costs 0.15 us, a tenth of a small call
        _softmax_rows_locked(x, y, log)
    else:
        _softmax_rows_locked(x.reshape(-1, n_classes), y.reshape(-1, n_classes), log)
    return y


@guarded
def softmax(x3: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of ``(outer, C, inner)``."""
    return _softmax_any(x3, False)


@guarded
def log_softmax(x3: np.ndarray) -> np.ndarray:
    """Log-softmax over axis 1 of ``(outer, C, inner)``."""
    return _softmax_any(x3, True)


# ----------------------------------------------------------------------------- logsumexp
@njit(**JIT)
def _lse(m, s):
    """``m + log(s)`` in float64 from a slice's max and sum of ``exp(x - m)``; a slice of only
    ``-inf`` (``m == -inf``, where ``s`` came out NaN) gives ``-inf``. NaN or ``+inf`` in the
    slice made ``m`` or ``s`` NaN, and the result is NaN."""
    if m == -np.inf:
        return -np.inf
    return np.float64(m) + np.log(np.float64(s))


@parallel_kernel(**JIT)
def _lse_rows(x, out):
    for i in prange(x.shape[0]):
        m = row_max(x[i])
        out[i] = _lse(m, sum_exp(x[i], m))


@parallel_kernel(**JIT)
def _lse_tiles(x, out, ngroups):
    ntiles = n_tiles(x.shape[0])
    for group in prange(ngroups):
        xt, m, s = tile_scratch(x.shape[1], x.dtype)
        t0, t1 = group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            r0, nr = tile_stats(x, tile, False, None, xt, m, s)
            for r in range(nr):
                out[r0 + r] = _lse(m[r], s[r])


@parallel_kernel(**JIT)
def _lse_blocks(x, out, width):
    nblk = n_blocks(x.shape[2], width)
    for task in prange(x.shape[0] * nblk):
        o, j0, w = block_task(task, nblk, width, x.shape[2])
        m, s = np.empty(w, x.dtype), np.empty(w, x.dtype)
        block_stats(x[o], j0, w, m, s)
        for j in range(w):
            out[o, j0 + j] = _lse(m[j], s[j])


@guarded
def logsumexp(x3: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``log(sum(exp(x)))`` over axis 1 of ``(outer, C, inner)``: ``(outer, inner)`` of the
    input's dtype, or written into ``out`` (float64, for statistics that are merged later) and
    returned. Computed as ``m + log(sum(exp(x - m)))`` with ``m`` the slice's max, in float64."""
    outer, n_classes, inner = x3.shape
    lse = np.empty((outer, inner), x3.dtype) if out is None else out
    if lse.size == 0:
        return lse
    if n_classes == 0:  # the sum of no exponentials
        lse.fill(-np.inf)
    elif inner == 1 and n_classes < SMALL_C:  # short rows: transposed tiles (see softmax)
        _lse_tiles(x3[:, :, 0], lse[:, 0], tile_tasks(outer))
    elif inner == 1:
        _lse_rows(x3[:, :, 0], lse[:, 0])
    else:  # two scratch rows per task (max, sum)
        _lse_blocks(x3, lse, width_for(x3, widest=4096, scratch_rows=2))
    return lse


# ----------------------------------------------------------------------------- backwards
@parallel_kernel(**JIT)
def _softmax_backward_rows(g, y, gx, log):
    # No prefetch of the next rows here (see prefetch_next_row): with two input streams it made
    # this kernel slower (4096x[1000] float32, 1.0 -> 1.2 ms), and at C = 10 the per-row call
    # was most of the work (0.31 -> 0.49 ms).
    for i in prange(g.shape[0]):
        s = like(0, g)
        if log:
            for c in range(g.shape[1]):
                s += g[i, c]
            for c in range(g.shape[1]):
                gx[i, c] = g[i, c] - fast_exp(y[i, c]) * s
        else:
            for c in range(g.shape[1]):
                s += g[i, c] * y[i, c]
            for c in range(g.shape[1]):
                gx[i, c] = y[i, c] * (g[i, c] - s)


@parallel_kernel(**JIT)
def _log_softmax_backward_split(gf, yf, of, ngroups, part_token, n_parts_token):
    """log_softmax's backward on short rows of ``C = part * n_parts`` classes (flat
    ``(N * C,)`` arrays), row-major as they are: the exps as one flat loop, each row's sum of
    ``g`` over ``n_parts`` runs of ``part``, spread back per run (``sh``), in loops of
    compile-time length (:func:`._blocks.tile_parts`) that vectorise over runs of rows.

    Used for C < 16, where it ran 1.3-3x faster than the row loop (2.5x at C = 10, float32);
    from 16 up, and for softmax's backward (no exp), the row loop was as fast or faster."""
    part = len(part_token)
    n_parts = len(n_parts_token)
    n_classes = part * n_parts
    n = gf.size // n_classes
    ntiles = n_tiles(n)
    for group in prange(ngroups):
        sh = np.empty(TILE * n_parts, gf.dtype)  # per run of part: then the row's sum
        t0, t1 = group_tiles(group, ngroups, ntiles)
        for tile in range(t0, t1):
            r0, nr = tile_rows(n, tile)
            nh = nr * n_parts
            lo, hi = r0 * n_classes, (r0 + nr) * n_classes
            g, y, out = gf[lo:hi], yf[lo:hi], of[lo:hi]
            for h in range(nh):
                acc = like(0, gf)
                for c in range(part):
                    acc += g[h * part + c]
                sh[h] = acc
            for r in range(nr):
                acc = sh[r * n_parts]
                for j in range(1, n_parts):
                    acc += sh[r * n_parts + j]
                for j in range(n_parts):
                    sh[r * n_parts + j] = acc
            # The exps as a flat loop first: inside the run loop they compiled badly for odd
            # parts (5x slower at C = 21 = 3 x 7).
            for k in range(out.size):
                out[k] = fast_exp(y[k])
            for h in range(nh):
                for c in range(part):
                    k = h * part + c
                    out[k] = g[k] - out[k] * sh[h]


#: log_softmax's backward takes the split kernel below this many classes (see its docstring).
LOG_BACKWARD_SPLIT_C = 16


@njit(**JIT)
def _vbackward_sum(s, gc, yc, log):
    """``s += g`` (log_softmax) or ``s += g * y`` (softmax)."""
    if log:
        for j in range(s.size):
            s[j] += gc[j]
    else:
        for j in range(s.size):
            s[j] += gc[j] * yc[j]


@njit(**JIT)
def _vbackward_write(out, gc, yc, s, log):
    if log:
        for j in range(s.size):
            out[j] = gc[j] - fast_exp(yc[j]) * s[j]
    else:
        for j in range(s.size):
            out[j] = yc[j] * (gc[j] - s[j])


@parallel_kernel(**JIT)
def _softmax_backward_blocks(g, y, gx, log, width):
    outer, n_classes, inner = g.shape
    nblk = n_blocks(inner, width)
    for task in prange(outer * nblk):
        o, j0, w = block_task(task, nblk, width, inner)
        s = np.zeros(w, g.dtype)
        for c in range(n_classes):
            _vbackward_sum(s, g[o, c, j0:j0 + w], y[o, c, j0:j0 + w], log)
        for c in range(n_classes):
            _vbackward_write(gx[o, c, j0:j0 + w], g[o, c, j0:j0 + w], y[o, c, j0:j0 + w], s, log)


#: softmax's backward reads a block's g and y twice (the sum, then the output): blocks whose
#: two slabs fit in this many bytes are re-read from L2. At 32x[21]x4096 float64 (1.3 MiB of
#: g and y per 4096-wide task) 2048 wide ran 8-10% faster than 4096 (two runs of 30
#: interleaved calls, 2-core Zen 5); float32 (688 KiB) stays 4096.
BACKWARD_SLAB_BYTES = 1 << 20


def _backward_widest(y3: np.ndarray, log: bool) -> int:
    """The widest block of the middle-axis backward: the whole inner extent, narrowed for
    softmax's backward until its two slabs fit :data:`BACKWARD_SLAB_BYTES` (log_softmax's,
    whose second pass computes an exp, measured faster at full width)."""
    widest = y3.shape[2]
    slab = 2 * y3.shape[1] * y3.itemsize  # bytes of g and y per inner position
    while not log and widest > 256 and slab * widest > BACKWARD_SLAB_BYTES:
        widest //= 2
    return widest


def _backward_any(g3: np.ndarray, y3: np.ndarray, log: bool) -> np.ndarray:
    gx = empty_like(y3)
    outer, n_classes, inner = y3.shape
    if gx.size == 0:
        return gx
    if inner == 1:
        parts = (tile_parts(n_classes, y3.itemsize)
                 if log and n_classes < LOG_BACKWARD_SPLIT_C else None)
        if parts is not None:
            _log_softmax_backward_split(g3.reshape(-1), y3.reshape(-1), gx.reshape(-1),
                                        tile_tasks(outer), *parts)
        else:
            _build(_softmax_backward_rows, gx, log)(
                g3.reshape(outer, n_classes), y3.reshape(outer, n_classes),
                gx.reshape(outer, n_classes), log)
    else:
        # Blocks as wide as the threads allow: the backward is memory-bound, and a whole
        # (C, inner) slab per task is one contiguous stream for the prefetcher instead of C
        # short ones (20% faster at 32x[21]x4096). One scratch row (the sums).
        _build(_softmax_backward_blocks, gx, log)(
            g3, y3, gx, log, width_for(y3, widest=_backward_widest(y3, log), scratch_rows=1))
    return gx


@guarded
def softmax_backward_last_axis(g: np.ndarray, y: np.ndarray, log: bool) -> np.ndarray | None:
    """The plain call: softmax's (log_softmax's) backward over the last axis of C-contiguous
    float32/float64 arrays of one shape and dtype, for :mod:`nblosses._fast`. The row kernel
    :func:`softmax_backward` runs on such input (the same results bit for bit) without the
    canonical views; None where that is not the kernel (log_softmax's short rows, no
    elements)."""
    n_classes = y.shape[-1]
    if not y.size or (log and n_classes < LOG_BACKWARD_SPLIT_C):
        return None
    gx = empty_like(y)
    kernel = _build(_softmax_backward_rows, gx, log)
    if y.ndim == 2:  # a reshape costs 0.15 us, a tenth of a small call
        kernel(g, y, gx, log)
    else:
        kernel(g.reshape(-1, n_classes), y.reshape(-1, n_classes), gx.reshape(-1, n_classes), log)
    return gx


def _build(kernel: ParallelKernel, gx: np.ndarray, log: bool) -> Any:
    """The build of a backward kernel for an output like ``gx``: log_softmax's computes an
    exp per element and goes parallel from :data:`GRAIN` elements, softmax's (two
    multiply-adds) from :data:`LIGHT_GRAIN`."""
    return kernel.parallel if gx.size >= (GRAIN if log else LIGHT_GRAIN) else kernel.serial


@guarded
def softmax_backward(g3: np.ndarray, y3: np.ndarray) -> np.ndarray:
    """``y * (g - sum_C(g * y))`` over axis 1."""
    return _backward_any(g3, y3, False)


@guarded
def log_softmax_backward(g3: np.ndarray, y3: np.ndarray) -> np.ndarray:
    """``g - exp(y) * sum_C(g)`` over axis 1."""
    return _backward_any(g3, y3, True)


# ----------------------------------------------------------------------------- sigmoid
@parallel_kernel(**JIT)
def _sigmoid(x, y):
    n = x.size
    for k in prange(n_chunks(n)):
        lo, hi = chunk_span(k, n)
        xs, ys = x[lo:hi], y[lo:hi]  # slices: range-indexed loops vectorise
        for i in range(xs.size):
            ys[i] = like(1, x) / (like(1, x) + fast_exp(-xs[i]))


@parallel_kernel(grain=LIGHT_GRAIN, **JIT)
def _sigmoid_backward(g, y, gx):
    n = y.size
    for k in prange(n_chunks(n)):
        lo, hi = chunk_span(k, n)
        gs, ys, out = g[lo:hi], y[lo:hi], gx[lo:hi]
        for i in range(ys.size):
            out[i] = gs[i] * ys[i] * (like(1, y) - ys[i])


_sigmoid_locked = guarded(_sigmoid)


@guarded
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise ``1 / (1 + exp(-x))``."""
    y = empty_like(x)
    _sigmoid(x, y)
    return y


def sigmoid_any_shape(x: np.ndarray) -> np.ndarray:
    """:func:`sigmoid` of a C-contiguous array of any shape, for :mod:`nblosses._fast`."""
    y = empty_like(x)
    _sigmoid_locked(x.ravel(), y.ravel())  # views: both are C-contiguous
    return y


@guarded
def sigmoid_backward(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise ``g * y * (1 - y)``."""
    gx = empty_like(y)
    _sigmoid_backward(g, y, gx)
    return gx
