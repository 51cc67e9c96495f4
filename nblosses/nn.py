"""Class API: torch.nn-style modules that hold their configuration and call :mod:`.functional`.

Constructors mirror torch's exactly (plus a keyword-only ``backend=``); an unknown keyword is a
``TypeError``, as in torch. Calling a module runs its functional counterpart. Without autograd,
each module keeps what its gradient needs from its last call, and ``backward(grad_output)``
returns the gradient with respect to that call's input, so torch chains port directly::

    logsoftmax, nll = nn.LogSoftmax(dim=1), nn.NLLLoss()
    loss = nll(logsoftmax(x), target)
    grad_x = logsoftmax.backward(nll.backward())

Loss modules keep references to their inputs (not copies) and compute the fused loss+gradient
kernel on ``backward``; mutate those arrays between the call and ``backward`` and the gradient
follows the new values.
"""

from __future__ import annotations

from typing import Any

from . import _args
from . import functional as F

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LogSoftmax",
    "Module",
    "NLLLoss",
    "Sigmoid",
    "Softmax",
]

Array = Any


class Module:
    """Base class: a callable holding configuration and the state its ``backward`` needs."""

    def __init__(self, *, backend: str | None = None) -> None:
        self.backend = backend
        self._saved: tuple | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_output: Any = None) -> Array:
        """Gradient with respect to the input of the last call (see subclasses)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _need_saved(self) -> tuple:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before the module was "
                               f"called on an input")
        return self._saved

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# ----------------------------------------------------------------------------- activations
def _ones_like_output(y: Array) -> Array:
    return y * 0 + 1


class Softmax(Module):
    """Softmax over ``dim`` (see :func:`nblosses.functional.softmax`).

    Parameters
    ----------
    dim : int, optional
        Axis to normalise; ``None`` warns on each call and picks torch's legacy default.
    backend : str, optional
        Backend for every call of this module.

    Notes
    -----
    Output: the input's shape and dtype. ``backward(g)`` returns ``y * (g - sum(g * y))`` along
    ``dim`` for the last output ``y``; before a call it raises ``RuntimeError``. A bad ``dim``
    raises ``IndexError`` and integer input ``TypeError`` when the module is called.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m = nn.Softmax(dim=2)
    >>> out = m(np.random.rand(3, 4, 5, 6))
    >>> bool(np.allclose(out.sum(axis=2), 1.0))
    True
    """

    _op = staticmethod(F.softmax)
    _op_backward = staticmethod(F.softmax_backward)

    def __init__(self, dim: int | None = None, *, backend: str | None = None) -> None:
        super().__init__(backend=backend)
        self.dim = dim

    def forward(self, input: Array) -> Array:
        y = self._op(input, self.dim, backend=self.backend)
        dim = _args.implicit_dim(y.ndim) if self.dim is None else self.dim
        self._saved = (y, dim)
        return y

    def backward(self, grad_output: Array | None = None) -> Array:
        """Gradient w.r.t. the last input, given ``grad_output`` (default: ones)."""
        y, dim = self._need_saved()
        g = _ones_like_output(y) if grad_output is None else grad_output
        return self._op_backward(g, y, dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """Log-softmax over ``dim`` (see :func:`nblosses.functional.log_softmax`).

    Parameters
    ----------
    dim : int, optional
        Axis to normalise; ``None`` warns on each call and picks torch's legacy default.
    backend : str, optional
        Backend for every call of this module.

    Notes
    -----
    Output: the input's shape and dtype. ``backward(g)`` returns ``g - exp(y) * sum(g)`` along
    ``dim`` for the last output ``y``; before a call it raises ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m = nn.LogSoftmax(dim=1)
    >>> m(np.zeros((1, 2))).round(4)
    array([[-0.6931, -0.6931]])
    """

    _op = staticmethod(F.log_softmax)
    _op_backward = staticmethod(F.log_softmax_backward)


class Sigmoid(Module):
    """Elementwise logistic sigmoid (see :func:`nblosses.functional.sigmoid`).

    Parameters
    ----------
    backend : str, optional
        Backend for every call of this module.

    Notes
    -----
    Output: the input's shape and dtype. ``backward(g)`` returns ``g * y * (1 - y)`` for the
    last output ``y``; before a call it raises ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m = nn.Sigmoid()
    >>> m(np.array([0.0]))
    array([0.5])
    >>> m.backward(np.array([1.0]))
    array([0.25])
    """

    def __init__(self, *, backend: str | None = None) -> None:
        super().__init__(backend=backend)

    def forward(self, input: Array) -> Array:
        y = F.sigmoid(input, backend=self.backend)
        self._saved = (y,)
        return y

    def backward(self, grad_output: Array | None = None) -> Array:
        """Gradient w.r.t. the last input, given ``grad_output`` (default: ones)."""
        (y,) = self._need_saved()
        g = _ones_like_output(y) if grad_output is None else grad_output
        return F.sigmoid_backward(g, y, backend=self.backend)


# ----------------------------------------------------------------------------- losses
class _Loss(Module):
    """Shared constructor logic of torch's ``_Loss``: legacy ``size_average`` / ``reduce``."""

    def __init__(self, size_average: Any = None, reduce: Any = None, reduction: str = "mean",
                 *, backend: str | None = None) -> None:
        super().__init__(backend=backend)
        self.reduction = _args.reduction_from(size_average, reduce, reduction)

    def _functional(self, input: Array, target: Array, **kwargs: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, input: Array, target: Array) -> Array:
        loss = self._functional(input, target)
        self._saved = (input, target)
        return loss

    def backward(self, grad_output: Any = None) -> Array:
        """Gradient w.r.t. the input of the last call, given ``grad_output`` (default 1, or ones
        of the loss's shape for ``reduction="none"``), from the fused loss+gradient kernel."""
        input, target = self._need_saved()
        _, grad = self._functional(input, target, return_grad=True, grad_output=grad_output)
        return grad

    def extra_repr(self) -> str:
        return "" if self.reduction == "mean" else f"reduction={self.reduction!r}"


class _WeightedLoss(_Loss):
    def __init__(self, weight: Array | None = None, size_average: Any = None, reduce: Any = None,
                 reduction: str = "mean", *, backend: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction, backend=backend)
        self.weight = weight


class NLLLoss(_WeightedLoss):
    """Negative log-likelihood loss (see :func:`nblosses.functional.nll_loss`).

    Parameters
    ----------
    weight : array_like, optional
        Per-class weights, shape ``(C,)``.
    ignore_index : int
        Target value that contributes neither loss nor gradient nor ``mean`` weight.
    size_average, reduce : bool, optional
        Deprecated (as in torch): when given they set ``reduction`` and warn.
    reduction : {"mean", "sum", "none"}
        How per-element losses are combined.
    backend : str, optional
        Backend for every call of this module; default: the current default.

    Notes
    -----
    Shapes: input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` of log-probabilities; target
    ``()``, ``(N,)`` or ``(N, d1, ..., dk)`` of class indices; the loss is 0-d, or the target's
    shape for ``reduction="none"``. Calling raises what :func:`~nblosses.functional.nll_loss`
    raises; ``backward()`` before a call raises ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m, loss = nn.LogSoftmax(dim=1), nn.NLLLoss()
    >>> x = np.zeros((3, 5)); target = np.array([1, 0, 4])
    >>> print(loss(m(x), target).round(4))
    1.6094
    >>> m.backward(loss.backward()).round(3)[0]
    array([ 0.067, -0.267,  0.067,  0.067,  0.067])
    """

    def __init__(self, weight: Array | None = None, size_average: Any = None,
                 ignore_index: int = -100, reduce: Any = None, reduction: str = "mean", *,
                 backend: str | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction, backend=backend)
        self.ignore_index = ignore_index

    def _functional(self, input, target, **kwargs):
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction, backend=self.backend, **kwargs)


class CrossEntropyLoss(_WeightedLoss):
    """Cross-entropy of logits (see :func:`nblosses.functional.cross_entropy`).

    Parameters
    ----------
    weight : array_like, optional
        Per-class weights, shape ``(C,)``.
    ignore_index : int
        Target value that contributes neither loss nor gradient (class-index targets only).
    size_average, reduce : bool, optional
        Deprecated (as in torch): when given they set ``reduction`` and warn.
    reduction : {"mean", "sum", "none"}
        How per-element losses are combined.
    label_smoothing : float
        In ``[0, 1]``: the target becomes ``(1 - eps) * y + eps / C``.
    backend : str, optional
        Backend for every call of this module; default: the current default.

    Notes
    -----
    Shapes: input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` of logits; target either class
    indices (``()``, ``(N,)``, ``(N, d1, ..., dk)``) or class probabilities (the input's shape).
    ``backward()`` runs the fused loss+gradient kernel on the last call's arrays. Calling raises
    what :func:`~nblosses.functional.cross_entropy` raises; ``backward()`` before a call raises
    ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    >>> print(loss(np.zeros((2, 4)), np.array([0, 3])).round(4))
    1.3863
    >>> loss.backward().shape
    (2, 4)
    """

    def __init__(self, weight: Array | None = None, size_average: Any = None,
                 ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, backend: str | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction, backend=backend)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def _functional(self, input, target, **kwargs):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               backend=self.backend, **kwargs)


class BCELoss(_WeightedLoss):
    """Binary cross-entropy of probabilities (see
    :func:`nblosses.functional.binary_cross_entropy`).

    Parameters
    ----------
    weight : array_like, optional
        Rescaling weight, broadcast to the input's shape.
    size_average, reduce : bool, optional
        Deprecated (as in torch): when given they set ``reduction`` and warn.
    reduction : {"mean", "sum", "none"}
        How per-element losses are combined.
    backend : str, optional
        Backend for every call of this module; default: the current default.

    Notes
    -----
    Shapes: input (probabilities in ``[0, 1]``) and target of any one shape; the loss is 0-d or
    that shape. Input outside ``[0, 1]`` raises ``ValueError``; ``backward()`` before a call
    raises ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m, loss = nn.Sigmoid(), nn.BCELoss()
    >>> print(loss(m(np.array([0.0, 0.0])), np.array([1.0, 0.0])).round(4))
    0.6931
    >>> m.backward(loss.backward())
    array([-0.25,  0.25])
    """

    def _functional(self, input, target, **kwargs):
        return F.binary_cross_entropy(input, target, weight=self.weight,
                                      reduction=self.reduction, backend=self.backend, **kwargs)


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross-entropy, fused and stable (see
    :func:`nblosses.functional.binary_cross_entropy_with_logits`).

    Parameters
    ----------
    weight : array_like, optional
        Rescaling weight, broadcast to the input's shape.
    size_average, reduce : bool, optional
        Deprecated (as in torch): when given they set ``reduction`` and warn.
    reduction : {"mean", "sum", "none"}
        How per-element losses are combined.
    pos_weight : array_like, optional
        Weight of positive examples, broadcast along the last dimensions (e.g. ``(C,)``).
    backend : str, optional
        Backend for every call of this module; default: the current default.

    Notes
    -----
    Shapes: logits and target of any one shape; the loss is 0-d or that shape.
    ``backward()`` before a call raises ``RuntimeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> loss = nn.BCEWithLogitsLoss(pos_weight=np.array([2.0]))
    >>> print(loss(np.array([[0.0]]), np.array([[1.0]])).round(4))
    1.3863
    """

    def __init__(self, weight: Array | None = None, size_average: Any = None, reduce: Any = None,
                 reduction: str = "mean", pos_weight: Array | None = None, *,
                 backend: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction, backend=backend)
        self.weight = weight
        self.pos_weight = pos_weight

    def _functional(self, input, target, **kwargs):
        return F.binary_cross_entropy_with_logits(input, target, weight=self.weight,
                                                  reduction=self.reduction,
                                                  pos_weight=self.pos_weight,
                                                  backend=self.backend, **kwargs)
