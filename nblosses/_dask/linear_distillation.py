"""Dask plan of linear_distillation_loss: vocabulary-parallel, exact, lazy.

The student's ``input`` ``(..., d)`` and the teacher's ``teacher_input`` are taken as rows
``(N, d)``, ``(N, d_teacher)``, chunked along the batch like the student's; the output layers
``linear_weight`` ``(V, d)`` and ``teacher_weight`` ``(V, d_teacher)`` along the vocabulary
like the student's (features in one chunk); biases and targets follow. The results are those
of the eager call, as lazy dask arrays.

The plan is linear_cross_entropy's (:mod:`.linear_ce`) with a pair of logits blocks per task:
for every (row chunk ``i``, vocabulary chunk ``j``) a task forms both blocks ``x_i @ w_j.T``
and ``tx_i @ tw_j.T`` and reduces them to per-row statistics (the backend's
``linear_distillation_loss.block_stats``), dropping them; a task per row chunk merges them over
``j`` (:func:`nblosses.backends._linear_distillation.merge`). The JSD takes one more round of
block tasks for its sums, which need the rows' logsumexps. A task per row chunk then gives
the losses and the gradient's per-row coefficients (``finish``), and, with a gradient, a task
per ``(i, j)`` recomputes the pair, turns the student's block into ``dL/ds``
(``block_grad``) and returns its three partial products, summed per row chunk (``grad_input``)
and per vocabulary chunk (``grad_linear_weight``, ``grad_linear_bias``). No task holds more
than one pair of ``(rows_i, V_j)`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from dask.base import tokenize

from .. import _args
from .._registry import Runtime, resolve_backend
from .._spec import OpSpec
from ..backends import _linear_distillation as LD
from ..errors import UnsupportedOpError
from ..ops._results import results
from ..ops.linear_distillation import check_linear_distillation
from . import _common as C
from .linear_ce import _Graph

#: The columns of a finished row chunk: the loss, then (with a gradient) :data:`LD.COEFS`.
_LOSS = 0


def _block_op(be: Runtime, name: str) -> Callable[..., Any]:
    """The backend's block operation ``name`` (an attribute of its kernel)."""
    op = getattr(be.kernel("linear_distillation_loss"), name, None)
    if op is None:
        raise UnsupportedOpError(f"backend {be.name!r}: its linear_distillation_loss kernel "
                                 f"has no {name}, which dask arrays need")
    return op


def _pair(be: Runtime, x: Any, w: Any, tx: Any, tw: Any) -> tuple[Any, Any]:
    """Both heads' logits blocks (raw products), C-contiguous."""
    return be.xp.matmul(x, w.T), be.xp.matmul(tx, tw.T)


# ----------------------------------------------------------------------------- block tasks
def _stats_block(x: Any, w: Any, b: Any, tx: Any, tw: Any, tb: Any, t: Any, c0: int,
                 backend: str, opts: LD.DistillOptions, n_classes: int) -> Any:
    """Row statistics ``(R, 7)`` of the block pair (classes ``c0:``)."""
    be = resolve_backend(backend, x)
    zs, zt = _pair(be, x, w, tx, tw)
    return _block_op(be, "block_stats")(zs, zt, b, tb, t, opts, c0=c0, n_classes=n_classes)


def _merged(stats: list, backend: str, opts: LD.DistillOptions) -> Any:
    """A row chunk's statistics merged over its vocabulary chunks."""
    xp = resolve_backend(backend, stats[0]).xp
    acc = LD.new_stats(xp, stats[0].shape[0])
    for st in stats:
        LD.merge(xp, acc, st, opts)
    return acc


def _jsd_block(x: Any, w: Any, b: Any, tx: Any, tw: Any, tb: Any, merged: Any,
               backend: str, opts: LD.DistillOptions) -> Any:
    """The JSD's sums ``(R, 2)`` of the block pair, given its rows' merged statistics."""
    be = resolve_backend(backend, x)
    zs, zt = _pair(be, x, w, tx, tw)
    lse = be.xp.stack(LD.log_sums(be.xp, merged, opts), axis=1)
    out = be.xp.zeros((zs.shape[0], 2), C.F64)
    _block_op(be, "block_jsd")(zs, zt, b, tb, lse, out, opts, raw=True)
    return out


def _finish(merged: Any, jsd: list | None, t: Any, g: Any, backend: str,
            opts: LD.DistillOptions, n_classes: int, want_grad: bool) -> Any:
    """The row chunk's loss (column 0) and, with a gradient, its coefficients."""
    be = resolve_backend(backend, merged)
    xp = be.xp
    sums = None if jsd is None else sum(jsd[1:], jsd[0])
    scale = C.rows_grad(be, g, merged.shape[:1]) if want_grad else None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        loss, coefs = LD.finish(xp, merged, sums, C.unwrap(t), n_classes, opts, scale, want_grad)
    return loss[:, None] if coefs is None else xp.concatenate([loss[:, None], coefs], axis=1)


def _grad_block(x: Any, w: Any, b: Any, tx: Any, tw: Any, tb: Any, t: Any, fin: Any, c0: int,
                backend: str, opts: LD.DistillOptions) -> tuple[Any, Any, Any]:
    """``(g @ w, g.T @ x, g.sum(0))`` of the student's block gradient ``g = dL/ds``."""
    be = resolve_backend(backend, x)
    zs, zt = _pair(be, x, w, tx, tw)
    coefs = be.xp.ascontiguousarray(fin[:, 1:])
    _block_op(be, "block_grad")(zs, zt, b, tb, t, coefs, opts, c0=c0, raw=True)
    return zs @ w, zs.T @ x, zs.sum(0, dtype=C.F64)


# ----------------------------------------------------------------------------- the graph
class _PairGraph(_Graph):
    """linear_cross_entropy's graph (its keys, references and loss) with the teacher's head
    beside the student's in every block task."""

    def __init__(self, be: Runtime, backend: str, student: tuple, teacher: tuple, t: Any,
                 opts: LD.DistillOptions) -> None:
        x, w, b = student
        cfg: Any = opts  # the base graph's cfg slot: in its token (no block_args read it here)
        super().__init__(be, backend, x, w, b, t, None, cfg)
        self.opts = opts
        self.tx, self.tw, self.tb = teacher
        self.token = tokenize(self.token, *teacher)  # the student's token names its tasks
        self.n_classes = int(w.shape[0])

    def name(self, what: str) -> str:
        return f"linear-distill-{what}-{self.token}"

    def pair_args(self, i: int, j: int) -> tuple:
        """``(x_i, w_j, b_j, tx_i, tw_j, tb_j)`` keys of block ``(i, j)``."""
        return (self.ref(self.x, i, 0), self.ref(self.w, j, 0), self.ref(self.bias, j),
                self.ref(self.tx, i, 0), self.ref(self.tw, j, 0), self.ref(self.tb, j))

    def finish(self, g: Any, want_grad: bool) -> None:
        """The statistics (and JSD) tasks and each row chunk's finishing task."""
        self.key_on(g, want_grad)
        st, merged, jsd, fin = (self.name(k) for k in ("stats", "merged", "jsd", "rows"))
        nj = len(self.cols)
        for i in range(len(self.rows)):
            ti = self.ref(self.t, i)
            for j in range(nj):
                self.dsk[(st, i, j)] = (_stats_block, *self.pair_args(i, j), ti, self.c0s[j],
                                        self.backend, self.opts, self.n_classes)
            self.dsk[(merged, i)] = (_merged, [(st, i, j) for j in range(nj)], self.backend,
                                     self.opts)
            sums = None
            if self.opts.mode == LD.JSD:
                for j in range(nj):
                    self.dsk[(jsd, i, j)] = (_jsd_block, *self.pair_args(i, j), (merged, i),
                                             self.backend, self.opts)
                sums = [(jsd, i, j) for j in range(nj)]
            gi = self.ref(g, i) if getattr(g, "ndim", 0) == 1 else self.ref(g)
            self.dsk[(fin, i)] = (_finish, (merged, i), sums, ti, gi, self.backend, self.opts,
                                  self.n_classes, want_grad)

    def grad_task(self, i: int, j: int, finished: Any) -> tuple:
        return (_grad_block, *self.pair_args(i, j), self.ref(self.t, i), finished, self.c0s[j],
                self.backend, self.opts)


# ----------------------------------------------------------------------------- the plan
def plan_linear_distillation(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``linear_distillation_loss``."""
    name = C.backend_name(v["backend"])
    keys = ("input", "linear_weight", "linear_bias", "teacher_input", "teacher_weight",
            "teacher_bias", "target")
    x, w, b, tx, tw, tb, t = (C.as_dask(v[k]) for k in keys)
    be = C.backend_for(name, x, w, b, tx, tw, tb, t)
    lay = check_linear_distillation(be, spec.name, x, w, b, tx, tw, tb, t, opts["hard_weight"])
    reduction = _args.reduction_from(None, None, v["reduction"])
    ignore = opts["ignore_index"]
    cdt = _args.compute_dtype(be, x.dtype)
    xc = x.astype(cdt).reshape(lay.rows, lay.d).rechunk({1: -1})
    wc = w.astype(cdt).rechunk({1: -1})
    rows, cols = xc.chunks[0], wc.chunks[0]
    txc = tx.astype(cdt).reshape(lay.rows, lay.d_teacher).rechunk((rows, -1))
    twc = tw.astype(cdt).rechunk((cols, -1))
    bias = [None if a is None else a.astype(cdt).rechunk((cols,)) for a in (b, tb)]
    if t is not None:
        t = C.checked_targets(t.reshape(lay.rows).rechunk((rows,)), lay.v, ignore, name)
    cfg = LD.DistillOptions(opts["beta"], opts["temperature"], opts["hard_weight"],
                            opts["softcap"], ignore)
    graph = _PairGraph(be, name, (xc, wc, bias[0]), (txc, twc, bias[1]), t, cfg)
    denom: Any = 1.0
    if reduction == "mean":
        denom = float(lay.rows) if t is None else C.mean_denominator(t, None, ignore, be)
    want_grad = bool(v["return_grad"])
    g = (C.grad_arg(v["grad_output"], reduction, denom, lay.loss_shape, (rows,), "a", be)[0]
         if want_grad else None)
    graph.finish(g, want_grad)
    loss = graph.loss(reduction, denom, x.dtype)
    out: list[Any] = [loss.reshape(lay.loss_shape) if reduction == "none" else loss]
    if want_grad:
        gx, gw, gb = graph.gradients(x.dtype)
        out.append((gx.reshape(x.shape), gw, gb))
    return results(out)
