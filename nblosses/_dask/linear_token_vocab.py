"""Dask plan of linear_token_logprobs with the vocabulary in chunks: vocabulary-parallel, exact,
lazy.

Taken when ``linear_weight`` ``(V, d)`` comes in several chunks along the vocabulary (one chunk:
the rows plan of :mod:`.linear_token_statistics`, the whole output layer in every task). The
rows ``(N, d)`` are chunked along the batch as given, the weight along the vocabulary as
given (features in one chunk each); the bias follows the weight's chunks, the targets and
array-valued upstream gradients the rows'. The results are those of the eager call, as lazy
dask arrays.

The plan is linear_distillation_loss's (:mod:`.linear_distillation`), on linear_cross_entropy's
graph (:mod:`.linear_ce`): for every (row chunk ``i``, vocabulary chunk ``j``) a task forms the
logits block ``x_i @ w_j.T`` and reduces it to per-row statistics by the backend's
``linear_token_logprobs.block_stats`` (the block's max ``m``, ``s = sum e``, ``q = sum e d``
with ``d`` the tempered shift from ``m``, and the target's logit where the block holds it),
dropping the block; a task per row chunk merges them over ``j`` exactly
(:func:`nblosses.backends._linear_token_logprobs.merge`) and finishes the rows: their
log-probabilities, entropies and the gradient's per-row coefficients (``finish``). With a
gradient, a task per ``(i, j)`` recomputes the block, turns it into ``dL/dz``
(``block_grad``: the backend's one statement of the gradient, soft cap included) and returns
its three partial products, summed per row chunk (``grad_input``) and per vocabulary chunk
(``grad_linear_weight``, ``grad_linear_bias``). No task holds more than one ``(rows_i, V_j)``
block.

The three block steps are :mod:`._vocab`'s (``token_stats``, ``token_finish``, ``token_grad``),
which token_logprobs' class-parallel plan (:mod:`.token_statistics`) runs on chunks of logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._registry import Runtime, resolve_backend
from ..backends._host import ignore_value
from ..ops._results import at_least_float32
from . import _vocab as V
from ._common import F64, unwrap
from .linear_ce import _Graph, _pick

NAME = "linear_token_logprobs"
FINISHED = V.TOKEN_FINISHED


# ----------------------------------------------------------------------------- block tasks
def _stats_block(x: Any, w: Any, b: Any, t: Any, c0: int, backend: str, cfg: V.Tokens) -> Any:
    """Row statistics ``(R, 4)`` (:func:`._vocab.token_stats`) of the logits block
    ``x @ w.T`` (classes ``c0:``)."""
    be = resolve_backend(backend, x)
    return V.token_stats(be, be.xp.matmul(x, w.T), b, t, c0, cfg)


def _finish(stats: list, t: Any, go: Any, ge: Any, backend: str, cfg: V.Tokens,
            want_grad: bool) -> Any:
    """A row chunk's :data:`FINISHED` columns (the first two without a gradient) from its
    blocks' statistics (:func:`._vocab.token_finish`)."""
    be = resolve_backend(backend, stats[0])
    return V.token_finish(be, stats, unwrap(t), go, ge, stats[0].shape[:1], cfg, want_grad)


def _grad_block(x: Any, w: Any, b: Any, t: Any, fin: Any, c0: int, backend: str,
                cfg: V.Tokens) -> tuple[Any, Any, Any]:
    """``(g @ w, g.T @ x, g.sum(0))`` of the block's gradient ``g = dL/dz``."""
    be = resolve_backend(backend, x)
    z = V.token_grad(be, be.xp.matmul(x, w.T), b, t, fin, c0, cfg)
    return z @ w, z.T @ x, z.sum(0, dtype=F64)


# ----------------------------------------------------------------------------- the graph
class _TokenGraph(_Graph):
    """linear_cross_entropy's graph (its keys, references and gradient sums) with this op's
    block tasks and per-row results."""

    def __init__(self, be: Runtime, backend: str, x: Any, w: Any, b: Any, t: Any,
                 cfg: V.Tokens) -> None:
        base: Any = cfg  # the base graph's cfg slot: in its token (no block_args read it here)
        super().__init__(be, backend, x, w, b, t, None, base)
        self.opts = cfg

    def name(self, what: str) -> str:
        return f"linear-token-logprobs-{what}-{self.token}"

    def block(self, i: int, j: int) -> tuple:
        """``(x_i, w_j, b_j, t_i)`` keys of block ``(i, j)``."""
        return (self.ref(self.x, i, 0), self.ref(self.w, j, 0), self.ref(self.bias, j),
                self.ref(self.t, i))

    def finish(self, ups: tuple, want_grad: bool) -> None:
        """The statistics tasks and each row chunk's finishing task; ``ups``: the upstream
        gradients ``(grad_output, grad_entropy)``, each ``None``, a scalar, a 0-d dask array
        or a dask array of the rows."""
        self.key_on(*ups, want_grad)
        st, fin = self.name("stats"), self.name("rows")
        nj = len(self.cols)
        for i in range(len(self.rows)):
            for j in range(nj):
                self.dsk[(st, i, j)] = (_stats_block, *self.block(i, j), self.c0s[j],
                                        self.backend, self.opts)
            gs = [self.ref(g, i) if getattr(g, "ndim", 0) == 1 else self.ref(g) for g in ups]
            self.dsk[(fin, i)] = (_finish, [(st, i, j) for j in range(nj)],
                                  self.ref(self.t, i), *gs, self.backend, self.opts, want_grad)

    def column(self, k: int) -> Any:
        """Column ``k`` of the finished rows (:data:`FINISHED`) as a dask array of the rows."""
        what = FINISHED[k]
        for i in range(len(self.rows)):
            self.dsk[(self.name(what), i)] = (_pick, (self.name("rows"), i), k,
                                              self.opts.stats)
        return self.array(what, (self.rows,), self.opts.stats)

    def grad_task(self, i: int, j: int, finished: Any) -> tuple:
        return (_grad_block, *self.block(i, j), finished, self.c0s[j], self.backend,
                self.opts)


# ----------------------------------------------------------------------------- the plan
def plan_vocabulary(be: Runtime, backend: str, x: Any, w: Any, b: Any, t: Any, ups: tuple,
                    opts: dict, *, cdt: Any, want_entropy: bool,
                    want_grad: bool) -> tuple[list, tuple | None]:
    """``([logp, entropy?], grads or None)`` of rows ``x`` ``(N, d)`` (chunked along the
    batch, the features in one chunk), ``w`` ``(V, d)`` in several vocabulary chunks, the
    bias ``b`` ``(V,)`` or ``None`` and the checked int64 targets ``t`` ``(N,)`` chunked as
    ``x``'s rows; ``ups``: the upstream gradients, rows chunked as ``x``'s (see
    :meth:`_TokenGraph.finish`). The gradients are ``(grad_x, grad_w, grad_b)`` in ``x``'s
    dtype, ``grad_w`` and ``grad_b`` chunked as ``w``."""
    stats = np.dtype(at_least_float32(np.dtype(cdt))).name
    cfg = V.Tokens(NAME, int(w.shape[0]), ignore_value(opts["ignore_index"]),
                  float(opts["temperature"]), float(opts["softcap"] or 0.0), stats)
    wc = w.astype(cdt).rechunk({1: -1})
    graph = _TokenGraph(be, backend, x.astype(cdt), wc,
                        None if b is None else b.astype(cdt).rechunk((wc.chunks[0],)), t, cfg)
    graph.finish(ups if want_grad else (None, None), want_grad)
    out = [graph.column(0), *([graph.column(1)] if want_entropy else [])]
    return out, (graph.gradients(x.dtype) if want_grad else None)
