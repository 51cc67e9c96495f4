"""What every Dask plan needs: the backend its tasks use, blocks, metas and indices, the upstream
gradient, checked targets and the reduction of per-position losses.

Tasks run on blocks (NumPy or CuPy chunks) in worker threads or processes: everything they need
is passed to them (the backend by name, options as plain values), nothing is read from the
caller's context there.
"""

from __future__ import annotations

import importlib
from typing import Any

import dask.array as da
import numpy as np

from .. import _args
from .._registry import Runtime, array_module, check_name, get_backend, resolve_backend
from ..backends import _linear_ce as G

F64 = np.float64
#: blockwise indices: the batch axis, the class axis, a statistics axis; then spatial axes.
BATCH, CLASS, STAT = "a", "b", "z"
_SPATIAL = "cdefghijklmnopqrstuvwxy"
#: An absent array argument of blockwise (``None`` with no index).
ABSENT = (None, None)


# ----------------------------------------------------------------------------- graph building
def is_dask(obj: Any) -> bool:
    """Whether ``obj`` is a dask array."""
    return array_module(obj) == "dask"


def backend_name(backend: str | None) -> str:
    """The backend name the tasks use, fixed now: the call's, else the current default
    (context-local, so read here and not in the threads or processes that run the tasks)."""
    return check_name(backend if backend is not None else get_backend())


def as_dask(a: Any) -> Any:
    """A dask array (any other array becomes one chunk); ``None`` stays ``None``."""
    if a is None or is_dask(a):
        return a
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        a = np.asarray(a)
    return da.from_array(a, chunks=tuple(max(n, 1) for n in a.shape) or ())


def backend_for(name: str, *arrays: Any) -> Runtime:
    """The backend the chunks of the dask ``arrays`` run on, judged from their metadata."""
    return resolve_backend(name, *(a._meta for a in arrays if a is not None))


def meta(be: Runtime, ndim: int, dtype: Any) -> Any:
    """An empty array of the backend's type: the ``meta`` of a result."""
    return be.xp.empty((0,) * ndim, dtype=dtype)


def letters(ndim: int) -> str:
    """blockwise indices of ``ndim`` spatial axes."""
    return _SPATIAL[:ndim]


def pair(a: Any, index: str) -> tuple[Any, Any]:
    """A blockwise ``(array, index)`` argument, or :data:`ABSENT` for ``None``."""
    return ABSENT if a is None else (a, index)


def broadcast(v: Any, shape: tuple[int, ...], chunks: tuple) -> Any:
    """Dask array ``v`` broadcast to ``shape`` (lazily: a broadcast costs no memory), chunked
    as ``chunks``; its blocks line up with them along its stretched axes too (one chunk of
    length 1 there). ``v``'s shape must broadcast to ``shape``."""
    lead = len(shape) - v.ndim
    v = v.rechunk(tuple(chunks[lead + i] if n == shape[lead + i] else (n,)
                        for i, n in enumerate(v.shape)))
    return da.broadcast_to(v, shape, chunks=chunks)


def refuse_grad_buffer(spec: Any, values: dict) -> None:
    """``TypeError`` when a call on dask arrays passes ``grad_buffer`` (a lazy gradient has no
    buffer to write into)."""
    if values["grad_buffer"] is not None:
        raise TypeError(f"{spec.name}: grad_buffer is not supported for dask arrays (the "
                        f"gradient is a lazy dask array; store it with dask.array.store)")


def scalar_arg(v: Any) -> tuple[Any, Any]:
    """A blockwise argument for a scalar that may be a 0-d dask array."""
    return (v, "") if is_dask(v) else (v, None)


# ----------------------------------------------------------------------------- inside tasks
def unwrap(b: Any) -> Any:
    """A block from blockwise's nested lists (a contracted axis holds exactly one chunk)."""
    while isinstance(b, list):
        (b,) = b
    return b


def xp_of(a: Any) -> Any:
    """The array namespace of a block (``numpy``, ``cupy``)."""
    return importlib.import_module(type(a).__module__.partition(".")[0])


def work_dtype(dtype: Any) -> Any:
    """The dtype the plans' own arithmetic (merges, statistics, the LM head's block kernels)
    runs in for blocks of ``dtype``: float32 or float64."""
    return dtype if dtype.kind == "f" and dtype.itemsize >= 4 else np.dtype("float32")


def work(be: Runtime, b: Any) -> Any:
    """A block as a canonical array of the backend (C-contiguous) of :func:`work_dtype`."""
    a = be.asarray(unwrap(b))
    return _args.to_compute(be, a, work_dtype(a.dtype))


def rows_grad(be: Runtime, gb: Any, shape: tuple[int, ...]) -> Any:
    """A block's per-position upstream gradient (float64): the given block, a scalar (a reduced
    loss's ``grad_output / denominator``) broadcast, or ones."""
    gb = unwrap(gb)
    if gb is None:
        return be.xp.ones(shape, dtype=F64)
    if getattr(gb, "ndim", 0) == len(shape) and len(shape) > 0:
        return be.asarray(gb).astype(F64)
    return be.xp.full(shape, float(gb), dtype=F64)


def pick(tup: Any, i: int) -> Any:
    """Result ``i`` of a task that returned several."""
    return unwrap(tup)[i]


def divide(a: Any, b: Any, dtype: Any = F64) -> Any:
    """``a / b`` of two blocks (0-d arrays or scalars) with IEEE results and no warning: 0/0
    is NaN (a ``mean`` over no kept target, as torch), x/0 a signed infinity."""
    a, b = unwrap(a), unwrap(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp_of(a).asarray(a / b, dtype=dtype)


# ----------------------------------------------------------------------------- gradients
def grad_scale(grad_output: Any, denom: Any, be: Runtime) -> Any:
    """``grad_output / denom`` of a reduced loss (IEEE for a zero ``denom``), a float or a 0-d
    dask array when either is one."""
    if grad_output is None:
        g: Any = 1.0
    elif is_dask(grad_output):
        if grad_output.size != 1:
            raise ValueError(f"grad_output for a reduced loss must be a scalar, got shape "
                             f"{tuple(grad_output.shape)}")
        g = grad_output.reshape(()).astype(F64)
    else:
        g = float(_args.grad_output_arg(be, grad_output, "mean", (), F64, ()))
    if not is_dask(g) and not is_dask(denom):
        return float(divide(np.float64(g), np.float64(denom)))
    g = g if is_dask(g) else da.from_array(np.float64(g))
    denom = denom if is_dask(denom) else da.from_array(np.float64(denom))
    return da.map_blocks(divide, g, denom, meta=meta(be, 0, F64))


def grad_arg(grad_output: Any, reduction: str, denom: Any, loss_shape: tuple[int, ...],
             chunks: tuple, index: str, be: Runtime) -> tuple[Any, Any]:
    """The blockwise argument that carries the upstream gradient to the tasks: for ``"none"``
    a dask array of the loss's shape chunked as ``chunks`` (absent: ones), else the scalar
    ``grad_output / denom`` (``denom`` 1 for ``"sum"``)."""
    if reduction != "none":
        return scalar_arg(grad_scale(grad_output, denom if reduction == "mean" else 1.0, be))
    if grad_output is None:
        return ABSENT
    g = as_dask(grad_output)
    if tuple(g.shape) != tuple(loss_shape):
        raise ValueError(f"grad_output shape {tuple(g.shape)} does not match the loss shape "
                         f"{tuple(loss_shape)}")
    return g.reshape(tuple(sum(c) for c in chunks)).rechunk(chunks), index


# ----------------------------------------------------------------------------- targets
def _checked_targets(tb: Any, n_classes: int, ignore_index: int, backend: str) -> Any:
    be = resolve_backend(backend, tb)
    t = be.asarray(tb).astype(be.xp.int64)
    _args.check_targets(be, t.reshape(-1), n_classes, ignore_index)
    return t


def checked_targets(t: Any, n_classes: int, ignore_index: int, backend: str) -> Any:
    """Class-index targets as int64, each block checked when computed (``IndexError`` for an
    index outside ``[0, C)`` that is not ``ignore_index``): the kernels reading them depend on
    the check, so they never see a bad index, whatever the backend's own checks."""
    return t.map_blocks(_checked_targets, n_classes, ignore_index, backend,
                        meta=t._meta.astype(np.int64))


def _denominator(tb: Any, wb: Any, ignore_index: int, ndim: int) -> Any:
    t, w = unwrap(tb), unwrap(wb)
    xp = xp_of(t)
    d = G.mean_denominator(xp, t.reshape(-1), None if w is None else w.astype(F64),
                           ignore_index, to_host=False)
    return xp.asarray(d, dtype=F64).reshape((1,) * ndim)


def mean_denominator(t: Any, w: Any, ignore_index: int, be: Runtime) -> Any:
    """The ``mean`` denominator of class-index targets ``t`` (summed ``w[t]`` of the kept
    ones, or their count), a 0-d dask array: a reduction over the targets alone, so that the
    gradient pass never waits for the pass over the logits."""
    ind = letters(t.ndim)
    whole = None if w is None else w.rechunk(-1)
    parts = da.blockwise(_denominator, ind, t, ind, *pair(whole, CLASS), ignore_index, None,
                         t.ndim, None, adjust_chunks={i: 1 for i in ind}, concatenate=True,
                         meta=meta(be, t.ndim, F64))
    return parts.sum()


# ----------------------------------------------------------------------------- reductions
def reduce_loss(rows: Any, reduction: str, denom: Any, dtype: Any, be: Runtime) -> Any:
    """Per-position losses as the caller's result: cast for ``"none"``, else a float64 tree
    sum (over ``denom`` for ``"mean"``: 0/0 is NaN, as torch) as a 0-d array of ``dtype``."""
    if reduction == "none":
        return rows.astype(dtype)
    total = rows.astype(F64).sum()
    return da.blockwise(divide, "", total, "", *scalar_arg(denom if reduction == "mean" else 1.0),
                        dtype, None, meta=meta(be, 0, dtype))
