"""Dask arrays for :mod:`nblosses.functional`: lazy, chunked, exact.

:mod:`nblosses._dispatch` routes every call that has a dask array among its arrays here, with
the op (:mod:`nblosses._ops`), the caller's arguments and the already checked options (the
import is lazy: ``import nblosses`` never imports dask). :func:`call` runs the same metadata
checks of :mod:`nblosses._args` as the eager path, at once, and returns lazy dask arrays; what
is here is only what is Dask's own: chunk maps and merges over class chunks.

How chunks are computed
-----------------------
* The backend is fixed when the graph is built: the call's ``backend=``, else the current default
  (:func:`nblosses.use_backend` is context-local, so it is read here, not in the worker threads or
  processes that run the tasks). ``"auto"`` then picks per chunk by array type (NumPy -> ``cpu``,
  CuPy -> ``cuda``).
* Arrays are chunked like the input; targets, weights, ``grad_output`` are rechunked to match it
  (they are at most as large as the input), the input never is.
* Class axis in one chunk (chunking along batch / spatial axes only): every block is one call of
  the :mod:`nblosses.functional` function on that block (``reduction="none"``, with the fused
  gradient when asked), so the compiled kernels do the work.
* Class axis in several chunks (vocabulary-parallel): no row is ever gathered. Each chunk yields
  per-position statistics (max ``m_k``, ``s_k = sum exp(x - m_k)``, the target logit if the chunk
  holds the target class, ``sum_c w_c x_c`` for label smoothing, ``sum_c w_c y'_c`` and
  ``sum_c w_c y'_c x_c`` for probability targets), merged by a tree reduction over the class
  chunks: ``M = max m_k``, ``S = sum s_k exp(m_k - M)``, the rest summed. Outputs and gradients
  are then mapped block by block from the merged ``(M, log S)`` of each row.
* ``mean`` / ``sum`` are tree reductions of float64 per-position losses; the ``mean`` denominator
  (sum of ``w[t]`` over non-ignored targets, or ``N*d1*..*dk`` for probability targets) is its own
  tree reduction over the targets only, so the gradient pass never waits for the logits' pass.
  All ignored -> NaN. Out-of-range targets raise ``IndexError`` when the chunk is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from . import _args
from . import functional as F
from ._registry import array_module, check_name, get_backend, resolve_backend
from ._spec import OpSpec as Op
from .ops.activations import check_softmax_input
from .ops.binary_losses import check_binary_loss
from .ops.class_losses import check_class_loss
from .ops.linear_ce import check_linear_ce

__all__ = ["call"]

Array = Any
_F64 = np.float64
_BATCH, _CLASS, _STAT = "a", "b", "z"
_SPATIAL = "cdefghijklmnopqrstuvwxy"


# ----------------------------------------------------------------------------- helpers
def is_dask_array(obj: Any) -> bool:
    """Whether ``obj`` is a dask array."""
    return array_module(obj) == "dask"


def _backend_name(backend: str | None) -> str:
    """The backend name the chunk tasks use, fixed now (tasks run in other threads/processes)."""
    return check_name(backend if backend is not None else get_backend())


def _as_dask(a: Any) -> Any:
    """A dask array (a non-dask array becomes one chunk)."""
    if a is None or is_dask_array(a):
        return a
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    return da.from_array(a, chunks=tuple(max(n, 1) for n in a.shape) or ())


def _backend_for(name: str, *arrays: Any):
    """The backend the chunks of ``arrays`` (dask) will run on, judged from their metadata."""
    return resolve_backend(name, *(a._meta for a in arrays if a is not None))


def _meta(be, ndim: int, dtype: Any) -> Any:
    return be.xp.empty((0,) * ndim, dtype=dtype)


def _xp(a: Any) -> Any:
    """The array namespace of a chunk (``numpy``, ``cupy``, ...)."""
    mod = type(a).__module__.partition(".")[0]
    if mod == "numpy":
        return np
    import importlib

    return importlib.import_module(mod)


def _unwrap(b: Any) -> Any:
    """A block from blockwise's nested lists (contracted axes hold exactly one chunk)."""
    while isinstance(b, list):
        (b,) = b
    return b


def _work(be, b: Any) -> Any:
    """A chunk as the backend's array in float32 or float64 (our own math never runs in half)."""
    a = be.asarray(_unwrap(b))
    if a.dtype.kind != "f" or a.dtype.itemsize < 4:
        a = a.astype(be.xp.float32)
    return a


def _scalar(v: Any) -> float:
    return float(_unwrap(v))


def _scalar_arg(v: Any) -> tuple[Any, Any]:
    """A blockwise (argument, index) pair for a scalar that may be a 0-d dask array."""
    return (v, "") if is_dask_array(v) else (v, None)


def _letters(ndim: int) -> str:
    return "".join(_SPATIAL[:ndim])


def _expand(a: Any, ndim: int) -> Any:
    """A per-position ``(n, *spatial)`` array as ``(n, 1, *spatial)`` for an ndim-d block."""
    return a.reshape(a.shape[:1] + (1,) + a.shape[1:]) if ndim > 1 else a


def _pick_mask(xp, t: Any, off: int, ck: int, ignore_index: int):
    """Positions whose (non-ignored) target class lies in the chunk ``[off, off + ck)``."""
    local = t - off
    mask = (t != ignore_index) & (local >= 0) & (local < ck)
    idx = xp.nonzero(mask)
    return idx, local[idx]


# ----------------------------------------------------------------------------- online softmax merge
def _merge_stats(st: Any, axis: Any, keepdims: bool) -> Any:
    """Merge statistics ``[m, s, additive...]`` (last axis) over ``axis`` of the class chunks."""
    xp = _xp(st)
    m, s, rest = st[..., 0], st[..., 1], st[..., 2:]
    with np.errstate(invalid="ignore", over="ignore"):
        big = m.max(axis=axis, keepdims=True)
        # A chunk of only -inf has s == 0 and contributes nothing (not 0 * exp(nan)).
        total = xp.where(s == 0, 0.0, s * xp.exp(m - big)).sum(axis=axis, keepdims=True)
    out = xp.concatenate([big[..., None], total[..., None], rest.sum(axis=axis, keepdims=True)],
                         axis=-1)
    return out if keepdims else out.squeeze(axis=axis)


def _identity(a: Any, axis: Any = None, keepdims: bool = True) -> Any:
    return a


def _merge_class_stats(stats: Any, be, out_ndim: int) -> Any:
    """Tree-reduce per-chunk statistics ``(..., K class chunks at axis 1 ..., nf)`` over axis 1."""
    return da.reduction(stats, _identity, _merge_stats, combine=_merge_stats, axis=1,
                        keepdims=False, dtype=_F64, concatenate=True,
                        meta=_meta(be, out_ndim, _F64))


def _max_sumexp(be, x: Any, axis: int) -> tuple[Any, Any]:
    """Per-chunk ``m = max x`` and ``s = sum exp(x - m)`` (float64), reduced over ``axis``.

    The sum comes from the backend's fused cross-entropy kernel: with the row maximum as the
    target, the loss is ``log(sum exp(x - m))`` exactly (computed from ``x - m``), in one pass
    and without a temporary of the chunk's size.
    """
    xp = be.xp
    shape = x.shape[:axis] + x.shape[axis + 1:]
    x3 = x.reshape(_args.split_shape(x.shape, axis))
    if x3.shape[1] == 1 or x.size == 0:  # a one-class chunk: s = 1 (x - m = 0), no kernel call
        m = x3[:, 0].astype(_F64)
        s = xp.ones(m.shape, dtype=_F64)
    else:
        top = x3.argmax(axis=1)
        m = xp.take_along_axis(x3, top[:, None], axis=1)[:, 0].astype(_F64)
        with np.errstate(invalid="ignore", over="ignore"):
            s = xp.exp(F.cross_entropy(x3, top, reduction="none", backend=be.name).astype(_F64))
    s = xp.where(m == -np.inf, 0.0, s)  # a chunk of only -inf contributes nothing
    return m.reshape(shape), s.reshape(shape)


# ----------------------------------------------------------------------------- softmax family
def _softmax_block(xb, op, dim, backend):
    return getattr(F, op)(xb, dim, backend=backend)


def _lse_stats_block(xb, axis, backend):
    be = resolve_backend(backend, xb)
    m, s = _max_sumexp(be, _work(be, xb), axis)
    return be.xp.expand_dims(be.xp.stack([m, s], axis=-1), axis)


def _softmax_from_stats_block(xb, stb, op, axis, backend, out_dtype):
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = _work(be, xb)
    st = be.asarray(_unwrap(stb))
    with np.errstate(divide="ignore", invalid="ignore"):
        big = xp.expand_dims(st[..., 0], axis).astype(x.dtype)
        log_s = xp.expand_dims(xp.log(st[..., 1]), axis).astype(x.dtype)
        y = x - big  # exact at the max: M is one of the chunk's own values
        y -= log_s
        if op == "softmax":
            xp.exp(y, out=y)
    return y.astype(out_dtype, copy=False)


def _softmax_family(op: str, v: dict, opts: dict) -> Array:
    name = _backend_name(v["backend"])
    x = _as_dask(v["input"])
    if v["dtype"] is not None:
        x = x.astype(np.dtype(v["dtype"]))
    be = _backend_for(name, x)
    d = check_softmax_input(be, op, x, v["dim"])
    meta = _meta(be, x.ndim, x.dtype)
    if x.ndim == 0 or x.numblocks[d] == 1 or x.size == 0:
        return x.map_blocks(_softmax_block, op, d, name, meta=meta)
    ind = _letters(x.ndim)
    red = ind.replace(ind[d], "")
    stats = da.blockwise(_lse_stats_block, ind + _STAT, x, ind, d, None, name, None,
                         new_axes={_STAT: 2}, adjust_chunks={ind[d]: 1},
                         meta=_meta(be, x.ndim + 1, _F64))
    merged = da.reduction(stats, _identity, _merge_stats, combine=_merge_stats, axis=d,
                          keepdims=False, dtype=_F64, concatenate=True,
                          meta=_meta(be, x.ndim, _F64))
    return da.blockwise(_softmax_from_stats_block, ind, x, ind, merged, red + _STAT, op, None,
                        d, None, name, None, x.dtype, None, concatenate=False, meta=meta)




def _sigmoid_block(xb, backend):
    return F.sigmoid(xb, backend=backend)


def _sigmoid(op: str, v: dict, opts: dict) -> Array:
    """Block by block."""
    name = _backend_name(v["backend"])
    x = _as_dask(v["input"])
    be = _backend_for(name, x)
    _args.compute_dtype(be, x.dtype)
    return x.map_blocks(_sigmoid_block, name, meta=_meta(be, x.ndim, x.dtype))


def _softmax_backward_block(gb, yb, op, dim, backend):
    return getattr(F, op)(gb, yb, dim, backend=backend)


def _softmax_backward_partial(gb, yb, op, axis, backend):
    be = resolve_backend(backend, gb, yb)
    g = _work(be, gb)
    if op == "softmax_backward":
        g = g * _work(be, yb)
    return g.sum(axis=axis, keepdims=True, dtype=_F64)


def _softmax_backward_finish(gb, yb, tb, op, axis, backend, out_dtype):
    be = resolve_backend(backend, gb, yb)
    xp = be.xp
    g, y = _work(be, gb), _work(be, yb)
    tot = xp.expand_dims(be.asarray(tb), axis).astype(y.dtype)
    if op == "softmax_backward":
        out = y * (g - tot)
    else:
        out = xp.exp(y)
        out *= tot
        out = g - out
    return out.astype(out_dtype, copy=False)


def _backward_arrays(op: str, v: dict) -> tuple[str, Any, Any, Any]:
    """``(backend name, backend, grad_output, output)`` of a backward call, checked."""
    name = _backend_name(v["backend"])
    g, y = _as_dask(v["grad_output"]), _as_dask(v["output"])
    _args.check_same_shape(op, g, y)
    be = _backend_for(name, g, y)
    _args.check_backward_dtypes(be, op, g, y)
    return name, be, g, y


def _softmax_backward(op: str, v: dict, opts: dict) -> Array:
    name, be, g, y = _backward_arrays(op, v)
    d = _args.softmax_dim(op, y.ndim, v["dim"])
    g = g.rechunk(y.chunks)
    ind = _letters(y.ndim)
    meta = _meta(be, y.ndim, y.dtype)
    if y.ndim == 0 or y.numblocks[d] == 1 or y.size == 0:
        return da.blockwise(_softmax_backward_block, ind, g, ind, y, ind, op, None, d, None,
                            name, None, meta=meta)
    red = ind.replace(ind[d], "")
    part = da.blockwise(_softmax_backward_partial, ind, g, ind, y, ind, op, None, d, None,
                        name, None, adjust_chunks={ind[d]: 1}, meta=_meta(be, y.ndim, _F64))
    tot = part.sum(axis=d)
    return da.blockwise(_softmax_backward_finish, ind, g, ind, y, ind, tot, red, op, None, d,
                        None, name, None, y.dtype, None, meta=meta)




def _sigmoid_backward_block(gb, yb, backend):
    return F.sigmoid_backward(gb, yb, backend=backend)


def _sigmoid_backward(op: str, v: dict, opts: dict) -> Array:
    name, be, g, y = _backward_arrays(op, v)
    y = y.rechunk(g.chunks)
    ind = _letters(g.ndim)
    return da.blockwise(_sigmoid_backward_block, ind, g, ind, y, ind, name, None,
                        meta=_meta(be, g.ndim, g.dtype))


# ----------------------------------------------------------------------------- reductions
def _pick_block(tup, i):
    return _unwrap(tup)[i]


def _finish_block(total, denom, mean, out_dtype):
    xp = _xp(total)
    total = _unwrap(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = total / _scalar(denom) if mean else total
    return xp.asarray(value, dtype=out_dtype)


def _reduce_rows(rows, reduction: str, denom: Any, dtype, be, squeeze: bool):
    """Per-position losses -> the caller's result (lazy)."""
    if reduction == "none":
        out = rows.astype(dtype)
        return out[0] if squeeze else out
    total = rows.astype(_F64).sum()
    return da.blockwise(_finish_block, "", total, "", *_scalar_arg(denom), reduction == "mean",
                        None, dtype, None, meta=_meta(be, 0, dtype))


def _div_block(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return _xp(a).asarray(_unwrap(a) / _unwrap(b), dtype=_F64)


def _grad_scale(grad_output: Any, denom: Any, be) -> Any:
    """``grad_output / denom`` for a reduced loss: a float or a 0-d dask array."""
    if grad_output is None:
        g = 1.0
    elif is_dask_array(grad_output):
        if grad_output.size != 1:
            raise ValueError(f"grad_output for a reduced loss must be a scalar, got shape "
                             f"{tuple(grad_output.shape)}")
        g = grad_output.reshape(()).astype(_F64)
    else:
        ga = _args.as_array(be, grad_output, "grad_output")
        if ga.size != 1:
            raise ValueError(f"grad_output for a reduced loss must be a scalar, got shape "
                             f"{tuple(ga.shape)}")
        g = float(ga.reshape(()))
    if not is_dask_array(g) and not is_dask_array(denom):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(g) / np.float64(denom))
    g = g if is_dask_array(g) else da.from_array(np.float64(g))
    denom = denom if is_dask_array(denom) else da.from_array(np.float64(denom))
    return da.map_blocks(_div_block, g, denom, meta=_meta(be, 0, _F64))


def _grad_rows_arg(grad_output: Any, loss_shape, chunks, squeeze: bool, be):
    """``grad_output`` for ``reduction="none"``: None (ones) or a dask array chunked like the
    loss."""
    if grad_output is None:
        return None
    g = _as_dask(grad_output)
    if tuple(g.shape) != tuple(loss_shape):
        raise ValueError(f"grad_output shape {tuple(g.shape)} does not match the loss shape "
                         f"{tuple(loss_shape)}")
    if squeeze:
        g = g[None]
    return g.rechunk(chunks)


def _rows_grad(be, gb, shape):
    """Per-position upstream gradient of a block: the given block, or a scalar broadcast."""
    gb = _unwrap(gb)
    if gb is None:
        return be.xp.ones(shape, dtype=_F64)
    if getattr(gb, "ndim", 0) == len(shape) and len(shape) > 0:
        return be.asarray(gb).astype(_F64)
    return be.xp.full(shape, _scalar(gb), dtype=_F64)


# ----------------------------------------------------------------------------- class losses
def _target_weight_block(tb, wb, n_classes, ignore_index, backend):
    """Per-position ``w[t]`` (1 without weights), 0 where ignored; checks the target range."""
    be = resolve_backend(backend, tb)
    xp = be.xp
    t = be.asarray(_unwrap(tb)).astype(xp.int64)
    _args.check_targets(be, t, n_classes, ignore_index)
    valid = t != ignore_index
    wb = _unwrap(wb)
    if wb is None or n_classes == 0:
        return valid.astype(_F64)
    w = be.asarray(wb).astype(_F64)
    return xp.where(valid, w[xp.where(valid, t, 0)], 0.0)


def _class_block(xb, tb, wb, gb, op, backend, opts, want_grad, probs):
    """One block with the whole class axis: the functional op itself, unreduced."""
    xb, tb, wb = _unwrap(xb), _unwrap(tb), _unwrap(wb)
    fn = getattr(F, op)
    if not want_grad:
        return fn(xb, tb, wb, reduction="none", backend=backend, **opts)
    be = resolve_backend(backend, xb)
    shape = (xb.shape[0],) + tuple(xb.shape[2:]) if probs else tuple(tb.shape)
    return fn(xb, tb, wb, reduction="none", return_grad=True,
              grad_output=_rows_grad(be, gb, shape), backend=backend, **opts)


def _ce_stats_block(xb, tb, wb, offb, backend, n_classes, ignore_index, eps, probs):
    """Statistics of one class chunk, shape ``(n, 1, *spatial, nf)``.

    Index targets: ``[m, s, x_t (0 unless this chunk holds t), sum_c w_c x_c (if eps > 0)]``.
    Probability targets: ``[m, s, sum_c w_c y'_c, sum_c w_c y'_c x_c]``.
    """
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = _work(be, xb)
    off = int(_unwrap(offb)[0])
    m, s = _max_sumexp(be, x, 1)
    fields = [m, s]
    w = None if _unwrap(wb) is None else be.asarray(_unwrap(wb)).astype(x.dtype)
    if probs:
        wy = be.asarray(_unwrap(tb)).astype(x.dtype) * x.dtype.type(1.0 - eps)
        wy += x.dtype.type(eps / n_classes)
        if w is not None:
            wy *= w.reshape((1, -1) + (1,) * (x.ndim - 2))
        fields.append(wy.sum(axis=1, dtype=_F64))
        wy *= x
        fields.append(wy.sum(axis=1, dtype=_F64))
    else:
        t = be.asarray(_unwrap(tb)).astype(xp.int64)
        idx, local = _pick_mask(xp, t, off, x.shape[1], ignore_index)
        xt = xp.zeros(t.shape, dtype=_F64)
        xt[idx] = x[(idx[0], local) + idx[1:]]
        fields.append(xt)
        if eps > 0:
            swx = (x.sum(axis=1, dtype=_F64) if w is None
                   else xp.tensordot(x, w, axes=([1], [0])).astype(_F64))
            fields.append(swx)
    return xp.stack(fields, axis=-1)[:, None]


def _ce_rows_block(stb, tb, wtb, wsum, n_classes, ignore_index, eps, probs):
    """Per-position float64 losses from merged statistics."""
    st = _unwrap(stb)
    xp = _xp(st)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = st[..., 0] + xp.log(st[..., 1])
        if probs:
            return st[..., 2] * lse - st[..., 3]
        wt = _unwrap(wtb)
        loss = (1.0 - eps) * wt * (lse - st[..., 2])
        if eps > 0:
            loss = loss + eps / n_classes * (lse * _scalar(wsum) - st[..., 3])
        return xp.where(_unwrap(tb) != ignore_index, loss, 0.0)


def _positions(xp, shape):
    """Open-mesh index arrays of ``shape`` (as ``numpy.indices(shape, sparse=True)``)."""
    nd = len(shape)
    return tuple(xp.arange(n).reshape((1,) * k + (n,) + (1,) * (nd - k - 1))
                 for k, n in enumerate(shape))


def _ce_grad_block(xb, tb, wb, offb, lsb, stb, wtb, gb, wsum, backend, n_classes, ignore_index,
                   eps, probs, out_dtype):
    """Gradient of one class chunk from the merged row statistics (global max and log-sum).

    Index targets, finite statistics: one call of the fused kernel on the chunk, whose
    gradient ``g' (softmax_chunk - onehot)`` becomes the global one with
    ``g' = coef * exp(lse_chunk - lse_row)`` and a fix-up at one class per row. Otherwise
    (probability targets, rows with inf / NaN) the formula in array operations.
    """
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = _work(be, xb)
    nd = x.ndim
    off = int(_unwrap(offb)[0])
    st = be.asarray(_unwrap(stb))
    g = _rows_grad(be, gb, st.shape[:-1])
    w = None if _unwrap(wb) is None else be.asarray(_unwrap(wb)).astype(x.dtype)
    wshape = (1, -1) + (1,) * (nd - 2)
    if not probs:
        t = be.asarray(_unwrap(tb)).astype(xp.int64)
        valid = t != ignore_index
        with np.errstate(invalid="ignore"):  # inf * 0 where all targets are ignored
            a = xp.where(valid, g * (1.0 - eps) * be.asarray(_unwrap(wtb)), 0.0)
            b = xp.where(valid, g * (eps / n_classes), 0.0)
            coef = a + b * _scalar(wsum)
        idx, local = _pick_mask(xp, t, off, x.shape[1], ignore_index)
        loc = be.asarray(_unwrap(lsb))[:, 0]
        finite = xp.isfinite(loc[..., 0]) & xp.isfinite(st[..., 0]) & xp.isfinite(st[..., 1])
        if x.size and bool(finite.all()):
            with np.errstate(over="ignore", invalid="ignore"):
                g_chunk = coef * (loc[..., 1] / st[..., 1]) * xp.exp(loc[..., 0] - st[..., 0])
            tl = xp.zeros(t.shape, dtype=xp.int64)
            tl[idx] = local
            _, gx = F.cross_entropy(x, tl, reduction="none", return_grad=True,
                                    grad_output=g_chunk, backend=be.name)
            fix = g_chunk.copy()  # undo the kernel's one-hot at tl, then the true one at t
            fix[idx] -= a[idx]
            pos = _positions(xp, t.shape)
            gx[(pos[0], tl) + pos[1:]] += fix.astype(gx.dtype)
            if eps > 0:
                wc = w.reshape(wshape) if w is not None else x.dtype.type(1.0)
                gx -= _expand(b, nd).astype(gx.dtype) * wc
            return gx.astype(out_dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        big = _expand(st[..., 0], nd).astype(x.dtype)
        log_s = _expand(xp.log(st[..., 1]), nd).astype(x.dtype)
        p = x - big
        p -= log_s
        xp.exp(p, out=p)  # softmax of the whole row, this chunk's columns
        if probs:
            p *= _expand(g * st[..., 2], nd).astype(x.dtype)
            wy = be.asarray(_unwrap(tb)).astype(x.dtype) * x.dtype.type(1.0 - eps)
            wy += x.dtype.type(eps / n_classes)
            if w is not None:
                wy *= w.reshape(wshape)
            wy *= _expand(g, nd).astype(x.dtype)
            p -= wy
            return p.astype(out_dtype, copy=False)
        p *= _expand(coef, nd).astype(x.dtype)
        if eps > 0:
            wc = w.reshape(wshape) if w is not None else x.dtype.type(1.0)
            p -= _expand(b, nd).astype(x.dtype) * wc
        p[(idx[0], local) + idx[1:]] -= a[idx].astype(x.dtype)
        if not bool(valid.all()):
            p = xp.where(_expand(valid, nd), p, x.dtype.type(0))
    return p.astype(out_dtype, copy=False)


def _nll_partial_block(xb, tb, offb, backend, ignore_index):
    """``x[t]`` where this class chunk holds ``t`` (else 0), shape ``(n, 1, *spatial)``."""
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = be.asarray(_unwrap(xb))
    t = be.asarray(_unwrap(tb)).astype(xp.int64)
    idx, local = _pick_mask(xp, t, int(_unwrap(offb)[0]), x.shape[1], ignore_index)
    xt = xp.zeros(t.shape, dtype=_F64)
    xt[idx] = x[(idx[0], local) + idx[1:]]
    return xt[:, None]


def _nll_rows_block(xtb, tb, wtb, ignore_index):
    xt, wt = _unwrap(xtb), _unwrap(wtb)
    with np.errstate(invalid="ignore"):
        return _xp(xt).where(_unwrap(tb) != ignore_index, -wt * xt, 0.0)


def _nll_grad_block(xb, tb, offb, wtb, gb, backend, ignore_index, out_dtype):
    be = resolve_backend(backend, xb)
    xp = be.xp
    x = be.asarray(_unwrap(xb))
    t = be.asarray(_unwrap(tb)).astype(xp.int64)
    g = _rows_grad(be, gb, t.shape)
    gx = xp.zeros(x.shape, dtype=out_dtype)
    idx, local = _pick_mask(xp, t, int(_unwrap(offb)[0]), x.shape[1], ignore_index)
    with np.errstate(invalid="ignore"):
        gx[(idx[0], local) + idx[1:]] = (-be.asarray(_unwrap(wtb)) * g)[idx].astype(out_dtype)
    return gx


@dataclass(frozen=True)
class _ClassCall:
    """A dask class-loss call after the checks: arrays in ``(N, C, *spatial)`` form and the
    canonical options."""

    op: str
    name: str  # backend name used by the chunk tasks
    be: Any
    x: Any
    t: Any
    w: Any
    probs: bool
    loss_shape: tuple[int, ...]
    squeeze: bool  # the caller's input was (C,)
    reduction: str
    ignore_index: int
    eps: float
    extra: dict  # options beyond torch's (z_loss, softcap) passed to the kernels as given

    @property
    def indices(self) -> tuple[str, str]:
        sp = _letters(self.x.ndim - 2)
        return _BATCH + _CLASS + sp, _BATCH + sp


def _class_call(op: Op, v: dict, opts: dict) -> _ClassCall:
    name = _backend_name(v["backend"])
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    if v["grad_buffer"] is not None:
        raise TypeError(f"{op.name}: grad_buffer is not supported for dask arrays (the gradient "
                        f"is a lazy dask array; store it with dask.array.store instead)")
    x, t, w = _as_dask(v["input"]), _as_dask(v["target"]), _as_dask(v["weight"])
    be = _backend_for(name, x, t, w)
    layout = check_class_loss(be, op.name, x, t, w, opts["ignore_index"],
                                    allow_probs=op.name == "cross_entropy")
    squeeze = x.ndim == 1
    if squeeze:  # (C,) -> (1, C); the target () -> (1,)
        x, t = x[None], t[None]
    row_chunks = (x.chunks[0],) + x.chunks[2:]
    t = t.rechunk(x.chunks if layout.probs else row_chunks)
    extra = {k: v[k] for k, _ in op.kernel_options if v[k] != op.param(k).default}
    return _ClassCall(op.name, name, be, x, t, w, layout.probs, layout.loss_shape, squeeze,
                      reduction, opts["ignore_index"], opts.get("label_smoothing", 0.0), extra)


def _class_loss(op: Op, v: dict, opts: dict) -> Any:
    c = _class_call(op, v, opts)
    _, ti = c.indices
    n_classes = c.x.shape[1]
    # Per-position w[t] (index targets; also the target range check) and the mean denominator.
    wt: Any = None
    if not c.probs:
        wfull = (c.w.rechunk(-1), _CLASS) if c.w is not None else (None, None)
        wt = da.blockwise(_target_weight_block, ti, c.t, ti, *wfull, n_classes, None,
                          c.ignore_index, None, c.name, None, concatenate=False,
                          align_arrays=False, meta=_meta(c.be, len(ti), _F64))
    if c.reduction != "mean":
        denom: Any = 1.0
    elif c.probs:
        denom = float(math.prod(c.loss_shape))
    else:
        denom = wt.sum()
    gpair = None
    if v["return_grad"]:
        if c.reduction == "none":
            row_chunks = (c.x.chunks[0],) + c.x.chunks[2:]
            garg = _grad_rows_arg(v["grad_output"], c.loss_shape, row_chunks, c.squeeze, c.be)
            gpair = (garg, ti) if garg is not None else (None, None)
        else:
            gpair = _scalar_arg(_grad_scale(v["grad_output"], denom, c.be))
    if c.x.numblocks[1] == 1:  # the class axis whole: the functional op on each block
        return _class_loss_whole(c, denom, gpair, bool(v.get("return_lse")))
    if c.extra or v.get("return_lse"):
        raise NotImplementedError(
            f"{c.op}: z_loss, softcap and return_lse need the class axis in one chunk for dask "
            f"arrays (got {c.x.numblocks[1]} class chunks): rechunk it with "
            f"x.rechunk({{1: -1}})")
    if c.op == "nll_loss":
        return _nll_split(c, wt, denom, gpair)
    return _ce_split(c, wt, denom, gpair)


def _finish(c: _ClassCall, rows: Any, denom: Any, grad: Any = None, lse: Any = None) -> Any:
    out = [_reduce_rows(rows, c.reduction, denom, c.x.dtype, c.be, c.squeeze)]
    if grad is not None:
        out.append(grad[0] if c.squeeze else grad)
    if lse is not None:
        out.append(lse[0] if c.squeeze else lse)
    return out[0] if len(out) == 1 else tuple(out)


def _class_loss_whole(c: _ClassCall, denom: Any, gpair: Any, want_lse: bool) -> Any:
    xi, ti = c.indices
    opts = {"ignore_index": c.ignore_index, **c.extra}
    if c.op == "cross_entropy":
        opts["label_smoothing"] = c.eps
        if want_lse:
            opts["return_lse"] = True
    warg = (c.w.rechunk((c.x.chunks[1],)), _CLASS) if c.w is not None else (None, None)
    common = (c.x, xi, c.t, xi if c.probs else ti, *warg)
    rows_meta = _meta(c.be, len(ti), c.x.dtype)
    if gpair is None and not want_lse:
        rows = da.blockwise(_class_block, ti, *common, None, None, c.op, None, c.name, None,
                            opts, None, False, None, c.probs, None, concatenate=False,
                            align_arrays=False, meta=rows_meta)
        return _finish(c, rows, denom)
    want_grad = gpair is not None
    tup = da.blockwise(_class_block, ti, *common, *(gpair or (None, None)), c.op, None, c.name,
                       None, opts, None, want_grad, None, c.probs, None, concatenate=False,
                       align_arrays=False, meta=np.empty((0,) * len(ti), dtype=object))
    rows = da.blockwise(_pick_block, ti, tup, ti, 0, None, meta=rows_meta)
    grad = lse = None
    if want_grad:
        grad = da.blockwise(_pick_block, xi, tup, ti, 1, None,
                            new_axes={_CLASS: c.x.shape[1]},
                            meta=_meta(c.be, c.x.ndim, c.x.dtype))
    if want_lse:
        lse = da.blockwise(_pick_block, ti, tup, ti, 1 + want_grad, None, meta=rows_meta)
    return _finish(c, rows, denom, grad, lse)


def _class_offsets(c: _ClassCall) -> Any:
    starts = np.cumsum((0,) + c.x.chunks[1][:-1]).astype(np.int64)
    return da.from_array(starts, chunks=1)


def _nll_split(c: _ClassCall, wt: Any, denom: Any, gpair: Any) -> Any:
    """NLL with the class axis in several chunks: the target's log-probability from its chunk."""
    xi, ti = c.indices
    off = _class_offsets(c)
    part = da.blockwise(_nll_partial_block, xi, c.x, xi, c.t, ti, off, _CLASS, c.name, None,
                        c.ignore_index, None, adjust_chunks={_CLASS: 1}, align_arrays=False,
                        meta=_meta(c.be, c.x.ndim, _F64))
    rows = da.blockwise(_nll_rows_block, ti, part.sum(axis=1), ti, c.t, ti, wt, ti,
                        c.ignore_index, None, meta=_meta(c.be, len(ti), _F64))
    if gpair is None:
        return _finish(c, rows, denom)
    grad = da.blockwise(_nll_grad_block, xi, c.x, xi, c.t, ti, off, _CLASS, wt, ti, *gpair,
                        c.name, None, c.ignore_index, None, c.x.dtype, None, align_arrays=False,
                        meta=_meta(c.be, c.x.ndim, c.x.dtype))
    return _finish(c, rows, denom, grad)


def _ce_split(c: _ClassCall, wt: Any, denom: Any, gpair: Any) -> Any:
    """Cross-entropy with the class axis in several chunks (vocabulary-parallel): per-chunk
    statistics merged exactly, then the gradient chunk by chunk from the merged rows."""
    xi, ti = c.indices
    n_classes = c.x.shape[1]
    off = _class_offsets(c)
    warg = (c.w.rechunk((c.x.chunks[1],)), _CLASS) if c.w is not None else (None, None)
    tidx = xi if c.probs else ti
    nf = 4 if (c.probs or c.eps > 0) else 3
    stats = da.blockwise(_ce_stats_block, xi + _STAT, c.x, xi, c.t, tidx, *warg, off, _CLASS,
                         c.name, None, n_classes, None, c.ignore_index, None, c.eps, None,
                         c.probs, None, new_axes={_STAT: nf}, adjust_chunks={_CLASS: 1},
                         align_arrays=False, meta=_meta(c.be, c.x.ndim + 1, _F64))
    merged = _merge_class_stats(stats, c.be, len(ti) + 1)
    wsum: Any = float(n_classes) if c.w is None else c.w.astype(_F64).sum()
    wtpair = (wt, ti) if wt is not None else (None, None)
    tpair = (c.t, ti) if not c.probs else (None, None)
    rows = da.blockwise(_ce_rows_block, ti, merged, ti + _STAT, *tpair, *wtpair,
                        *_scalar_arg(wsum), n_classes, None, c.ignore_index, None, c.eps, None,
                        c.probs, None, concatenate=False, align_arrays=False,
                        meta=_meta(c.be, len(ti), _F64))
    if gpair is None:
        return _finish(c, rows, denom)
    grad = da.blockwise(_ce_grad_block, xi, c.x, xi, c.t, tidx, *warg, off, _CLASS, stats,
                        xi + _STAT, merged, ti + _STAT, *wtpair, *gpair, *_scalar_arg(wsum),
                        c.name, None, n_classes, None, c.ignore_index, None, c.eps, None,
                        c.probs, None, c.x.dtype, None, concatenate=False, align_arrays=False,
                        meta=_meta(c.be, c.x.ndim, c.x.dtype))
    return _finish(c, rows, denom, grad)


# ----------------------------------------------------------------------------- binary losses
def _broadcast_to_input(op: str, what: str, v: Any, x) -> Any:
    """``v`` (weight / pos_weight) as a dask array of ``x``'s shape and chunks."""
    if v is None:
        return None
    v = _as_dask(v)
    try:
        shape = np.broadcast_shapes(tuple(v.shape), tuple(x.shape))
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(f"{op}: {what} of shape {tuple(v.shape)} cannot be broadcast to the "
                         f"input shape {tuple(x.shape)}")
    lead = x.ndim - v.ndim
    v = v.rechunk(tuple(x.chunks[lead + i] if n == x.shape[lead + i] else (n,)
                        for i, n in enumerate(v.shape)))
    return da.broadcast_to(v, x.shape, chunks=x.chunks)


def _binary_block(xb, yb, wb, pwb, gb, op, backend, want_grad):
    kwargs = {"pos_weight": pwb} if op == "binary_cross_entropy_with_logits" else {}
    fn = getattr(F, op)
    if not want_grad:
        return fn(xb, yb, wb, reduction="none", backend=backend, **kwargs)
    be = resolve_backend(backend, xb)
    return fn(xb, yb, wb, reduction="none", return_grad=True,
              grad_output=_rows_grad(be, gb, tuple(xb.shape)), backend=backend, **kwargs)


def _binary_loss(op_: Op, v: dict, opts: dict) -> Any:
    op = op_.name
    name = _backend_name(v["backend"])
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    weight, pos_weight = v["weight"], v.get("pos_weight")
    return_grad, grad_output = v["return_grad"], v["grad_output"]
    x, y = _as_dask(v["input"]), _as_dask(v["target"])
    be = _backend_for(name, x, y, _as_dask(weight), _as_dask(pos_weight))
    check_binary_loss(be, op, x, y)
    y = y.rechunk(x.chunks)
    w = _broadcast_to_input(op, "weight", weight, x)
    pw = _broadcast_to_input(op, "pos_weight", pos_weight, x)
    ind = _letters(x.ndim)
    dtype = x.dtype
    arrays = (x, ind, y, ind, *((w, ind) if w is not None else (None, None)),
              *((pw, ind) if pw is not None else (None, None)))
    denom = float(x.size) if reduction == "mean" else 1.0
    meta = _meta(be, x.ndim, dtype)
    if not return_grad:
        rows = da.blockwise(_binary_block, ind, *arrays, None, None, op, None, name, None,
                            False, None, meta=meta)
        return _reduce_rows(rows, reduction, denom, dtype, be, False)
    if reduction == "none":
        g = _grad_rows_arg(grad_output, x.shape, x.chunks, False, be)
        gpair = (g, ind) if g is not None else (None, None)
    else:
        gpair = _scalar_arg(_grad_scale(grad_output, denom, be))
    tup = da.blockwise(_binary_block, ind, *arrays, *gpair, op, None, name, None, True, None,
                       meta=np.empty((0,) * x.ndim, dtype=object))
    rows = da.blockwise(_pick_block, ind, tup, ind, 0, None, meta=meta)
    grad = da.blockwise(_pick_block, ind, tup, ind, 1, None, meta=meta)
    return _reduce_rows(rows, reduction, denom, dtype, be, False), grad


def _checked_targets_block(tb, n_classes: int, ignore_index: int, backend: str):
    """A target chunk, after the class-index range check (raises when the chunk is computed)."""
    be = resolve_backend(backend, tb)
    t = be.asarray(tb)
    _args.check_targets(be, t.astype(be.xp.int64).reshape(-1), n_classes, ignore_index)
    return tb


def _linear_ce(op: Op, v: dict, opts: dict) -> Any:
    """Vocabulary-parallel linear cross-entropy (:mod:`nblosses._dask_linear_ce`): ``input``
    chunked along the batch, ``linear_weight`` along the vocabulary."""
    from . import _dask_linear_ce

    name = _backend_name(v["backend"])
    x, w, t = _as_dask(v["input"]), _as_dask(v["linear_weight"]), _as_dask(v["target"])
    b, cw = _as_dask(v["linear_bias"]), _as_dask(v["weight"])
    be = _backend_for(name, x, w, t, b, cw)
    lay = check_linear_ce(be, op.name, x, w, t, b, cw, opts["ignore_index"])
    if lay.out_features or lay.squeeze:
        raise NotImplementedError(f"{op.name}: dask arrays take (N, d) input and a (V, d) "
                                  f"linear_weight (no K-dimensional loss, no single row)")
    reduction = _args.reduction_from(None, None, v["reduction"])
    ignore = -100 if opts["ignore_index"] is None else opts["ignore_index"]
    cdt = _args.compute_dtype(be, x.dtype)
    if lay.probs:
        t = t.astype(cdt)
    else:
        t = t.astype(np.int64).map_blocks(_checked_targets_block, lay.v, ignore, name,
                                          dtype=np.int64)
    want_grad, want_lse = bool(v["return_grad"]), bool(v["return_lse"])
    g = v["grad_output"]
    if want_grad and reduction != "none":
        g = _grad_scale(g, 1.0, be)
    elif want_grad:
        g = da.ones(lay.n, chunks=x.chunks[0], dtype=cdt) if g is None else _as_dask(g)
    loss, lse, grads = _dask_linear_ce.linear_cross_entropy(
        x.astype(cdt), w.astype(cdt), None if b is None else b.astype(cdt), t,
        None if cw is None else cw.astype(cdt), ignore_index=ignore,
        label_smoothing=opts["label_smoothing"], reduction=reduction, z_loss=opts["z_loss"],
        softcap=opts["softcap"], want_grad=want_grad, grad_output=g, want_lse=want_lse)
    out = [loss.astype(x.dtype)]
    if want_grad:
        out.append(tuple(None if a is None else a.astype(x.dtype) for a in grads))
    if want_lse:
        out.append(lse)
    return out[0] if len(out) == 1 else tuple(out)


def _by_name(fn):
    """Adapt a runner that takes the op's name."""
    return lambda op, v, opts: fn(op.name, v, opts)


_RUNNERS = {
    "softmax": _by_name(_softmax_family),
    "softmax_backward": _by_name(_softmax_backward),
    "elementwise": _by_name(lambda op, v, opts: (_sigmoid if op == "sigmoid"
                                                 else _sigmoid_backward)(op, v, opts)),
    "class_loss": _class_loss,
    "binary_loss": _binary_loss,
    "linear_ce": _linear_ce,
}


def call(op: Op, values: dict, opts: dict) -> Any:
    """Run ``op`` lazily on dask arrays (other arrays among ``values`` become one chunk)."""
    try:
        runner = _RUNNERS[str(op.dask)]
    except KeyError:
        raise NotImplementedError(f"{op.name} does not take dask arrays yet") from None
    return runner(op, values, opts)
