"""Dask plan of kl_div: the generic plan (:mod:`._blockwise`), elementwise, in any chunking.

``input`` and ``target`` are broadcast (lazily) to their broadcast shape, the loss's, chunked
along each axis like the operand that spans it (the input where it does): one ``kl_div``
kernel call per block, unreduced, then a float64 tree reduction. As torch, ``"batchmean"``
and the legacy ``size_average`` / ``reduce`` pair resolve to a reduction and a division by
``input.shape[0]`` (:func:`nblosses.ops.kl_div.resolve_reduction`), here folded into the
reduction's denominator and the upstream gradient. When the input is the broadcast operand,
its gradient (computed per block of the broadcast shape) is summed back over the broadcast
axes in float64, as the eager call sums it. With ``log_target``, each block of the target is
checked for ``+inf`` when it is computed (``ValueError`` naming its flat position in the
broadcast shape), before any kernel reads it.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _args
from .._registry import resolve_backend
from .._spec import OpSpec
from ..ops._results import results
from ..ops.kl_div import (
    KLDivArgs,
    check_kl_div,
    check_log_target,
    execute,
    resolve_reduction,
    sum_to,
)
from . import _common as C
from ._blockwise import Result, run_blocks


def _loss_chunks(x: Any, t: Any, shape: tuple[int, ...]) -> tuple:
    """The chunks of the broadcast ``shape``: along each axis the input's where it spans the
    axis, else the target's (which then does)."""
    out = []
    for i in range(1, len(shape) + 1):
        a = x if x.ndim >= i and x.shape[-i] == shape[-i] else t
        out.append(a.chunks[-i])
    return tuple(reversed(out))


def _checked_log_target(tb: Any, backend: str, shape: tuple[int, ...],
                        block_info: Any = None) -> Any:
    """A block of the log-target, checked for ``+inf`` (its position named in ``shape``)."""
    check_log_target(resolve_backend(backend, tb), tb,
                     tuple(lo for lo, _ in block_info[0]["array-location"]), shape)
    return tb


def _block(xb: Any, tb: Any, gb: Any, *, backend: str, cdt: Any, grad_dtype: Any,
           log_target: bool, want_grad: bool) -> Any:
    """One block, both operands of its shape: flat canonical arrays, one kernel call,
    unreduced (the loss in the compute dtype ``cdt``, the gradient in ``grad_dtype``)."""
    be = resolve_backend(backend, xb)
    x = be.asarray(xb)
    shape = tuple(x.shape)
    a = KLDivArgs(_args.to_compute(be, x, cdt).reshape(-1),
                  _args.to_compute(be, tb, cdt).reshape(-1), shape, shape, cdt, grad_dtype)
    g = C.rows_grad(be, gb, shape) if want_grad else None
    out = execute(be, a, reduction="none", batch=False, log_target=log_target,
                  want_grad=want_grad, grad_output=g, grad_buffer=None)
    return results(out)


def plan_kl_div(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``kl_div``."""
    C.refuse_grad_buffer(spec, v)
    reduction, batch = resolve_reduction(v["size_average"], v["reduce"], v["reduction"])
    name = C.backend_name(v["backend"])
    x, t = C.as_dask(v["input"]), C.as_dask(v["target"])
    be = C.backend_for(name, x, t)
    shape, dtype = check_kl_div(be, spec.name, x, t)
    cdt = _args.compute_dtype(be, dtype)
    chunks = _loss_chunks(x, t, shape)
    xb, tb = C.broadcast(x, shape, chunks), C.broadcast(t, shape, chunks)
    log_target = bool(v["log_target"])
    if log_target:
        tb = tb.map_blocks(_checked_log_target, name, shape, meta=tb._meta)
    # torch divides the result (reduced or not), so the upstream gradient, by the batch
    divisor = x.shape[0] if batch and x.ndim else 1
    denom = float(math.prod(shape) if reduction == "mean" else 1) * divisor
    per = divisor or 1  # an empty batch has no position to divide
    ind = C.letters(len(shape))
    want_grad = bool(v["return_grad"])
    grad = None
    if want_grad and reduction != "none":  # the scalar grad_output / denom
        grad = C.grad_arg(v["grad_output"], "mean", denom, shape, chunks, ind, be)
    elif want_grad:  # per position grad_output / divisor (absent: ones over it)
        g, _ = C.grad_arg(v["grad_output"], "none", 1.0, shape, chunks, ind, be)
        grad = (1.0 / per, None) if g is None else (g / per, ind)
    broadcast_input = tuple(x.shape) != shape
    # a gradient to sum back over broadcast axes stays float64 until summed
    grad_dtype = C.F64 if broadcast_input else x.dtype
    out = run_blocks(_block, [(xb, ind), (tb, ind), grad or C.ABSENT],
                     [Result(ind, cdt), *([Result(ind, grad_dtype)] if want_grad else [])], be,
                     backend=name, cdt=cdt, grad_dtype=grad_dtype, log_target=log_target,
                     want_grad=want_grad)
    if reduction == "none":
        loss = (out[0] / per).astype(dtype)
    else:
        loss = C.reduce_loss(out[0], "mean", denom, dtype, be)
    if want_grad and broadcast_input:
        out[1] = sum_to(out[1], tuple(x.shape)).astype(x.dtype)
    return results([loss, *out[1:]])
