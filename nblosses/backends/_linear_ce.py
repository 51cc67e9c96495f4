"""Backend-generic parts of the chunked linear cross-entropy: chunk planning and the per-row
algebra that turns merged statistics into losses and gradient coefficients.

Everything here works on O(N) vectors through the backend's array namespace ``xp`` (NumPy or
CuPy); the O(N V) work (products and per-logit passes) is the backends' own.

Per row ``i`` with logits ``z`` (bias added and softcapped), ``lse = m + log(s)``:

- class index ``t`` (not ignored), weight ``w``, smoothing ``eps``, ``V`` classes::

      loss = (1 - eps) w_t (lse - z_t) + eps / V (lse W - sum_c w_c z_c) + zl lse^2
      dL/dz_c = scale ((1 - eps) w_t + eps / V W + 2 zl lse) p_c - scale eps / V w_c
                - scale (1 - eps) w_t [c == t]

  with ``W = sum_c w_c`` and ``p = softmax(z)``; ignored rows: loss 0, gradient 0.
- probabilities ``y``, ``y' = y (1 - eps) + eps / V``, ``A = sum_c w_c y'_c``::

      loss = A lse - sum_c w_c y'_c z_c + zl lse^2
      dL/dz_c = scale (A + 2 zl lse) p_c - scale w_c y'_c

``scale`` is the upstream gradient (over the mean denominator for ``mean``). Kernels receive
``coef = scale * (...) / s`` (it multiplies ``exp(z - m)``), ``b`` (multiplies ``w_c`` or
``w_c y'_c``) and ``a`` (subtracted at the target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Extra memory of one call: at most 5% of the N x V logits; blocks take 90% of that, the
#: rest is left to O(rows) statistics and temporaries, ...
BUDGET_FRACTION = 0.045
#: ... and at most this many elements (64 MiB of float32) for large problems, ...
MAX_BLOCK = 1 << 24
#: ... but blocks of at least this many elements for small ones (BLAS calls of a few rows
#: cost more in overhead than the memory saved).
MIN_BLOCK = 1 << 16
#: Rows a block should hold before the vocabulary is split into chunks too.
MIN_ROWS = 16


@dataclass(frozen=True)
class Plan:
    """Block shape: ``rows`` batch rows times ``cols`` vocabulary columns; ``split``: the
    vocabulary takes more than one block (two passes over the logits)."""

    rows: int
    cols: int
    split: bool


def plan_chunks(n: int, v: int, d: int = 0, chunk_rows: int | None = None,
                chunk_classes: int | None = None) -> Plan:
    """The block shape for ``n`` rows, ``v`` classes and ``d`` features (a row of the block
    costs ``cols + d`` elements: its logits and its transposed ``grad_x``).

    Policy: the whole vocabulary per block (one product per logit: the three matrix products
    of the unchunked computation and no more) whenever ``MIN_ROWS`` rows of it fit the budget
    ``clip(BUDGET_FRACTION * n * v, MIN_BLOCK, MAX_BLOCK)`` elements; then as many rows as fit.
    Otherwise (huge vocabularies) ``MIN_ROWS`` rows and vocabulary chunks: the logits are then
    computed twice (statistics pass, gradient pass). Explicit ``chunk_rows`` /
    ``chunk_classes`` override either choice (clipped to ``[1, n]`` / ``[1, v]``).
    """
    n1, v1 = max(1, n), max(1, v)
    budget = max(MIN_BLOCK, min(int(BUDGET_FRACTION * n1 * v1), MAX_BLOCK))
    if chunk_classes is not None:
        cols = min(v1, max(1, int(chunk_classes)))
    elif (v1 + d) * min(n1, MIN_ROWS) <= budget:
        cols = v1
    else:
        cols = max(1, budget // min(n1, MIN_ROWS) - d)
    rows = chunk_rows if chunk_rows is not None else budget // (cols + d)
    rows = min(n1, max(1, int(rows)))
    return Plan(rows, cols, cols < v1)


def mean_denominator(xp: Any, t: Any, weight: Any, ignore_index: int | None) -> float:
    """torch's ``mean`` denominator: summed ``w[t]`` of kept class targets (their count without
    weights); ``N`` for probability targets (``t`` of shape ``(N, V)``, ``ignore_index`` None)."""
    if ignore_index is None:
        return float(t.shape[0])
    valid = t != ignore_index
    if weight is None:
        return float(valid.sum())
    return float(xp.where(valid, weight[xp.where(valid, t, 0)], 0).sum(dtype=xp.float64))


def upstream_scale(reduction: str, grad_output: Any, denom: float) -> Any:
    """Per-row upstream gradient: the array for ``"none"``, else a float (over ``denom`` for
    ``mean``; 0/0 gives NaN, x/0 a signed infinity, as IEEE)."""
    if reduction == "none":
        return grad_output
    g = float(grad_output)
    if reduction == "sum":
        return g
    if denom != 0:
        return g / denom
    return math.nan if g == 0 or math.isnan(g) else math.copysign(math.inf, g)


def _lse(xp: Any, m: Any, s: Any) -> Any:
    return m + xp.log(s)


def finish_class(xp: Any, st: dict, t: Any, weight: Any, ignore_index: int, eps: float, v: int,
                 w_total: float, z_loss: float, scale: Any, want_grad: bool):
    """Losses (float64, 0 on ignored rows), lse and gradient coefficients of one row chunk.

    ``st`` holds the merged float64 statistics ``m``, ``s``, ``xt``, ``swx`` of the chunk's
    rows. Returns ``(loss, lse, coef, b, a)`` (the last three None without a gradient).
    """
    m, s = st["m"], st["s"]
    lse = _lse(xp, m, s)
    valid = t != ignore_index
    wt = xp.ones(t.shape, xp.float64) if weight is None else weight[xp.where(valid, t, 0)]
    wt = xp.where(valid, wt, 0.0)
    keep = 1.0 - eps
    loss = keep * wt * (lse - st["xt"])
    if eps > 0:
        loss += eps / v * (lse * w_total - st["swx"])
    if z_loss > 0:
        loss += z_loss * lse * lse
    loss = xp.where(valid, loss, 0.0)
    if not want_grad:
        return loss, lse, None, None, None
    sc = xp.where(valid, scale, 0.0)  # ignored rows: no gradient (and no inf * 0)
    coef = sc * (keep * wt + eps / v * w_total + 2.0 * z_loss * lse) / s
    return loss, lse, coef, sc * (eps / v), sc * keep * wt


def finish_probs(xp: Any, st: dict, z_loss: float, scale: Any, want_grad: bool):
    """As :func:`finish_class` for probability targets (statistics ``m``, ``s``, ``a_sum``,
    ``b_sum``); returns ``(loss, lse, coef, b, None)``."""
    m, s, a_sum = st["m"], st["s"], st["a_sum"]
    lse = _lse(xp, m, s)
    loss = a_sum * lse - st["b_sum"]
    if z_loss > 0:
        loss += z_loss * lse * lse
    if not want_grad:
        return loss, lse, None, None, None
    sc = xp.zeros(m.shape, xp.float64) + scale
    return loss, lse, sc * (a_sum + 2.0 * z_loss * lse) / s, sc, None
