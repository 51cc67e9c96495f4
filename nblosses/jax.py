"""nblosses inside JAX: ``cross_entropy``, ``softmax`` and ``log_softmax`` that work under
``jax.jit`` and ``jax.grad``.

The forward pass runs nblosses' CPU kernels through :func:`jax.pure_callback` (the callback
receives host NumPy arrays, which nblosses reads without copying); the gradient comes from
:func:`jax.custom_vjp`. Cross-entropy computes its gradient in the same pass as the loss and
keeps it as the residual, so the backward pass only multiplies it by the cotangent; the
softmaxes keep their output and call nblosses' ``softmax_backward`` / ``log_softmax_backward``.

Conventions are torch's, as everywhere in nblosses: the class axis is axis 1 of an
``(N, C, d1, ...)`` input (axis 0 of a ``(C,)`` one), class-index targets are integers,
``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``.

Scope: a callback runs on the host, so on a GPU the arrays travel to the host and back;
outside ``jit``, JAX GPU arrays can go straight to :mod:`nblosses.functional` (DLPack, the
``"cuda"`` backend, no copies). Under ``jax.vmap`` the callback runs once per batch element.
Gradients flow to the logits only (none to targets or weights); no higher derivatives.

Importing this module imports JAX; importing :mod:`nblosses` does not.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import nblosses.jax as nbj
>>> x = jnp.zeros((2, 3))
>>> t = jnp.array([0, 2])
>>> loss, grad = jax.jit(jax.value_and_grad(nbj.cross_entropy))(x, t)
>>> import numpy as np
>>> print(round(float(loss), 4), np.asarray(grad[0]).round(4))
1.0986 [-0.3333  0.1667  0.1667]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import functional

# Untyped on purpose: the options travel as plain values (the overloads want literals).
_F: Any = functional

__all__ = ["cross_entropy", "log_softmax", "softmax"]


def _struct(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _loss_shape(x: Any, reduction: str) -> tuple[int, ...]:
    if reduction != "none" or x.ndim == 1:
        return ()
    return (x.shape[0], *x.shape[2:])


# ----------------------------------------------------------------------------- cross-entropy
def _ce_callback(x: Any, target: Any, weight: Any, options: tuple, want_grad: bool) -> Any:
    """``(loss, grad)`` (or ``loss``) of the nblosses CPU kernels, as a JAX callback."""
    ignore_index, reduction, label_smoothing, z_loss, softcap = options

    def host(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> Any:
        out = _F.cross_entropy(x, target, weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing,
                               z_loss=z_loss, softcap=softcap, return_grad=want_grad,
                               backend="cpu")
        return tuple(np.asarray(o) for o in out) if want_grad else np.asarray(out)

    loss = _struct(_loss_shape(x, reduction), x.dtype)
    shapes = (loss, _struct(x.shape, x.dtype)) if want_grad else loss
    return jax.pure_callback(host, shapes, x, target, weight, vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(x: Any, target: Any, weight: Any, options: tuple) -> Any:
    return _ce_callback(x, target, weight, options, want_grad=False)


def _cross_entropy_fwd(x: Any, target: Any, weight: Any, options: tuple) -> Any:
    loss, grad = _ce_callback(x, target, weight, options, want_grad=True)
    return loss, grad


def _cross_entropy_bwd(options: tuple, grad: Any, g: Any) -> tuple[Any, None, None]:
    if g.ndim and grad.ndim > 1:  # "none": one cotangent per position, class axis 1
        g = jnp.expand_dims(g, 1)
    return grad * g, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def cross_entropy(input: Any, target: Any, weight: Any = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None) -> Any:
    """Cross-entropy of logits (torch semantics), differentiable by ``jax.grad``.

    Parameters
    ----------
    input : jax.Array
        Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``, float32 (float64 with
        ``jax_enable_x64``).
    target : jax.Array
        Class indices (integers, ``input``'s shape without axis 1) or class probabilities
        (``input``'s shape and dtype).
    weight : jax.Array, optional
        Per-class weights ``(C,)``.
    ignore_index, reduction, label_smoothing, z_loss, softcap
        As in :func:`nblosses.functional.cross_entropy`.

    Returns
    -------
    jax.Array
        0-d for ``"mean"`` / ``"sum"``, else the unreduced shape.
    """
    options = (int(ignore_index), str(reduction), float(label_smoothing), float(z_loss),
               None if softcap is None else float(softcap))
    return _cross_entropy(input, target, weight, options)


# ----------------------------------------------------------------------------- softmax family
def _call(fn: Any, shape_like: Any, *arrays: Any, dim: int) -> Any:
    def host(*arrays: np.ndarray) -> np.ndarray:
        return np.asarray(fn(*arrays, dim=dim, backend="cpu"))

    return jax.pure_callback(host, _struct(shape_like.shape, shape_like.dtype), *arrays,
                             vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax(x: Any, dim: int, log: bool) -> Any:
    return _call(_F.log_softmax if log else _F.softmax, x, x, dim=dim)


def _softmax_fwd(x: Any, dim: int, log: bool) -> tuple[Any, Any]:
    y = _softmax(x, dim, log)
    return y, y


def _softmax_bwd(dim: int, log: bool, y: Any, g: Any) -> tuple[Any]:
    backward = _F.log_softmax_backward if log else _F.softmax_backward
    return (_call(backward, y, g, y, dim=dim),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(input: Any, dim: int) -> Any:
    """Softmax along ``dim`` (torch semantics), differentiable by ``jax.grad``."""
    return _softmax(input, dim % max(input.ndim, 1), False)


def log_softmax(input: Any, dim: int) -> Any:
    """Log-softmax along ``dim`` (torch semantics), differentiable by ``jax.grad``."""
    return _softmax(input, dim % max(input.ndim, 1), True)
