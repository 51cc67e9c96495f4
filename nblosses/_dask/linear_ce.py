"""Dask plan of linear_cross_entropy: vocabulary-parallel, exact, lazy.

``input`` ``(N, d)`` is chunked along the batch, ``linear_weight`` ``(V, d)`` along the
vocabulary (``d`` in one chunk each; they are rechunked to that if needed); ``linear_bias`` and
``weight`` ``(V,)`` and the target (``(N,)`` class indices or ``(N, V)`` probabilities) are
rechunked to match. The results are those of the eager call, as lazy dask arrays.

The algorithm is Megatron's vocabulary-parallel cross-entropy, on the blocks of
:mod:`._vocab`. For every (row chunk ``i``, vocabulary chunk ``j``) a task computes the logits
block ``x_i @ w_j.T`` (the backend's product) and reduces it to per-row statistics, dropping
the block. A task per row chunk merges them over ``j`` exactly (:mod:`._stats`) into losses
and the gradient's per-row coefficients. With a gradient, a task per ``(i, j)`` recomputes the
block, turns it into ``dL/dz`` and returns its three partial products, summed per row chunk
(``grad_x``) and per vocabulary chunk (``grad_w``, ``grad_bias``). No task holds more than one
``(rows_i, V_j)`` block, and the ``mean`` denominator is its own reduction over the targets.
Every task runs on the backend its blocks resolve to (``backend=``, or by array type).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import _args
from .._registry import Runtime, resolve_backend
from .._spec import OpSpec
from ..ops._results import results
from ..ops.linear_ce import check_linear_ce
from . import _common as C
from . import _vocab as V
from ._stats import merge


# ----------------------------------------------------------------------------- block tasks
def _stats_block(x: Any, w: Any, bias: Any, t: Any, weight: Any, c0: int, backend: str,
                 cfg: V.Vocab) -> Any:
    """Row statistics ``(R, 4)`` of the logits block ``x @ w.T`` (classes ``c0:``)."""
    be = resolve_backend(backend, x)
    return V.stats(be, be.xp.matmul(x, w.T), bias, t, weight, c0, cfg)


def _row_finish(stats: list, t: Any, weight: Any, g: Any, backend: str, cfg: V.Vocab,
                want_grad: bool) -> Any:
    """A row chunk's :data:`._vocab.FINISHED` columns from its blocks' statistics."""
    be = resolve_backend(backend, stats[0])
    merged = merge(be.xp.stack(stats), axis=0)
    w = None if weight is None else weight.astype(C.F64)
    return V.finish(be, merged, None if cfg.probs else t, w,
                    cfg.n_classes if w is None else w.sum(),
                    C.rows_grad(be, g, merged.shape[:1]) if want_grad else None, cfg)


def _grad_block(x: Any, w: Any, bias: Any, t: Any, weight: Any, fin: Any, c0: int,
                backend: str, cfg: V.Vocab) -> tuple[Any, Any, Any]:
    """``(g @ w, g.T @ x, g.sum(0))`` of the block's gradient ``g = dL/dz``."""
    be = resolve_backend(backend, x)
    z = V.grad(be, be.xp.matmul(x, w.T), bias, t, weight, fin, c0, cfg)
    return z @ w, z.T @ x, z.sum(0, dtype=C.F64)


def _pick(fin: Any, k: int, dtype: Any) -> Any:
    return fin[:, k].astype(dtype)


def _sum_parts(parts: list, k: int, dtype: Any) -> Any:
    total = parts[0][k].astype(C.F64 if k == 2 else parts[0][k].dtype, copy=True)
    for p in parts[1:]:
        total += p[k]
    return total.astype(dtype, copy=False)


def _total(fins: list, denom: Any, mean: bool, dtype: Any) -> Any:
    total = sum(f[:, 0].sum() for f in fins)
    return C.divide(total, denom if mean else 1.0, dtype)


# ----------------------------------------------------------------------------- the graph
class _Graph:
    """The task dict of one call, its keys and dependencies."""

    def __init__(self, be: Runtime, backend: str, x: Any, w: Any, bias: Any, t: Any,
                 weight: Any, cfg: V.Vocab) -> None:
        self.be, self.backend, self.cfg = be, backend, cfg
        self.x, self.w, self.bias, self.t = x, w, bias, t
        self.rows, self.cols = x.chunks[0], w.chunks[0]
        self.c0s = np.concatenate([[0], np.cumsum(self.cols)]).astype(int).tolist()
        self.w_cols = None if weight is None else weight.rechunk((self.cols,))
        self.w_full = None if weight is None else weight.rechunk(-1)
        self.token = tokenize(x, w, bias, t, weight, cfg, backend)
        self.dsk: dict = {}
        self.deps: list = []  # the dask arrays whose keys the tasks name (see ref)

    def name(self, what: str) -> str:
        return f"linear-ce-{what}-{self.token}"

    def ref(self, a: Any, *index: int) -> Any:
        """A task argument for ``a``: its block's key (and ``a`` a dependency) if it is a dask
        array, else ``a`` itself."""
        if not C.is_dask(a):
            return a
        if all(a is not d for d in self.deps):
            self.deps.append(a)
        return (a.name, *index)

    def array(self, what: str, chunks: tuple, dtype: Any) -> Any:
        name = self.name(what)
        graph = HighLevelGraph.from_collections(name, dict(self.dsk), dependencies=self.deps)
        return da.Array(graph, name, chunks=chunks, meta=C.meta(self.be, len(chunks), dtype))

    def block_args(self, i: int, j: int) -> tuple:
        """``(x_i, w_j, bias_j, target, weight_j)`` keys of block ``(i, j)``."""
        t = self.ref(self.t, i, j) if self.cfg.probs else self.ref(self.t, i)
        return (self.ref(self.x, i, 0), self.ref(self.w, j, 0), self.ref(self.bias, j), t,
                self.ref(self.w_cols, j))

    def key_on(self, *values: Any) -> None:
        """Name every task from now on after ``values`` too: the call's options that its
        arrays do not hold (the upstream gradient, whether there is one), so that two calls
        differing only in them never share a key (one graph's tasks would replace the
        other's when both are computed together)."""
        self.token = tokenize(self.token, *values)

    def finish(self, g: Any, want_grad: bool) -> None:
        """The statistics tasks and each row chunk's finishing task (``g``: the upstream
        gradient: rows (a dask array), a scale, or ``None``)."""
        self.key_on(g, want_grad)
        st, fin = self.name("stats"), self.name("rows")
        for i in range(len(self.rows)):
            for j in range(len(self.cols)):
                self.dsk[(st, i, j)] = (_stats_block, *self.block_args(i, j), self.c0s[j],
                                        self.backend, self.cfg)
            gi = self.ref(g, i) if C.is_dask(g) and g.ndim == 1 else self.ref(g)
            self.dsk[(fin, i)] = (_row_finish, [(st, i, j) for j in range(len(self.cols))],
                                  None if self.cfg.probs else self.ref(self.t, i),
                                  self.ref(self.w_full, 0), gi, self.backend, self.cfg,
                                  want_grad)

    def loss(self, reduction: str, denom: Any, dtype: Any) -> Any:
        fin, name = self.name("rows"), self.name(f"loss-{reduction}")
        n = len(self.rows)
        if reduction == "none":
            for i in range(n):
                self.dsk[(name, i)] = (_pick, (fin, i), 0, dtype)
            return self.array(f"loss-{reduction}", (self.rows,), dtype)
        self.dsk[(name,)] = (_total, [(fin, i) for i in range(n)], self.ref(denom),
                             reduction == "mean", dtype)
        return self.array(f"loss-{reduction}", (), dtype)

    def lse(self, dtype: Any) -> Any:
        fin = self.name("rows")
        for i in range(len(self.rows)):
            self.dsk[(self.name("lse"), i)] = (_pick, (fin, i), 1, dtype)
        return self.array("lse", (self.rows,), dtype)

    def grad_task(self, i: int, j: int, finished: Any) -> tuple:
        """The task of block ``(i, j)``'s gradient parts, given its rows' finished
        statistics."""
        return (_grad_block, *self.block_args(i, j), finished, self.c0s[j], self.backend,
                self.cfg)

    def gradients(self, dtype: Any) -> tuple[Any, Any, Any]:
        """``(grad_input, grad_weight, grad_bias)``: each block's parts (:meth:`grad_task`),
        summed over the vocabulary blocks (input) and the row blocks (weight, bias)."""
        ni, nj = len(self.rows), len(self.cols)
        part, fin = self.name("part"), self.name("rows")
        for i in range(ni):
            for j in range(nj):
                self.dsk[(part, i, j)] = self.grad_task(i, j, (fin, i))
        for i in range(ni):
            self.dsk[(self.name("gx"), i, 0)] = (_sum_parts, [(part, i, j) for j in range(nj)],
                                                 0, dtype)
        for j in range(nj):
            parts = [(part, i, j) for i in range(ni)]
            self.dsk[(self.name("gw"), j, 0)] = (_sum_parts, parts, 1, dtype)
            self.dsk[(self.name("gb"), j)] = (_sum_parts, parts, 2, dtype)
        d = self.x.shape[1]
        return (self.array("gx", (self.rows, (d,)), dtype),
                self.array("gw", (self.cols, (d,)), dtype),
                self.array("gb", (self.cols,), dtype) if self.bias is not None else None)


# ----------------------------------------------------------------------------- the plan
def plan_linear_ce(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``linear_cross_entropy``."""
    name = C.backend_name(v["backend"])
    x, w, t = C.as_dask(v["input"]), C.as_dask(v["linear_weight"]), C.as_dask(v["target"])
    b, cw = C.as_dask(v["linear_bias"]), C.as_dask(v["weight"])
    be = C.backend_for(name, x, w, t, b, cw)
    lay = check_linear_ce(be, spec.name, x, w, t, b, cw, opts["ignore_index"])
    if lay.out_features or lay.squeeze:
        raise NotImplementedError(f"{spec.name}: dask arrays take (N, d) input and a (V, d) "
                                  f"linear_weight (no K-dimensional loss, no single row)")
    reduction = _args.reduction_from(None, None, v["reduction"])
    ignore = -100 if opts["ignore_index"] is None else opts["ignore_index"]
    cdt = _args.compute_dtype(be, x.dtype)
    xc, wc = x.astype(cdt).rechunk({1: -1}), w.astype(cdt).rechunk({1: -1})
    rows, cols = xc.chunks[0], wc.chunks[0]
    t = (t.astype(cdt).rechunk((rows, cols)) if lay.probs
         else C.checked_targets(t.rechunk((rows,)), lay.v, ignore, name))
    cw = None if cw is None else cw.astype(cdt)
    cfg = V.Vocab(lay.probs, lay.v, ignore, opts["label_smoothing"], opts["softcap"],
                  opts["z_loss"])
    graph = _Graph(be, name, xc, wc, None if b is None else b.astype(cdt).rechunk((cols,)), t,
                   cw, cfg)
    denom: Any = 1.0
    if reduction == "mean":
        denom = float(lay.n) if lay.probs else C.mean_denominator(t, cw, ignore, be)
    want_grad = bool(v["return_grad"])
    g = (C.grad_arg(v["grad_output"], reduction, denom, (lay.n,), (rows,), "a", be)[0]
         if want_grad else None)
    graph.finish(g, want_grad)
    out: list[Any] = [graph.loss(reduction, denom, x.dtype)]
    if want_grad:
        out.append(graph.gradients(x.dtype))
    if v["return_lse"]:
        out.append(graph.lse(cdt))
    return results(out)
