"""Dask plans of token_logprobs.

Arrays are ``(N, C, *spatial)`` (a ``(C,)`` input is one row); the targets (and array-valued
upstream gradients) are chunked as the logits' positions, each block's targets checked when
computed (``IndexError``) before a kernel reads them.

- The class axis in one chunk: one kernel call per block of positions
  (:func:`._blockwise.run_blocks`; nothing is reduced). The log-probabilities, the entropy and
  the gradient come from one sweep over each block's logits, as the eager call.
- The class axis in several chunks (class-parallel, exact): for every (block of positions,
  class chunk) a task reduces a copy of its logits chunk, as rows ``(positions, classes)``, to
  per-position statistics (:func:`._vocab.token_stats`: the backend's
  ``linear_token_logprobs.block_stats``, soft cap included: the chunk's max ``m``,
  ``s = sum e``, ``q = sum e d`` with ``d`` the tempered shift, the target's logit where the
  chunk holds it); a task per block of positions merges them over the class chunks exactly and
  finishes the log-probabilities, entropies and the gradient's per-position coefficients
  (:func:`._vocab.token_finish`); with a gradient, a task per (block of positions, class
  chunk) writes that chunk of the gradient (:func:`._vocab.token_grad`: ``block_grad``). The
  block steps are those of linear_token_logprobs' vocabulary-parallel plan
  (:mod:`.linear_token_vocab`), the logits chunk itself as the block. No task holds more than
  one chunk of the class axis. A backend whose ``linear_token_logprobs`` kernel lacks the
  block operations gets the first plan (the class axis rechunked into one chunk).
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from .. import _args
from .._registry import Runtime, resolve_backend
from .._spec import OpSpec
from ..backends._host import ignore_value
from ..ops._results import at_least_float32, results
from ..ops.class_losses import ClassLossArgs, ClassLossLayout, check_class_loss
from ..ops.token_logprobs import execute
from . import _common as C
from . import _vocab as V
from ._blockwise import Result, run_blocks


def _block(xb: Any, tb: Any, gb: Any, eb: Any, *, backend: str, opts: dict,
           want_entropy: bool, want_grad: bool) -> Any:
    """One block of positions with the whole class axis: ``(logp, entropy?, grad?)``."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    x = be.asarray(x)
    shape = tuple(x.shape)
    shape3 = (shape[0], shape[1], math.prod(shape[2:]))
    cdt = _args.compute_dtype(be, x.dtype)
    target = be.xp.ascontiguousarray(be.asarray(C.unwrap(tb))).reshape(shape3[0], shape3[2])
    a = ClassLossArgs(_args.to_compute(be, x, cdt).reshape(shape3), target, None,
                      ClassLossLayout(False, shape, shape3, shape[:1] + shape[2:]), cdt)
    out = execute(be, a, ignore_index=opts["ignore_index"], temperature=opts["temperature"],
                  softcap=opts["softcap"], want_entropy=want_entropy, want_grad=want_grad,
                  grad_output=C.unwrap(gb), grad_entropy=C.unwrap(eb), grad_buffer=None)
    if want_grad:
        out[-1] = out[-1].reshape(shape).astype(x.dtype, copy=False)
    return results(out)


def _upstream(name: str, what: str, value: Any, shape: tuple[int, ...], rows: tuple,
              index: str) -> tuple[Any, Any]:
    """A blockwise argument for an upstream gradient: a scalar as it is (a Python or 0-d
    value, or a 0-d dask array), an array of the positions' ``shape`` chunked as ``rows``."""
    if value is None:
        return None, None
    if not C.is_dask(value) and not hasattr(value, "shape"):
        return value, None
    g = C.as_dask(value)
    if g.ndim == 0:
        return C.scalar_arg(g)
    if tuple(g.shape) != shape:
        raise ValueError(f"{name}: {what} shape {tuple(g.shape)} does not match the positions' "
                         f"shape {shape} (the input's shape without the class axis)")
    return g.reshape(tuple(sum(c) for c in rows)).rechunk(rows), index


# ----------------------------------------------------------------------------- class chunks
def _chunk(xb: Any, tb: Any, backend: str) -> tuple[Runtime, Any, Any, Any]:
    """A class chunk's ``(backend, logits, rows, targets)``: ``rows`` a copy of the logits as
    ``(positions, classes)`` in the work dtype (the block kernels overwrite it), ``targets``
    the positions' flat indices."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    t = be.xp.ascontiguousarray(be.asarray(C.unwrap(tb))).reshape(-1)
    return be, x, V.chunk_rows(be, x, C.work_dtype(x.dtype)), t


def _split_stats(xb: Any, tb: Any, offb: Any, *, backend: str, cfg: V.Tokens) -> Any:
    """A class chunk's per-position statistics, ``(N, 1, *spatial, 4)``."""
    be, x, z, t = _chunk(xb, tb, backend)
    st = V.token_stats(be, z, None, t, int(C.unwrap(offb)[0]), cfg)
    return be.xp.expand_dims(st.reshape(x.shape[:1] + x.shape[2:] + (4,)), 1)


def _split_finish(stats: list, tb: Any, gb: Any, eb: Any, *, backend: str, cfg: V.Tokens,
                  want_grad: bool) -> Any:
    """A block of positions' :data:`._vocab.TOKEN_FINISHED` columns, ``(N, *spatial, k)``,
    from its class chunks' statistics (a list, one per chunk)."""
    blocks = [C.unwrap(b) for b in stats]
    be = resolve_backend(backend, blocks[0])
    t = be.asarray(C.unwrap(tb))
    shape = tuple(t.shape)
    fin = V.token_finish(be, [b.reshape(-1, 4) for b in blocks], t.reshape(-1), gb, eb, shape,
                         cfg, want_grad)
    return fin.reshape(shape + fin.shape[-1:])


def _split_grad(xb: Any, tb: Any, offb: Any, fb: Any, *, backend: str, cfg: V.Tokens) -> Any:
    """A class chunk's gradient, in the input's dtype."""
    be, x, z, t = _chunk(xb, tb, backend)
    fin = be.asarray(C.unwrap(fb))
    z = V.token_grad(be, z, None, t, fin.reshape(-1, fin.shape[-1]), int(C.unwrap(offb)[0]), cfg)
    return V.from_chunk_rows(z, x.shape).astype(x.dtype, copy=False)


def _class_parallel(be: Runtime, backend: str, x: Any, t: Any, ups: list, opts: dict, *,
                    cdt: Any, want_entropy: bool, want_grad: bool) -> list[Any]:
    """``[logp, entropy?, grad?]`` of logits ``x`` with the class axis in several chunks and
    the checked targets ``t`` chunked as its positions; ``ups``: the upstream gradients'
    blockwise arguments (:func:`_upstream`)."""
    cfg = V.Tokens("token_logprobs", int(x.shape[1]), ignore_value(opts["ignore_index"]),
                   float(opts["temperature"]), float(opts["softcap"] or 0.0),
                   np.dtype(at_least_float32(np.dtype(cdt))).name)
    spatial = C.letters(x.ndim - 2)
    xi, ti = C.BATCH + C.CLASS + spatial, C.BATCH + spatial
    off = (V.class_offsets(x.chunks[1]), C.CLASS)
    stats = da.blockwise(_split_stats, xi + C.STAT, x, xi, t, ti, *off, new_axes={C.STAT: 4},
                         adjust_chunks={C.CLASS: 1}, align_arrays=False,
                         meta=C.meta(be, x.ndim + 1, C.F64), backend=backend, cfg=cfg)
    fin = da.blockwise(_split_finish, ti + C.STAT, stats, xi + C.STAT, t, ti,
                       *(v for u in ups for v in u), adjust_chunks={C.STAT: 6 if want_grad else 2},
                       concatenate=False, align_arrays=False, meta=C.meta(be, x.ndim, C.F64),
                       backend=backend, cfg=cfg, want_grad=want_grad)
    out = [fin[..., k].astype(cfg.stats) for k in range(2 if want_entropy else 1)]
    if want_grad:
        out.append(da.blockwise(_split_grad, xi, x, xi, t, ti, *off, fin, ti + C.STAT,
                                concatenate=False, align_arrays=False,
                                meta=C.meta(be, x.ndim, x.dtype), backend=backend, cfg=cfg))
    return out


# ----------------------------------------------------------------------------- the plan
def plan_token_logprobs(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``token_logprobs``."""
    C.refuse_grad_buffer(spec, v)
    name = C.backend_name(v["backend"])
    x, t = C.as_dask(v["input"]), C.as_dask(v["target"])
    be = C.backend_for(name, x, t)
    check_class_loss(be, spec.name, x, t, None, opts["ignore_index"], allow_probs=False)
    cdt = _args.compute_dtype(be, x.dtype)
    squeeze = x.ndim == 1
    grad_output, grad_entropy = v["grad_output"], v["grad_entropy"]
    if squeeze:  # (C,) -> (1, C); the target and per-position gradients () -> (1,)
        x, t = x[None], t[None]
        grad_output, grad_entropy = (
            g[None] if g is not None and getattr(g, "ndim", 0) == 0 and hasattr(g, "shape")
            else g for g in (grad_output, grad_entropy))
    split = x.numblocks[1] > 1 and V.has_token_ops(be)
    if not split:
        x = x.rechunk({1: -1})
    rows = (x.chunks[0],) + x.chunks[2:]
    spatial = C.letters(x.ndim - 2)
    xi, ti = C.BATCH + C.CLASS + spatial, C.BATCH + spatial
    t = C.checked_targets(t.rechunk(rows), x.shape[1], opts["ignore_index"], name)
    want_entropy, want_grad = bool(v["return_entropy"]), bool(v["return_grad"])
    loss_shape = tuple(x.shape[:1] + x.shape[2:])
    ups = [_upstream(spec.name, what, g, loss_shape, rows, ti) if want_grad else (None, None)
           for what, g in (("grad_output", grad_output), ("grad_entropy", grad_entropy))]
    if split:
        out = _class_parallel(be, name, x, t, ups, opts, cdt=cdt, want_entropy=want_entropy,
                              want_grad=want_grad)
        return results([a[0] for a in out] if squeeze else out)
    stats = at_least_float32(cdt)
    res = [Result(ti, stats), *([Result(ti, stats)] if want_entropy else []),
           *([Result(xi, x.dtype, {C.CLASS: x.shape[1]})] if want_grad else [])]
    out = run_blocks(_block, [(x, xi), (t, ti), *ups], res, be, backend=name, opts=dict(opts),
                     want_entropy=want_entropy, want_grad=want_grad)
    if squeeze:
        out = [a[0] for a in out]
    return results(out)
