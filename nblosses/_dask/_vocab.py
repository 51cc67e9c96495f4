"""Vocabulary-parallel cross-entropy on blocks of logits that a Dask plan holds itself.

A block is ``z``, rows by a range ``c0:c0+Vc`` of the classes: a chunk of the logits
(:mod:`.class_losses`, the class axis in several chunks) or the product ``x_i @ w_j.T``
(:mod:`.linear_ce`). Three steps, each on one block or one row block:

1. :func:`stats`: the block's row statistics ``[m, s, r1, r2]`` (:mod:`._stats`), by the
   backend's LM-head block kernel (``linear_cross_entropy.block_stats``);
2. :func:`finish`: the merged statistics of a row block into losses, ``lse`` and the
   gradient's per-row coefficients, by the LM head's per-row algebra
   (:func:`nblosses.backends._linear_ce.finish_class` / ``finish_probs``);
3. :func:`grad`: a block's ``dL/dz`` from those, by the backend's block kernel
   (``linear_cross_entropy.block_grad``): the one statement of the gradient per backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._registry import Runtime
from ..backends import _linear_ce as G
from ..errors import UnsupportedOpError
from ._common import F64

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
