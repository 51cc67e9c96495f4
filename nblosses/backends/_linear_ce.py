"""linear_cross_entropy on the chunked LM-head driver (:mod:`._lm_head`): the loss's statistics,
its per-row algebra, and the call (:func:`run`) every backend runs with its hooks.

Per row block, the driver computes the logits block ``z = x[rows] @ W[cols].T``; the backend's
``merge`` adds the bias, softcaps, and folds each row's max, sum of exponentials, target logit
and smoothing sums into running float64 statistics (``block_stats``); :meth:`LinearCE.finish_rows`
turns them into the rows' losses, ``lse`` and gradient coefficients (:func:`finish_class` /
:func:`finish_probs`); the backend's ``gradient_block`` overwrites the block with ``dL/dz``
(``block_grad``) for the driver's three gradient products.

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
from typing import Any

from ._formulas import ce_point, probs_point
from ._host import LossCall, div, ignore_value
from ._host import upstream_scale as upstream_scale  # re-exported: the Dask driver's
from ._lm_head import ChunkedHead, Head, Plan, param_grads, plan_chunks


def _kept(xp: Any, t: Any, ignore_index: int, v: int) -> tuple[Any, Any]:
    """``(valid, bad)``: targets not ``ignore_index``, and those of them outside ``[0, v)``
    (possible only where the front end leaves the check to the device: they are never used
    as an index, and their rows' loss and gradient are NaN)."""
    valid = t != ignore_index
    return valid, valid & ((t < 0) | (t >= v))


def mean_denominator(xp: Any, t: Any, weight: Any, ignore_index: int | None, *,
                     to_host: bool = True) -> Any:
    """torch's ``mean`` denominator: summed ``w[t]`` of kept class targets (their count without
    weights); ``N`` for probability targets (``t`` of shape ``(N, V)``, ``ignore_index`` None).

    A float; with ``to_host=False`` and class targets, a 0-d float64 array of ``xp`` instead
    (a device backend then never reads it back).
    """
    if ignore_index is None:
        return float(t.shape[0])
    if weight is None:
        d = (t != ignore_index).sum(dtype=xp.float64)
    else:
        valid, bad = _kept(xp, t, ignore_index, weight.shape[0])
        d = xp.where(valid, weight[xp.where(valid & ~bad, t, 0)], 0).sum(dtype=xp.float64)
    return float(d) if to_host else d


def _lse(xp: Any, m: Any, s: Any) -> Any:
    return m + xp.log(s)


def mean_of(xp: Any, total: Any, denom: Any) -> Any:
    """The driver's summed loss over the ``mean`` denominator, a 0-d array of ``xp``
    (:func:`._host.div`: 0/0 is NaN, x/0 a signed infinity; a 0-d device ``denom`` divides
    where it lives, nothing is read back)."""
    return xp.asarray(div(total, denom))


def finish_class(xp: Any, st: dict, t: Any, weight: Any, ignore_index: int, eps: float, v: int,
                 w_total: float, z_loss: float, scale: Any, want_grad: bool):
    """Losses (float64, 0 on ignored rows), lse and gradient coefficients of one row chunk.

    ``st`` holds the merged float64 statistics ``m``, ``s``, ``xt``, ``swx`` of the chunk's
    rows. Returns ``(loss, lse, coef, b, a)`` (the last three None without a gradient).
    """
    m, s = st["m"], st["s"]
    lse = _lse(xp, m, s)
    valid, bad = _kept(xp, t, ignore_index, v)
    wt = (xp.ones(t.shape, xp.float64) if weight is None
          else weight[xp.where(valid & ~bad, t, 0)])
    wt = xp.where(valid, wt, 0.0)
    sc = xp.where(valid, scale, 0.0)  # ignored rows: no gradient (and no inf * 0)
    loss, a, coef, b = ce_point(lse, st["xt"], st["swx"], wt, eps, v, w_total, sc, z_loss)
    loss = xp.where(bad, math.nan, xp.where(valid, loss, 0.0))
    if not want_grad:
        return loss, lse, None, None, None
    coef = xp.where(bad, math.nan, coef / s)  # a NaN row of dL/dz
    return loss, lse, coef, b, a


def finish_probs(xp: Any, st: dict, z_loss: float, scale: Any, want_grad: bool):
    """As :func:`finish_class` for probability targets (statistics ``m``, ``s``, ``a_sum``,
    ``b_sum``); returns ``(loss, lse, coef, b, None)``."""
    m, s = st["m"], st["s"]
    lse = _lse(xp, m, s)
    sc = xp.zeros(m.shape, xp.float64) + scale
    loss, coef = probs_point(lse, st["a_sum"], st["b_sum"], sc, z_loss)
    if not want_grad:
        return loss, lse, None, None, None
    return loss, lse, coef / s, sc, None


# ----------------------------------------------------------------------------- the loss
_CLASS_STATS = ("m", "s", "xt", "swx")
_PROB_STATS = ("m", "s", "a_sum", "b_sum")


class LinearCE(ChunkedHead):
    """One ``linear_cross_entropy`` call on the driver: its statistics, outputs and per-row
    finish; a backend's class adds ``merge`` / ``gradient_block`` (its block kernels, taking
    :meth:`block_args`) and the driver's backend hooks.

    ``scale``: the upstream gradient (a float or 0-d array over the ``mean`` denominator, or
    the rows' array for ``"none"``; unused without a gradient); ``losses`` / ``lse_out``: the
    ``(N,)`` arrays receiving each row's loss / logsumexp, or None. :attr:`total` sums the
    losses (float64; a 0-d array on a device).
    """

    def __init__(self, x2, w2, bias, target, weight, ignore_index, eps: float, z_loss: float,
                 softcap: float, plan: Plan, *, scale: Any, want_grad: bool, losses: Any,
                 lse_out: Any) -> None:
        super().__init__((Head(x2, w2, bias),), plan)
        xp = self.xp
        self.target, self.weight = target, weight
        self.probs = target.ndim == 2
        self.ignore, self.eps, self.z_loss, self.cap = ignore_index, eps, z_loss, softcap
        self.scale, self.want_grad = scale, want_grad
        self.losses, self.lse_out = losses, lse_out
        self.total: Any = 0.0
        w_total = self.v if weight is None else weight.sum(dtype=xp.float64)
        self.w_total = float(w_total) if self.host_scalars else w_total
        names = _PROB_STATS if self.probs else _CLASS_STATS
        self.stats = {k: xp.empty(plan.rows, xp.float64) for k in names}

    def block_args(self, r0: int, r1: int, c0: int, c1: int) -> tuple[Any, Any, Any, dict]:
        """``(bias, target, weight, keywords)`` of the block operations
        (``linear_cross_entropy.block_stats`` / ``block_grad``) on a block."""
        bias = self.bias_slice(0, c0, c1)
        w = None if self.weight is None else self.weight[c0:c1]
        t = self.target[r0:r1, c0:c1] if self.probs else self.target[r0:r1]
        return bias, t, w, dict(c0=c0, ignore_index=self.ignore, n_classes=self.v,
                                label_smoothing=self.eps, softcap=self.cap)

    def start_rows(self, r0: int, r1: int) -> dict:
        st = {k: a[:r1 - r0] for k, a in self.stats.items()}
        for k, a in st.items():
            a[...] = -math.inf if k == "m" else 0.0
        return st

    def finish_rows(self, st: dict, r0: int, r1: int) -> Any:
        """The rows' losses and lse recorded; returns ``(coef, b, a)`` (None each without a
        gradient)."""
        xp = self.xp
        scale = self.scale
        sc = (scale if getattr(scale, "ndim", 0) == 0  # a float or a 0-d device scalar
              else xp.asarray(scale[r0:r1], xp.float64))
        if self.probs:
            loss, lse, *coefs = finish_probs(xp, st, self.z_loss, sc, self.want_grad)
        else:
            loss, lse, *coefs = finish_class(xp, st, self.target[r0:r1], self.weight,
                                             self.ignore, self.eps, self.v, self.w_total,
                                             self.z_loss, sc, self.want_grad)
        self.total = self.total + loss.sum()  # stays on the device for CuPy
        if self.losses is not None:
            self.losses[r0:r1] = loss
        if self.lse_out is not None:
            self.lse_out[r0:r1] = lse
        return tuple(coefs)


def run(cls: type[LinearCE], x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
        reduction, z_loss, softcap, want_grad, grad_output, want_lse, chunk_rows=None,
        chunk_classes=None):
    """The kernel protocol's ``linear_cross_entropy`` with the backend class ``cls``."""
    xp = cls.xp
    n, d = x2.shape
    v = w2.shape[0]
    ignore = None if target.ndim == 2 else ignore_value(ignore_index)
    denom = (mean_denominator(xp, target, weight, ignore, to_host=cls.host_scalars)
             if reduction == "mean" else 1.0)
    # The host plan's gradient is grad_x (the input's); grad_W and grad_b are the head's own.
    host = LossCall(xp, (n, d), (n,), x2.dtype, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, denom=denom)
    lse_out = xp.empty(n, x2.dtype) if want_lse else None
    grads = param_grads(xp, Head(x2, w2, bias), host.grad) if want_grad else None
    total: Any = 0.0
    if n == 0 or v == 0:
        host.fill_empty(lse_out)
    else:
        call = cls(x2, w2, bias, target, weight, ignore, float(label_smoothing), float(z_loss),
                   float(softcap), plan_chunks(n, v, d, chunk_rows, chunk_classes),
                   scale=host.g_scalar if host.g_rows is None else host.g_rows,
                   want_grad=want_grad, losses=host.losses, lse_out=lse_out)
        call.sweep(grads)
        total = call.total
    if reduction == "none":
        return host.losses, lse_out, grads
    # Not host.result(total): the fake-device test of the CUDA driver watches mean_of receive
    # the device denominator; the arithmetic is the same (_host.div).
    if reduction == "mean":
        total = mean_of(xp, total, denom)
    return xp.asarray(total, dtype=x2.dtype), lse_out, grads
