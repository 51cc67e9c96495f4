"""The base classes of :mod:`nblosses.nn` and the modules written by hand.

:mod:`nblosses.nn` is generated from the op specs (:mod:`nblosses._codegen`): each op with a
module gets a class of :class:`Activation` or :class:`Loss` here. How the modules behave (their
constructors, ``backward`` without autograd, the references loss modules keep) is said once, in
:mod:`nblosses.nn`'s docstring (``MODULE_DOCS["nn"]`` in :mod:`nblosses._frontends`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _args
from ._spec import OpSpec
from .ops import SPECS

#: The public classes (re-exported by :mod:`nblosses.nn`).
__all__ = ["LinearCrossEntropyLoss", "LinearDistillationLoss", "Module"]

Array = Any
_LEGACY = ("size_average", "reduce")


class Module:
    """Base class: a callable holding configuration and the state its ``backward`` needs."""

    _spec: OpSpec
    #: Every module takes ``backend=`` (its other configuration is set from its spec).
    backend: str | None

    def __init_subclass__(cls, op: str | None = None, **kwargs: Any) -> None:
        """``class Softmax(Activation, op="softmax")``: the class computes the op of that spec."""
        super().__init_subclass__(**kwargs)
        if op is not None:
            cls._spec = SPECS[op]

    def __init__(self, **config: Any) -> None:
        if "size_average" in config:
            size_average, reduce = config.pop("size_average"), config.pop("reduce")
            # As torch's _Loss: the legacy pair, when given, sets reduction (and warns) right
            # here; otherwise reduction is kept as given and checked by the call (kl_div's
            # "batchmean" is valid for one op only).
            if size_average is not None or reduce is not None:
                config["reduction"] = _args.reduction_from(size_average, reduce,
                                                           config["reduction"])
        self.__dict__.update(config)
        self._config = tuple(config)
        self._saved: tuple | None = None

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def _functional(self, *inputs: Any, **kwargs: Any) -> Any:
        """The op on ``inputs`` with this module's current configuration."""
        from . import functional  # lazily: nblosses._codegen imports this module to write it

        config = {name: getattr(self, name) for name in self._config}
        return getattr(functional, self._spec.name)(*inputs, **config, **kwargs)

    def forward(self, *inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_output: Any = None) -> Array:  # pragma: no cover - abstract
        """Gradient with respect to the input of the last call."""
        raise NotImplementedError

    def _need_saved(self) -> tuple:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before the module was "
                               f"called on an input")
        return self._saved

    def extra_repr(self) -> str:
        shown = [f"{n}={getattr(self, n)!r}" for n in self._config
                 if n != "backend" and getattr(self, n) != self._spec.param(n).default]
        return ", ".join(shown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Activation(Module):
    """Keeps its last output; ``backward(g)`` is the op's gradient function of it."""

    def forward(self, input: Array) -> Array:
        y = self._functional(input)
        dim = getattr(self, "dim", None)
        if "dim" in self._config and dim is None:  # the legacy implicit axis, as the call chose
            dim = _args.implicit_dim(y.ndim)
        self._saved = (y, dim)
        return y

    def backward(self, grad_output: Array | None = None) -> Array:
        """Gradient w.r.t. the last input, given ``grad_output`` (default: ones)."""
        y, dim = self._need_saved()
        g = y * 0 + 1 if grad_output is None else grad_output
        dims = () if dim is None else (dim,)
        from . import functional

        return getattr(functional, str(self._spec.gradient_op))(g, y, *dims,
                                                                backend=self.backend)


class Loss(Module):
    """Keeps its last inputs; ``backward`` runs the fused loss+gradient kernel on them."""

    def forward(self, *inputs: Array) -> Any:
        loss = self._functional(*inputs)
        self._saved = inputs
        return loss

    def backward(self, grad_output: Any = None) -> Array:
        """Gradient w.r.t. the input of the last call, given ``grad_output`` (default 1, or ones
        of the loss's shape for ``reduction="none"``), from the fused loss+gradient kernel."""
        inputs = self._need_saved()
        result = self._functional(*inputs, return_grad=True, grad_output=grad_output)
        return result[1]


class LinearCrossEntropyLoss(Module, op="linear_cross_entropy"):
    """The final linear layer and cross-entropy, holding the layer's parameters (see
    :func:`nblosses.functional.linear_cross_entropy`).

    Parameters
    ----------
    in_features : int
        Size ``d`` of each input row.
    num_classes : int
        Number of classes ``V`` (the vocabulary of a language-model head).
    out_features : tuple of int
        torch's K-dimensional loss: the layer maps to ``(V, *out_features)`` per row.
    bias : bool
        Whether the layer has a bias.
    device : {None, "cpu", "cuda"}
        Where the parameters live: NumPy arrays (``None`` / ``"cpu"``) or CuPy arrays.
    dtype : dtype, optional
        Parameter dtype (float32 by default).
    reduction, weight, ignore_index, label_smoothing, options
        As :func:`~nblosses.functional.linear_cross_entropy`.
    z_loss, softcap, return_lse, backend
        nblosses' additions, keyword-only, as for :class:`CrossEntropyLoss`.

    Attributes
    ----------
    linear_weight : array
        ``(V * prod(out_features), in_features)``, initialised as torch's ``nn.Linear``
        (uniform in ``±1/sqrt(in_features)``).
    linear_bias : array or None
        ``(V * prod(out_features),)``.
    linear_weight_grad, linear_bias_grad : array or None
        Set by :meth:`backward`: the gradients of the parameters.

    Notes
    -----
    ``backward(grad_output=None)`` returns the gradient with respect to the last call's input
    and stores the parameters' gradients, from one chunked pass that never forms the logits.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> head = nn.LinearCrossEntropyLoss(8, 50, bias=True)
    >>> x, t = np.ones((4, 8), dtype=np.float32), np.array([1, 2, 3, 4])
    >>> float(head(x, t)) > 0
    True
    >>> head.backward().shape, head.linear_weight_grad.shape
    ((4, 8), (50, 8))
    """

    reduction: str

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device: Any = None, dtype: Any = None,
                 reduction: str = "mean", weight: Array | None = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0,
                 options: Any = None, z_loss: float = 0.0, softcap: float | None = None,
                 return_lse: bool = False, backend: str | None = None) -> None:
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"expected weight shape to be {(num_classes,)}, got "
                             f"{tuple(weight.shape)}")
        _args.check_label_smoothing("LinearCrossEntropyLoss", label_smoothing)
        super().__init__(reduction=_args.reduction_from(None, None, reduction), weight=weight,
                         ignore_index=ignore_index, label_smoothing=label_smoothing,
                         options=options, z_loss=z_loss, softcap=softcap,
                         return_lse=return_lse, backend=backend)
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.in_features = in_features
        rows = math.prod(self.out_features, start=num_classes)
        xp = _array_module(device)
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        rng = np.random.default_rng()
        dt = np.dtype(dtype or np.float32)
        self.linear_weight = xp.asarray(rng.uniform(-bound, bound, (rows, in_features)), dt)
        self.linear_bias = xp.asarray(rng.uniform(-bound, bound, rows), dt) if bias else None
        self.linear_weight_grad: Array | None = None
        self.linear_bias_grad: Array | None = None

    def _functional(self, *inputs: Any, **kwargs: Any) -> Any:
        w = self.linear_weight.reshape((self.num_classes, *self.out_features, self.in_features))
        b = (None if self.linear_bias is None
             else self.linear_bias.reshape((self.num_classes, *self.out_features)))
        input, target = inputs
        return super()._functional(input, w, target, linear_bias=b, **kwargs)

    def forward(self, input: Array, target: Array) -> Any:
        result = self._functional(input, target)
        self._saved = (input, target)
        return result

    def backward(self, grad_output: Any = None) -> Array:
        """Gradient w.r.t. the last call's input; stores ``linear_weight_grad`` and
        ``linear_bias_grad``."""
        input, target = self._need_saved()
        result = self._functional(input, target, return_grad=True, grad_output=grad_output)
        gx, gw, gb = result[1]
        self.linear_weight_grad = gw.reshape(self.linear_weight.shape)
        self.linear_bias_grad = None if gb is None else gb.reshape(-1)
        return gx

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear_bias is not None}, "
                f"reduction={self.reduction!r}")


class LinearDistillationLoss(Module, op="linear_distillation_loss"):
    """Distillation into a language-model head, holding the student's output layer (see
    :func:`nblosses.functional.linear_distillation_loss`); the teacher's features and output
    layer are passed per call (frozen: they get no gradient).

    Parameters
    ----------
    in_features : int
        Size ``d`` of each student feature row.
    num_classes : int
        Number of classes ``V`` (the vocabulary shared with the teacher).
    bias : bool
        Whether the student's layer has a bias.
    device : {None, "cpu", "cuda"}
        Where the parameters live: NumPy arrays (``None`` / ``"cpu"``) or CuPy arrays.
    dtype : dtype, optional
        Parameter dtype (float32 by default).
    beta, temperature, ignore_index, hard_weight, softcap, reduction, options, backend
        As :func:`~nblosses.functional.linear_distillation_loss`, keyword-only.

    Attributes
    ----------
    linear_weight : array
        ``(V, in_features)``, initialised as torch's ``nn.Linear`` (uniform in
        ``±1/sqrt(in_features)``).
    linear_bias : array or None
        ``(V,)``.
    linear_weight_grad, linear_bias_grad : array or None
        Set by :meth:`backward`: the gradients of the parameters.

    Notes
    -----
    ``head(input, teacher_input, teacher_weight, target=None, teacher_bias=None)``;
    ``backward(grad_output=None)`` returns the gradient with respect to the last call's input
    and stores the parameters' gradients, from one chunked pass that forms neither head's
    logits.

    Examples
    --------
    >>> import numpy as np
    >>> from nblosses import nn
    >>> head = nn.LinearDistillationLoss(8, 50, bias=True, temperature=2.0)
    >>> r = np.random.default_rng(0)
    >>> x = r.standard_normal((4, 8), dtype=np.float32)
    >>> tx = r.standard_normal((4, 16), dtype=np.float32)
    >>> tw = r.standard_normal((50, 16), dtype=np.float32)
    >>> float(head(x, tx, tw)) >= 0
    True
    >>> head.backward().shape, head.linear_weight_grad.shape
    ((4, 8), (50, 8))
    """

    reduction: str

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False,
                 device: Any = None, dtype: Any = None, beta: float = 0.0,
                 temperature: float = 1.0, ignore_index: int = -100, hard_weight: float = 0.0,
                 softcap: float | None = None, reduction: str = "mean", options: Any = None,
                 backend: str | None = None) -> None:
        super().__init__(beta=beta, temperature=temperature, ignore_index=ignore_index,
                         hard_weight=hard_weight, softcap=softcap,
                         reduction=_args.reduction_from(None, None, reduction),
                         options=options, backend=backend)
        self.num_classes, self.in_features = num_classes, in_features
        xp = _array_module(device)
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        rng = np.random.default_rng()
        dt = np.dtype(dtype or np.float32)
        self.linear_weight = xp.asarray(rng.uniform(-bound, bound, (num_classes, in_features)),
                                        dt)
        self.linear_bias = (xp.asarray(rng.uniform(-bound, bound, num_classes), dt) if bias
                            else None)
        self.linear_weight_grad: Array | None = None
        self.linear_bias_grad: Array | None = None

    def _functional(self, *inputs: Any, **kwargs: Any) -> Any:
        input, teacher_input, teacher_weight, target, teacher_bias = inputs
        return super()._functional(input, self.linear_weight, teacher_input, teacher_weight,
                                   target, linear_bias=self.linear_bias,
                                   teacher_bias=teacher_bias, **kwargs)

    def forward(self, input: Array, teacher_input: Array, teacher_weight: Array,
                target: Array | None = None, teacher_bias: Array | None = None) -> Any:
        inputs = (input, teacher_input, teacher_weight, target, teacher_bias)
        result = self._functional(*inputs)
        self._saved = inputs
        return result

    def backward(self, grad_output: Any = None) -> Array:
        """Gradient w.r.t. the last call's input; stores ``linear_weight_grad`` and
        ``linear_bias_grad``."""
        result = self._functional(*self._need_saved(), return_grad=True,
                                  grad_output=grad_output)
        gx, gw, gb = result[1]
        self.linear_weight_grad, self.linear_bias_grad = gw, gb
        return gx

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear_bias is not None}" + (f", {own}" if own else ""))


def _array_module(device: Any) -> Any:
    """NumPy for ``None`` / ``"cpu"``, CuPy for ``"cuda"`` (imported only then)."""
    name = str(device or "cpu").split(":")[0]
    if name == "cpu":
        return np
    if name == "cuda":
        import cupy

        return cupy
    raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
