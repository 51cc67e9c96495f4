"""Dask plans of nll_loss and cross_entropy.

Arrays are ``(N, C, *spatial)`` (a ``(C,)`` input is one row). The class-index targets are
checked block by block when computed (:func:`._common.checked_targets`); the ``mean``
denominator is a reduction over the targets alone.

- The class axis in one chunk: the generic plan (:mod:`._blockwise`), one call of the family's
  ``execute`` per block.
- ``nll_loss``, the class axis in several chunks: each chunk is an ``nll_loss`` call of its
  own, its targets made local (the chunk's classes, every other target ignored): the chunk
  holding a row's target gives its loss and gradient, the others 0.
- ``cross_entropy``, the class axis in several chunks (vocabulary-parallel): each chunk's row
  statistics, merged over the chunks, finished per row block, then each chunk's gradient
  (:mod:`._vocab`). No row is gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da

from .. import _args
from .._registry import Runtime, resolve_backend
from .._spec import OpSpec
from ..ops._results import at_least_float32, results
from ..ops.class_losses import (
    ClassLossArgs,
    ClassLossLayout,
    canonical_input,
    check_class_loss,
    execute,
    kernel_options,
)
from . import _common as C
from . import _vocab as V
from ._blockwise import Result, loss_plan, run_blocks
from ._stats import merge_chunks


@dataclass(frozen=True)
class _Call:
    """A class-loss call after the checks: ``(N, C, *spatial)`` dask arrays, options."""

    name: str  # the op
    backend: str  # the backend name the tasks resolve
    be: Runtime
    x: Any
    t: Any  # checked int64 indices (N, *spatial) or probabilities (N, C, *spatial)
    w: Any
    probs: bool
    loss_shape: tuple[int, ...]
    reduction: str
    options: dict[str, Any]  # the kernel's keywords: ignore_index, label_smoothing, extensions
    cdt: Any  # the compute dtype

    @property
    def xi(self) -> str:
        return C.BATCH + C.CLASS + C.letters(self.x.ndim - 2)

    @property
    def ti(self) -> str:
        return C.BATCH + C.letters(self.x.ndim - 2)

    def args(self, *, whole_weight: bool = False) -> list[tuple[Any, Any]]:
        """The blockwise arguments ``x``, ``t``, ``w`` (``w`` chunked like the classes, or
        whole)."""
        w = None if self.w is None else self.w.rechunk(-1 if whole_weight else self.x.chunks[1])
        return [(self.x, self.xi), (self.t, self.xi if self.probs else self.ti), C.pair(w, C.CLASS)]


def plan_class_loss(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``nll_loss`` and ``cross_entropy``."""
    C.refuse_grad_buffer(spec, v)
    name = C.backend_name(v["backend"])
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    x, t, w = C.as_dask(v["input"]), C.as_dask(v["target"]), C.as_dask(v["weight"])
    be = C.backend_for(name, x, t, w)
    ignore = opts["ignore_index"]
    layout = check_class_loss(be, spec.name, x, t, w, ignore,
                              allow_probs=spec.name == "cross_entropy")
    squeeze = x.ndim == 1
    if squeeze:  # (C,) -> (1, C); the target () -> (1,)
        x, t = x[None], t[None]
    options = {**kernel_options(spec, opts), "ignore_index": ignore}
    if "label_smoothing" in opts:
        options["label_smoothing"] = opts["label_smoothing"]
    row_chunks = (x.chunks[0],) + x.chunks[2:]
    if layout.probs:
        t = t.rechunk(x.chunks)
        denom: Any = float(math.prod(layout.loss_shape))
    else:
        t = C.checked_targets(t.rechunk(row_chunks), x.shape[1], ignore, name)
        denom = C.mean_denominator(t, w, ignore, be) if reduction == "mean" else 1.0
    c = _Call(spec.name, name, be, x, t, w, layout.probs, layout.loss_shape, reduction,
              options, _args.compute_dtype(be, x.dtype))
    grad = (C.grad_arg(v["grad_output"], reduction, denom, layout.loss_shape, row_chunks, c.ti,
                     be) if v["return_grad"] else None)
    want_lse = bool(v.get("return_lse"))
    if x.numblocks[1] == 1:
        out = _whole(c, denom, grad, want_lse)
    elif spec.name == "nll_loss":
        out = _nll_split(c, denom, grad)
    else:
        out = _ce_split(c, denom, grad, want_lse)
    if squeeze:
        out = [out[0] if reduction != "none" else out[0][0], *(a[0] for a in out[1:])]
    return results(out)


def _canonical(be: Runtime, x: Any, t: Any, w: Any, probs: bool, cdt: Any) -> ClassLossArgs:
    """The kernels' arrays of one block (reshapes and casts only: the call was checked)."""
    shape = tuple(x.shape)
    shape3 = canonical_input(shape)
    target = (_args.to_compute(be, t, cdt).reshape(shape3) if probs
              else be.xp.ascontiguousarray(be.asarray(t)).reshape(shape3[0], shape3[2]))
    return ClassLossArgs(_args.to_compute(be, x, cdt).reshape(shape3), target,
                         None if w is None else _args.to_compute(be, w, cdt),
                         ClassLossLayout(probs, shape, shape3, shape[:1] + shape[2:]), cdt)


# ----------------------------------------------------------------------------- whole classes
def _whole_block(xb: Any, tb: Any, wb: Any, gb: Any, *, op: str, backend: str, probs: bool,
                 options: dict, want_grad: bool, want_lse: bool) -> Any:
    """One block with the whole class axis: one kernel call, unreduced."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    cdt = _args.compute_dtype(be, x.dtype)
    a = _canonical(be, x, C.unwrap(tb), C.unwrap(wb), probs, cdt)
    g = C.rows_grad(be, gb, a.layout.loss_shape) if want_grad else None
    out = execute(be, op, a, reduction="none", options=options, want_grad=want_grad,
                  grad_output=g, grad_buffer=None, want_lse=want_lse)
    if want_grad:
        out[1] = out[1].reshape(x.shape).astype(x.dtype, copy=False)
    return results(out)


def _whole(c: _Call, denom: Any, grad: Any, want_lse: bool) -> list[Any]:
    others = []
    if grad is not None:
        others.append(Result(c.xi, c.x.dtype, {C.CLASS: c.x.shape[1]}))
    if want_lse:
        others.append(Result(c.ti, at_least_float32(c.cdt)))
    return loss_plan(_whole_block, c.args(), be=c.be, loss=Result(c.ti, c.cdt), others=others,
                     reduction=c.reduction, denom=denom, dtype=c.x.dtype, grad=grad,
                     op=c.name, backend=c.backend, probs=c.probs, options=c.options,
                     want_grad=grad is not None, want_lse=want_lse)


def _offsets(c: _Call) -> tuple[Any, str]:
    """Each class chunk's first class, a blockwise argument along the class axis."""
    return V.class_offsets(c.x.chunks[1]), C.CLASS


# ----------------------------------------------------------------------------- nll_loss
def _nll_chunk(xb: Any, tb: Any, wb: Any, offb: Any, gb: Any, *, backend: str, ignore: int,
               want_grad: bool) -> Any:
    """A class chunk as an ``nll_loss`` of its own: ``(partial loss (N, 1, *spatial),
    gradient?)``; targets outside the chunk (or ignored) are ignored (``-1``) there."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    xp = be.xp
    t = be.asarray(C.unwrap(tb))
    local = t - int(C.unwrap(offb)[0])
    local = xp.where((t != ignore) & (local >= 0) & (local < x.shape[1]), local, -1)
    a = _canonical(be, x, local, C.unwrap(wb), False, _args.compute_dtype(be, x.dtype))
    g = C.rows_grad(be, gb, a.layout.loss_shape) if want_grad else None
    out = execute(be, "nll_loss", a, reduction="none", options={"ignore_index": -1},
                  want_grad=want_grad, grad_output=g, grad_buffer=None, want_lse=False)
    out[0] = xp.expand_dims(out[0], 1)
    if want_grad:
        out[1] = out[1].reshape(x.shape).astype(x.dtype, copy=False)
    return results(out)


def _nll_split(c: _Call, denom: Any, grad: Any) -> list[Any]:
    want_grad = grad is not None
    outs = [Result(c.xi, c.cdt, chunks={C.CLASS: 1})]
    if want_grad:
        outs.append(Result(c.xi, c.x.dtype))
    part, *rest = run_blocks(_nll_chunk, [*c.args(), _offsets(c), grad or C.ABSENT], outs, c.be,
                             backend=c.backend, ignore=c.options["ignore_index"],
                             want_grad=want_grad)
    rows = part.astype(C.F64).sum(axis=1)  # one chunk holds each row's term: exact
    return [C.reduce_loss(rows, c.reduction, denom, c.x.dtype, c.be), *rest]


# ----------------------------------------------------------------------------- cross_entropy
def _chunk(be: Runtime, xb: Any, tb: Any, wb: Any, probs: bool) -> tuple[Any, Any, Any]:
    """A class chunk's ``(z, target, weight)`` for the block kernels (float32 at least)."""
    z = V.chunk_rows(be, xb, C.work_dtype(C.unwrap(xb).dtype))
    target = V.chunk_rows(be, tb, z.dtype) if probs else be.xp.ascontiguousarray(
        be.asarray(C.unwrap(tb)).reshape(-1))
    w = C.unwrap(wb)
    return z, target, None if w is None else _args.to_compute(be, w, z.dtype)


def _ce_stats(xb: Any, tb: Any, wb: Any, offb: Any, *, backend: str, cfg: V.Vocab) -> Any:
    """A class chunk's row statistics, ``(N, 1, *spatial, 4)``."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    z, target, w = _chunk(be, x, tb, wb, cfg.probs)
    st = V.stats(be, z, None, target, w, int(C.unwrap(offb)[0]), cfg)
    return be.xp.expand_dims(st.reshape(x.shape[:1] + x.shape[2:] + (4,)), 1)


def _ce_finish(mb: Any, tb: Any, wb: Any, gb: Any, *, backend: str, cfg: V.Vocab,
               want_grad: bool) -> Any:
    """A row block's :data:`._vocab.FINISHED` columns, ``(N, *spatial, k)``."""
    merged = C.unwrap(mb)
    be = resolve_backend(backend, merged)
    shape = merged.shape[:-1]
    w = C.unwrap(wb)
    w = None if w is None else be.asarray(w).astype(C.F64)
    fin = V.finish(be, be.asarray(merged).reshape(-1, 4),
                   None if cfg.probs else be.asarray(C.unwrap(tb)).reshape(-1), w,
                   cfg.n_classes if w is None else w.sum(),
                   C.rows_grad(be, gb, shape).reshape(-1) if want_grad else None, cfg)
    return fin.reshape(shape + fin.shape[-1:])


def _ce_grad(xb: Any, tb: Any, wb: Any, offb: Any, fb: Any, *, backend: str, cfg: V.Vocab,
             out_dtype: Any) -> Any:
    """A class chunk's gradient."""
    x = C.unwrap(xb)
    be = resolve_backend(backend, x)
    z, target, w = _chunk(be, x, tb, wb, cfg.probs)
    fin = be.asarray(C.unwrap(fb))
    z = V.grad(be, z, None, target, w, fin.reshape(-1, fin.shape[-1]), int(C.unwrap(offb)[0]),
               cfg)
    return V.from_chunk_rows(z, x.shape).astype(out_dtype, copy=False)


def _ce_split(c: _Call, denom: Any, grad: Any, want_lse: bool) -> list[Any]:
    opts = c.options
    cfg = V.Vocab(c.probs, c.x.shape[1], opts["ignore_index"], opts.get("label_smoothing", 0.0),
                  opts.get("softcap", 0.0), opts.get("z_loss", 0.0))
    xi, ti, off = c.xi, c.ti, _offsets(c)
    stats = da.blockwise(_ce_stats, xi + C.STAT, *(v for a in c.args() for v in a), *off,
                         new_axes={C.STAT: 4}, adjust_chunks={C.CLASS: 1}, align_arrays=False,
                         meta=C.meta(c.be, c.x.ndim + 1, C.F64), backend=c.backend, cfg=cfg)
    merged = merge_chunks(stats, 1, c.be)
    want_grad = grad is not None
    whole_w = c.args(whole_weight=True)[2]
    fin = da.blockwise(_ce_finish, ti + C.STAT, merged, ti + C.STAT,
                       *((c.t, ti) if not c.probs else C.ABSENT), *whole_w, *(grad or C.ABSENT),
                       adjust_chunks={C.STAT: 6 if want_grad else 2}, concatenate=False,
                       align_arrays=False, meta=C.meta(c.be, c.x.ndim, C.F64), backend=c.backend,
                       cfg=cfg, want_grad=want_grad)
    out = [C.reduce_loss(fin[..., 0], c.reduction, denom, c.x.dtype, c.be)]
    if want_grad:
        out.append(da.blockwise(_ce_grad, xi, *(v for a in c.args() for v in a), *off, fin,
                                ti + C.STAT, concatenate=False, align_arrays=False,
                                meta=C.meta(c.be, c.x.ndim, c.x.dtype), backend=c.backend,
                                cfg=cfg, out_dtype=c.x.dtype))
    if want_lse:
        out.append(fin[..., 1].astype(at_least_float32(c.cdt)))
    return out
