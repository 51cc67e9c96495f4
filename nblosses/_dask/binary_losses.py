"""Dask plan of binary_cross_entropy and binary_cross_entropy_with_logits: the generic plan
(:mod:`._blockwise`), block by block in any chunking. ``weight`` / ``pos_weight`` are broadcast
to the input's shape and chunks (lazily: a broadcast costs no memory)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _args
from .._registry import resolve_backend
from .._spec import OpSpec
from ..ops._results import results
from ..ops.binary_losses import BinaryLossArgs, check_binary_loss, check_probabilities, execute
from . import _common as C
from ._blockwise import Result, loss_plan


def _broadcast(name: str, what: str, v: Any, x: Any) -> Any:
    """``v`` (``weight`` / ``pos_weight``) as a dask array of ``x``'s shape and chunks."""
    if v is None:
        return None
    v = C.as_dask(v)
    try:
        shape = np.broadcast_shapes(tuple(v.shape), tuple(x.shape))
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(f"{name}: {what} of shape {tuple(v.shape)} cannot be broadcast to the "
                         f"input shape {tuple(x.shape)}")
    return C.broadcast(v, tuple(x.shape), x.chunks)


def _block(xb: Any, yb: Any, wb: Any, pwb: Any, gb: Any, *, op: str, backend: str,
           want_grad: bool) -> Any:
    """One block: flat canonical arrays, one kernel call, unreduced."""
    be = resolve_backend(backend, xb)
    x = be.asarray(xb)
    cdt = _args.compute_dtype(be, x.dtype)

    def flat(a: Any) -> Any:
        return None if a is None else _args.to_compute(be, a, cdt).reshape(-1)

    xc = flat(x)
    if op == "binary_cross_entropy":
        check_probabilities(op, xc)
    a = BinaryLossArgs(xc, flat(yb), flat(wb), flat(pwb), tuple(x.shape), cdt)
    out = execute(be, op, a, reduction="none", want_grad=want_grad,
                  grad_output=C.rows_grad(be, gb, a.shape) if want_grad else None)
    if want_grad:
        out[1] = out[1].astype(x.dtype, copy=False)
    return results(out)


def plan_binary_loss(spec: OpSpec, v: dict, opts: dict) -> Any:
    """Both binary losses."""
    name = C.backend_name(v["backend"])
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    x, y = C.as_dask(v["input"]), C.as_dask(v["target"])
    weight, pos_weight = C.as_dask(v["weight"]), C.as_dask(v.get("pos_weight"))
    be = C.backend_for(name, x, y, weight, pos_weight)
    cdt = check_binary_loss(be, spec.name, x, y)
    ind = C.letters(x.ndim)
    args = [(x, ind), (y.rechunk(x.chunks), ind),
            C.pair(_broadcast(spec.name, "weight", weight, x), ind),
            C.pair(_broadcast(spec.name, "pos_weight", pos_weight, x), ind)]
    denom = float(x.size) if reduction == "mean" else 1.0
    want_grad = bool(v["return_grad"])
    grad = C.grad_arg(v["grad_output"], reduction, denom, tuple(x.shape), x.chunks, ind,
                    be) if want_grad else None
    out = loss_plan(_block, args, be=be, loss=Result(ind, cdt),
                    others=[Result(ind, x.dtype)] if want_grad else [], reduction=reduction,
                    denom=denom, dtype=x.dtype, grad=grad, op=spec.name, backend=name,
                    want_grad=want_grad)
    return results(out)
