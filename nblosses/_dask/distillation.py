"""Dask plan of distillation_loss: the generic plan (:mod:`._blockwise`), the class axis in one
chunk.

The student, the teacher (logits, or a top-k teacher's indices and log-probabilities) and the
target are chunked alike along the positions (the student's chunks; the class axis, and the
top-k axis, gathered into one chunk): one ``distillation`` / ``distillation_topk`` kernel call
per block of positions, unreduced, then a float64 tree reduction. The ``mean`` denominator is
the number of kept positions (``target != ignore_index``), a reduction over the targets alone,
or the number of positions without a target. Class indices and top-k indices are checked block
by block when computed (``IndexError``), before any kernel reads them.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _args
from .._registry import resolve_backend
from .._spec import OpSpec
from ..ops._results import results
from ..ops.distillation import (
    DistillArgs,
    DistillLayout,
    check_distillation,
    check_topk_indices,
    execute,
)
from . import _common as C
from ._blockwise import Result, loss_plan


def _checked_topk(ib: Any, n_classes: int, backend: str) -> Any:
    """A block of top-k indices as int64, checked (``IndexError`` outside ``[0, C)``)."""
    be = resolve_backend(backend, ib)
    idx = be.xp.ascontiguousarray(be.asarray(ib).astype("int64", copy=False))
    check_topk_indices(be, idx, n_classes)
    return idx


def _block(xb: Any, *rest: Any, backend: str, topk: bool, opts: dict, want_grad: bool) -> Any:
    """One block of positions, the whole class axis: one kernel call, unreduced (the loss in
    the compute dtype, the gradient in the input's)."""
    *teacher_blocks, tb, gb = rest
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    x = be.asarray(x)
    cdt = _args.compute_dtype(be, x.dtype)
    shape = tuple(x.shape)
    n, c = shape[0], shape[1]
    inner = math.prod(shape[2:])
    teacher = [be.asarray(C.unwrap(b)) for b in teacher_blocks]
    if topk:
        k = teacher[0].shape[1]
        canon: tuple[Any, ...] = (teacher[0].reshape(n, k, inner),
                                  _args.to_compute(be, teacher[1], cdt).reshape(n, k, inner))
    else:
        k = c
        canon = (_args.to_compute(be, teacher[0], cdt).reshape(n, c, inner),)
    t = C.unwrap(tb)
    target = None if t is None else be.xp.ascontiguousarray(be.asarray(t)).reshape(n, inner)
    loss_shape = shape[:1] + shape[2:]
    a = DistillArgs(_args.to_compute(be, x, cdt).reshape(n, c, inner), canon, target,
                    DistillLayout(topk, shape, (n, c, inner), k, loss_shape), cdt)
    out = execute(be, a, reduction="none", opts=opts, want_grad=want_grad,
                  grad_output=C.rows_grad(be, gb, loss_shape) if want_grad else None,
                  grad_buffer=None)
    if want_grad:
        out[1] = out[1].reshape(shape).astype(x.dtype, copy=False)
    return results(out)


def plan_distillation(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``distillation_loss``."""
    C.refuse_grad_buffer(spec, v)
    name = C.backend_name(v["backend"])
    reduction = _args.reduction_from(None, None, v["reduction"])
    x = C.as_dask(v["input"])
    teacher = tuple(C.as_dask(a) for a in (v["teacher"] if isinstance(v["teacher"], tuple)
                                         else (v["teacher"],)))
    if len(teacher) not in (1, 2):
        raise TypeError(f"{spec.name}: a top-k teacher is a pair (indices, log_probs), got a "
                        f"tuple of {len(teacher)}")
    t = C.as_dask(v["target"])
    be = C.backend_for(name, x, *teacher, t)
    layout = check_distillation(be, spec.name, x, teacher, t, opts)
    grad_output = v["grad_output"]
    if x.ndim == 1:  # (C,) -> (1, C); the target () -> (1,)
        x, teacher = x[None], tuple(a[None] for a in teacher)
        t = None if t is None else t[None]
        if reduction == "none" and grad_output is not None:
            grad_output = C.as_dask(grad_output)[None]
    x = x.rechunk({1: -1})
    rows = (x.chunks[0],) + x.chunks[2:]
    spatial = C.letters(x.ndim - 2)
    xi, ti = C.BATCH + C.CLASS + spatial, C.BATCH + spatial
    if layout.topk:
        idx, lp = (a.rechunk((rows[0], -1, *rows[1:])) for a in teacher)
        idx = idx.map_blocks(_checked_topk, x.shape[1], name,
                             meta=idx._meta.astype("int64"))
        targs = [(idx, C.BATCH + C.STAT + spatial), (lp, C.BATCH + C.STAT + spatial)]
    else:
        targs = [(teacher[0].rechunk(x.chunks), xi)]
    ignore = opts["ignore_index"]
    if t is not None:
        t = C.checked_targets(t.rechunk(rows), x.shape[1], ignore, name)
    if reduction != "mean":
        denom: Any = 1.0
    elif t is None:
        denom = float(math.prod(layout.loss_shape))
    else:
        denom = C.mean_denominator(t, None, ignore, be)
    loss_shape = x.shape[:1] + x.shape[2:]
    grad = (C.grad_arg(grad_output, reduction, denom, loss_shape, rows, ti, be)
            if v["return_grad"] else None)
    others = [] if grad is None else [Result(xi, x.dtype, {C.CLASS: x.shape[1]})]
    cdt = _args.compute_dtype(be, x.dtype)
    out = loss_plan(_block, [(x, xi), *targs, C.pair(t, ti) if t is not None else C.ABSENT],
                    be=be, loss=Result(ti, cdt), others=others, reduction=reduction,
                    denom=denom, dtype=x.dtype, grad=grad, backend=name, topk=layout.topk,
                    opts=dict(opts), want_grad=grad is not None)
    if layout.input_shape != tuple(x.shape):  # the (C,) input: one position
        out = [out[0] if reduction != "none" else out[0][0], *(a[0] for a in out[1:])]
    return results(out)
