"""``token_logprobs`` inside torch autograd: per-token log-probabilities and entropies of
``softmax(cap(x) / T)``, both differentiable with respect to the logits.

The forward pass computes both statistics in one sweep over the logits (no ``(N, C)``
log-probabilities are kept); the gradient depends on both upstream gradients, which are only
known in backward, so backward runs the fused kernel again with them (``return_grad=True``:
one statistics sweep and one gradient sweep). Only the logits and targets are saved.

Both passes are :func:`torch.library.custom_op`\\ s (``torch.ops.nblosses.token_logprobs`` and
``torch.ops.nblosses.token_logprobs_backward``) with fake implementations, so
``torch.compile(fullgraph=True)`` keeps each as one node, forward and backward.

bfloat16 logits on the CPU are computed in float32 (NumPy has no bfloat16) and their gradient
returned in bfloat16; the statistics are float32 for every half-precision input, on any device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _args
from .. import functional as _functional
from ..ops.token_logprobs import check_temperature

# Untyped on purpose: the options travel as plain values (the overloads want literals).
_F: Any = _functional

__all__ = ["token_logprobs"]

_NAME = "token_logprobs"


def _positions(input: Tensor) -> list[int]:
    """The statistics' shape: the input's without its class axis (1, or 0 for ``(C,)``)."""
    return [] if input.dim() <= 1 else [input.shape[0], *input.shape[2:]]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _host_view(input: Tensor) -> Tensor:
    """The logits as nblosses takes them: detached; bfloat16 on the CPU as float32 (so that the
    statistics come back in float32, not rounded to bfloat16)."""
    x = input.detach()
    return x.float() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x


@torch.library.custom_op("nblosses::token_logprobs", mutates_args=())
def _token_logprobs(input: Tensor, target: Tensor, temperature: float, softcap: float,
                    ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(logp, entropy)`` of every position."""
    return _F.token_logprobs(_host_view(input), target, temperature=temperature,
                             softcap=softcap or None, ignore_index=ignore_index,
                             return_entropy=True)


@_token_logprobs.register_fake
def _(input: Tensor, target: Tensor, temperature: float, softcap: float,
      ignore_index: int) -> tuple[Tensor, Tensor]:
    shape, dtype = _positions(input), _stats_dtype(input.dtype)
    return input.new_empty(shape, dtype=dtype), input.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nblosses::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(input: Tensor, target: Tensor, grad_logp: Tensor,
                             grad_entropy: Tensor | None, temperature: float, softcap: float,
                             ignore_index: int) -> Tensor:
    """The logits' gradient of ``sum(grad_logp * logp + grad_entropy * entropy)``."""
    _, grad = _F.token_logprobs(
        _host_view(input), target, temperature=temperature, softcap=softcap or None,
        ignore_index=ignore_index, return_grad=True, grad_output=grad_logp.detach(),
        grad_entropy=None if grad_entropy is None else grad_entropy.detach())
    return grad.to(input.dtype)


@_token_logprobs_backward.register_fake
def _(input: Tensor, target: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None,
      temperature: float, softcap: float, ignore_index: int) -> Tensor:
    return torch.empty_like(input)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    input, target, *options = inputs
    ctx.save_for_backward(input, target)
    ctx.options = tuple(options)
    # An unused output's cotangent stays None (no zeros of the positions' shape).
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, g_logp: Tensor | None,
              g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
    rest = (None,) * (1 + len(ctx.options))
    if (g_logp is None and g_entropy is None) or not ctx.needs_input_grad[0]:
        return (None, *rest)
    input, target = ctx.saved_tensors
    if g_logp is None:  # only the entropy reaches the loss
        assert g_entropy is not None
        g_logp = torch.zeros_like(g_entropy)
    return (_token_logprobs_backward(input, target, g_logp, g_entropy, *ctx.options), *rest)


torch.library.register_autograd(_token_logprobs, _backward, setup_context=_setup_context)


def token_logprobs(input: Tensor, target: Tensor, *, temperature: float = 1.0,
                   softcap: float | None = None, ignore_index: int = -100,
                   return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-position log-probability of ``target`` under ``softmax(cap(input) / temperature)``
    and, with ``return_entropy``, the distribution's entropy; both differentiable with
    respect to ``input``.

    Parameters
    ----------
    input : Tensor
        Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class axis 1).
    target : Tensor
        Token indices (integers), ``input``'s shape without the class axis.
    temperature, softcap, ignore_index, return_entropy
        As in :func:`nblosses.functional.token_logprobs` (ignored positions give 0 and no
        gradient).

    Returns
    -------
    Tensor or tuple of Tensor
        ``logp``, or ``(logp, entropy)``: float32 for half-precision logits, else the logits'
        dtype.

    Examples
    --------
    >>> import torch
    >>> import nblosses.torch as nbt
    >>> logits = torch.zeros(2, 4, requires_grad=True)
    >>> logp, ent = nbt.token_logprobs(logits, torch.tensor([1, 3]), return_entropy=True)
    >>> (logp.sum() + 0.1 * ent.sum()).backward()
    >>> print(logp.detach(), logits.grad[0])
    tensor([-1.3863, -1.3863]) tensor([-0.2500,  0.7500, -0.2500, -0.2500])
    """
    logp, entropy = _token_logprobs(input, target, check_temperature(_NAME, temperature),
                                    _args.check_softcap(_NAME, softcap),
                                    _args.check_ignore_index(_NAME, ignore_index))
    return (logp, entropy) if return_entropy else logp
