"""``linear_cross_entropy`` inside torch autograd: a ``CUSTOM`` op (three gradients: the
hidden states, the head's weight and its bias), written by hand."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _args
from ._autograd import F, head_loss_op, head_results, wants_grad

__all__ = ["linear_cross_entropy"]


def _call_linear_ce(tensors: tuple[Any, ...], options: tuple[Any, ...],
                    return_grad: bool, grad_output: Tensor | None = None) -> Any:
    """nblosses' ``linear_cross_entropy`` on detached ``(input, linear_weight, target,
    linear_bias, weight)`` with the op's ``(ignore_index, reduction, label_smoothing, z_loss,
    softcap, chunk_rows)`` (``chunk_rows``: torch's ``batch_chunk_size`` or None)."""
    input, linear_weight, target, linear_bias, weight = tensors
    ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows = options
    return F.linear_cross_entropy(
        input.detach(), linear_weight.detach(), target,
        linear_bias=None if linear_bias is None else linear_bias.detach(), weight=weight,
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap or None, options=_args.chunking(chunk_rows),
        return_grad=return_grad, grad_output=None if grad_output is None else grad_output.detach())


@head_loss_op("linear_cross_entropy", _call_linear_ce, arrays=5)
def _linear_ce(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
               weight: Tensor | None, ignore_index: int | None, reduction: str,
               label_smoothing: float, z_loss: float, softcap: float, chunk_rows: int | None,
               want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)``; the gradients (for an
    upstream gradient of 1) only with ``want_grad``, else empty, as is a bias gradient without
    a bias."""
    result = _call_linear_ce((input, linear_weight, target, linear_bias, weight),
                             (ignore_index, reduction, label_smoothing, z_loss, softcap,
                              chunk_rows), want_grad)
    return head_results(result, input, want_grad)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options: Any = None,
                         z_loss: float = 0.0, softcap: float | None = None,
                         process_group: Any = None) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``: the final linear layer and the loss in
    one call, never forming the ``(N, V)`` logits, differentiable with respect to ``input``,
    ``linear_weight`` and ``linear_bias``.

    With ``mean`` / ``sum`` the three gradients come from the forward pass (the same chunked
    sweep) and backward only scales them; with ``reduction="none"`` each row's upstream
    gradient is needed, so backward runs the chunked computation again with it. ``options``
    (torch's chunking options): its ``batch_chunk_size``, when set, is the rows per block, each
    over the whole vocabulary (as torch's); otherwise nblosses picks its blocks within 5% of
    the logits' memory. ``z_loss`` and ``softcap`` as in :func:`cross_entropy`.
    ``process_group``: a ``torch.distributed`` group over which the vocabulary (the rows of
    ``linear_weight``) is sharded; the call is then
    :mod:`nblosses.torch.distributed`'s vocabulary-parallel head.
    """
    if process_group is not None:
        from .distributed import linear_cross_entropy as distributed

        return distributed(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                           reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, options=options, z_loss=z_loss,
                           softcap=softcap, process_group=process_group)
    need = torch.is_grad_enabled() and (input.requires_grad or linear_weight.requires_grad or (
        linear_bias is not None and linear_bias.requires_grad))
    wants_grad(input, target=target, weight=weight)  # refuses target / weight gradients
    want_grad = bool(need) and reduction != "none"
    chunk_rows = _args.check_chunking("linear_cross_entropy", options)
    return _linear_ce(input, linear_weight, target, linear_bias, weight, ignore_index,
                      reduction, label_smoothing, z_loss, softcap or 0.0, chunk_rows,
                      want_grad)[0]
