"""Dask plans of softmax, log_softmax, sigmoid and their gradients.

With ``dim`` in one chunk every block is one kernel call. With ``dim`` in several chunks
(softmax over a large vocabulary, say) no slice is gathered: the forward merges each chunk's
``logsumexp`` (the backend's row-statistics kernel, :mod:`._stats`) into the slice's ``LSE``
and writes each block as ``x - LSE`` (``exp`` of it for softmax); the backward sums each
chunk's ``g * y`` (softmax) or ``g`` (log_softmax) over ``dim`` and finishes block by block.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from .. import _args
from .._registry import resolve_backend
from .._spec import OpSpec
from ..ops.activations import check_softmax_input
from ._common import F64, STAT, as_dask, backend_for, backend_name, letters, meta, unwrap, work
from ._stats import logsumexp, lse_stats, merge_chunks


# ----------------------------------------------------------------------------- block tasks
def _kernel_block(*blocks: Any, op: str, dim: int | None, backend: str) -> Any:
    """One kernel call on whole blocks: ``(outer, C, inner)`` views along ``dim``, or flat
    arrays (``dim`` None: sigmoid and its gradient)."""
    be = resolve_backend(backend, *blocks)
    arrays = [be.asarray(b) for b in blocks]
    shape, dtype = arrays[-1].shape, arrays[-1].dtype
    cdt = _args.compute_dtype(be, dtype)
    canon = (-1,) if dim is None else _args.split_shape(shape, dim)
    out = be.kernel(op)(*(_args.to_compute(be, a, cdt).reshape(canon) for a in arrays))
    return out.reshape(shape).astype(dtype, copy=False)


def _lse_block(xb: Any, axis: int, backend: str) -> Any:
    be = resolve_backend(backend, xb)
    return lse_stats(be, work(be, xb), axis)


def _softmax_from_stats(xb: Any, stb: Any, log: bool, axis: int, backend: str) -> Any:
    """``x - LSE`` (``exp`` of it for softmax) from the slices' merged statistics. ``LSE`` is
    float64: it is subtracted as its value in the block's dtype, then the rest, so that
    nothing is lost at the slice's max whatever its magnitude (``x - hi`` is exact there)."""
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = work(be, xb)
    lse = xp.expand_dims(logsumexp(be.asarray(unwrap(stb))), axis)
    with np.errstate(invalid="ignore", over="ignore"):  # a slice of only -inf is NaN
        hi = lse.astype(x.dtype)
        y = x - hi
        if y.dtype != F64:
            y -= (lse - hi).astype(y.dtype)
    if not log:
        xp.exp(y, out=y)
    return y.astype(be.asarray(xb).dtype, copy=False)


def _backward_partial(gb: Any, yb: Any, log: bool, axis: int, backend: str) -> Any:
    be = resolve_backend(backend, gb, yb)
    g = work(be, gb)
    if not log:
        g = g * work(be, yb)
    return g.sum(axis=axis, keepdims=True, dtype=F64)


def _backward_finish(gb: Any, yb: Any, tb: Any, log: bool, axis: int, backend: str) -> Any:
    """``y * (g - total)`` (softmax) or ``g - exp(y) * total`` (log_softmax)."""
    be = resolve_backend(backend, gb, yb)
    xp = be.xp
    g, y = work(be, gb), work(be, yb)
    total = xp.expand_dims(be.asarray(tb), axis).astype(y.dtype)
    out = g - xp.exp(y) * total if log else y * (g - total)
    return out.astype(be.asarray(yb).dtype, copy=False)


# ----------------------------------------------------------------------------- plans
def plan_softmax(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``softmax`` / ``log_softmax``."""
    name = backend_name(v["backend"])
    x = as_dask(v["input"])
    if v["dtype"] is not None:
        x = x.astype(np.dtype(v["dtype"]))
    be = backend_for(name, x)
    d = check_softmax_input(be, spec.name, x, v["dim"])
    out_meta = meta(be, x.ndim, x.dtype)
    if x.ndim == 0 or x.numblocks[d] == 1 or x.size == 0:
        return x.map_blocks(_kernel_block, op=spec.name, dim=d, backend=name, meta=out_meta)
    ind = letters(x.ndim)
    stats = da.blockwise(_lse_block, ind + STAT, x, ind, d, None, name, None,
                         new_axes={STAT: 2}, adjust_chunks={ind[d]: 1},
                         meta=meta(be, x.ndim + 1, F64))
    merged = merge_chunks(stats, d, be)
    return da.blockwise(_softmax_from_stats, ind, x, ind, merged, ind.replace(ind[d], "") + STAT,
                        spec.name == "log_softmax", None, d, None, name, None,
                        concatenate=False, meta=out_meta)


def _backward_arrays(spec: OpSpec, v: dict) -> tuple[str, Any, Any, Any]:
    """``(backend name, backend, grad_output, output)`` of a gradient call, checked."""
    name = backend_name(v["backend"])
    g, y = as_dask(v["grad_output"]), as_dask(v["output"])
    _args.check_same_shape(spec.name, g, y)
    be = backend_for(name, g, y)
    _args.check_backward_dtypes(be, spec.name, g, y)
    return name, be, g.rechunk(y.chunks), y


def plan_softmax_backward(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``softmax_backward`` / ``log_softmax_backward``."""
    name, be, g, y = _backward_arrays(spec, v)
    d = _args.softmax_dim(spec.name, y.ndim, v["dim"])
    ind = letters(y.ndim)
    out_meta = meta(be, y.ndim, y.dtype)
    if y.ndim == 0 or y.numblocks[d] == 1 or y.size == 0:
        return da.map_blocks(_kernel_block, g, y, op=spec.name, dim=d, backend=name,
                             meta=out_meta)
    log = spec.name == "log_softmax_backward"
    part = da.blockwise(_backward_partial, ind, g, ind, y, ind, log, None, d, None, name, None,
                        adjust_chunks={ind[d]: 1}, meta=meta(be, y.ndim, F64))
    return da.blockwise(_backward_finish, ind, g, ind, y, ind, part.sum(axis=d),
                        ind.replace(ind[d], ""), log, None, d, None, name, None, meta=out_meta)


def plan_elementwise(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``sigmoid`` and ``sigmoid_backward``: block by block."""
    if spec.name == "sigmoid":
        name = backend_name(v["backend"])
        x = as_dask(v["input"])
        be = backend_for(name, x)
        _args.compute_dtype(be, x.dtype)
        arrays = [x]
    else:
        name, be, g, y = _backward_arrays(spec, v)
        arrays = [g, y]
    out = arrays[-1]
    return da.map_blocks(_kernel_block, *arrays, op=spec.name, dim=None, backend=name,
                         meta=meta(be, out.ndim, out.dtype))
