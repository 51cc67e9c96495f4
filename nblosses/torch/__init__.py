"""nblosses inside torch autograd: drop-in ``torch.nn.functional`` losses and softmaxes.

Each function here has torch's signature (plus nblosses' keyword-only extras where they mean
something) and is differentiable by torch autograd. The kernels are nblosses' (Numba on the
CPU, CUDA through CuPy), reached through DLPack without copies. The losses compute their
gradient in the forward pass, in the same sweep over the logits as the loss; the backward pass
only scales that gradient by the upstream gradient, in place when autograd will not need it
again. Peak extra memory of a forward+backward is therefore the gradient itself, where torch
keeps the log-probabilities and then allocates the gradient (twice the logits).

Every op is a :func:`torch.library.custom_op` (``torch.ops.nblosses.*``) with a fake
(meta) implementation and a registered backward, so ``torch.compile(fullgraph=True)`` keeps
each call as one opaque node instead of breaking the graph.

Gradients flow to ``input`` only; ``target``, ``weight`` and ``pos_weight`` that require
grad raise ``NotImplementedError`` (torch computes no ``weight`` gradient either). There is no
double backward.

Importing this module imports torch; importing :mod:`nblosses` does not.

Examples
--------
>>> import torch
>>> import nblosses.torch as nbt
>>> logits = torch.zeros(2, 3, requires_grad=True)
>>> loss = nbt.cross_entropy(logits, torch.tensor([0, 2]))
>>> loss.backward()
>>> print(round(loss.item(), 4), logits.grad[0])
1.0986 tensor([-0.3333,  0.1667,  0.1667])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import _reduction

from .. import functional as _functional

# Untyped on purpose: the ops' schemas carry reduction as str, the stubs as Literal.
_F: Any = _functional

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "nll_loss",
    "softmax",
]

_EMPTY = (0,)


# ----------------------------------------------------------------------------- helpers
def _reduction_of(size_average: Any, reduce: Any, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def _wants_grad(input: Tensor, *others: Tensor | None) -> bool:
    """Whether this call is recorded for backward; others (targets, weights) cannot be."""
    if not torch.is_grad_enabled():
        return False
    for name, t in zip(("target", "weight", "pos_weight"), others):
        if t is not None and t.requires_grad:
            raise NotImplementedError(f"nblosses.torch: the derivative for {name!r} is not "
                                      "implemented (only input gets a gradient)")
    return input.requires_grad


def _no_grad(input: Tensor) -> Tensor:
    return input.new_empty(_EMPTY)


def _class_loss_shape(input: Tensor, reduction: str) -> list[int]:
    if reduction != "none" or input.dim() == 1:
        return []
    return [input.shape[0], *input.shape[2:]]


def _upstream(g: Tensor, grad: Tensor, class_axis: bool) -> Tensor:
    """The upstream gradient shaped to broadcast against ``grad``."""
    if g.dim() and class_axis:
        return g.unsqueeze(1)
    return g


def _may_overwrite() -> bool:
    """Whether the saved gradient can be scaled in place: eager autograd that frees the graph
    after this backward (not ``retain_graph=True``, not gradcheck, not a compiled trace)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def _scaled(grad: Tensor, g: Tensor, class_axis: bool) -> Tensor:
    """``grad * g`` (the chain rule), in place when allowed; a CPU scalar 1 costs nothing."""
    g = _upstream(g, grad, class_axis)
    overwrite = _may_overwrite()
    if overwrite and g.dim() == 0 and g.device.type == "cpu" and g.item() == 1.0:
        return grad.detach()
    return grad.mul_(g).detach() if overwrite else grad * g


def _register_loss(op: Any, shape: Callable[..., list[int]], class_axis: bool) -> None:
    """Fake implementation and autograd formula of a fused loss op returning
    ``(loss, grad)``, ``grad`` empty unless the last argument ``want_grad`` is true."""

    def fake(input: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        reduction = next(a for a in args if isinstance(a, str))
        loss = input.new_empty(shape(input, reduction))
        return loss, (torch.empty_like(input) if args[-1] else _no_grad(input))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        # No zeros of the gradient's size for the gradient output's (unused) cotangent.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])
        ctx.n_inputs = len(inputs)

    def backward(ctx: Any, g_loss: Tensor, _g_grad: Any) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        rest = (None,) * (ctx.n_inputs - 1)
        if g_loss is None:
            return (None, *rest)
        if grad.numel() == 0:
            raise RuntimeError("nblosses.torch: the gradient was not computed in the forward "
                               "pass (called under no_grad or without requires_grad)")
        return (_scaled(grad, g_loss, class_axis), *rest)

    torch.library.register_fake(op, fake)
    torch.library.register_autograd(op, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------- class losses
@torch.library.custom_op("nblosses::cross_entropy", mutates_args=())
def _cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                   reduction: str, label_smoothing: float, z_loss: float, softcap: float,
                   want_grad: bool) -> tuple[Tensor, Tensor]:
    out = _F.cross_entropy(input.detach(), target, weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                           softcap=softcap or None, return_grad=want_grad)
    return out if want_grad else (out, _no_grad(input))


@torch.library.custom_op("nblosses::nll_loss", mutates_args=())
def _nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
              reduction: str, want_grad: bool) -> tuple[Tensor, Tensor]:
    out = _F.nll_loss(input.detach(), target, weight, ignore_index=ignore_index,
                      reduction=reduction, return_grad=want_grad)
    return out if want_grad else (out, _no_grad(input))


_register_loss(_cross_entropy, _class_loss_shape, class_axis=True)
_register_loss(_nll_loss, _class_loss_shape, class_axis=True)


class _CrossEntropyInPlace(torch.autograd.Function):
    """Cross-entropy whose gradient overwrites the logits (``inplace_grad=True``)."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, weight: Tensor | None,
                options: dict[str, Any]) -> Tensor:
        # Written through a DLPack view, unseen by torch's version counter (as Liger-Kernel
        # does): the logits must not be needed by anything else afterwards.
        loss, _ = _F.cross_entropy(input.detach(), target, weight, return_grad=True,
                                   grad_buffer=input.detach(), **options)
        ctx.save_for_backward(input)
        return loss

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return _scaled(grad, g_loss, class_axis=True), None, None, None


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100,
                  reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, inplace_grad: bool = False) -> Tensor:
    """``torch.nn.functional.cross_entropy`` with the gradient fused into the forward pass.

    Parameters
    ----------
    input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As in :func:`torch.nn.functional.cross_entropy` (class indices or probabilities).
    z_loss : float
        Adds ``z_loss * logsumexp(input)**2`` per non-ignored position (PaLM's z-loss).
    softcap : float, optional
        Soft-caps the logits first: ``softcap * tanh(input / softcap)`` (Gemma 2).
    inplace_grad : bool
        Write the gradient into ``input``'s memory instead of a new tensor (saves the
        gradient's memory; Liger-Kernel's trick). ``input`` then holds the gradient, so
        nothing else may use the logits afterwards; eager mode only (ignored under
        ``torch.compile``, which then traces the regular op), and the compute dtype must be
        ``input``'s (float32 / float64 on the CPU).

    Returns
    -------
    Tensor
        The loss, as torch returns it; differentiable with respect to ``input``.
    """
    reduction = _reduction_of(size_average, reduce, reduction)
    want_grad = _wants_grad(input, target, weight)
    if inplace_grad and want_grad and not torch.compiler.is_compiling():
        options = {"ignore_index": ignore_index, "reduction": reduction,
                   "label_smoothing": label_smoothing, "z_loss": z_loss, "softcap": softcap}
        return _CrossEntropyInPlace.apply(input, target, weight, options)
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap or 0.0, want_grad)[0]


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None,
             size_average: bool | None = None, ignore_index: int = -100,
             reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.nll_loss`` (input: log-probabilities), gradient fused."""
    reduction = _reduction_of(size_average, reduce, reduction)
    return _nll_loss(input, target, weight, ignore_index, reduction,
                     _wants_grad(input, target, weight))[0]


# ----------------------------------------------------------------------------- linear + CE
def _linear_ce_shape(input: Tensor, linear_weight: Tensor, reduction: str) -> list[int]:
    return [] if reduction != "none" else [*input.shape[:-1], *linear_weight.shape[1:-1]]


def _call_linear_ce(tensors: tuple[Any, ...], options: tuple[Any, ...],
                    return_grad: bool, grad_output: Tensor | None = None) -> Any:
    """nblosses' ``linear_cross_entropy`` on detached ``(input, linear_weight, target,
    linear_bias, weight)`` with the op's ``(ignore_index, reduction, label_smoothing, z_loss,
    softcap)``."""
    input, linear_weight, target, linear_bias, weight = tensors
    ignore_index, reduction, label_smoothing, z_loss, softcap = options
    return _F.linear_cross_entropy(
        input.detach(), linear_weight.detach(), target,
        linear_bias=None if linear_bias is None else linear_bias.detach(), weight=weight,
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap or None, return_grad=return_grad,
        grad_output=None if grad_output is None else grad_output.detach())


@torch.library.custom_op("nblosses::linear_cross_entropy", mutates_args=())
def _linear_ce(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
               weight: Tensor | None, ignore_index: int | None, reduction: str,
               label_smoothing: float, z_loss: float, softcap: float,
               want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_linear_weight, grad_linear_bias)``; the gradients (for an
    upstream gradient of 1) only with ``want_grad``, else empty, as is a bias gradient without
    a bias."""
    result = _call_linear_ce((input, linear_weight, target, linear_bias, weight),
                             (ignore_index, reduction, label_smoothing, z_loss, softcap),
                             want_grad)
    if not want_grad:
        return result, _no_grad(input), _no_grad(input), _no_grad(input)
    loss, (gx, gw, gb) = result
    return loss, gx, gw, (_no_grad(input) if gb is None else gb)


@_linear_ce.register_fake
def _(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
      weight: Tensor | None, ignore_index: int | None, reduction: str, label_smoothing: float,
      z_loss: float, softcap: float, want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss = input.new_empty(_linear_ce_shape(input, linear_weight, reduction))
    if not want_grad:
        return loss, _no_grad(input), _no_grad(input), _no_grad(input)
    gb = _no_grad(input) if linear_bias is None else torch.empty_like(linear_bias)
    return loss, torch.empty_like(input), torch.empty_like(linear_weight), gb


def _linear_ce_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.options = inputs[6], inputs[5:10]
    if inputs[-1]:  # gradients from the forward pass: backward scales them
        ctx.save_for_backward(*output[1:])
    else:  # reduction="none": each row's upstream gradient is needed, so backward recomputes
        ctx.save_for_backward(*inputs[:5])


#: No gradient for target, weight and the six option arguments of ``_linear_ce``.
_NO_GRAD_TAIL = (None,) * 7


def _linear_ce_backward(ctx: Any, g_loss: Tensor, *_unused: Any) -> tuple[Tensor | None, ...]:
    if g_loss is None:
        return (None, None, None, None, *_NO_GRAD_TAIL)
    if ctx.reduction == "none":
        _, (gx, gw, gb) = _call_linear_ce(ctx.saved_tensors, ctx.options, True, g_loss)
    else:
        gx, gw, gb = ctx.saved_tensors
        if gx.numel() == 0 and gw.numel() == 0:
            raise RuntimeError("nblosses.torch: the gradient was not computed in the forward "
                               "pass (called under no_grad or without requires_grad)")
        gx, gw = _scaled(gx, g_loss, False), _scaled(gw, g_loss, False)
        gb = _scaled(gb, g_loss, False) if gb is not None and gb.numel() else None
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gw if need[1] else None, None,
            gb if gb is not None and need[3] else None, *_NO_GRAD_TAIL)


torch.library.register_autograd(_linear_ce, _linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options: Any = None,
                         z_loss: float = 0.0, softcap: float | None = None) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``: the final linear layer and the loss in
    one call, never forming the ``(N, V)`` logits, differentiable with respect to ``input``,
    ``linear_weight`` and ``linear_bias``.

    With ``mean`` / ``sum`` the three gradients come from the forward pass (the same chunked
    sweep) and backward only scales them; with ``reduction="none"`` each row's upstream
    gradient is needed, so backward runs the chunked computation again with it. ``options``
    (torch's chunking options) is accepted and ignored: nblosses picks its chunks within 5%
    of the logits' memory. ``z_loss`` and ``softcap`` as in :func:`cross_entropy`.
    """
    need = torch.is_grad_enabled() and (input.requires_grad or linear_weight.requires_grad or (
        linear_bias is not None and linear_bias.requires_grad))
    _wants_grad(input, target, weight)  # refuses target / weight gradients
    want_grad = bool(need) and reduction != "none"
    return _linear_ce(input, linear_weight, target, linear_bias, weight, ignore_index,
                      reduction, label_smoothing, z_loss, softcap or 0.0, want_grad)[0]


# ----------------------------------------------------------------------------- binary losses
def _binary_shape(input: Tensor, reduction: str) -> list[int]:
    return list(input.shape) if reduction == "none" else []


@torch.library.custom_op("nblosses::binary_cross_entropy", mutates_args=())
def _bce(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str,
         want_grad: bool) -> tuple[Tensor, Tensor]:
    out = _F.binary_cross_entropy(input.detach(), target, weight, reduction=reduction,
                                  return_grad=want_grad)
    return out if want_grad else (out, _no_grad(input))


@torch.library.custom_op("nblosses::binary_cross_entropy_with_logits", mutates_args=())
def _bce_logits(input: Tensor, target: Tensor, weight: Tensor | None,
                pos_weight: Tensor | None, reduction: str,
                want_grad: bool) -> tuple[Tensor, Tensor]:
    out = _F.binary_cross_entropy_with_logits(input.detach(), target, weight,
                                              reduction=reduction, pos_weight=pos_weight,
                                              return_grad=want_grad)
    return out if want_grad else (out, _no_grad(input))


_register_loss(_bce, _binary_shape, class_axis=False)
_register_loss(_bce_logits, _binary_shape, class_axis=False)


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                         size_average: bool | None = None, reduce: bool | None = None,
                         reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.binary_cross_entropy`` (input: probabilities), gradient fused."""
    reduction = _reduction_of(size_average, reduce, reduction)
    return _bce(input, target, weight, reduction, _wants_grad(input, target, weight))[0]


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Tensor | None = None,
                                     size_average: bool | None = None,
                                     reduce: bool | None = None, reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits``, gradient fused."""
    reduction = _reduction_of(size_average, reduce, reduction)
    want_grad = _wants_grad(input, target, weight, pos_weight)
    return _bce_logits(input, target, weight, pos_weight, reduction, want_grad)[0]


# ----------------------------------------------------------------------------- softmax family
@torch.library.custom_op("nblosses::softmax", mutates_args=())
def _softmax(input: Tensor, dim: int, log: bool) -> Tensor:
    return (_F.log_softmax if log else _F.softmax)(input.detach(), dim)


@torch.library.custom_op("nblosses::softmax_backward", mutates_args=())
def _softmax_backward(grad_output: Tensor, output: Tensor, dim: int, log: bool) -> Tensor:
    return (_F.log_softmax_backward if log else _F.softmax_backward)(grad_output.detach(),
                                                                        output.detach(), dim)


@_softmax.register_fake
def _(input: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty_like(input)


@_softmax_backward.register_fake
def _(grad_output: Tensor, output: Tensor, dim: int, log: bool) -> Tensor:
    return torch.empty_like(output)


def _softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(output)
    ctx.dim, ctx.log = inputs[1], inputs[2]


def _softmax_grad(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
    (output,) = ctx.saved_tensors
    return _softmax_backward(g, output, ctx.dim, ctx.log), None, None


torch.library.register_autograd(_softmax, _softmax_grad, setup_context=_softmax_setup)


def _softmax_call(input: Tensor, dim: int | None, dtype: torch.dtype | None,
                  log: bool) -> Tensor:
    if dtype is not None:
        input = input.to(dtype)
    if dim is None:
        # torch's deprecation warning and choice of axis
        dim = torch.nn.functional._get_softmax_dim(  # type: ignore[attr-defined]
            "log_softmax" if log else "softmax", input.dim(), 3)
    return _softmax(input, dim % max(input.dim(), 1), log)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """``torch.nn.functional.softmax``; backward by nblosses' ``softmax_backward``."""
    return _softmax_call(input, dim, dtype, log=False)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """``torch.nn.functional.log_softmax``; backward by nblosses' ``log_softmax_backward``."""
    return _softmax_call(input, dim, dtype, log=True)
