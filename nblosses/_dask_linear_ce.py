"""``linear_cross_entropy`` on dask arrays: vocabulary-parallel, exact, lazy.

Takes the kernel protocol's canonical arguments as dask arrays (NumPy chunks): ``x`` ``(N, d)``
chunked along the batch, ``w`` ``(V, d)`` along the vocabulary (``d`` in one chunk each; they
are rechunked to that if needed), ``bias`` / ``weight`` ``(V,)``, ``target`` ``(N,)`` class
indices or ``(N, V)`` probabilities (rechunked to match). Returns ``(loss, lse, grads)`` as
lazy dask arrays, the same values as the CPU kernel.

The algorithm is Megatron's vocabulary-parallel cross-entropy. For every (row chunk ``i``,
vocabulary chunk ``j``) a task computes the logits block ``x_i @ w_j.T`` and reduces it to
per-row statistics (max ``m``, ``s = sum exp(z - m)``, the target's logit when ``j`` holds the
target class, smoothing / probability sums), and drops the block. A task per row chunk merges
them exactly over ``j`` (``M = max m_j``, ``S = sum s_j exp(m_j - M)``, the rest summed) into
losses and the gradient's per-row coefficients. With a gradient, a second task per ``(i, j)``
recomputes the block, turns it into ``dL/dz`` and returns its three partial products, summed
per row chunk (``grad_x``) and per vocabulary chunk (``grad_w``, ``grad_bias``). No task holds
more than one ``(rows_i, V_j)`` block, and the ``mean`` denominator is its own reduction over
the targets.

Routing: :mod:`nblosses._dask` sends ``linear_cross_entropy`` calls with any dask argument to
:func:`linear_cross_entropy` after canonicalising the arguments as for the eager kernel.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .backends import _linear_ce as G
from .backends.cpu import linear_ce_kernels as K


# ----------------------------------------------------------------------------- block tasks
def _stats_block(x, w, bias, t, weight, c0: int, eps: float, cap: float, v: int):
    """Per-row statistics of the block ``x @ w.T`` (columns ``c0:c0+len(w)``): ``(R, 4)``."""
    z = np.matmul(x, w.T)
    st = np.zeros((4, x.shape[0]), np.float64)
    st[0] = -np.inf
    if t.ndim == 2:
        K.stats_probs(z, bias, cap, t, weight, 1.0 - eps, eps / v, st[0], st[1], st[2], st[3])
    else:
        K.stats_class(z, bias, cap, t, c0, weight, eps > 0, st[0], st[1], st[2], st[3])
    return st.T.copy()


def _merge(stats: list) -> dict:
    """Exact merge over vocabulary chunks of ``(R, 4)`` statistics."""
    a = np.stack(stats)  # (J, R, 4)
    m = a[:, :, 0].max(0)
    s = (a[:, :, 1] * np.exp(a[:, :, 0] - m)).sum(0)
    rest = a[:, :, 2:].sum(0)
    return {"m": m, "s": s, "r2": rest[:, 0], "r3": rest[:, 1]}


def _row_finish(stats: list, t, weight, denom, cfg: dict, g):
    """``(loss, lse, coef, b, a, m)`` of one row chunk (``m``: the merged max)."""
    st = _merge(stats)
    w_total = float(cfg["v"] if weight is None else weight.sum(dtype=np.float64))
    scale: Any = 0.0
    if cfg["want_grad"]:
        scale = G.upstream_scale(cfg["reduction"], g, float(denom))
        if cfg["reduction"] == "none":
            scale = np.asarray(g, np.float64)
    if cfg["probs"]:
        st = {"m": st["m"], "s": st["s"], "a_sum": st["r2"], "b_sum": st["r3"]}
        out = G.finish_probs(np, st, cfg["z_loss"], scale, cfg["want_grad"])
    else:
        st = {"m": st["m"], "s": st["s"], "xt": st["r2"], "swx": st["r3"]}
        out = G.finish_class(np, st, t, weight, cfg["ignore"], cfg["eps"], cfg["v"],
                             w_total, cfg["z_loss"], scale, cfg["want_grad"])
    return (*out, st["m"])


def _grad_block(x, w, bias, t, weight, fin, c0: int, cfg: dict):
    """``(g @ w, g.T @ x, g.sum(0))`` of the block's gradient ``g = dL/dz``."""
    _, _, coef, b, a, m = fin
    z = np.matmul(x, w.T)
    eps, cap, v = cfg["eps"], cfg["cap"], cfg["v"]
    if cfg["probs"]:
        K.grad_probs(z, bias, cap, True, t, weight, 1.0 - eps, eps / v, m, coef, b)
    else:
        K.grad_class(z, bias, cap, True, t, c0, cfg["ignore"], weight, m, coef, b, a)
    return z @ w, z.T @ x, z.sum(0, dtype=np.float64)


def _denominator(ts: list, weight, ignore) -> float:
    return sum(G.mean_denominator(np, t, weight, ignore) for t in ts)


def _pick(part: tuple, k: int, dtype):
    return np.asarray(part[k], dtype)


def _sum_parts(parts: list, k: int, dtype):
    total = parts[0][k].astype(np.float64 if k == 2 else parts[0][k].dtype, copy=True)
    for p in parts[1:]:
        total += p[k]
    return total.astype(dtype, copy=False)


def _total(fins: list, denom, reduction: str, dtype):
    total = sum(float(f[0].sum()) for f in fins)
    if reduction == "mean":
        d = float(denom)
        total = total / d if d != 0 else math.nan
    return np.asarray(total, dtype)


# ----------------------------------------------------------------------------- the graph
class _Graph:
    """Task keys and the shared task dict of one call."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.dsk: dict = {}
        self.deps: list = []

    def name(self, what: str) -> str:
        return f"linear-ce-{what}-{self.token}"

    def array(self, what: str, chunks: tuple, dtype) -> da.Array:
        name = self.name(what)
        graph = HighLevelGraph.from_collections(name, dict(self.dsk), dependencies=self.deps)
        return da.Array(graph, name, chunks=chunks, dtype=dtype)


def _key(a, *index):
    return None if a is None else (a.name, *index)


def _prepare(x, w, bias, target, weight, grad_output, reduction):
    """Rechunk to the layout of the graph: ``d`` whole, rows of ``x``, classes of ``w``."""
    x = da.asarray(x).rechunk({1: -1})
    w = da.asarray(w).rechunk({1: -1})
    rows, cols = x.chunks[0], w.chunks[0]
    target = da.asarray(target)
    target = target.rechunk((rows, cols) if target.ndim == 2 else (rows,))
    bias = None if bias is None else da.asarray(bias).rechunk((cols,))
    w_cols = w_full = None
    if weight is not None:
        w_cols, w_full = da.asarray(weight).rechunk((cols,)), da.asarray(weight).rechunk(-1)
    if reduction == "none" and grad_output is not None:
        grad_output = da.asarray(grad_output).rechunk((rows,))
    return x, w, bias, target, w_cols, w_full, grad_output


def linear_cross_entropy(x, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse):
    """The kernel protocol's ``linear_cross_entropy`` on dask arrays (see the module doc)."""
    x, w2, bias, target, w_cols, w_full, go = _prepare(x, w2, bias, target, weight,
                                                       grad_output, reduction)
    dtype = x.dtype
    probs = target.ndim == 2
    rows, cols = x.chunks[0], w2.chunks[0]
    c0s = np.concatenate([[0], np.cumsum(cols)]).tolist()
    v = int(w2.shape[0])
    cfg = dict(probs=probs, ignore=None if probs else int(ignore_index),
               eps=float(label_smoothing), cap=float(softcap), z_loss=float(z_loss), v=v,
               want_grad=want_grad, reduction=reduction)
    gr = _Graph(tokenize(x, w2, bias, target, weight, go, cfg, want_lse))
    gr.deps = [a for a in (x, w2, bias, target, w_cols, w_full, go) if isinstance(a, da.Array)]
    st, fin, den = gr.name("stats"), gr.name("rows"), gr.name("denom")

    def tkey(i, j):
        return (target.name, i, j) if probs else (target.name, i)

    for i in range(len(rows)):
        for j in range(len(cols)):
            gr.dsk[(st, i, j)] = (_stats_block, (x.name, i, 0), (w2.name, j, 0),
                                  _key(bias, j), tkey(i, j), _key(w_cols, j), c0s[j],
                                  cfg["eps"], cfg["cap"], v)
    if reduction == "mean" and not probs:
        gr.dsk[(den,)] = (_denominator, [(target.name, i) for i in range(len(rows))],
                          _key(w_full, 0), cfg["ignore"])
    else:
        gr.dsk[(den,)] = float(x.shape[0]) if reduction == "mean" else 1.0
    for i in range(len(rows)):
        g = _key(go, i) if reduction == "none" else (grad_output if want_grad else 0.0)
        gr.dsk[(fin, i)] = (_row_finish, [(st, i, j) for j in range(len(cols))],
                            None if probs else (target.name, i), _key(w_full, 0), (den,), cfg,
                            g)
    loss, lse = _loss_and_lse(gr, rows, reduction, dtype, want_lse)
    grads = _gradients(gr, x, w2, bias, target, w_cols, cfg, c0s, dtype) if want_grad else None
    return loss, lse, grads


def _loss_and_lse(gr: _Graph, rows: tuple, reduction: str, dtype, want_lse: bool):
    fin, n = gr.name("rows"), len(rows)
    name = gr.name("loss")
    if reduction == "none":
        for i in range(n):
            gr.dsk[(name, i)] = (_pick, (fin, i), 0, dtype)
        loss = gr.array("loss", (rows,), dtype)
    else:
        gr.dsk[(name,)] = (_total, [(fin, i) for i in range(n)], (gr.name("denom"),), reduction,
                           dtype)
        loss = gr.array("loss", (), dtype)
    lse = None
    if want_lse:
        for i in range(n):
            gr.dsk[(gr.name("lse"), i)] = (_pick, (fin, i), 1, dtype)
        lse = gr.array("lse", (rows,), dtype)
    return loss, lse


def _gradients(gr: _Graph, x, w2, bias, target, w_cols, cfg: dict, c0s: list, dtype):
    rows, cols = x.chunks[0], w2.chunks[0]
    ni, nj = len(rows), len(cols)
    part, fin = gr.name("part"), gr.name("rows")
    for i in range(ni):
        for j in range(nj):
            t = (target.name, i, j) if cfg["probs"] else (target.name, i)
            gr.dsk[(part, i, j)] = (_grad_block, (x.name, i, 0), (w2.name, j, 0),
                                    _key(bias, j), t, _key(w_cols, j), (fin, i), c0s[j], cfg)
    for i in range(ni):
        gr.dsk[(gr.name("gx"), i, 0)] = (_sum_parts, [(part, i, j) for j in range(nj)], 0,
                                         dtype)
    for j in range(nj):
        parts = [(part, i, j) for i in range(ni)]
        gr.dsk[(gr.name("gw"), j, 0)] = (_sum_parts, parts, 1, dtype)
        gr.dsk[(gr.name("gb"), j)] = (_sum_parts, parts, 2, dtype)
    d = x.shape[1]
    gx = gr.array("gx", (rows, (d,)), dtype)
    gw = gr.array("gw", (cols, (d,)), dtype)
    gb = gr.array("gb", (cols,), dtype) if bias is not None else None
    return gx, gw, gb
