"""The host side of a loss call, written once for every backend: outputs, upstream gradient,
empty inputs and the reduced result.

A backend's loss function (kernel protocol in :mod:`nblosses.backends`) makes a
:class:`LossCall` with its array namespace, hands the kernels its arrays and scalars, and
returns :meth:`LossCall.result`. Pure Python over the namespace: no Numba, no CuPy import (the
CUDA backend passes its ``cupy`` module, tests pass fakes of it).

Semantics shared by every backend:

- ``reduction="none"``: per-position losses (``loss_shape``) are allocated here, and the upstream
  gradient is the caller's per-position array;
- ``"sum"`` / ``"mean"``: the upstream gradient is one scalar, over the ``mean`` denominator
  (IEEE: 0/0 is NaN, x/0 a signed infinity, as torch's division); the reduced loss is either the
  kernel's host total over the denominator, or a 0-d device array the kernel finishes itself
  (``device_total``: no read back);
- the gradient is written into the caller's ``grad_buffer`` when given;
- empty inputs (N = 0 or C = 0) read no logits: losses and gradient are zeros, the ``mean`` of
  nothing is NaN (0/0), and the logsumexp of no classes is -inf.
"""

from __future__ import annotations

import math
from typing import Any

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def div(a: Any, b: Any) -> Any:
    """``a / b`` with IEEE results for ``b == 0`` (a signed infinity; NaN for 0/0 and NaN) and
    no warning, as NumPy under ``errstate(ignore)`` without its per-call cost. A ``b`` that is a
    0-d array (a denominator kept on a device) divides where it lives: IEEE there too, and
    nothing is read back."""
    if not isinstance(b, (int, float)):
        return a / b
    if b != 0:
        return a / b
    if a != a or a == 0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def upstream_scale(reduction: str, grad_output: Any, denom: Any) -> Any:
    """The upstream gradient the kernels scale by: the per-position array for ``"none"``, else
    the float ``grad_output`` over the ``mean`` denominator ``denom`` (unused for ``"sum"``;
    ``None``: left to the kernel that finds it; a 0-d device array gives a 0-d device array,
    see :func:`div`)."""
    if reduction == "none":
        return grad_output
    g = float(grad_output)
    return div(g, denom) if reduction == "mean" and denom is not None else g


def ignore_value(ignore_index: int) -> int:
    """``ignore_index`` as the kernels compare it with int64 targets: clipped to int64's range
    (a value outside it matches no target, and the clipped one matches none either, since a
    target at the bound would be out of ``[0, C)`` anyway)."""
    i = int(ignore_index)
    return i if _I64_MIN <= i <= _I64_MAX else (_I64_MIN if i < 0 else _I64_MAX)


class LossCall:
    """The host side of one loss call: its outputs, its upstream gradient and its result.

    Parameters
    ----------
    xp : module
        The backend's array namespace (``empty`` and ``asarray`` are used).
    x_shape : tuple of int
        Shape of the gradient (the input's canonical shape).
    loss_shape : tuple of int
        Shape of the per-position losses.
    dtype : dtype
        The compute dtype of every output.
    reduction : {"none", "mean", "sum"}
    want_grad : bool
    grad_output : array, float or None
        The caller's upstream gradient (``None`` unless ``want_grad``).
    grad_buffer : array or None
        Where the gradient goes instead of a new array.
    denom : float, 0-d array or None
        ``mean`` only: the denominator, on the host or a 0-d device array; ``None`` when the
        kernel finds it (the upstream scalar is then passed undivided, for the kernel to divide,
        or divided once :meth:`set_denominator` has the kernel's value).
    device_total : bool
        Reduced losses are finished by the kernel in a 0-d array allocated here (:attr:`total`),
        rather than returned to the host as a float.
    empty : callable, optional
        Allocator ``empty(shape, dtype)`` (default ``xp.empty``; the CPU passes its output
        cache).

    Attributes
    ----------
    losses : array or None
        Per-position losses (``"none"``).
    total : array or None
        The 0-d reduced loss the kernel writes (``device_total``).
    grad : array or None
        The gradient (``want_grad``): ``grad_buffer`` or a new array.
    g_rows : array or None
        Per-position upstream gradient (``"none"`` with a gradient).
    g_scalar : float or 0-d array
        Upstream gradient of a reduced loss over its denominator (0.0 without one).
    """

    __slots__ = ("_g", "denom", "dtype", "g_rows", "g_scalar", "grad", "losses", "reduction",
                 "total", "xp")

    def __init__(self, xp: Any, x_shape: tuple[int, ...], loss_shape: tuple[int, ...],
                 dtype: Any, *, reduction: str, want_grad: bool, grad_output: Any,
                 grad_buffer: Any = None, denom: Any = 1.0, device_total: bool = False,
                 empty: Any = None) -> None:
        # Plain statements, no tuple assignments: this runs once per call (small calls count).
        alloc = xp.empty if empty is None else empty
        keep = reduction == "none"
        self.xp = xp
        self.dtype = dtype
        self.reduction = reduction
        self.denom: Any = denom if reduction == "mean" else 1.0
        self.losses: Any = alloc(loss_shape, dtype) if keep else None
        self.total: Any = alloc((), dtype) if device_total and not keep else None
        self.g_rows: Any = None
        self.g_scalar: Any = 0.0
        self._g: Any = None
        if not want_grad:
            self.grad: Any = None
            return
        self.grad = alloc(x_shape, dtype) if grad_buffer is None else grad_buffer
        if keep:
            self.g_rows = grad_output
        else:
            self._g = grad_output
            self.g_scalar = upstream_scale(reduction, grad_output, self.denom)

    def set_denominator(self, denom: Any) -> None:
        """The ``mean`` denominator, once a kernel has found it; the upstream scalar follows."""
        if self.reduction != "mean":
            return
        self.denom = denom
        if self._g is not None:
            self.g_scalar = upstream_scale("mean", self._g, denom)

    def fill_empty(self, lse_out: Any = None) -> None:
        """No logits to read (N = 0 or C = 0): zero losses and gradient, -inf logsumexp, and a
        device total of the ``mean`` of nothing (0/0, NaN) or the sum 0."""
        for a in (self.losses, self.grad):
            if a is not None:
                a[...] = 0
        if lse_out is not None:
            lse_out[...] = -math.inf
        if self.total is not None:
            # A denominator the kernel would have found counts kept positions: none here.
            self.total[...] = div(0.0, 0.0 if self.denom is None else self.denom)

    def result(self, total: Any = 0.0) -> Any:
        """The loss: per-position losses, the device total, or the host ``total`` (a float the
        kernel summed, or a 0-d array) over the ``mean`` denominator, as a 0-d array."""
        if self.losses is not None:
            return self.losses
        if self.total is not None:
            return self.total
        if self.reduction == "mean":
            total = div(total, self.denom)
        return self.xp.asarray(total, dtype=self.dtype)
