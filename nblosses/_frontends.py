"""What each front end makes of an op spec: its parameters and its numpydoc docstrings.

:mod:`nblosses._codegen` writes the front ends' source from the specs (signatures, bodies, a
one-line docstring each); the generated modules attach the full docstrings built here when they
are imported (:func:`attach_docs`), so that the text of each parameter, example and note stays
in one place, its spec, and ``help()``, Sphinx and the doctests read the complete reference.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import MutableMapping
from typing import Any

from ._spec import ARRAY_PARAMS, Autograd, ModuleKind, OpSpec, Param, Role
from .ops import SPECS

#: Parameters the autograd front ends leave out: the gradient is theirs to compute, the
#: backend follows the arrays' device and validation keeps its default.
_NOT_IN_AUTOGRAD = frozenset({"return_grad", "grad_output", "grad_buffer", "backend",
                              "validate"})
#: torch's legacy parameters: nblosses.torch keeps them (torch's signature), nblosses.jax not.
_TORCH_LEGACY = frozenset({"size_average", "reduce", "_stacklevel"})


def derived(spec: OpSpec) -> bool:
    """Whether ``spec`` gets a generated function in the autograd front ends."""
    return spec.autograd in (Autograd.SOFTMAX, Autograd.FUSED_LOSS)


def autograd_params(spec: OpSpec, torch: bool) -> list[Param]:
    """The parameters of ``spec``'s function in :mod:`nblosses.torch` (``torch=True``: torch's
    signature, the keyword-only extras that mean something in autograd, then the spec's
    ``torch_params``) or :mod:`nblosses.jax` (the same without torch's legacy ones)."""
    skip = _NOT_IN_AUTOGRAD | set(spec.results) | (set() if torch else _TORCH_LEGACY)
    params = [p for p in spec.params if p.name not in skip]
    return params + list(spec.torch_params) if torch else params


def is_sequence(p: Param) -> bool:
    """An array parameter that may be a tuple of arrays (its type line says ``tuple``): the
    torch op takes it as a tensor list."""
    return "tuple" in p.doc.strip().partition("\n")[0]


def module_doc(spec: OpSpec) -> str:
    """numpydoc docstring of ``spec``'s :mod:`nblosses.nn` class."""
    what = ("``backward(g)`` returns the gradient w.r.t. the last input from the last output"
            if spec.module_kind is ModuleKind.ACTIVATION else
            "``backward(grad_output=None)`` runs the fused loss+gradient kernel on the last "
            "call's arrays")
    notes = textwrap.fill(
        f"Calling the module with ``{', '.join(spec.inputs)}`` runs "
        f":func:`nblosses.functional.{spec.name}` with this configuration and raises what it "
        f"raises; {what}; before a call it raises ``RuntimeError``.", 92)
    doc = spec.docstring((Role.CONFIG,))
    for section in ("\nReturns\n", "\nRaises\n", "\nNotes\n", "\nExamples\n"):
        doc = doc.split(section)[0]
    first, _, rest = doc.rstrip().partition("\n")
    doc = f"{first.rstrip('.')} (see :func:`nblosses.functional.{spec.name}`).\n{rest}"
    return (doc + "\n\nNotes\n-----\n" + notes + "\n\nExamples\n--------\n"
            + textwrap.dedent(spec.module_examples).strip() + "\n")


def autograd_doc(spec: OpSpec, torch: bool) -> str:
    """numpydoc docstring of ``spec``'s function in :mod:`nblosses.torch` (``torch=True``) or
    :mod:`nblosses.jax`."""
    lib, array = ("torch autograd", "Tensor") if torch else ("JAX (``jit``, ``grad``, ``vmap``)",
                                                            "jax.Array")
    if spec.autograd is Autograd.SOFTMAX:
        how = (f"backward is :func:`nblosses.functional.{spec.gradient_op}` of the saved "
               "output.")
        returns = f"{array}\n    Same shape as ``input`` (in ``dtype`` when given)."
    else:
        how = ("differentiable with respect to ``input`` only. A reduced loss computes its "
               "gradient in the forward pass, in the same sweep as the loss, and backward "
               "scales it; an unreduced one (``reduction=\"none\"``) gets its gradient in "
               "backward, from the same fused sweep given the upstream gradient.")
        returns = f"{array}\n    The loss: 0-d when reduced, else the unreduced shape."
    lines = [spec.summary, "", textwrap.fill(
        f":func:`nblosses.functional.{spec.name}` inside {lib}: {how}", 92), "",
        "Parameters", "----------"]
    for p in autograd_params(spec, torch):
        kind, _, body = inspect.cleandoc(p.doc).partition("\n")
        if p.name in ARRAY_PARAMS:
            kind = array + (" or tuple of " + array if is_sequence(p) else "") + (
                ", optional" if p.default is None else "")
        lines.append(f"{p.name} : {kind}")
        lines += ["    " + ln if ln else "" for ln in textwrap.dedent(body).splitlines()]
    return "\n".join([*lines, "", "Returns", "-------", returns]) + "\n"


#: The docstring of each generated module, by front end.
MODULE_DOCS = {
    "functional": """Functional API: torch.nn.functional's softmax family and classification losses.

Every function has torch's signature plus nblosses' keyword-only additions, and one body: the
dispatcher's ``call(spec, arguments)`` (:mod:`nblosses._dispatch`): check the options, pick the
backend (:func:`nblosses.use_backend`), run the op's runner (canonical arrays, kernel, results).
Results are arrays of the backend's type in the input's dtype; reduced losses are 0-d arrays.
NumPy, CuPy, Dask, torch and JAX arrays are accepted by every function.
""",
    "nn": """Class API: torch.nn-style modules that hold their configuration and call nblosses.functional.

Each module's constructor takes its op's configuration parameters in torch's order (plus
nblosses' keyword-only ones, ``backend=`` among them); an unknown keyword is a ``TypeError``, as
in torch. Without autograd, each module keeps what its gradient needs from its last call, and
``backward(grad_output)`` returns the gradient with respect to that call's input, so torch
chains port directly::

    logsoftmax, nll = nn.LogSoftmax(dim=1), nn.NLLLoss()
    loss = nll(logsoftmax(x), target)
    grad_x = logsoftmax.backward(nll.backward())

Loss modules keep references to their inputs (not copies) and run the fused loss+gradient
kernel on ``backward``; mutate those arrays between the call and ``backward`` and the gradient
follows the new values. The base classes and the modules written by hand (the language-model
heads, which hold parameters) are in :mod:`nblosses._modules`.
""",
    "torch": """The torch autograd functions of nblosses.torch derived from the op specs.

One function per spec whose ``autograd`` is ``SOFTMAX`` or ``FUSED_LOSS``, each backed by a
custom op ``torch.ops.nblosses.<name>`` whose schema torch infers from the typed body; fake
tensors, autograd and ``torch.compile`` support come from :mod:`nblosses.torch._autograd`.
""",
    "jax": """The JAX functions of nblosses.jax derived from the op specs.

One function per spec whose ``autograd`` is ``SOFTMAX`` or ``FUSED_LOSS``, each handing its
arguments to :mod:`nblosses.jax._autodiff` (a ``custom_vjp`` over the FFI bridge: ``jit``,
``grad`` and ``vmap`` work).
""",
}


def docs(front_end: str) -> dict[str, str]:
    """The docstring of each public name ``front_end`` (``"functional"``, ``"nn"``,
    ``"torch"`` or ``"jax"``) generates, by name."""
    specs = SPECS.values()
    if front_end == "functional":
        return {s.name: s.docstring() for s in specs}
    if front_end == "nn":
        return {s.module: module_doc(s) for s in specs
                if s.module and s.module_kind is not ModuleKind.NONE}
    if front_end in ("torch", "jax"):
        return {s.name: autograd_doc(s, front_end == "torch") for s in specs if derived(s)}
    raise ValueError(f"unknown front end {front_end!r}")


def summary(doc: str) -> str:
    """The first line of ``doc``: what the generated source keeps of it."""
    return doc.partition("\n")[0]


def attach_docs(namespace: MutableMapping[str, Any], front_end: str) -> None:
    """Give a generated module (its ``globals()``, ``namespace``) and each function or class in
    it its full docstring."""
    namespace["__doc__"] = MODULE_DOCS[front_end]
    for name, doc in docs(front_end).items():
        namespace[name].__doc__ = doc
