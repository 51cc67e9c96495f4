"""``linear_token_logprobs`` inside torch autograd: per-token log-probabilities and entropies of
an LM head's ``softmax(cap(input @ linear_weight.T + linear_bias) / T)``, both differentiable
with respect to the input, the weight and the bias; the ``(N, V)`` logits are never formed.

As :mod:`._token_logprobs`: the forward pass computes both statistics in one chunked sweep;
the gradient depends on both upstream gradients, known only in backward, so backward runs the
chunked sweep again with them (``return_grad=True``: the logits recomputed block by block).
Only the input, the weight, the bias and the targets are saved. Both passes are
:func:`torch.library.custom_op`\\ s (``torch.ops.nblosses.linear_token_logprobs`` and
``..._backward``) with fake implementations. bfloat16 on the CPU is computed in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _args
from .. import functional as _functional
from ..ops.token_logprobs import check_temperature

_F: Any = _functional

__all__ = ["linear_token_logprobs"]

_NAME = "linear_token_logprobs"


def _host(t: Tensor | None) -> Tensor | None:
    """Detached; bfloat16 on the CPU as float32 (NumPy has no bfloat16)."""
    if t is None:
        return None
    t = t.detach()
    return t.float() if t.device.type == "cpu" and t.dtype == torch.bfloat16 else t


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.custom_op("nblosses::linear_token_logprobs", mutates_args=())
def _ltlp(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
          temperature: float, softcap: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(logp, entropy)`` of every row."""
    return _F.linear_token_logprobs(_host(input), _host(linear_weight), target,
                                    linear_bias=_host(linear_bias), temperature=temperature,
                                    softcap=softcap or None, ignore_index=ignore_index,
                                    return_entropy=True)


@_ltlp.register_fake
def _(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
      temperature: float, softcap: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    shape, dtype = list(input.shape[:-1]), _stats_dtype(input.dtype)
    return input.new_empty(shape, dtype=dtype), input.new_empty(shape, dtype=dtype)


@torch.library.custom_op("nblosses::linear_token_logprobs_backward", mutates_args=())
def _ltlp_backward(input: Tensor, linear_weight: Tensor, target: Tensor,
                   linear_bias: Tensor | None, grad_logp: Tensor, grad_entropy: Tensor | None,
                   temperature: float, softcap: float,
                   ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_linear_weight, grad_linear_bias)`` of ``sum(grad_logp * logp +
    grad_entropy * entropy)`` (the last empty without a bias)."""
    _, (gx, gw, gb) = _F.linear_token_logprobs(
        _host(input), _host(linear_weight), target, linear_bias=_host(linear_bias),
        temperature=temperature, softcap=softcap or None, ignore_index=ignore_index,
        return_grad=True, grad_output=grad_logp.detach(),
        grad_entropy=None if grad_entropy is None else grad_entropy.detach())
    gb = input.new_empty(0) if gb is None else gb.to(linear_weight.dtype)
    return gx.to(input.dtype), gw.to(linear_weight.dtype), gb


@_ltlp_backward.register_fake
def _(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
      grad_logp: Tensor, grad_entropy: Tensor | None, temperature: float, softcap: float,
      ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    gb = input.new_empty(0) if linear_bias is None else torch.empty_like(linear_bias)
    return torch.empty_like(input), torch.empty_like(linear_weight), gb


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    input, weight, target, bias, *options = inputs
    ctx.save_for_backward(input, weight, target, bias)
    ctx.options = tuple(options)
    ctx.set_materialize_grads(False)  # an unused output's cotangent stays None


def _backward(ctx: Any, g_logp: Tensor | None,
              g_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
    rest = (None,) * len(ctx.options)
    need = ctx.needs_input_grad
    if (g_logp is None and g_entropy is None) or not (need[0] or need[1] or need[3]):
        return (None,) * (4 + len(ctx.options))
    input, weight, target, bias = ctx.saved_tensors
    if g_logp is None:  # only the entropy reaches the loss
        assert g_entropy is not None
        g_logp = torch.zeros_like(g_entropy)
    gx, gw, gb = _ltlp_backward(input, weight, target, bias, g_logp, g_entropy, *ctx.options)
    return (gx if need[0] else None, gw if need[1] else None, None,
            gb if bias is not None and need[3] else None, *rest)


torch.library.register_autograd(_ltlp, _backward, setup_context=_setup_context)


def linear_token_logprobs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Tensor | None = None, temperature: float = 1.0,
                          softcap: float | None = None, ignore_index: int = -100,
                          return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row log-probability of ``target`` under ``softmax(cap(input @ linear_weight.T +
    linear_bias) / temperature)`` and, with ``return_entropy``, the entropy; both
    differentiable with respect to ``input``, ``linear_weight`` and ``linear_bias``.

    Parameters
    ----------
    input : Tensor
        Features ``(N, d)`` or ``(d,)``.
    linear_weight : Tensor
        The output layer, ``(V, d)``.
    target : Tensor
        Token indices ``(N,)`` (``()`` for a ``(d,)`` input).
    linear_bias, temperature, softcap, ignore_index, return_entropy
        As in :func:`nblosses.functional.linear_token_logprobs` (ignored rows give 0 and no
        gradient).

    Returns
    -------
    Tensor or tuple of Tensor
        ``logp``, or ``(logp, entropy)``: float32 for half-precision input, else its dtype.

    Examples
    --------
    >>> import torch
    >>> import nblosses.torch as nbt
    >>> x = torch.zeros(2, 3, requires_grad=True)
    >>> w = torch.zeros(4, 3, requires_grad=True)
    >>> logp, ent = nbt.linear_token_logprobs(x, w, torch.tensor([1, 3]), return_entropy=True)
    >>> (logp.sum() + 0.1 * ent.sum()).backward()
    >>> print(logp.detach(), w.grad[1])
    tensor([-1.3863, -1.3863]) tensor([0., 0., 0.])
    """
    logp, entropy = _ltlp(input, linear_weight, target, linear_bias,
                          check_temperature(_NAME, temperature),
                          _args.check_softcap(_NAME, softcap),
                          _args.check_ignore_index(_NAME, ignore_index))
    return (logp, entropy) if return_entropy else logp
