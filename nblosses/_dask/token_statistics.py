"""Dask plan of token_logprobs: one kernel call per block of positions, the class axis in one
chunk (:func:`._blockwise.run_blocks`; nothing is reduced).

The logits are rechunked to hold the whole class axis, the targets (and array-valued upstream
gradients) chunked as the logits' positions; each block's targets are checked when computed
(``IndexError``) before the kernel reads them. The log-probabilities, the entropy and the
gradient come from one sweep over each block's logits, as the eager call.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _args
from .._registry import resolve_backend
from .._spec import OpSpec
from ..ops._results import at_least_float32, results
from ..ops.class_losses import ClassLossArgs, ClassLossLayout, check_class_loss
from ..ops.token_logprobs import execute
from ._blockwise import Result, run_blocks
from ._common import (
    BATCH,
    CLASS,
    as_dask,
    backend_for,
    backend_name,
    checked_targets,
    is_dask,
    letters,
    refuse_grad_buffer,
    scalar_arg,
    unwrap,
)


def _block(xb: Any, tb: Any, gb: Any, eb: Any, *, backend: str, opts: dict,
           want_entropy: bool, want_grad: bool) -> Any:
    """One block of positions with the whole class axis: ``(logp, entropy?, grad?)``."""
    x = unwrap(xb)
    be = resolve_backend(backend, x)
    x = be.asarray(x)
    shape = tuple(x.shape)
    shape3 = (shape[0], shape[1], math.prod(shape[2:]))
    cdt = _args.compute_dtype(be, x.dtype)
    target = be.xp.ascontiguousarray(be.asarray(unwrap(tb))).reshape(shape3[0], shape3[2])
    a = ClassLossArgs(_args.to_compute(be, x, cdt).reshape(shape3), target, None,
                      ClassLossLayout(False, shape, shape3, shape[:1] + shape[2:]), cdt)
    out = execute(be, a, ignore_index=opts["ignore_index"], temperature=opts["temperature"],
                  softcap=opts["softcap"], want_entropy=want_entropy, want_grad=want_grad,
                  grad_output=unwrap(gb), grad_entropy=unwrap(eb), grad_buffer=None)
    if want_grad:
        out[-1] = out[-1].reshape(shape).astype(x.dtype, copy=False)
    return results(out)


def _upstream(name: str, what: str, value: Any, shape: tuple[int, ...], rows: tuple,
              index: str) -> tuple[Any, Any]:
    """A blockwise argument for an upstream gradient: a scalar as it is (a Python or 0-d
    value, or a 0-d dask array), an array of the positions' ``shape`` chunked as ``rows``."""
    if value is None:
        return None, None
    if not is_dask(value) and not hasattr(value, "shape"):
        return value, None
    g = as_dask(value)
    if g.ndim == 0:
        return scalar_arg(g)
    if tuple(g.shape) != shape:
        raise ValueError(f"{name}: {what} shape {tuple(g.shape)} does not match the positions' "
                         f"shape {shape} (the input's shape without the class axis)")
    return g.reshape(tuple(sum(c) for c in rows)).rechunk(rows), index


def plan_token_logprobs(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``token_logprobs``."""
    refuse_grad_buffer(spec, v)
    name = backend_name(v["backend"])
    x, t = as_dask(v["input"]), as_dask(v["target"])
    be = backend_for(name, x, t)
    check_class_loss(be, spec.name, x, t, None, opts["ignore_index"], allow_probs=False)
    cdt = _args.compute_dtype(be, x.dtype)
    squeeze = x.ndim == 1
    grad_output, grad_entropy = v["grad_output"], v["grad_entropy"]
    if squeeze:  # (C,) -> (1, C); the target and per-position gradients () -> (1,)
        x, t = x[None], t[None]
        grad_output, grad_entropy = (
            g[None] if g is not None and getattr(g, "ndim", 0) == 0 and hasattr(g, "shape")
            else g for g in (grad_output, grad_entropy))
    x = x.rechunk({1: -1})
    rows = (x.chunks[0],) + x.chunks[2:]
    spatial = letters(x.ndim - 2)
    xi, ti = BATCH + CLASS + spatial, BATCH + spatial
    t = checked_targets(t.rechunk(rows), x.shape[1], opts["ignore_index"], name)
    want_entropy, want_grad = bool(v["return_entropy"]), bool(v["return_grad"])
    loss_shape = tuple(x.shape[:1] + x.shape[2:])
    ups = [_upstream(spec.name, what, g, loss_shape, rows, ti) if want_grad else (None, None)
           for what, g in (("grad_output", grad_output), ("grad_entropy", grad_entropy))]
    stats = at_least_float32(cdt)
    res = [Result(ti, stats), *([Result(ti, stats)] if want_entropy else []),
           *([Result(xi, x.dtype, {CLASS: x.shape[1]})] if want_grad else [])]
    out = run_blocks(_block, [(x, xi), (t, ti), *ups], res, be, backend=name, opts=dict(opts),
                     want_entropy=want_entropy, want_grad=want_grad)
    if squeeze:
        out = [a[0] for a in out]
    return results(out)
