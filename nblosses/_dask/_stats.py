"""The exact merge of per-row statistics over class chunks (online softmax).

A class chunk describes each row by ``[m, s, r...]``: a shift ``m``, ``s = sum_c exp(x_c - m)``
over the chunk's classes, then fields that add up over chunks (the target's logit, smoothing or
probability sums). ``s = 0`` marks a chunk that holds only ``-inf`` in that row: it contributes
nothing (not ``0 * exp(nan)``). Chunks merge as

    M = max_k m_k,   S = sum_k s_k exp(m_k - M),   r = sum_k r_k,

which is the whole row's statistics whatever the grouping, so a tree reduction merges them
without ever gathering a row; ``M + log S`` is the row's logsumexp. NaN in any chunk (its ``m``
or ``s``) makes the row's ``M`` or ``S`` NaN.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from .. import _args
from .._registry import Runtime
from ._common import F64, meta, xp_of


def merge(st: Any, axis: Any, keepdims: bool = False) -> Any:
    """Merge statistics ``[m, s, r...]`` (the last axis) over ``axis`` (the class chunks)."""
    xp = xp_of(st)
    m, s, rest = st[..., 0], st[..., 1], st[..., 2:]
    with np.errstate(invalid="ignore", over="ignore"):
        big = m.max(axis=axis, keepdims=True)
        total = xp.where(s == 0, 0.0, s * xp.exp(m - big)).sum(axis=axis, keepdims=True)
    out = xp.concatenate([big[..., None], total[..., None], rest.sum(axis=axis, keepdims=True)],
                         axis=-1)
    return out if keepdims else out.squeeze(axis=axis)


def _each(a: Any, axis: Any = None, keepdims: bool = True) -> Any:
    return a


def merge_chunks(stats: Any, axis: int, be: Runtime) -> Any:
    """Tree-merge dask statistics ``(..., K class chunks at axis, ..., fields)`` over
    ``axis``; the result drops that axis."""
    return da.reduction(stats, _each, merge, combine=merge, axis=axis, keepdims=False,
                        dtype=F64, concatenate=True, meta=meta(be, stats.ndim - 1, F64))


def logsumexp(st: Any) -> Any:
    """``M + log S`` of merged statistics (``-inf`` for a row of only ``-inf``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return st[..., 0] + xp_of(st).log(st[..., 1])


def lse_stats(be: Runtime, x: Any, axis: int) -> Any:
    """One chunk's statistics over ``axis``, shaped ``x`` with ``axis`` of length 1 and a last
    axis ``[m, s]`` (float64), from the backend's ``logsumexp`` kernel: ``[lse, 1]``, or
    ``[-inf, 0]`` where the chunk holds only ``-inf`` (NaN and ``+inf`` give a NaN ``lse``,
    which the merge propagates). ``x``: canonical (C-contiguous, a kernel's dtype)."""
    xp = be.xp
    outer, n_classes, inner = _args.split_shape(x.shape, axis)
    lse = be.kernel("logsumexp")(x.reshape(outer, n_classes, inner),
                                 out=xp.empty((outer, inner), F64))
    st = xp.stack([lse, xp.where(lse == -np.inf, 0.0, 1.0)], axis=-1)
    return st.reshape(x.shape[:axis] + (1,) + x.shape[axis + 1:] + (2,))
