"""The op table: one declarative description per op, from which every front end is derived.

:mod:`nblosses.functional` builds each public function from its :class:`Op` (signature,
defaults, docstring), :mod:`nblosses.nn` builds each module's constructor from the same
parameters, the Dask front end reads the canonical arguments the same checks produce, and the
docs' signature table is printed from here. A new keyword option is one :class:`Param` here
(with its check from :mod:`nblosses._args`) plus the kernels that read it.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _args

REQUIRED = inspect.Parameter.empty
#: Marks a checked default that depends on the context (see ``Param.context_default``).
CONTEXT = object()
# Parameter names that hold arrays in any op.
_ARRAY_PARAMS = frozenset({"input", "target", "weight", "pos_weight", "grad_output", "output",
                           "grad_buffer", "linear_weight", "linear_bias"})


@dataclass(frozen=True)
class Param:
    """One parameter of an op.

    Parameters
    ----------
    name : str
        The keyword (and positional) name, as torch spells it.
    default : object
        Default value; :data:`REQUIRED` for none.
    doc : str
        numpydoc entry body: first line the type, then the description.
    keyword_only : bool
        After the ``*`` (nblosses' additions to torch's signatures are keyword-only).
    role : {"input", "config", "call"}
        ``input``: an array the module's ``forward`` takes; ``config``: held by the module
        (constructor argument); ``call``: per call only (``return_grad``, ``dtype``, ...).
    check : callable, optional
        ``check(op_name, value) -> canonical value`` (from :mod:`nblosses._args`), run once per
        call before any array is touched.
    kernel : bool
        Pass the checked value to the kernel as the keyword of the same name.
    torch : bool
        Part of torch's signature (signature tests compare these with torch's).
    context_default : bool
        The check turns the default into a value taken from the context on every call (e.g.
        ``validate``: the current :func:`nblosses.use_validation`), so it is never cached.
    """

    name: str
    default: Any = REQUIRED
    doc: str = ""
    keyword_only: bool = False
    role: str = "config"
    check: Callable[[str, Any], Any] | None = None
    kernel: bool = False
    torch: bool = True
    context_default: bool = False


@dataclass(frozen=True)
class Op:
    """One public op: its parameters in call order and its documentation."""

    name: str
    family: str
    params: tuple[Param, ...]
    summary: str
    description: str = ""
    returns: str = ""
    raises: str = ""
    notes: str = ""
    examples: str = ""
    module: str | None = None
    module_examples: str = ""
    gradient_op: str | None = None

    def param(self, name: str) -> Param:
        """The parameter called ``name``."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    # Derived views of ``params``, computed once: every call reads them.
    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:
        """Names of the array arguments a module's ``forward`` takes."""
        return tuple(p.name for p in self.params if p.role == "input")

    @functools.cached_property
    def array_params(self) -> tuple[str, ...]:
        """Parameters that may hold arrays (they choose the backend and the array kind)."""
        return tuple(p.name for p in self.params if p.name in _ARRAY_PARAMS)

    @functools.cached_property
    def checked(self) -> tuple[tuple[Param, Any], ...]:
        """``(param, canonical default)`` of each parameter with a check. A call that leaves
        an option at its default (the object itself) skips the check, unless the default comes
        from the context (then :data:`CONTEXT` stands for it and the check always runs)."""
        return tuple((p, CONTEXT if p.context_default else p.check(self.name, p.default))
                     for p in self.params if p.check is not None)

    @functools.cached_property
    def kernel_options(self) -> tuple[tuple[str, Any], ...]:
        """``(name, canonical default)`` of each option passed through to the kernel."""
        return tuple((p.name, p.check(self.name, p.default) if p.check else p.default)
                     for p in self.params if p.kernel)

    def signature(self, roles: tuple[str, ...] = ("input", "config", "call")) -> inspect.Signature:
        """The signature of the parameters with one of ``roles`` (in call order)."""
        params = []
        for p in self.params:
            if p.role not in roles:
                continue
            kind = (inspect.Parameter.KEYWORD_ONLY if p.keyword_only
                    else inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params.append(inspect.Parameter(p.name, kind, default=p.default))
        return inspect.Signature(params)

    def docstring(self, roles: tuple[str, ...] = ("input", "config", "call")) -> str:
        """numpydoc docstring of the function (or, with ``roles``, of a module's constructor)."""
        lines = [self.summary, ""]
        if self.description:
            lines += [textwrap.dedent(self.description).strip(), ""]
        lines += ["Parameters", "----------"]
        for p in self.params:
            if p.role in roles and p.doc:
                kind, _, body = textwrap.dedent(p.doc).strip().partition("\n")
                lines.append(f"{p.name} : {kind}")
                lines += ["    " + ln if ln else "" for ln in textwrap.dedent(body).splitlines()]
        for title, text in (("Returns", self.returns), ("Raises", self.raises),
                            ("Notes", self.notes), ("Examples", self.examples)):
            if text:
                lines += ["", title, "-" * len(title), textwrap.dedent(text).strip()]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- shared parameters
def _input(name: str, doc: str) -> Param:
    return Param(name, doc=doc, role="input")


BACKEND = Param("backend", None, """str, optional
    ``"cpu"``, ``"cuda"``, another registered name or ``"auto"`` (by array type); default:
    the current default (:func:`nblosses.use_backend`, :func:`nblosses.set_backend`).""",
                keyword_only=True, torch=False)
DIM = Param("dim", None, """int, optional
    Axis to normalise over; negative counts from the end. ``None`` is deprecated (as in
    torch): it warns and picks 0 for 0-, 1- and 3-d input, else 1.""")
WEIGHT = Param("weight", None, """array_like, optional
    Per-class weights of shape ``(C,)``.""")
SIZE_AVERAGE = Param("size_average", None, """bool, optional
    Deprecated (as in torch); with ``reduce``, when given, it sets ``reduction`` and warns.""")
REDUCE = Param("reduce", None, """bool, optional
    Deprecated (as in torch); see ``size_average``.""")
REDUCTION = Param("reduction", "mean", """{"mean", "sum", "none"}
    How per-element losses are combined.""")
IGNORE_INDEX = Param("ignore_index", -100, """int
    Target value that contributes neither to the loss, nor to the gradient, nor to the
    ``mean`` denominator.""", check=_args.check_ignore_index)
LABEL_SMOOTHING = Param("label_smoothing", 0.0, r"""float
    :math:`\epsilon \in [0, 1]`: the target becomes :math:`(1-\epsilon)\,y + \epsilon / C`.""",
                        check=_args.check_label_smoothing)
Z_LOSS = Param("z_loss", 0.0, r"""float
    Adds :math:`z \cdot \mathrm{lse}^2` to each non-ignored position's loss (PaLM's z-loss,
    not class-weighted), reduced like the loss; :math:`\mathrm{lse}` is the logsumexp of the
    (soft-capped) logits. Not in torch.""", keyword_only=True, check=_args.check_z_loss,
               kernel=True, torch=False)
SOFTCAP = Param("softcap", None, r"""float, optional
    Soft-caps the logits first, :math:`c \tanh(x / c)` (Gemma 2), with the chain rule in the
    gradient. Not in torch.""", keyword_only=True, check=_args.check_softcap, kernel=True,
                torch=False)
RETURN_LSE = Param("return_lse", False, """bool
    Also return the per-position logsumexp of the (soft-capped) logits, shaped like the
    unreduced loss (float32 for half-precision input). Not in torch.""", keyword_only=True,
                   role="config", torch=False)
RETURN_GRAD = Param("return_grad", False, """bool
    Also return the gradient of ``sum(grad_output * loss)`` with respect to ``input``,
    computed in the same pass as the loss.""", keyword_only=True, role="call", torch=False)
GRAD_OUTPUT = Param("grad_output", None, """scalar or array, optional
    Upstream gradient; 1 (or ones of the loss's shape for ``"none"``) by default.""",
                    keyword_only=True, role="call", torch=False)
GRAD_BUFFER = Param("grad_buffer", None, """array, optional
    Where to write the gradient: an array of the input's shape and compute dtype,
    C-contiguous; it may be ``input`` itself, which then holds the gradient instead of the
    logits (saves the gradient's memory; only when the logits are not needed again).""",
                    keyword_only=True, role="call", torch=False)
VALIDATE = Param("validate", None, """{"async", "sync"}, optional
    How class indices are checked on a device backend: ``"async"`` inside the kernels, with
    the ``IndexError`` raised by a later call or :func:`nblosses.synchronize` (the host never
    waits); ``"sync"`` before the kernel, eagerly (waits for the device). Default: the current
    default (:func:`nblosses.use_validation`), ``"async"``. The CPU backend always checks
    eagerly.""", keyword_only=True, check=_args.check_validate, torch=False,
                 context_default=True)
_LOSS_TAIL = (RETURN_GRAD, GRAD_OUTPUT)

_SOFTMAX_RAISES = """
TypeError
    Integer input without ``dtype=``.
IndexError
    ``dim`` out of range."""
_CLASS_RAISES = """
IndexError
    A target outside ``[0, C)`` that is not ``ignore_index`` (on a device backend reported
    asynchronously unless ``validate="sync"``).
ValueError
    Mismatched shapes, bad weight length, bad ``reduction`` or option value.
TypeError
    Non-float input or a target of the wrong kind."""
_LOSS_RETURNS = """
loss : array
    0-d for ``mean`` / ``sum``, else the unreduced shape. All ignored with ``mean`` -> NaN.
grad : array
    Only with ``return_grad=True``: the gradient, shaped as ``input``."""


def _softmax_op(name: str, summary: str, description: str, examples: str, module: str,
                module_examples: str) -> Op:
    return Op(
        name, "softmax",
        (_input("input", """array_like
            Floating-point array of any shape (0-d included)."""),
         DIM,
         Param("_stacklevel", 3, """int
            Accepted for torch compatibility; unused.""", role="call"),
         Param("dtype", None, """dtype, optional
            Cast the input to this dtype before computing; the result has this dtype.""",
               role="call"),
         BACKEND),
        summary, description,
        returns="""
        array
            Same shape as ``input``. A slice containing NaN or ``+inf``, or only ``-inf``, is
            NaN.""",
        raises=_SOFTMAX_RAISES, examples=examples, module=module,
        module_examples=module_examples, gradient_op=f"{name}_backward")


def _softmax_backward_op(name: str, summary: str, examples: str) -> Op:
    return Op(
        name, "softmax_backward",
        (_input("grad_output", """array_like
            Gradient of the objective with respect to the output."""),
         _input("output", """array_like
            The forward output (same shape)."""),
         Param("dim", REQUIRED, """int
            The axis the forward op normalised over."""),
         BACKEND),
        summary,
        returns="""
        array
            Gradient with respect to the forward input, same shape and dtype as ``output``.""",
        raises="""
        ValueError
            ``grad_output`` and ``output`` differ in shape.""",
        examples=examples)


def _class_loss_op(name: str, input_doc: str, target_doc: str, extra: tuple[Param, ...],
                   summary: str, **docs: Any) -> Op:
    params = (_input("input", input_doc), _input("target", target_doc), WEIGHT, SIZE_AVERAGE,
              IGNORE_INDEX, REDUCE, REDUCTION, *extra, *_LOSS_TAIL, GRAD_BUFFER, VALIDATE,
              BACKEND)
    return Op(name, "class_loss", params, summary, returns=_LOSS_RETURNS, raises=_CLASS_RAISES,
              **docs)


BCE_VALIDATE = Param("validate", None, """{"async", "sync"}, optional
    How a device backend checks that the input lies in ``[0, 1]``: ``"async"`` inside the
    kernel (``ValueError`` raised by a later call or :func:`nblosses.synchronize`), ``"sync"``
    before it (waits for the device). Default: :func:`nblosses.get_validation`. The CPU backend
    always checks eagerly.""", keyword_only=True, check=_args.check_validate, torch=False,
                     context_default=True)


def _binary_loss_op(name: str, extra: tuple[Param, ...], summary: str, **docs: Any) -> Op:
    params = (_input("input", docs.pop("input_doc")), _input("target", """array_like
        Same shape as ``input`` (usually 0/1; any value is allowed)."""),
              Param("weight", None, """array_like, optional
        Rescaling weight, broadcast to ``input``'s shape."""),
              SIZE_AVERAGE, REDUCE,
              Param("reduction", "mean", """{"mean", "sum", "none"}
        How per-element losses are combined; ``mean`` divides by the number of elements."""),
              *extra, *_LOSS_TAIL, *docs.pop("validate", ()), BACKEND)
    return Op(name, "binary_loss", params, summary, **docs)


OPS: dict[str, Op] = {op.name: op for op in (
    _softmax_op(
        "softmax",
        r"Softmax along ``dim``: :math:`y_i = e^{x_i - m} / \sum_j e^{x_j - m}`, "
        r":math:`m = \max_j x_j`.", "",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> F.softmax(np.array([[1.0, 2.0, 3.0]]), dim=1).round(4)
        array([[0.09  , 0.2447, 0.6652]])""",
        "Softmax",
        """
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m = nn.Softmax(dim=2)
        >>> out = m(np.random.rand(3, 4, 5, 6))
        >>> bool(np.allclose(out.sum(axis=2), 1.0))
        True"""),
    _softmax_op(
        "log_softmax",
        r"Log-softmax along ``dim``: :math:`x_i - m - \log \sum_j e^{x_j - m}`.",
        """More accurate than ``log(softmax(x))`` (equal to it only up to rounding), and
        finite where softmax underflows to 0.""",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> F.log_softmax(np.array([0.0, 0.0]), dim=0)
        array([-0.69314718, -0.69314718])""",
        "LogSoftmax",
        """
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m = nn.LogSoftmax(dim=1)
        >>> m(np.zeros((1, 2))).round(4)
        array([[-0.6931, -0.6931]])"""),
    Op("sigmoid", "activation",
       (_input("input", """array_like
            Floating-point array of any shape."""), BACKEND),
       r"Logistic sigmoid :math:`1 / (1 + e^{-x})`, elementwise.",
       returns="""
        array
            Same shape and dtype; ``+inf`` gives 1, ``-inf`` gives 0, NaN stays NaN.""",
       raises="""
        TypeError
            Non-float input.""",
       examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> F.sigmoid(np.array([0.0, 100.0, -100.0], dtype=np.float32))
        array([0.5, 1. , 0. ], dtype=float32)""",
       module="Sigmoid",
       module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m = nn.Sigmoid()
        >>> m(np.array([0.0]))
        array([0.5])
        >>> m.backward(np.array([1.0]))
        array([0.25])""",
       gradient_op="sigmoid_backward"),
    _softmax_backward_op(
        "softmax_backward",
        r"Gradient of :func:`softmax` given its ``output`` :math:`y`: :math:`y (g - \sum g y)`.",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> y = F.softmax(np.array([1.0, 2.0]), dim=0)
        >>> F.softmax_backward(np.array([1.0, 1.0]), y, dim=0)
        array([0., 0.])"""),
    _softmax_backward_op(
        "log_softmax_backward",
        r"Gradient of :func:`log_softmax` given its ``output`` :math:`y`: "
        r":math:`g - e^y \sum g`.",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> y = F.log_softmax(np.array([0.0, 0.0]), dim=0)
        >>> F.log_softmax_backward(np.array([1.0, 0.0]), y, dim=0)
        array([ 0.5, -0.5])"""),
    Op("sigmoid_backward", "activation_backward",
       (_input("grad_output", """array_like
            Gradient of the objective with respect to the sigmoid output."""),
        _input("output", """array_like
            The sigmoid output (same shape)."""), BACKEND),
       r"Gradient of :func:`sigmoid` given its ``output`` :math:`y`: :math:`g\,y(1-y)`.",
       returns="""
        array
            Gradient with respect to the sigmoid input, shaped as ``output``.""",
       raises="""
        ValueError
            ``grad_output`` and ``output`` differ in shape.""",
       examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> F.sigmoid_backward(np.array([1.0]), np.array([0.5]))
        array([0.25])"""),
    _class_loss_op(
        "nll_loss",
        """array_like
            Log-probabilities of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.""",
        """array_like of int
            Class indices in ``[0, C)`` (or ``ignore_index``) of shape ``()``, ``(N,)`` or
            ``(N, d1, ..., dk)``.""",
        (),
        r"Negative log-likelihood loss on log-probabilities: :math:`l_i = -w_{t_i} x_{i, t_i}`.",
        notes="""
        ``mean`` divides by the sum of the weights of the non-ignored targets.""",
        examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> logp = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
        >>> loss = F.nll_loss(logp, np.array([1, 0]))
        >>> loss.shape, round(float(loss), 4)
        ((), 0.4904)""",
        module="NLLLoss",
        module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m, loss = nn.LogSoftmax(dim=1), nn.NLLLoss()
        >>> x = np.zeros((3, 5)); target = np.array([1, 0, 4])
        >>> print(loss(m(x), target).round(4))
        1.6094
        >>> m.backward(loss.backward()).round(3)[0]
        array([ 0.067, -0.267,  0.067,  0.067,  0.067])"""),
    _class_loss_op(
        "cross_entropy",
        """array_like
            Unnormalised logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.""",
        """array_like
            Either class indices (integers, shaped as the input without its class axis) or
            class probabilities (floats, shaped as ``input``; then ``ignore_index`` must stay
            negative).""",
        (LABEL_SMOOTHING, Z_LOSS, SOFTCAP, RETURN_LSE),
        "Cross-entropy of logits: log-softmax and NLL fused, never materialising "
        "log-probabilities.",
        notes="""
        Index targets: ``mean`` divides by the sum of ``weight[target]`` over non-ignored
        positions; probability targets: by ``N * d1 * ... * dk``. The loss, the gradient and
        the logsumexp come from one pass over the logits; no log-probability array is formed.
        With ``return_lse`` the result is ``(loss, lse)`` or ``(loss, grad, lse)``.""",
        examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> x = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> loss, grad = F.cross_entropy(x, np.array([0, 2]), return_grad=True)
        >>> round(float(loss), 4)
        0.6691
        >>> grad.round(4)
        array([[-0.1065,  0.0533,  0.0533],
               [ 0.1667,  0.1667, -0.3333]])
        >>> loss, lse = F.cross_entropy(x, np.array([0, 2]), z_loss=1e-4, return_lse=True)
        >>> lse.round(4)
        array([2.2395, 1.0986])""",
        module="CrossEntropyLoss",
        module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> loss = nn.CrossEntropyLoss(label_smoothing=0.1)
        >>> print(loss(np.zeros((2, 4)), np.array([0, 3])).round(4))
        1.3863
        >>> loss.backward().shape
        (2, 4)"""),
    _binary_loss_op(
        "binary_cross_entropy", (),
        r"Binary cross-entropy of probabilities: :math:`-w[y \log x + (1-y)\log(1-x)]`.",
        input_doc="""array_like
            Probabilities in ``[0, 1]``, any shape.""",
        validate=(BCE_VALIDATE,),
        description="""Each log is clamped at -100, as in torch, so ``x = 0`` or ``1`` gives a
        finite loss.""",
        returns="""
        loss : array
            0-d, or ``input``'s shape for ``"none"``.
        grad : array
            With ``return_grad=True``: :math:`g\\,w\\,(x-y) / \\max(x(1-x), 10^{-12})`.""",
        raises="""
        ValueError
            ``input`` outside ``[0, 1]`` (NaN included), shape mismatch, bad weight shape.""",
        examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> round(float(F.binary_cross_entropy(np.array([0.5, 0.9]), np.array([1.0, 1.0]))), 4)
        0.3993""",
        module="BCELoss",
        module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m, loss = nn.Sigmoid(), nn.BCELoss()
        >>> print(loss(m(np.array([0.0, 0.0])), np.array([1.0, 0.0])).round(4))
        0.6931
        >>> m.backward(loss.backward())
        array([-0.25,  0.25])"""),
    _binary_loss_op(
        "binary_cross_entropy_with_logits",
        (Param("pos_weight", None, """array_like, optional
            Weight of positive examples, broadcast along the last dimensions (e.g. ``(C,)``)."""),),
        "Sigmoid and binary cross-entropy fused, stable for any logit.",
        input_doc="""array_like
            Logits, any shape.""",
        description=r""":math:`l = w[(1-y)x - (1 + (p-1)y)\log\sigma(x)]` with
        :math:`\log\sigma(x) = \min(x, 0) - \log(1 + e^{-|x|})`.""",
        returns="""
        loss : array
            0-d, or ``input``'s shape for ``"none"``.
        grad : array
            With ``return_grad=True``: :math:`g\\,w[(1+(p-1)y)\\sigma(x) - p\\,y]`.""",
        raises="""
        ValueError
            Shape mismatch, or a weight that does not broadcast.""",
        examples="""
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> x, y = np.array([0.0, 1000.0]), np.array([1.0, 1.0])
        >>> round(float(F.binary_cross_entropy_with_logits(x, y)), 4)
        0.3466""",
        module="BCEWithLogitsLoss",
        module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> loss = nn.BCEWithLogitsLoss(pos_weight=np.array([2.0]))
        >>> print(loss(np.array([[0.0]]), np.array([[1.0]])).round(4))
        1.3863"""),
)}


_LINEAR_CE = Op(
    "linear_cross_entropy", "linear_ce",
    (_input("input", """array_like
        Features ``(N, d)`` or ``(d,)``."""),
     _input("linear_weight", """array_like
        Weight of the linear layer, ``(V, d)`` (or ``(V, o1, ..., ok, d)``: torch's
        K-dimensional loss, computed through materialised logits)."""),
     _input("target", """array_like
        Class indices ``(N,)`` (integers) or class probabilities ``(N, V)`` (floats)."""),
     Param("linear_bias", None, """array_like, optional
        Bias of the linear layer, ``(V,)`` (or ``(V, o1, ..., ok)``).""", keyword_only=True,
           role="input"),
     Param("weight", None, """array_like, optional
        Per-class weights of shape ``(V,)``.""", keyword_only=True),
     Param("reduction", "mean", """{"mean", "sum", "none"}
        How per-row losses are combined.""", keyword_only=True),
     Param("ignore_index", None, """int, optional
        Target value that contributes nothing; ``None`` means -100 for class indices and must
        stay ``None`` for probability targets (as in torch).""", keyword_only=True,
           check=_args.check_optional_ignore_index),
     Param("label_smoothing", 0.0, LABEL_SMOOTHING.doc, keyword_only=True,
           check=_args.check_label_smoothing),
     Param("options", None, """object, optional
        torch's ``LinearCrossEntropyOptions``: accepted; its ``batch_chunk_size``, when set,
        is the row-chunk size. nblosses always chunks (it never forms the ``(N, V)`` logits)
        and picks the chunks itself otherwise.""", keyword_only=True,
           check=_args.check_chunking),
     Z_LOSS, SOFTCAP, RETURN_LSE, RETURN_GRAD, GRAD_OUTPUT, VALIDATE, BACKEND),
    "The final linear layer and cross-entropy in one pass: "
    "``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the logits.",
    description="""The vocabulary is processed in blocks of rows (BLAS / cuBLAS products
    for the logits of a block, a fused kernel for their statistics and, with
    ``return_grad=True``, their gradient in place), so the extra memory stays a few percent of
    ``N * V`` whatever the vocabulary.""",
    returns="""
    loss : array
        0-d for ``mean`` / ``sum``, ``(N,)`` for ``"none"``.
    grads : tuple of array
        Only with ``return_grad=True``: ``(grad_input, grad_linear_weight, grad_linear_bias)``
        (the last ``None`` without a bias).
    lse : array
        Only with ``return_lse=True``: the per-row logsumexp of the (soft-capped) logits.""",
    raises=_CLASS_RAISES,
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> r = np.random.default_rng(0)
    >>> x, w = r.standard_normal((4, 8)), r.standard_normal((50, 8))
    >>> t = np.array([3, 0, 49, 7])
    >>> loss, (gx, gw, gb) = F.linear_cross_entropy(x, w, t, return_grad=True)
    >>> bool(np.isclose(loss, F.cross_entropy(x @ w.T, t)))
    True
    >>> gx.shape, gw.shape, gb is None
    ((4, 8), (50, 8), True)""")
OPS[_LINEAR_CE.name] = _LINEAR_CE


def signature_table() -> str:
    """An RST table of every op: functional signature and module constructor (for the docs)."""
    rows = [("function", "module", "constructor")]
    for op in OPS.values():
        ctor = op.signature(("config",)) if op.module else None
        rows.append((f"``F.{op.name}{op.signature()}``",
                     f"``nn.{op.module}``" if op.module else "",
                     f"``{ctor}``" if ctor is not None else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([rule, body[0], rule, *body[1:], rule]) + "\n"
