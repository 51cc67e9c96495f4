"""Class API: torch.nn-style modules that hold their configuration and call :mod:`.functional`.

Each module is built from its op's entry in the op table (:mod:`nblosses._ops`): the
constructor takes the op's configuration parameters in torch's order (plus nblosses'
keyword-only ones, ``backend=`` among them); an unknown keyword is a ``TypeError``, as in torch.
Calling a module runs its functional counterpart. Without autograd, each module keeps what its
gradient needs from its last call, and ``backward(grad_output)`` returns the gradient with
respect to that call's input, so torch chains port directly::

    logsoftmax, nll = nn.LogSoftmax(dim=1), nn.NLLLoss()
    loss = nll(logsoftmax(x), target)
    grad_x = logsoftmax.backward(nll.backward())

Loss modules keep references to their inputs (not copies) and run the fused loss+gradient
kernel on ``backward``; mutate those arrays between the call and ``backward`` and the gradient
follows the new values.
"""

from __future__ import annotations

import textwrap
from typing import Any

from . import _args
from . import functional as F
from ._ops import OPS, Op

__all__ = sorted(["Module", *(op.module for op in OPS.values() if op.module)])

Array = Any
_LEGACY = ("size_average", "reduce")


class Module:
    """Base class: a callable holding configuration and the state its ``backward`` needs."""

    _op: Op

    def __init__(self, **config: Any) -> None:
        if "size_average" in config:  # torch resolves the legacy pair (and warns) right here
            config["reduction"] = _args.reduction_from(config.pop("size_average"),
                                                       config.pop("reduce"),
                                                       config["reduction"])
        self.__dict__.update(config)
        self._config = tuple(config)
        self._saved: tuple | None = None

    def __call__(self, *inputs: Any) -> Any:
        return self.forward(*inputs)

    def _functional(self, *inputs: Any, **kwargs: Any) -> Any:
        """The op on ``inputs`` with this module's current configuration."""
        config = {name: getattr(self, name) for name in self._config}
        return getattr(F, self._op.name)(*inputs, **config, **kwargs)

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
                 if n != "backend" and getattr(self, n) != self._op.param(n).default]
        return ", ".join(shown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _Activation(Module):
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
        return getattr(F, self._op.gradient_op)(g, y, *dims, backend=self.backend)


class _Loss(Module):
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


def _module_doc(op: Op, base: type) -> str:
    what = ("``backward(g)`` returns the gradient w.r.t. the last input from the last output"
            if base is _Activation else
            "``backward(grad_output=None)`` runs the fused loss+gradient kernel on the last "
            "call's arrays")
    notes = textwrap.dedent(f"""
        Calling the module with ``{', '.join(op.inputs)}`` runs
        :func:`nblosses.functional.{op.name}` with this configuration and raises what it
        raises; {what}; before a call it raises ``RuntimeError``.""")
    doc = op.docstring(("config",)).split("\nReturns\n")[0].split("\nRaises\n")[0]
    doc = doc.split("\nNotes\n")[0].split("\nExamples\n")[0].rstrip()
    first, _, rest = doc.partition("\n")
    doc = f"{first.rstrip('.')} (see :func:`nblosses.functional.{op.name}`).\n{rest}"
    return (doc + "\n\nNotes\n-----" + notes + "\n\nExamples\n--------\n"
            + textwrap.dedent(op.module_examples).strip() + "\n")


def _make_module(op: Op, base: type) -> type:
    """The module class of ``op``: a constructor with the op's configuration parameters."""
    sig = op.signature(("config",))
    namespace: dict[str, Any] = {}
    params, names, star = [], [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        namespace[f"_default_{p.name}"] = p.default
        params.append(f"{p.name}=_default_{p.name}")
        names.append(p.name)
    body = ", ".join(f"{n}={n}" for n in names)
    source = (f"def __init__(self, {', '.join(params)}):\n"
              f"    Module.__init__(self, {body})\n")
    namespace["Module"] = Module
    exec(compile(source, f"<nblosses.nn.{op.module}>", "exec"), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{op.module}.__init__"
    cls = type(op.module, (base,), {"__init__": init, "_op": op, "__module__": __name__,
                                    "__doc__": _module_doc(op, base)})
    return cls


_BASES = {"softmax": _Activation, "activation": _Activation, "class_loss": _Loss,
          "binary_loss": _Loss}
for _op in OPS.values():
    if _op.module:
        globals()[_op.module] = _make_module(_op, _BASES[_op.family])
del _op
