"""Vocabulary-parallel cross-entropy and token log-probabilities on blocks of logits that a
Dask plan holds itself.

A block is ``z``, rows by a range ``c0:c0+Vc`` of the classes: a chunk of the logits
(:mod:`.class_losses` and :mod:`.token_statistics`, the class axis in several chunks, as rows
by :func:`chunk_rows`) or the product ``x_i @ w_j.T`` (:mod:`.linear_ce`,
:mod:`.linear_token_vocab`). Cross-entropy takes three steps, each on one block or one row
block:

1. :func:`stats`: the block's row statistics ``[m, s, r1, r2]`` (:mod:`._stats`), by the
   backend's LM-head block kernel (``linear_cross_entropy.block_stats``);
2. :func:`finish`: the merged statistics of a row block into losses, ``lse`` and the
   gradient's per-row coefficients, by the LM head's per-row algebra
   (:func:`nblosses.backends._linear_ce.finish_class` / ``finish_probs``);
3. :func:`grad`: a block's ``dL/dz`` from those, by the backend's block kernel
   (``linear_cross_entropy.block_grad``): the one statement of the gradient per backend.

token_logprobs (and its LM head) the same three, with the backend's ``linear_token_logprobs``
block kernels and :mod:`nblosses.backends._linear_token_logprobs`' merge and finish:
:func:`token_stats`, :func:`token_finish`, :func:`token_grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from .._registry import Runtime
from ..backends import _linear_ce as G
from ..backends import _linear_token_logprobs as T
from ..errors import UnsupportedOpError
from ..ops import token_logprobs as TLP
from ..ops.class_losses import canonical_input
from ._common import F64, unwrap

_CLASS_FIELDS = ("m", "s", "xt", "swx")
_PROB_FIELDS = ("m", "s", "a_sum", "b_sum")
#: The columns of a finished row block: loss and logsumexp, then (with a gradient) the
#: gradient's per-row coefficients and the merged max.
FINISHED = ("loss", "lse", "coef", "b", "a", "m")


@dataclass(frozen=True)
class Vocab:
    """The options of a call, as the block steps take them."""

    probs: bool  # probability targets (rows by the block's classes) rather than indices
    n_classes: int
    ignore_index: int
    label_smoothing: float
    softcap: float
    z_loss: float

    @property
    def fields(self) -> tuple[str, ...]:
        return _PROB_FIELDS if self.probs else _CLASS_FIELDS

    def keywords(self, c0: int) -> dict[str, Any]:
        """The block kernels' keywords for a block of classes from ``c0``."""
        return dict(c0=c0, ignore_index=self.ignore_index, n_classes=self.n_classes,
                    label_smoothing=self.label_smoothing, softcap=self.softcap)


def _block_ops(be: Runtime) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The backend's LM-head block kernels (attributes of its ``linear_cross_entropy``)."""
    kernel = be.kernel("linear_cross_entropy")
    stats, grad = getattr(kernel, "block_stats", None), getattr(kernel, "block_grad", None)
    if stats is None or grad is None:
        raise UnsupportedOpError(
            f"backend {be.name!r}: its linear_cross_entropy kernel has no block_stats / "
            f"block_grad, which dask arrays with the class axis in several chunks need")
    return stats, grad


def stats(be: Runtime, z: Any, bias: Any, target: Any, weight: Any, c0: int,
          cfg: Vocab) -> Any:
    """Row statistics ``(R, 4)`` float64 of block ``z`` (overwritten with its prepared
    logits: bias added, softcapped). ``target``: the rows' class indices or the block's
    probabilities; ``bias``, ``weight``: the block's slices or ``None``."""
    xp = be.xp
    st = {k: xp.full(z.shape[0], -np.inf) if k == "m" else xp.zeros(z.shape[0], F64)
          for k in cfg.fields}
    _block_ops(be)[0](z, bias, target, weight, st, **cfg.keywords(c0))
    # A row of only -inf in this block (user logits can hold one; the LM head's products
    # cannot, so its kernel leaves s NaN there) must contribute nothing: s = 0.
    empty = z.max(axis=1) == -np.inf if z.shape[1] else xp.ones(z.shape[0], bool)
    return xp.stack([st["m"], xp.where(empty, 0.0, st["s"]), *(st[k] for k in cfg.fields[2:])],
                    axis=-1)


def finish(be: Runtime, merged: Any, target: Any, weight: Any, w_total: Any, scale: Any,
           cfg: Vocab) -> Any:
    """The :data:`FINISHED` columns ``(R, 6)`` float64 of a row block from its merged
    statistics ``(R, 4)``: ``scale`` is the rows' upstream gradient (float64, over the
    ``mean`` denominator), ``None`` without a gradient (then only loss and lse)."""
    xp = be.xp
    st = dict(zip(cfg.fields, (merged[:, k] for k in range(4))))
    want_grad = scale is not None
    sc = scale if want_grad else 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # -inf and NaN rows
        if cfg.probs:
            loss, lse, coef, b, a = G.finish_probs(xp, st, cfg.z_loss, sc, want_grad)
        else:
            loss, lse, coef, b, a = G.finish_class(
                xp, st, target, weight, cfg.ignore_index, cfg.label_smoothing, cfg.n_classes,
                w_total, cfg.z_loss, sc, want_grad)
    if not want_grad:
        return xp.stack([loss, lse], axis=-1)
    return xp.stack([loss, lse, coef, b, xp.zeros_like(coef) if a is None else a, st["m"]],
                    axis=-1)


def grad(be: Runtime, z: Any, bias: Any, target: Any, weight: Any, finished: Any, c0: int,
         cfg: Vocab) -> Any:
    """``dL/dz`` of block ``z`` (raw products or logits: overwritten, and returned) from its
    rows' :func:`finish` columns."""
    m, *coefs = (be.xp.ascontiguousarray(finished[:, k]) for k in (5, 2, 3, 4))
    _block_ops(be)[1](z, bias, target, weight, m, tuple(coefs), raw=True, **cfg.keywords(c0))
    return z


# ----------------------------------------------------------------------------- class chunks
def chunk_rows(be: Runtime, b: Any, dtype: Any) -> Any:
    """A ``(N, Cc, *spatial)`` logits block as a fresh C-contiguous ``(N * inner, Cc)`` array of
    ``dtype``: a copy, which the block kernels may overwrite (the caller's chunk never is)."""
    a = be.asarray(unwrap(b))
    n, ck, inner = canonical_input(a.shape)
    rows = be.xp.moveaxis(a.reshape(n, ck, inner), 1, 2).reshape(n * inner, ck)
    return rows.astype(dtype, order="C", copy=True)


def from_chunk_rows(z: Any, shape: tuple[int, ...]) -> Any:
    """:func:`chunk_rows` undone: ``(N * inner, Cc)`` back to the block's ``shape``."""
    n, ck, inner = canonical_input(shape)
    return z.reshape(n, inner, ck).swapaxes(1, 2).reshape(shape)


def class_offsets(chunks: tuple[int, ...]) -> Any:
    """Each class chunk's first class: an int64 dask array of one element per chunk, a
    blockwise argument along the class axis."""
    return da.from_array(np.cumsum((0,) + tuple(chunks[:-1])).astype(np.int64), chunks=1)


# ----------------------------------------------------------------------------- token_logprobs
#: The columns of a finished row block of token_logprobs: the results, then (with a gradient)
#: the rows' merged max and the gradient's coefficients (:data:`T.COEFS`).
TOKEN_FINISHED = ("logp", "entropy", "m", *T.COEFS)
_TOKEN_M = TOKEN_FINISHED.index("m")


@dataclass(frozen=True)
class Tokens:
    """The options of a token_logprobs call (or its LM head's), as the block steps take
    them."""

    op: str  # the op, for messages
    n_classes: int
    ignore_index: int  # as the kernels compare it (clipped to int64)
    temperature: float
    softcap: float  # 0.0: none
    stats: str  # the dtype of the results and of the upstream gradients' values

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature


def token_op(be: Runtime, name: str) -> Callable[..., Any]:
    """The backend's token block operation ``name`` (an attribute of its
    ``linear_token_logprobs`` kernel)."""
    op = getattr(be.kernels.get("linear_token_logprobs"), name, None)
    if op is None:
        raise UnsupportedOpError(
            f"backend {be.name!r}: its linear_token_logprobs kernel has no {name}, which dask "
            f"arrays with the class axis (the vocabulary) in several chunks need")
    return op


def has_token_ops(be: Runtime) -> bool:
    """Whether the backend has the token block operations (:func:`token_op`)."""
    kernel = be.kernels.get("linear_token_logprobs")
    return all(getattr(kernel, k, None) is not None for k in ("block_stats", "block_grad"))


def token_stats(be: Runtime, z: Any, bias: Any, target: Any, c0: int, cfg: Tokens) -> Any:
    """Row statistics ``(R, 4)`` float64 (:data:`T.STATS`) of block ``z`` (classes ``c0:``;
    overwritten with its prepared logits: bias added, softcapped)."""
    return token_op(be, "block_stats")(z, bias, target, c0=c0, temperature=cfg.temperature,
                                       softcap=cfg.softcap)


def token_finish(be: Runtime, stats: list, target: Any, go: Any, ge: Any, shape: tuple,
                 cfg: Tokens, want_grad: bool) -> Any:
    """A row block's :data:`TOKEN_FINISHED` columns ``(R, k)`` float64 (the first two without
    a gradient) from its class blocks' statistics ``(R, 4)``; ``target``: the rows' checked
    ``(R,)`` indices; ``go`` / ``ge``: the upstream gradients (blocks of the positions'
    ``shape``, scalars or ``None``), checked here as the eager call checks them."""
    xp = be.xp
    merged = T.merge(xp, xp.stack(stats), 0, cfg.inv_t)
    rows = merged.shape[:1]
    go, ge = (TLP.upstream_args(be, cfg.op, unwrap(go), unwrap(ge), shape, rows, cfg.stats)
              if want_grad else (None, None))
    logp, ent, coefs = T.finish(xp, merged, target, cfg.ignore_index, cfg.n_classes,
                                cfg.inv_t, go, ge, want_grad)
    cols = [logp[:, None], ent[:, None]]
    if coefs is not None:
        cols += [merged[:, :1], coefs]
    return xp.concatenate(cols, axis=1)


def token_grad(be: Runtime, z: Any, bias: Any, target: Any, finished: Any, c0: int,
               cfg: Tokens) -> Any:
    """``dL/dz`` of block ``z`` (raw: before bias and soft cap; overwritten, and returned)
    from its rows' :func:`token_finish` columns ``(R, 6)``."""
    m, coefs = (be.xp.ascontiguousarray(a)
                for a in (finished[:, _TOKEN_M], finished[:, _TOKEN_M + 1:]))
    token_op(be, "block_grad")(z, bias, target, m, coefs, c0=c0, raw=True,
                               ignore_index=cfg.ignore_index, temperature=cfg.temperature,
                               softcap=cfg.softcap)
    return z

