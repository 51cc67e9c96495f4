"""The language-model heads inside JAX: :func:`linear_cross_entropy`,
:func:`linear_distillation_loss` and :func:`linear_token_logprobs`, differentiable with respect
to the features ``input``, the output layer's ``linear_weight`` and its ``linear_bias``, with
the ``(N, V)`` logits never formed.

Their specs have ``autograd=CUSTOM`` (three gradients; two outputs for
``linear_token_logprobs``), so the code generator leaves them out; these are their hand-written
:func:`jax.custom_vjp` forms, the JAX twins of :mod:`nblosses.torch._linear_ce`,
:mod:`nblosses.torch._linear_distillation` and :mod:`nblosses.torch._linear_token_logprobs`.
Each pass is one FFI call (:mod:`nblosses.jax._bridge`) into the chunked LM-head driver
(:mod:`nblosses.backends._lm_head`), which forms the logits a block at a time:

the losses (``linear_cross_entropy``, ``linear_distillation_loss``)
    Reduced (``"mean"`` / ``"sum"``), the gradients are known at forward time up to the scalar
    upstream gradient: the forward pass of a differentiated call asks for the loss and the
    three gradients in one call (one chunked sweep) and keeps the gradients as the residual;
    backward scales them (XLA drops the product for the constant 1 of ``grad`` /
    ``value_and_grad``). Unreduced (``"none"``), forward computes the loss alone and keeps the
    arrays; backward runs the sweep again with the cotangent as ``grad_output``.
``linear_token_logprobs``
    Forward computes the statistics and keeps the arrays; the gradient depends on both
    cotangents, known only in backward, which runs the sweep again with ``grad_output`` and
    ``grad_entropy`` (the entropy's operand left out when the entropy was not returned: the
    kernel takes zeros), as :mod:`nblosses.jax._token_logprobs` does.

Residuals are gradients or the call's own arrays: nothing of the logits' size is kept. Only
``input``, ``linear_weight`` and ``linear_bias`` get gradients; targets, class weights and the
teacher's head (frozen) get zero cotangents. Shapes and dtypes are checked when the function is
traced, by the op's own metadata checks (the errors of :mod:`nblosses.functional`); options
are static Python values, checked as the op checks them; target values are checked when the
call runs (a ``jax.errors.JaxRuntimeError`` naming the ``IndexError``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import _args, _registry
from .._spec import OpSpec
from ..ops import SPECS
from ..ops._results import at_least_float32
from ..ops.linear_ce import check_linear_ce
from ..ops.linear_distillation import check_linear_distillation
from ..ops.linear_token_logprobs import check_linear_token_logprobs
from ._autodiff import _option
from ._bridge import Request, call

__all__ = ["linear_cross_entropy", "linear_distillation_loss", "linear_token_logprobs"]

#: The differentiated arrays, in the order of every call's operands (and of the gradients).
_STUDENT = ("input", "linear_weight", "linear_bias")


@dataclasses.dataclass(frozen=True)
class _Head:
    """The static part of a call: its requests, their results' shapes and dtypes (the
    gradients': ``grads``, one per differentiated array, always the last results), and whether
    the forward pass of a differentiated call computes the gradients (``fused``)."""

    forward: Request
    outputs: tuple[jax.ShapeDtypeStruct, ...]
    backward: Request
    backward_outputs: tuple[jax.ShapeDtypeStruct, ...]
    grads: tuple[jax.ShapeDtypeStruct, ...]
    fused: bool


# ----------------------------------------------------------------------------- arguments
def _cpu() -> _registry.Runtime:
    """The runtime the FFI target runs on: its dtype rules are the ones checked here."""
    return _registry.load("cpu")


def _options(spec: OpSpec, values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The static options as a request carries them: each checked as the op checks it (a
    ``TypeError`` for a JAX array), ``reduction`` resolved, ``options`` (torch's chunking
    options) as its ``batch_chunk_size``."""
    out = []
    for name, value in values.items():
        value = _option(spec, name, value)
        if name == "reduction":
            value = _args.reduction_from(None, None, value)
        elif name == "options":
            value = _args.check_chunking(spec.name, value)
        out.append((name, value))
    return tuple(out)


def _student(input: Any, linear_weight: Any, linear_bias: Any) -> tuple[Any, ...]:
    """The differentiated arrays as JAX arrays: ``(input, linear_weight)``, and the bias when
    there is one."""
    arrays = (input, linear_weight) if linear_bias is None else (input, linear_weight,
                                                                  linear_bias)
    return tuple(jnp.asarray(a) for a in arrays)


def _bias(student: tuple[Any, ...]) -> Any:
    return student[2] if len(student) > 2 else None


def _maybe(value: Any) -> Any:
    return None if value is None else jnp.asarray(value)


def _arrays(student: tuple[Any, ...], frozen: dict[str, Any]) -> tuple[
        tuple[tuple[str, int], ...], tuple[Any, ...]]:
    """The request layout (the student's arrays first, then the frozen ones, a ``None`` as no
    operand) and the frozen operands."""
    layout = tuple((name, -1) for name in _STUDENT[:len(student)]) + tuple(
        (name, 0 if v is None else -1) for name, v in frozen.items())
    return layout, tuple(v for v in frozen.values() if v is not None)


def _grads(student: tuple[Any, ...]) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The gradients' shapes and dtypes: the differentiated arrays' own."""
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in student)


# ----------------------------------------------------------------------------- the autodiff
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head(how: _Head, student: tuple[Any, ...], frozen: tuple[Any, ...]) -> tuple[Any, ...]:
    return call(how.forward, [*student, *frozen], how.outputs)


def _head_fwd(how: _Head, student: tuple[Any, ...],
              frozen: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    if not how.fused:  # the gradient needs the cotangents: backward sweeps again
        return _head(how, student, frozen), (student, frozen)
    request = dataclasses.replace(how.forward, return_grad=True)
    results = call(request, [*student, *frozen], (*how.outputs, *how.grads))
    n = len(how.outputs)
    return tuple(results[:n]), tuple(results[n:])


def _head_bwd(how: _Head, residual: Any, g: tuple[Any, ...]) -> tuple[tuple[Any, ...], None]:
    if how.fused:  # the gradients for an upstream gradient of 1, and the scalar cotangent
        (scale,) = g
        return tuple(r * scale.astype(r.dtype) for r in residual), None
    student, frozen = residual
    results = call(how.backward, [*student, *frozen, *g], (*how.backward_outputs, *how.grads))
    return tuple(results[len(how.backward_outputs):]), None


_head.defvjp(_head_fwd, _head_bwd)


def _loss(spec: OpSpec, student: tuple[Any, ...], frozen: dict[str, Any],
          options: tuple[tuple[str, Any], ...], loss_shape: tuple[int, ...]) -> Any:
    """A loss head's loss: fused when reduced, else the backward sweep with ``grad_output``."""
    layout, frozen_operands = _arrays(student, frozen)
    loss = (jax.ShapeDtypeStruct(loss_shape, student[0].dtype),)
    forward = Request(spec.name, layout, options)
    backward = Request(spec.name, (*layout, ("grad_output", -1)), options, return_grad=True)
    how = _Head(forward, loss, backward, loss, _grads(student),
                fused=dict(options)["reduction"] != "none")
    return _head(how, student, frozen_operands)[0]


# ----------------------------------------------------------------------------- the functions
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *,
                         linear_bias: Any = None, weight: Any = None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options: Any = None, z_loss: float = 0.0,
                         softcap: float | None = None) -> Any:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the logits,
    differentiable with respect to ``input``, ``linear_weight`` and ``linear_bias`` (under
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``).

    Parameters
    ----------
    input : jax.Array
        Features ``(N, d)`` or ``(d,)``.
    linear_weight : jax.Array
        The output layer, ``(V, d)`` (or torch's K-dimensional ``(V, o1, ..., ok, d)``,
        computed through materialised logits as :func:`nblosses.functional.linear_cross_entropy`
        does).
    target : jax.Array
        Class indices ``(N,)`` (integers) or class probabilities ``(N, V)`` (floats; no
        gradient).
    linear_bias : jax.Array, optional
        The output layer's bias, ``(V,)``.
    weight : jax.Array, optional
        Per-class weights ``(V,)`` (no gradient).
    reduction, ignore_index, label_smoothing, options, z_loss, softcap
        As in :func:`nblosses.functional.linear_cross_entropy` (static Python values;
        ``options``: torch's ``LinearCrossEntropyOptions`` or any object with a
        ``batch_chunk_size``).

    Returns
    -------
    jax.Array
        The loss, in the input's dtype: 0-d for ``"mean"`` / ``"sum"``, ``(N,)`` for
        ``"none"``.

    Raises
    ------
    TypeError, ValueError
        When traced: the op's metadata errors (shapes, dtypes) and bad options. A target
        outside ``[0, V)`` that is not ``ignore_index`` raises ``jax.errors.JaxRuntimeError``
        (naming the ``IndexError``) when the call runs.

    Notes
    -----
    Reduced, a differentiated call computes the loss and the three gradients in one chunked
    sweep and backward scales them; with ``reduction="none"`` backward sweeps again with the
    per-row cotangents.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import nblosses.jax as nbj
    >>> x, w, b = jnp.zeros((2, 3)), jnp.zeros((4, 3)), jnp.zeros(4)
    >>> step = jax.jit(jax.value_and_grad(
    ...     lambda x, w, b: nbj.linear_cross_entropy(x, w, jnp.array([1, 3]), linear_bias=b),
    ...     argnums=(0, 1, 2)))
    >>> loss, (gx, gw, gb) = step(x, w, b)
    >>> print(round(float(loss), 4), gb)
    1.3863 [ 0.25 -0.25  0.25 -0.25]
    """
    spec = SPECS["linear_cross_entropy"]
    student = _student(input, linear_weight, linear_bias)
    t, cw = jnp.asarray(target), _maybe(weight)
    opts = _options(spec, {"reduction": reduction, "ignore_index": ignore_index,
                           "label_smoothing": label_smoothing, "options": options,
                           "z_loss": z_loss, "softcap": softcap})
    values = dict(opts)
    lay = check_linear_ce(_cpu(), spec.name, student[0], student[1], t, _bias(student), cw,
                          values["ignore_index"])
    shape = (() if values["reduction"] != "none" or lay.squeeze
             else (lay.n, *lay.out_features))
    return _loss(spec, student, {"target": t, "weight": cw}, opts, shape)


def linear_distillation_loss(input: Any, linear_weight: Any, teacher_input: Any,
                             teacher_weight: Any, target: Any = None, *,
                             linear_bias: Any = None, teacher_bias: Any = None,
                             beta: float = 0.0, temperature: float = 1.0,
                             ignore_index: int = -100, hard_weight: float = 0.0,
                             softcap: float | None = None, reduction: str = "mean",
                             options: Any = None) -> Any:
    """:func:`nblosses.functional.linear_distillation_loss` (distillation between two LM
    heads, neither's logits formed), differentiable with respect to the student's ``input``,
    ``linear_weight`` and ``linear_bias`` (under ``jax.jit``, ``jax.grad`` and ``jax.vmap``);
    the teacher is frozen: its arrays get zero cotangents.

    Parameters
    ----------
    input : jax.Array
        The student's features ``(..., d)``.
    linear_weight : jax.Array
        The student's output layer ``(V, d)``.
    teacher_input, teacher_weight : jax.Array
        The teacher's features ``(..., d_teacher)`` (the input's leading dimensions and dtype)
        and output layer ``(V, d_teacher)``.
    target : jax.Array, optional
        Class indices, the input's leading shape (``ignore_index`` positions count nowhere;
        the hard loss's labels).
    linear_bias, teacher_bias : jax.Array, optional
        The heads' biases, ``(V,)``.
    beta, temperature, ignore_index, hard_weight, softcap, reduction, options
        As in :func:`nblosses.functional.linear_distillation_loss` (static Python values).

    Returns
    -------
    jax.Array
        The loss, in the input's dtype: 0-d for ``"mean"`` / ``"sum"``, else the input's
        leading shape.

    Raises
    ------
    TypeError, ValueError
        When traced: the op's metadata errors (shapes, dtypes, a teacher of another
        vocabulary) and bad options. Bad target values raise ``jax.errors.JaxRuntimeError``
        when the call runs.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import nblosses.jax as nbj
    >>> x, w = jnp.ones((2, 3)), jnp.arange(12.0).reshape(4, 3) / 10
    >>> tx, tw = jnp.ones((2, 5)), jnp.zeros((4, 5))
    >>> loss, gw = jax.jit(jax.value_and_grad(
    ...     lambda w: nbj.linear_distillation_loss(x, w, tx, tw, beta=0.5)))(w)
    >>> print(round(float(loss), 5), gw.shape)
    0.09694 (4, 3)
    """
    spec = SPECS["linear_distillation_loss"]
    student = _student(input, linear_weight, linear_bias)
    tx, tw, tb = jnp.asarray(teacher_input), jnp.asarray(teacher_weight), _maybe(teacher_bias)
    t = _maybe(target)
    opts = _options(spec, {"beta": beta, "temperature": temperature,
                           "ignore_index": ignore_index, "hard_weight": hard_weight,
                           "softcap": softcap, "reduction": reduction, "options": options})
    values = dict(opts)
    lay = check_linear_distillation(_cpu(), spec.name, student[0], student[1], _bias(student),
                                    tx, tw, tb, t, float(values["hard_weight"]))
    shape = () if values["reduction"] != "none" else lay.loss_shape
    frozen = {"teacher_input": tx, "teacher_weight": tw, "teacher_bias": tb, "target": t}
    return _loss(spec, student, frozen, opts, shape)


def linear_token_logprobs(input: Any, linear_weight: Any, target: Any, *,
                          linear_bias: Any = None, temperature: float = 1.0,
                          softcap: float | None = None, ignore_index: int = -100,
                          return_entropy: bool = False, options: Any = None) -> Any:
    """Per-row log-probability of ``target`` under ``softmax(cap(input @ linear_weight.T +
    linear_bias) / temperature)`` and, with ``return_entropy``, the entropy, without the
    logits; both differentiable with respect to ``input``, ``linear_weight`` and
    ``linear_bias`` (under ``jax.jit``, ``jax.grad`` and ``jax.vmap``).

    Parameters
    ----------
    input : jax.Array
        Features ``(N, d)`` or ``(d,)``.
    linear_weight : jax.Array
        The output layer, ``(V, d)``.
    target : jax.Array
        Token indices (integers) ``(N,)`` (``()`` for a ``(d,)`` input).
    linear_bias : jax.Array, optional
        The output layer's bias, ``(V,)``.
    temperature, softcap, ignore_index, return_entropy, options
        As in :func:`nblosses.functional.linear_token_logprobs` (static Python values;
        ignored rows give 0 and no gradient).

    Returns
    -------
    jax.Array or tuple of jax.Array
        ``logp``, or ``(logp, entropy)``: float32 for half-precision input, else its dtype.

    Raises
    ------
    TypeError, ValueError
        When traced: the op's metadata errors and bad options. Bad target values raise
        ``jax.errors.JaxRuntimeError`` when the call runs.

    Notes
    -----
    The forward pass computes the statistics; backward, which alone knows both cotangents,
    runs the chunked sweep again with them (the logits recomputed block by block).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import nblosses.jax as nbj
    >>> def objective(x, w):
    ...     logp, ent = nbj.linear_token_logprobs(x, w, jnp.array([1, 3]), return_entropy=True)
    ...     return logp.sum() + 0.1 * ent.sum(), logp
    >>> (value, logp), (gx, gw) = jax.jit(jax.value_and_grad(
    ...     objective, argnums=(0, 1), has_aux=True))(jnp.ones((2, 3)), jnp.zeros((4, 3)))
    >>> print(logp, gw[1])
    [-1.3862944 -1.3862944] [0.5 0.5 0.5]
    """
    spec = SPECS["linear_token_logprobs"]
    student = _student(input, linear_weight, linear_bias)
    t = jnp.asarray(target)
    opts = _options(spec, {"temperature": temperature, "softcap": softcap,
                           "ignore_index": ignore_index, "options": options})
    entropy = _option(spec, "return_entropy", return_entropy)
    if not isinstance(entropy, bool):
        raise TypeError(f"{spec.name}: return_entropy must be a bool, got {return_entropy!r}")
    lay = check_linear_token_logprobs(_cpu(), spec.name, student[0], student[1], t, _bias(student))
    stats = jax.ShapeDtypeStruct(() if lay.squeeze else (lay.n,),
                                 jnp.dtype(at_least_float32(student[0].dtype)))
    layout, frozen = _arrays(student, {"target": t})
    # Backward's operands: both cotangents, the entropy's only when it was returned (else
    # None: the kernel's zeros, no array of JAX's zeros read).
    cotangents = (("grad_output", -1), ("grad_entropy", -1 if entropy else 0))
    how = _Head(Request(spec.name, layout, (*opts, ("return_entropy", entropy))),
                (stats,) * (1 + entropy),
                Request(spec.name, (*layout, *cotangents), opts, return_grad=True), (stats,),
                _grads(student), fused=False)
    out = _head(how, student, frozen)
    return tuple(out) if entropy else out[0]
