"""Functional API: torch.nn.functional's softmax and classification losses for NumPy/CuPy.

Every function normalises its arguments once (:mod:`nblosses._args`), picks a backend
(:func:`nblosses._registry.resolve_backend`) and calls that backend's kernel. Results are arrays
of the backend's type (NumPy for ``"cpu"``, CuPy for ``"cuda"``) in the input's dtype; reduced
losses are 0-d arrays.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from . import _args
from ._registry import array_module, resolve_backend

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "log_softmax",
    "log_softmax_backward",
    "nll_loss",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "softmax_backward",
]

Array = Any


def is_dask_array(obj: Any) -> bool:
    """Whether ``obj`` is a dask array, without importing dask."""
    return array_module(obj) == "dask"


def _dask_aware(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Route calls with any dask array argument to :mod:`nblosses._dask` (imported lazily),
    which maps the same function over chunks; other calls run ``fn`` directly."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if any(map(is_dask_array, args)) or any(map(is_dask_array, kwargs.values())):
            from . import _dask

            return getattr(_dask, fn.__name__)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _softmax_family(op: str, input: Array, dim: Any, dtype: Any, backend: str | None) -> Array:
    be = resolve_backend(backend, input)
    a = _args.softmax_args(be, op, input, dim, dtype)
    y3 = be.kernel(op)(a.x3)
    return y3.reshape(a.shape).astype(a.out_dtype, copy=False)


@_dask_aware
def softmax(input: Array, dim: int | None = None, dtype: Any = None, *,
            backend: str | None = None) -> Array:
    r"""Softmax along ``dim``: :math:`y_i = e^{x_i - m} / \sum_j e^{x_j - m}`, :math:`m = \max_j x_j`.

    Parameters
    ----------
    input : array_like
        Floating-point array of any shape (0-d included).
    dim : int, optional
        Axis to normalise over; negative counts from the end. ``None`` is deprecated (as in
        torch): it warns and picks 0 for 0-, 1- and 3-d input, else 1.
    dtype : dtype, optional
        Cast the input to this dtype before computing; the result has this dtype.
    backend : str, optional
        ``"cpu"``, ``"cuda"`` or ``"auto"``; default: the current default backend.

    Returns
    -------
    array
        Same shape as ``input``. A slice containing NaN or ``+inf``, or only ``-inf``, is NaN.

    Raises
    ------
    TypeError
        Integer input without ``dtype=``.
    IndexError
        ``dim`` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> F.softmax(np.array([[1.0, 2.0, 3.0]]), dim=1).round(4)
    array([[0.09  , 0.2447, 0.6652]])
    """
    return _softmax_family("softmax", input, dim, dtype, backend)


@_dask_aware
def log_softmax(input: Array, dim: int | None = None, dtype: Any = None, *,
                backend: str | None = None) -> Array:
    r"""Log-softmax along ``dim``: :math:`x_i - m - \log \sum_j e^{x_j - m}`.

    Parameters and dim rules as :func:`softmax`. More accurate than ``log(softmax(x))`` (equal
    to it only up to rounding), and finite where softmax underflows to 0.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> F.log_softmax(np.array([0.0, 0.0]), dim=0)
    array([-0.69314718, -0.69314718])
    """
    return _softmax_family("log_softmax", input, dim, dtype, backend)


@_dask_aware
def sigmoid(input: Array, *, backend: str | None = None) -> Array:
    r"""Logistic sigmoid :math:`1 / (1 + e^{-x})`, elementwise.

    Parameters
    ----------
    input : array_like
        Floating-point array of any shape.
    backend : str, optional
        Backend name; default: the current default.

    Returns
    -------
    array
        Same shape and dtype; ``+inf`` gives 1, ``-inf`` gives 0, NaN stays NaN.

    Raises
    ------
    TypeError
        Non-float input.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> F.sigmoid(np.array([0.0, 100.0, -100.0], dtype=np.float32))
    array([0.5, 1. , 0. ], dtype=float32)
    """
    be = resolve_backend(backend, input)
    (x,), shape, dtype = _args.elementwise_args(be, "sigmoid", input)
    return be.kernel("sigmoid")(x).reshape(shape).astype(dtype, copy=False)


def _softmax_backward(op: str, grad_output: Array, output: Array, dim: Any,
                      backend: str | None) -> Array:
    be = resolve_backend(backend, grad_output, output)
    g3, y3, shape, dtype = _args.softmax_backward_args(be, op, grad_output, output, dim)
    return be.kernel(op)(g3, y3).reshape(shape).astype(dtype, copy=False)


@_dask_aware
def softmax_backward(grad_output: Array, output: Array, dim: int | None, *,
                     backend: str | None = None) -> Array:
    r"""Gradient of :func:`softmax` given its ``output`` :math:`y`: :math:`y (g - \sum g y)`.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the objective with respect to the softmax output.
    output : array_like
        The softmax output (same shape).
    dim : int
        The axis softmax normalised over.

    Returns
    -------
    array
        Gradient with respect to the softmax input, same shape and dtype as ``output``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> y = F.softmax(np.array([1.0, 2.0]), dim=0)
    >>> F.softmax_backward(np.array([1.0, 1.0]), y, dim=0)
    array([0., 0.])
    """
    return _softmax_backward("softmax_backward", grad_output, output, dim, backend)


@_dask_aware
def log_softmax_backward(grad_output: Array, output: Array, dim: int | None, *,
                         backend: str | None = None) -> Array:
    r"""Gradient of :func:`log_softmax` given its ``output`` :math:`y`: :math:`g - e^y \sum g`.

    Parameters as :func:`softmax_backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> y = F.log_softmax(np.array([0.0, 0.0]), dim=0)
    >>> F.log_softmax_backward(np.array([1.0, 0.0]), y, dim=0)
    array([ 0.5, -0.5])
    """
    return _softmax_backward("log_softmax_backward", grad_output, output, dim, backend)


@_dask_aware
def sigmoid_backward(grad_output: Array, output: Array, *, backend: str | None = None) -> Array:
    r"""Gradient of :func:`sigmoid` given its ``output`` :math:`y`: :math:`g\,y(1-y)`.

    Parameters
    ----------
    grad_output : array_like
        Gradient of the objective with respect to the sigmoid output.
    output : array_like
        The sigmoid output (same shape).
    backend : str, optional
        Backend name; default: the current default.

    Returns
    -------
    array
        Gradient with respect to the sigmoid input, shaped as ``output``.

    Raises
    ------
    ValueError
        ``grad_output`` and ``output`` differ in shape.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> F.sigmoid_backward(np.array([1.0]), np.array([0.5]))
    array([0.25])
    """
    be = resolve_backend(backend, grad_output, output)
    (g, y), shape, dtype = _args.elementwise_args(be, "sigmoid_backward", grad_output, output)
    return be.kernel("sigmoid_backward")(g, y).reshape(shape).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- losses
def _finish(be, loss, grad, loss_shape, input_shape, dtype, return_grad, grad_buffer):
    """Reshape and cast kernel results back to the caller's shapes and dtype."""
    loss = loss.reshape(loss_shape if loss.ndim else ()).astype(dtype, copy=False)
    if not return_grad:
        return loss
    if grad_buffer is not None:
        return loss, grad_buffer
    return loss, grad.reshape(input_shape).astype(dtype, copy=False)


def _class_loss(op: str, input, target, weight, size_average, ignore_index, reduce, reduction,
                label_smoothing, return_grad, grad_output, grad_buffer, backend):
    be = resolve_backend(backend, input, target, weight)
    reduction = _args.reduction_from(size_average, reduce, reduction)
    a = _args.class_loss_args(be, op, input, target, weight, ignore_index, reduction,
                              label_smoothing, allow_probs=(op == "cross_entropy"))
    n, _, inner = a.x3.shape
    g = (_args.grad_output_arg(be, grad_output, reduction, a.loss_shape, a.x3.dtype, (n, inner))
         if return_grad else None)
    buf = (_args.grad_buffer_arg(be, grad_buffer, a.input_shape, a.x3.shape, a.x3.dtype)
           if return_grad else None)
    common = dict(reduction=reduction, want_grad=return_grad, grad_output=g, grad_buffer=buf)
    if a.probs:
        loss, grad = be.kernel("cross_entropy_probs")(a.x3, a.target, a.weight,
                                                      label_smoothing=float(label_smoothing),
                                                      **common)
    elif op == "cross_entropy":
        loss, grad = be.kernel("cross_entropy")(a.x3, a.target, a.weight,
                                                ignore_index=int(ignore_index),
                                                label_smoothing=float(label_smoothing), **common)
    else:
        loss, grad = be.kernel("nll_loss")(a.x3, a.target, a.weight,
                                           ignore_index=int(ignore_index), **common)
    return _finish(be, loss, grad, a.loss_shape, a.input_shape, a.dtype, return_grad, grad_buffer)


@_dask_aware
def nll_loss(input: Array, target: Array, weight: Array | None = None, size_average: Any = None,
             ignore_index: int = -100, reduce: Any = None, reduction: str = "mean", *,
             return_grad: bool = False, grad_output: Any = None, grad_buffer: Array | None = None,
             backend: str | None = None):
    r"""Negative log-likelihood loss on log-probabilities: :math:`l_i = -w_{t_i} x_{i, t_i}`.

    Parameters
    ----------
    input : array_like
        Log-probabilities of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
    target : array_like of int
        Class indices in ``[0, C)`` (or ``ignore_index``) of shape ``()``, ``(N,)`` or
        ``(N, d1, ..., dk)``.
    weight : array_like, optional
        Per-class weights of shape ``(C,)``.
    size_average, reduce : bool, optional
        Deprecated (as in torch); when given they set ``reduction`` and warn.
    ignore_index : int
        Target value that contributes neither to the loss nor to the ``mean`` denominator.
    reduction : {"mean", "sum", "none"}
        ``mean`` divides by the sum of the weights of the non-ignored targets.
    return_grad : bool
        Also return the gradient of ``sum(grad_output * loss)`` with respect to ``input``.
    grad_output : scalar or array, optional
        Upstream gradient; 1 (or ones of the loss's shape for ``"none"``) by default.
    grad_buffer : array, optional
        A C-contiguous array of the input's shape and dtype to write the gradient into.
    backend : str, optional
        Backend name; default: the current default.

    Returns
    -------
    loss : array
        0-d for ``mean`` / ``sum``, else the target's shape. All ignored with ``mean`` -> NaN.
    grad : array
        Only with ``return_grad=True``: the gradient, shaped as ``input``.

    Raises
    ------
    IndexError
        A target outside ``[0, C)`` that is not ``ignore_index``.
    ValueError
        Mismatched shapes, bad weight length or bad ``reduction``.
    TypeError
        Non-float input or non-integer target.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> logp = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    >>> loss = F.nll_loss(logp, np.array([1, 0]))
    >>> loss.shape, round(float(loss), 4)
    ((), 0.4904)
    """
    return _class_loss("nll_loss", input, target, weight, size_average, ignore_index, reduce,
                       reduction, 0.0, return_grad, grad_output, grad_buffer, backend)


@_dask_aware
def cross_entropy(input: Array, target: Array, weight: Array | None = None,
                  size_average: Any = None, ignore_index: int = -100, reduce: Any = None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *,
                  return_grad: bool = False, grad_output: Any = None,
                  grad_buffer: Array | None = None, backend: str | None = None):
    r"""Cross-entropy of logits: log-softmax and NLL fused, never materialising log-probabilities.

    Parameters
    ----------
    input : array_like
        Unnormalised logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
    target : array_like
        Either class indices (integers, shaped as for :func:`nll_loss`) or class probabilities
        (floats, shaped as ``input``; then ``ignore_index`` must stay negative).
    weight : array_like, optional
        Per-class weights ``(C,)``.
    label_smoothing : float
        :math:`\epsilon \in [0, 1]`: the target becomes :math:`(1-\epsilon)\,y + \epsilon / C`.
    grad_buffer : array, optional
        Where to write the gradient; may be ``input`` itself (a NumPy/CuPy array of the compute
        dtype), which then holds the gradient instead of the logits afterwards. Saves the memory
        of the gradient; only safe when the logits are not needed again.
    size_average, ignore_index, reduce, reduction, return_grad, grad_output, backend
        As :func:`nll_loss`.

    Returns
    -------
    loss : array
        0-d for ``mean`` / ``sum``, else the target's shape (without the class axis).
    grad : array
        Only with ``return_grad=True``: the gradient, shaped as ``input``.

    Raises
    ------
    IndexError, ValueError, TypeError
        As :func:`nll_loss`; ``ValueError`` also for ``label_smoothing`` outside [0, 1] and for
        a non-negative ``ignore_index`` with probability targets.

    Notes
    -----
    With probability targets, ``mean`` divides by ``N * d1 * ... * dk``. The loss and the
    gradient come from one pass over the logits; no log-probability array is formed.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> x = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> loss, grad = F.cross_entropy(x, np.array([0, 2]), return_grad=True)
    >>> round(float(loss), 4)
    0.6691
    >>> grad.round(4)
    array([[-0.1065,  0.0533,  0.0533],
           [ 0.1667,  0.1667, -0.3333]])
    """
    return _class_loss("cross_entropy", input, target, weight, size_average, ignore_index, reduce,
                       reduction, label_smoothing, return_grad, grad_output, grad_buffer, backend)


def _binary_loss(op, input, target, weight, pos_weight, size_average, reduce, reduction,
                 return_grad, grad_output, backend):
    be = resolve_backend(backend, input, target, weight, pos_weight)
    reduction = _args.reduction_from(size_average, reduce, reduction)
    probabilities = op == "binary_cross_entropy"
    a = _args.binary_loss_args(be, op, input, target, weight, pos_weight, reduction,
                               probabilities)
    g = (_args.grad_output_arg(be, grad_output, reduction, a.shape, a.x.dtype, a.x.shape)
         if return_grad else None)
    common = dict(reduction=reduction, want_grad=return_grad, grad_output=g)
    if probabilities:
        loss, grad = be.kernel(op)(a.x, a.y, a.weight, **common)
    else:
        loss, grad = be.kernel(op)(a.x, a.y, a.weight, a.pos_weight, **common)
    return _finish(be, loss, grad, a.shape, a.shape, a.dtype, return_grad, None)


@_dask_aware
def binary_cross_entropy(input: Array, target: Array, weight: Array | None = None,
                         size_average: Any = None, reduce: Any = None, reduction: str = "mean",
                         *, return_grad: bool = False, grad_output: Any = None,
                         backend: str | None = None):
    r"""Binary cross-entropy of probabilities: :math:`-w[y \log x + (1-y)\log(1-x)]`.

    Each log is clamped at -100, as in torch, so ``x = 0`` or ``1`` gives a finite loss.

    Parameters
    ----------
    input : array_like
        Probabilities in ``[0, 1]``, any shape.
    target : array_like
        Same shape as ``input`` (usually 0/1, any value allowed).
    weight : array_like, optional
        Broadcast to ``input``'s shape.
    size_average, reduce, reduction, return_grad, grad_output, backend
        As :func:`nll_loss`; ``mean`` divides by the number of elements.

    Returns
    -------
    loss : array
        0-d, or ``input``'s shape for ``"none"``.
    grad : array
        With ``return_grad=True``: :math:`g\,w\,(x-y) / \max(x(1-x), 10^{-12})`.

    Raises
    ------
    ValueError
        ``input`` outside ``[0, 1]`` (NaN included), shape mismatch, bad weight shape.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> round(float(F.binary_cross_entropy(np.array([0.5, 0.9]), np.array([1.0, 1.0]))), 4)
    0.3993
    """
    return _binary_loss("binary_cross_entropy", input, target, weight, None, size_average,
                        reduce, reduction, return_grad, grad_output, backend)


@_dask_aware
def binary_cross_entropy_with_logits(input: Array, target: Array, weight: Array | None = None,
                                     size_average: Any = None, reduce: Any = None,
                                     reduction: str = "mean", pos_weight: Array | None = None, *,
                                     return_grad: bool = False, grad_output: Any = None,
                                     backend: str | None = None):
    r"""Sigmoid and binary cross-entropy fused, stable for any logit.

    :math:`l = w[(1-y)x - (1 + (p-1)y)\log\sigma(x)]` with
    :math:`\log\sigma(x) = \min(x, 0) - \log(1 + e^{-|x|})`.

    Parameters
    ----------
    input : array_like
        Logits, any shape.
    target : array_like
        Same shape as ``input``.
    weight : array_like, optional
        Broadcast to ``input``'s shape.
    pos_weight : array_like, optional
        Weight of positive examples, broadcast along the last dimensions (e.g. ``(C,)``).
    size_average, reduce, reduction, return_grad, grad_output, backend
        As :func:`binary_cross_entropy`.

    Returns
    -------
    loss : array
    grad : array
        With ``return_grad=True``: :math:`g\,w[(1+(p-1)y)\sigma(x) - p\,y]`.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> x, y = np.array([0.0, 1000.0]), np.array([1.0, 1.0])
    >>> round(float(F.binary_cross_entropy_with_logits(x, y)), 4)
    0.3466
    """
    return _binary_loss("binary_cross_entropy_with_logits", input, target, weight, pos_weight,
                        size_average, reduce, reduction, return_grad, grad_output, backend)
