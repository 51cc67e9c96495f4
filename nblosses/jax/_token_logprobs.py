"""``token_logprobs`` inside JAX: per-token log-probabilities and entropies of
``softmax(cap(x) / T)``, both differentiable with respect to the logits.

The op's spec has ``autograd=CUSTOM`` (two outputs, each with its own cotangent), so the code
generator leaves it out; this is its hand-written :func:`jax.custom_vjp`, the JAX form of
:mod:`nblosses.torch._token_logprobs`. The forward pass is one FFI call computing the
statistics (no gradient) and keeps only the logits and targets; backward gets both
cotangents (JAX's zeros for an entropy that was not returned: the entropy's cotangent
operand is then left out, and the kernel takes zeros) and runs the fused kernel once with
``return_grad=True, grad_output=g_logp, grad_entropy=g_entropy``, the gradient written into
XLA's output buffer (:mod:`nblosses.jax._bridge`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import _args
from ..ops.token_logprobs import check_temperature
from ._bridge import Request, call

__all__ = ["token_logprobs"]

_NAME = "token_logprobs"


@dataclasses.dataclass(frozen=True)
class _How:
    """The static part of a call: its forward and backward requests and the statistics'
    shape and dtype."""

    forward: Request
    backward: Request
    stats: jax.ShapeDtypeStruct
    entropy: bool


def _static(name: str, value: Any) -> Any:
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise TypeError(f"{_NAME}: {name} must be a Python value (it is static under jit), "
                        "got a JAX array")
    return value.item() if hasattr(value, "item") else value


def _stats_struct(x: Any, t: Any) -> jax.ShapeDtypeStruct:
    """The statistics' shape and dtype, checked against the target's (when traced: the op
    checks the values when it runs)."""
    if x.ndim < 1:
        raise ValueError(f"{_NAME}: input must have 1 or more dimensions (got 0)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{_NAME}: input must be a floating-point array, got dtype {x.dtype}")
    positions = () if x.ndim == 1 else (x.shape[0], *x.shape[2:])
    if not jnp.issubdtype(t.dtype, jnp.integer) or tuple(t.shape) != positions:
        raise (TypeError if tuple(t.shape) == positions else ValueError)(
            f"{_NAME}: expected an integer target of class indices with shape {positions} "
            f"(the input's shape {tuple(x.shape)} without the class axis), got dtype "
            f"{t.dtype} with shape {tuple(t.shape)}")
    dtype = x.dtype if jnp.dtype(x.dtype).itemsize >= 4 else jnp.dtype(jnp.float32)
    return jax.ShapeDtypeStruct(positions, dtype)


def token_logprobs(input: Any, target: Any, *, temperature: float = 1.0,
                   softcap: float | None = None, ignore_index: int = -100,
                   return_entropy: bool = False) -> Any:
    """Per-position log-probability of ``target`` under ``softmax(cap(input) / temperature)``
    and, with ``return_entropy``, the distribution's entropy; both differentiable with
    respect to ``input`` (under ``jax.jit``, ``jax.grad`` and ``jax.vmap``).

    Parameters
    ----------
    input : jax.Array
        Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class axis 1).
    target : jax.Array
        Token indices (integers), ``input``'s shape without the class axis.
    temperature, softcap, ignore_index, return_entropy
        As in :func:`nblosses.functional.token_logprobs` (static Python values; ignored
        positions give 0 and no gradient).

    Returns
    -------
    jax.Array or tuple of jax.Array
        ``logp``, or ``(logp, entropy)``: float32 for half-precision logits, else the logits'
        dtype.

    Raises
    ------
    TypeError, ValueError
        When traced: a bad option, a non-float input, a target that is not integer or not of
        the positions' shape. A target outside ``[0, C)`` that is not ``ignore_index`` raises
        ``jax.errors.JaxRuntimeError`` (naming the ``IndexError``) when the call runs.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import nblosses.jax as nbj
    >>> def objective(x):
    ...     logp, ent = nbj.token_logprobs(x, jnp.array([1, 3]), return_entropy=True)
    ...     return logp.sum() + 0.1 * ent.sum(), logp
    >>> (value, logp), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(
    ...     jnp.zeros((2, 4)))
    >>> print(logp, grad[0])
    [-1.3862944 -1.3862944] [-0.25  0.75 -0.25 -0.25]
    """
    x, t = jnp.asarray(input), jnp.asarray(target)
    options = (("temperature", check_temperature(_NAME, _static("temperature", temperature))),
               ("softcap", softcap if softcap is None
                else _args.check_softcap(_NAME, _static("softcap", softcap))),
               ("ignore_index", _args.check_ignore_index(_NAME,
                                                         _static("ignore_index", ignore_index))))
    entropy = _static("return_entropy", return_entropy)
    if not isinstance(entropy, bool):
        raise TypeError(f"{_NAME}: return_entropy must be a bool, got {return_entropy!r}")
    arrays = (("input", -1), ("target", -1))
    # Backward's operands: the two cotangents, the entropy's only when it was returned (else
    # None: the kernel's zeros, no array of JAX's zeros read).
    cotangents = (("grad_output", -1), ("grad_entropy", -1 if entropy else 0))
    how = _How(Request(_NAME, arrays, (*options, ("return_entropy", entropy))),
               Request(_NAME, (*arrays, *cotangents), options, return_grad=True),
               _stats_struct(x, t), entropy)
    out = _token_logprobs(how, x, t)
    return out if entropy else out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_logprobs(how: _How, input: Any, target: Any) -> tuple[Any, ...]:
    return call(how.forward, [input, target], (how.stats,) * (1 + how.entropy))


def _fwd(how: _How, input: Any, target: Any) -> tuple[tuple[Any, ...], Any]:
    return _token_logprobs(how, input, target), (input, target)


def _bwd(how: _How, residual: Any, g: tuple[Any, ...]) -> tuple[Any, None]:
    input, target = residual
    _, grad = call(how.backward, [input, target, *g],
                   (how.stats, jax.ShapeDtypeStruct(input.shape, input.dtype)))
    return grad, None


_token_logprobs.defvjp(_fwd, _bwd)
