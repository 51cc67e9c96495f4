"""How an op spec becomes a differentiable torch op: the one mechanism behind the generated
functions of :mod:`nblosses.torch` (:mod:`nblosses.torch._generated`).

Two kinds of ops, by their spec's ``autograd``:

``FUSED_LOSS``
    :func:`fused_loss_op` makes the custom op ``nblosses::<name>`` returning ``(loss, grad)``.
    A reduced loss (``reduction`` other than ``"none"``) that autograd records computes its
    gradient in the forward pass, in the same sweep over ``input`` as the loss; backward only
    scales it by the (scalar) upstream gradient, in place when autograd will not need it again.
    An unreduced loss has one upstream gradient per position, unknown until backward: the
    forward pass computes the loss alone and backward calls the op once more with
    ``grad_output`` (the op's own fused loss+gradient sweep), which reads the input once and
    writes the gradient once, where a forward gradient scaled afterwards would be read and
    written twice. Either way the gradient is exact for any loss shape (broadcast inputs
    included) and only ``input`` gets one.
``SOFTMAX``
    :func:`softmax_ops` makes ``nblosses::<name>``, saving its output; backward is another
    custom op, named after the spec's ``gradient_op``.

Every op is a :func:`torch.library.custom_op` with a fake implementation and a registered
backward, so ``torch.compile(fullgraph=True)`` keeps a call as one node, and backward itself
only calls custom ops (it traces too).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import _reduction

from .. import _args
from .. import functional as _functional
from .._spec import OpSpec

__all__ = ["F", "cast", "fused_loss_op", "head_backward", "head_fake", "head_loss_op",
           "head_results", "head_setup", "in_place", "no_grad", "run_loss", "scaled",
           "softmax_dim", "softmax_ops", "tensor_list", "wants_grad"]

# Untyped on purpose: the ops' options travel as plain values (the overloads want literals).
F: Any = _functional

_EMPTY = (0,)


# ----------------------------------------------------------------------------- arguments
def no_grad(input: Tensor) -> Tensor:
    """The empty tensor standing for a gradient that was not computed."""
    return input.new_empty(_EMPTY)


def wants_grad(input: Tensor, **others: Any) -> bool:
    """Whether autograd records this call (``input`` requires grad, grad mode on); the other
    arrays cannot be differentiated, so one that requires grad raises ``NotImplementedError``."""
    if not torch.is_grad_enabled():
        return False
    for name, value in others.items():
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if getattr(t, "requires_grad", False):
                raise NotImplementedError(f"nblosses.torch: the derivative for {name!r} is not "
                                          "implemented (only input gets a gradient)")
    return input.requires_grad


def tensor_list(value: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """An array argument that may be a tuple of tensors (a top-k teacher's ``(indices,
    log_probs)``) as the tensor list the op's schema takes."""
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _host(value: Any) -> Any:
    """An op argument as :mod:`nblosses.functional` takes it: tensors detached (their autograd
    is this module's), a tensor list back to one tensor or a tuple."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, list):
        return value[0].detach() if len(value) == 1 else tuple(t.detach() for t in value)
    return value


def _resolved(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``reduction`` resolved from torch's legacy ``size_average`` / ``reduce``
    (silently: the op warns when it runs, as torch does)."""
    if values.get("size_average") is None and values.get("reduce") is None:
        return values
    legacy = _reduction.legacy_get_string(values["size_average"], values["reduce"],
                                          emit_warning=False)
    return {**values, "reduction": legacy}


def _forward_grad(values: dict[str, Any]) -> bool:
    """Whether a fused-loss call computes its gradient in the forward pass: recorded by
    autograd and reduced (one scalar upstream gradient then scales it)."""
    return bool(values["want_grad"]) and _resolved(values).get("reduction", "none") != "none"


# ----------------------------------------------------------------------------- fused losses
def run_loss(fn: Callable[..., Any], **values: Any) -> tuple[Tensor, Tensor]:
    """The body of a fused-loss op: ``fn`` (the :mod:`nblosses.functional` function) on the
    op's arguments, returning ``(loss, grad)``; ``grad`` is empty unless the call computes it
    (:func:`_forward_grad`, or a ``grad_output`` given by backward)."""
    grad_output = values.pop("grad_output")
    grad = _forward_grad(values) or grad_output is not None
    del values["want_grad"]
    kwargs = {name: _host(v) for name, v in values.items()}
    if not grad:
        return fn(**kwargs), no_grad(values["input"])
    if grad_output is not None:
        kwargs["grad_output"] = grad_output.detach()
    loss, g = fn(**kwargs, return_grad=True)
    return loss, g


def fused_loss_op(spec: OpSpec) -> Callable[[Callable[..., Any]], Any]:
    """Decorator making ``nblosses::<spec.name>`` of a fused-loss op body (typed, so that torch
    infers the schema: the spec's array and option parameters, then ``want_grad: bool`` and
    ``grad_output: Tensor | None``; it returns ``(loss, grad)``), with its fake and autograd."""

    def make(body: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(f"nblosses::{spec.name}", body, mutates_args=())
        names = tuple(inspect.signature(body).parameters)

        def fake(*args: Any) -> tuple[Tensor, Tensor]:
            values = dict(zip(names, args))
            input = values["input"]
            loss = input.new_empty(spec.result_shape(_resolved(values)))
            grad = _forward_grad(values) or values["grad_output"] is not None
            return loss, torch.empty_like(input) if grad else no_grad(input)

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
            ctx.mark_non_differentiable(output[1])
            # No zeros of the gradient's size for the gradient output's (unused) cotangent.
            ctx.set_materialize_grads(False)
            values = dict(zip(names, inputs))
            # No gradient for the other arguments: one None each, a list of them for a list.
            ctx.rest = tuple([None] * len(v) if isinstance(v, list) else None
                             for v in inputs[1:])
            ctx.scales = _forward_grad(values)
            if ctx.scales:
                ctx.save_for_backward(output[1])
                return
            # Backward calls the op again: keep its arguments, the tensors through autograd.
            ctx.arguments, tensors = _pack(inputs)
            ctx.save_for_backward(*tensors)

        def backward(ctx: Any, g_loss: Tensor | None, _g_grad: Any) -> tuple[Any, ...]:
            if g_loss is None:
                return (None, *ctx.rest)
            if ctx.scales:
                (grad,) = ctx.saved_tensors
                return (scaled(grad, g_loss), *ctx.rest)
            args = _unpack(ctx.arguments, ctx.saved_tensors)
            args[-2:] = [True, g_loss]  # want_grad, grad_output
            return (op(*args)[1], *ctx.rest)

        op.register_fake(fake)
        op.register_autograd(backward, setup_context=setup_context)
        return op

    return make


def _pack(inputs: tuple[Any, ...]) -> tuple[list[tuple[str, Any]], list[Tensor]]:
    """An op's arguments as ``(layout, tensors)``: each argument is ``("tensor", None)``,
    ``("list", n)`` (a tensor list) or ``("value", value)``; :func:`_unpack` inverts it."""
    layout: list[tuple[str, Any]] = []
    tensors: list[Tensor] = []
    for v in inputs:
        if isinstance(v, Tensor):
            layout.append(("tensor", None))
            tensors.append(v)
        elif isinstance(v, list) and v and isinstance(v[0], Tensor):
            layout.append(("list", len(v)))
            tensors += v
        else:
            layout.append(("value", v))
    return layout, tensors


def _unpack(layout: list[tuple[str, Any]], tensors: tuple[Tensor, ...]) -> list[Any]:
    saved = iter(tensors)
    return [next(saved) if kind == "tensor" else [next(saved) for _ in range(v)]
            if kind == "list" else v for kind, v in layout]


def _may_overwrite() -> bool:
    """Whether the saved gradient can be scaled in place: eager autograd that frees the graph
    after this backward (not ``retain_graph=True``, not gradcheck, not a compiled trace)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def scaled(grad: Tensor, g: Tensor) -> Tensor:
    """``grad * g`` (the chain rule; ``g`` broadcasts), in place when allowed; a CPU scalar 1
    costs nothing."""
    overwrite = _may_overwrite()
    if overwrite and g.dim() == 0 and g.device.type == "cpu" and g.item() == 1.0:
        return grad.detach()
    return grad.mul_(g).detach() if overwrite else grad * g


class _InPlaceLoss(torch.autograd.Function):
    """A fused loss whose gradient overwrites ``input`` (``inplace_grad=True``): written
    through a DLPack view, unseen by torch's version counter (as Liger-Kernel does), so
    ``input`` must not be needed by anything else afterwards."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, fn: Callable[..., Any], options: dict[str, Any]) -> Tensor:
        x = input.detach()
        ctx.scales = _forward_grad({**options, "want_grad": True})
        ctx.fn, ctx.options = fn, options
        ctx.save_for_backward(input)
        if not ctx.scales:  # one upstream gradient per position: backward writes the gradient
            return fn(x, **options)
        loss, _ = fn(x, **options, return_grad=True, grad_buffer=x)
        return loss

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor) -> tuple[Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        if ctx.scales:
            return scaled(grad, g_loss), None, None
        x = grad.detach()
        ctx.fn(x, **ctx.options, return_grad=True, grad_output=g_loss.detach(), grad_buffer=x)
        return x, None, None


def in_place(fn: Callable[..., Any], input: Tensor, **options: Any) -> Tensor:
    """The loss of ``fn`` (a :mod:`nblosses.functional` function) on ``input`` and the other
    arguments ``options``, its gradient written into ``input`` (eager mode only)."""
    return _InPlaceLoss.apply(input, fn, {k: _host(v) for k, v in options.items()})


# ----------------------------------------------------------------------------- softmaxes
def softmax_ops(spec: OpSpec) -> Any:
    """``nblosses::<spec.name>`` of the functional op (``(input, dim) -> output``) with its fake
    and autograd, and the custom op of its gradient op (the spec's ``gradient_op``,
    ``(grad_output, output, dim) -> grad``) that its backward calls on the saved output; the
    first is returned."""
    forward, gradient = getattr(F, spec.name), getattr(F, str(spec.gradient_op))

    def grad_body(grad_output: Tensor, output: Tensor, dim: int) -> Tensor:
        return gradient(grad_output.detach(), output.detach(), dim=dim)

    def body(input: Tensor, dim: int) -> Tensor:
        return forward(input.detach(), dim=dim)

    backward = torch.library.custom_op(f"nblosses::{spec.gradient_op}", grad_body,
                                       mutates_args=())
    backward.register_fake(lambda grad_output, output, dim: torch.empty_like(output))
    op = torch.library.custom_op(f"nblosses::{spec.name}", body, mutates_args=())

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    def grad(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:
        (output,) = ctx.saved_tensors
        return backward(g, output, ctx.dim), None

    op.register_fake(lambda input, dim: torch.empty_like(input))
    op.register_autograd(grad, setup_context=setup_context)
    return op


def head_fake(loss: Tensor, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
              want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fake results of an LM-head loss op: ``(loss, grad_input, grad_weight, grad_bias)``,
    the gradients empty placeholders (:func:`no_grad`) when not computed."""
    if not want_grad:
        return loss, no_grad(input), no_grad(input), no_grad(input)
    gb = no_grad(input) if linear_bias is None else torch.empty_like(linear_bias)
    return loss, torch.empty_like(input), torch.empty_like(linear_weight), gb


def head_results(result: Any, input: Tensor,
                 want_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The results of an LM-head loss op from its :mod:`nblosses.functional` call's ``result``
    (the loss, or with ``want_grad`` ``(loss, (grad_input, grad_weight, grad_bias))``):
    ``(loss, grad_input, grad_weight, grad_bias)``, a gradient not computed (or the bias's,
    without a bias) an empty placeholder (:func:`no_grad`): a custom op returns tensors only.
    """
    if not want_grad:
        return result, no_grad(input), no_grad(input), no_grad(input)
    loss, (gx, gw, gb) = result
    return loss, gx, gw, (no_grad(input) if gb is None else gb)


def head_backward(ctx: Any, g_loss: Tensor | None, call: Callable[..., Any], *,
                  bias_at: int) -> tuple[Tensor | None, ...]:
    """The backward of an LM-head loss op: one entry per op argument, the gradients of
    ``input`` (argument 0), ``linear_weight`` (1) and ``linear_bias`` (argument ``bias_at``)
    where autograd needs them, None for the others.

    From what :func:`head_setup` saved: the forward pass's gradients scaled by ``g_loss``, or
    (``reduction="none"``: one upstream gradient per row) ``call(arrays, options, True,
    g_loss)``, the op's chunked computation run again with it.
    """
    need = ctx.needs_input_grad
    grads: list[Tensor | None] = [None] * len(need)
    if g_loss is None:
        return tuple(grads)
    if ctx.reduction == "none":
        _, (gx, gw, gb) = call(ctx.saved_tensors, ctx.options, True, g_loss)
    else:
        gx, gw, gb = ctx.saved_tensors
        if gx.numel() == 0 and gw.numel() == 0:
            raise RuntimeError("nblosses.torch: the gradient was not computed in the forward "
                               "pass (called under no_grad or without requires_grad)")
        gx, gw = scaled(gx, g_loss), scaled(gw, g_loss)
        gb = scaled(gb, g_loss) if gb is not None and gb.numel() else None
    grads[0] = gx if need[0] else None
    grads[1] = gw if need[1] else None
    grads[bias_at] = gb if gb is not None and need[bias_at] else None
    return tuple(grads)


def head_setup(ctx: Any, output: tuple[Tensor, ...], *, forward_grad: bool,
               arrays: tuple[Any, ...], reduction: str, options: tuple[Any, ...]) -> None:
    """``setup_context`` of an LM-head loss op returning ``(loss, *gradients)``: the gradients
    computed in the forward pass (``forward_grad``) are saved for backward to scale; without
    them (``reduction="none"``: each row's upstream gradient is needed) the op's ``arrays``
    are saved, for backward to run the op again with the upstream gradient."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.options = reduction, options
    ctx.save_for_backward(*(output[1:] if forward_grad else arrays))


def head_loss_op(name: str, call: Callable[..., Any], *,
                 arrays: int) -> Callable[[Callable[..., Any]], Any]:
    """Decorator making ``nblosses::<name>`` of an LM-head loss op body, with its fake and
    autograd (:func:`head_fake`, :func:`head_setup`, :func:`head_backward`).

    The body is typed, so that torch infers the schema: its first ``arrays`` parameters are
    the arrays (``input``, ``linear_weight`` and ``linear_bias`` among them), then the options
    (``reduction`` among them) and last ``want_grad: bool``; it returns ``(loss, grad_input,
    grad_linear_weight, grad_linear_bias)`` (:func:`head_results`). ``call(arrays, options,
    return_grad, grad_output)`` is its :mod:`nblosses.functional` call, which backward runs
    again when the loss is unreduced. The unreduced loss has one value per row of ``input``
    and per output of ``linear_weight``'s middle axes (none for a ``(V, d)`` head).
    """

    def make(body: Callable[..., Any]) -> Any:
        op = torch.library.custom_op(f"nblosses::{name}", body, mutates_args=())
        names = tuple(inspect.signature(body).parameters)
        assert names[-1] == "want_grad", names
        bias_at, reduction_at = names.index("linear_bias"), names.index("reduction")

        def fake(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            values = dict(zip(names, args))
            input, weight = values["input"], values["linear_weight"]
            shape = ([*input.shape[:-1], *weight.shape[1:-1]]
                     if values["reduction"] == "none" else [])
            return head_fake(input.new_empty(shape), input, weight, values["linear_bias"],
                             values["want_grad"])

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
            head_setup(ctx, output, forward_grad=inputs[-1], arrays=inputs[:arrays],
                       reduction=inputs[reduction_at], options=inputs[arrays:-1])

        def backward(ctx: Any, g_loss: Tensor, *_unused: Any) -> tuple[Tensor | None, ...]:
            return head_backward(ctx, g_loss, call, bias_at=bias_at)

        op.register_fake(fake)
        op.register_autograd(backward, setup_context=setup_context)
        return op

    return make


def cast(input: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``input`` in ``dtype`` first (torch's softmax ``dtype=``), recorded by autograd."""
    return input if dtype is None else input.to(dtype)


def softmax_dim(name: str, input: Tensor, dim: int | None) -> int:
    """``dim`` checked and made non-negative; ``None`` warns and picks torch's legacy axis."""
    return _args.softmax_dim(name, input.dim(), dim)
