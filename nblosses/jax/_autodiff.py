"""How an op spec becomes a differentiable JAX function: the one mechanism behind the
generated functions of :mod:`nblosses.jax` (:mod:`nblosses.jax._generated`).

Each call runs as one FFI custom call (:mod:`nblosses.jax._bridge`) and is differentiated by
:func:`jax.custom_vjp`, by the spec's ``autograd``:

``FUSED_LOSS``
    Reduced (any ``reduction`` but ``"none"``): the forward pass of a differentiated call asks
    for the loss and its gradient in one call (one sweep over ``input``) and keeps the gradient
    as the residual; backward multiplies it by the scalar cotangent (XLA drops the product when
    the cotangent is the constant 1 of ``grad`` / ``value_and_grad``). Unreduced: one
    cotangent per position, known only in backward, which then runs the op's fused
    loss+gradient call with it as ``grad_output``. Only ``input`` gets a cotangent.
``SOFTMAX``
    The output is the residual; backward is the spec's gradient op on it.

Options are checked when the function is traced (they are static: Python values, not
arrays); array shapes and values are checked by the op when it runs, and its errors come back
as JAX runtime errors naming the Python exception.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import _args
from .._spec import OpSpec
from ._bridge import Request, call

__all__ = ["fused_loss", "softmax"]


def _struct(like: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(like.shape, like.dtype)


def _option(spec: OpSpec, name: str, value: Any) -> Any:
    """A static option, checked now as the op checks it (the op takes the caller's value: a
    check's canonical value is the kernel's), as a plain Python value."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise TypeError(f"{spec.name}: {name} must be a Python value (it is static under "
                        f"jit), got a JAX array")
    check = spec.param(name).check
    if check is not None:
        check(spec.name, value)
    return value.item() if hasattr(value, "item") else value


def _arrays(spec: OpSpec, values: dict[str, Any]) -> tuple[tuple[tuple[str, int], ...],
                                                            list[Any], dict[str, Any]]:
    """The array arguments as a :class:`Request` layout, the operands (a tuple argument, a
    top-k teacher's ``(indices, log_probs)``, is several operands) and ``values`` with the
    arrays as JAX arrays."""
    layout, operands, converted = [], [], dict(values)
    for name in spec.array_params:
        value = values.get(name)
        if name not in values or value is None:
            layout += [(name, 0)] if name in values else []
        elif isinstance(value, (tuple, list)):
            converted[name] = tuple(jnp.asarray(v) for v in value)
            layout.append((name, len(value)))
            operands += converted[name]
        else:
            converted[name] = jnp.asarray(value)
            layout.append((name, -1))
            operands.append(converted[name])
    return tuple(layout), operands, converted


# ----------------------------------------------------------------------------- fused losses
@dataclasses.dataclass(frozen=True)
class _Loss:
    """The static part of a fused-loss call: its forward request, whether it is reduced, and
    the loss's shape and dtype."""

    request: Request
    reduced: bool
    loss: jax.ShapeDtypeStruct


def fused_loss(spec: OpSpec, values: dict[str, Any]) -> Any:
    """The loss of ``spec`` on ``values`` (every argument of the public function by name),
    differentiable with respect to ``input``."""
    layout, operands, converted = _arrays(spec, values)
    options = tuple((name, _option(spec, name, v)) for name, v in values.items()
                    if name not in spec.array_params)
    input = operands[0]
    reduced = dict(options).get("reduction", "none") != "none"
    loss = spec.result_shape({**converted, **dict(options)})
    how = _Loss(Request(spec.name, layout, options), reduced,
                jax.ShapeDtypeStruct(loss, input.dtype))
    return _loss(how, input, tuple(operands[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(how: _Loss, input: Any, others: tuple[Any, ...]) -> Any:
    return call(how.request, [input, *others], (how.loss,))[0]


def _loss_fwd(how: _Loss, input: Any, others: tuple[Any, ...]) -> tuple[Any, Any]:
    if not how.reduced:  # the cotangent has the loss's shape: backward runs the fused call
        return _loss(how, input, others), (input, others)
    request = dataclasses.replace(how.request, return_grad=True)
    loss, grad = call(request, [input, *others], (how.loss, _struct(input)))
    return loss, grad


def _loss_bwd(how: _Loss, residual: Any, g: Any) -> tuple[Any, None]:
    if how.reduced:
        return residual * g.astype(residual.dtype), None
    input, others = residual
    request = dataclasses.replace(how.request, arrays=(*how.request.arrays, ("grad_output", -1)),
                                  return_grad=True)
    _, grad = call(request, [input, *others, g], (how.loss, _struct(input)))
    return grad, None


_loss.defvjp(_loss_fwd, _loss_bwd)


# ----------------------------------------------------------------------------- softmaxes
@dataclasses.dataclass(frozen=True)
class _Softmax:
    """The static part of a softmax call: its forward and gradient requests."""

    forward: Request
    backward: Request


def softmax(spec: OpSpec, values: dict[str, Any]) -> Any:
    """``spec``'s softmax of ``values["input"]`` (cast to ``dtype`` first when given) along
    ``dim``, differentiable."""
    x = jnp.asarray(values["input"])
    if values.get("dtype") is not None:
        x = x.astype(values["dtype"])
    options = tuple((name, _args.softmax_dim(spec.name, x.ndim, v) if name == "dim"
                     else _option(spec, name, v)) for name, v in values.items()
                    if name not in ("input", "dtype"))
    how = _Softmax(Request(spec.name, (("input", -1),), options),
                   Request(spec.gradient_op or "", (("grad_output", -1), ("output", -1)),
                           options))
    return _softmax(how, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax(how: _Softmax, x: Any) -> Any:
    return call(how.forward, [x], (_struct(x),))[0]


def _softmax_fwd(how: _Softmax, x: Any) -> tuple[Any, Any]:
    y = _softmax(how, x)
    return y, y


def _softmax_bwd(how: _Softmax, y: Any, g: Any) -> tuple[Any]:
    return (call(how.backward, [g, y], (_struct(y),))[0],)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
