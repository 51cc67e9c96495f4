"""The cross-entropy's per-position algebra, stated once: plain arithmetic that Numba compiles
into the CPU kernels (scalars) and the array drivers apply to whole vectors of positions (the
linear cross-entropy's :mod:`._linear_ce`, on NumPy or CuPy). The CUDA kernels state it again
in C++ (``cross_entropy.cu``, ``cross_entropy_probs.cu``, ``linear_ce.cu``).

A position is reduced to its logsumexp ``lse = m + log(sum_c exp(x_c - m))`` and a few sums; from
them come its loss and the coefficients of its gradient, which the kernels apply along the row
with ``p_c = exp(x_c - lse)`` (the softmax). ``scale`` is the upstream gradient (over the
``mean`` denominator), ``z`` the z-loss weight (``z lse^2`` per kept position, not
class-weighted).
"""

from __future__ import annotations

from typing import Any


def ce_point(lse: Any, x_t: Any, swx: Any, wt: Any, eps: float, n_classes: int, w_total: Any,
             scale: Any, z: float) -> tuple[Any, Any, Any, Any]:
    """Class-index target ``t`` (not ignored) of weight ``wt = w_t``, label smoothing ``eps``
    over ``n_classes`` classes whose weights sum to ``w_total``; ``x_t`` the target's logit and
    ``swx = sum_c w_c x_c`` (read only when ``eps > 0``).

    Returns ``(loss, a, coef, b)``::

        loss = (1 - eps) w_t (lse - x_t) + eps / C (lse W - sum_c w_c x_c) + z lse^2
        dL/dx_c = coef p_c - b w_c - a [c == t]
    """
    loss = (1.0 - eps) * wt * (lse - x_t) + z * lse * lse
    if eps > 0:
        loss += eps / n_classes * (lse * w_total - swx)
    a = scale * (1.0 - eps) * wt
    b = scale * eps / n_classes
    return loss, a, a + b * w_total + 2.0 * z * lse * scale, b


def probs_point(lse: Any, a_sum: Any, b_sum: Any, scale: Any, z: float) -> tuple[Any, Any]:
    """Class-probability target ``y`` smoothed to ``y' = (1 - eps) y + eps / C``, with
    ``a_sum = sum_c w_c y'_c`` and ``b_sum = sum_c w_c y'_c x_c``.

    Returns ``(loss, coef)``::

        loss = a_sum lse - b_sum + z lse^2
        dL/dx_c = coef p_c - scale w_c y'_c
    """
    return a_sum * lse - b_sum + z * lse * lse, scale * (a_sum + 2.0 * z * lse)
