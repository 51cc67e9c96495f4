"""``linear_distillation_loss`` inside torch autograd: a ``CUSTOM`` op (the student's three
gradients: its hidden states, its output layer's weight and bias; the teacher is frozen),
written by hand as ``linear_cross_entropy``'s (:mod:`._linear_ce`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._autograd import F, head_loss_op, head_results, wants_grad

__all__ = ["linear_distillation_loss"]

#: The op's options after its tensors, in its schema's order.
_OPTIONS = ("beta", "temperature", "ignore_index", "hard_weight", "softcap", "reduction")


def _call(tensors: tuple[Any, ...], options: tuple[Any, ...], return_grad: bool,
          grad_output: Tensor | None = None) -> Any:
    """nblosses' ``linear_distillation_loss`` on detached ``(input, linear_weight,
    teacher_input, teacher_weight, target, linear_bias, teacher_bias)``."""
    x, w, tx, tw, target, b, tb = (None if t is None else t.detach() for t in tensors)
    kw = dict(zip(_OPTIONS, options))
    kw["softcap"] = kw["softcap"] or None
    return F.linear_distillation_loss(
        x, w, tx, tw, target, linear_bias=b, teacher_bias=tb, **kw, return_grad=return_grad,
        grad_output=None if grad_output is None else grad_output.detach())


@head_loss_op("linear_distillation_loss", _call, arrays=7)
def _linear_distill(input: Tensor, linear_weight: Tensor, teacher_input: Tensor,
                    teacher_weight: Tensor, target: Tensor | None, linear_bias: Tensor | None,
                    teacher_bias: Tensor | None, beta: float, temperature: float,
                    ignore_index: int, hard_weight: float, softcap: float, reduction: str,
                    want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)``; the gradients (for an
    upstream gradient of 1) only with ``want_grad``, else empty, as is a bias gradient without
    a bias."""
    result = _call((input, linear_weight, teacher_input, teacher_weight, target, linear_bias,
                    teacher_bias),
                   (beta, temperature, ignore_index, hard_weight, softcap, reduction), want_grad)
    return head_results(result, input, want_grad)


def linear_distillation_loss(input: Tensor, linear_weight: Tensor, teacher_input: Tensor,
                             teacher_weight: Tensor, target: Tensor | None = None, *,
                             linear_bias: Tensor | None = None,
                             teacher_bias: Tensor | None = None, beta: float = 0.0,
                             temperature: float = 1.0, ignore_index: int = -100,
                             hard_weight: float = 0.0, softcap: float | None = None,
                             reduction: str = "mean") -> Tensor:
    """:func:`nblosses.functional.linear_distillation_loss` differentiable with respect to the
    student's ``input``, ``linear_weight`` and ``linear_bias``; the teacher is frozen (its
    tensors must not require grad: ``NotImplementedError`` otherwise).

    With ``mean`` / ``sum`` the three gradients come from the forward pass (the same chunked
    sweep) and backward only scales them; with ``reduction="none"`` each row's upstream
    gradient is needed, so backward runs the chunked computation again with it.
    """
    need = torch.is_grad_enabled() and (input.requires_grad or linear_weight.requires_grad or (
        linear_bias is not None and linear_bias.requires_grad))
    wants_grad(input, teacher_input=teacher_input, teacher_weight=teacher_weight,
               teacher_bias=teacher_bias, target=target)  # refuses the teacher's gradients
    want_grad = bool(need) and reduction != "none"
    return _linear_distill(input, linear_weight, teacher_input, teacher_weight, target,
                           linear_bias, teacher_bias, beta, temperature, ignore_index,
                           hard_weight, softcap or 0.0, reduction, want_grad)[0]
