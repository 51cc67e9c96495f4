"""Op specs: one description per op, from which every front end, test, benchmark and docs
entry is derived.

An :class:`OpSpec` says everything about an op that is not a kernel: its parameters (torch's
signature plus nblosses' keyword-only additions), its documentation, how a call is run (the
*runner*: canonical arguments, kernel, results), which kernels of the protocol it uses and where
a backend package defines them, how Dask arrays are planned, which ``nn`` module and which
``nblosses.torch`` / ``nblosses.jax`` function it gets, the torch composite it is tested and
benchmarked against, a few sample calls for the generic tests, its benchmark cases and the docs
page that explains it. The specs live in :mod:`nblosses.ops`, one module per op family.

Everything else reads them: :mod:`nblosses.functional` and :mod:`nblosses.nn` are generated
from them (:mod:`nblosses._codegen`), the backend registry's kernel table, the Dask planner,
the torch and JAX front ends, the benchmark cases, the docs' API page and the test suite.
"""

from __future__ import annotations

import enum
import functools
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CONTEXT",
    "REQUIRED",
    "Autograd",
    "BenchCase",
    "DaskPlan",
    "Group",
    "ModuleKind",
    "OpSpec",
    "Param",
    "Role",
    "Sample",
]

REQUIRED = inspect.Parameter.empty
#: Stands for a checked default that depends on the context (see ``Param.context_default``).
CONTEXT = object()
# Parameter names that hold arrays in any op (they choose the backend and the array kind).
ARRAY_PARAMS = frozenset({
    "input", "target", "weight", "pos_weight", "grad_output", "output", "grad_buffer",
    "linear_weight", "linear_bias", "teacher", "teacher_input", "teacher_weight",
    "teacher_bias", "grad_entropy"})


class Role(enum.Enum):
    """Where a parameter lives in the class API."""

    #: An array a module's ``forward`` takes.
    INPUT = "input"
    #: Held by a module (a constructor argument).
    CONFIG = "config"
    #: Per call only (``return_grad``, ``grad_output``, ``dtype``...).
    CALL = "call"


class ModuleKind(enum.Enum):
    """How an op's ``nn`` module computes ``backward``."""

    #: No generated module (none, or a hand-written one in :mod:`nblosses._modules`).
    NONE = "none"
    #: Keeps its last output; ``backward(g)`` is the op's gradient function of it.
    ACTIVATION = "activation"
    #: Keeps its last inputs; ``backward`` runs the fused loss+gradient call on them.
    LOSS = "loss"


class Autograd(enum.Enum):
    """How :mod:`nblosses.torch` and :mod:`nblosses.jax` make an op differentiable."""

    #: Not wrapped (a gradient function, or an op torch users call from torch itself).
    NONE = "none"
    #: Output saved; backward is the op's gradient function (softmax, log_softmax).
    SOFTMAX = "softmax"
    #: A loss with ``return_grad`` and ``grad_output``. Reduced, its gradient with respect to
    #: ``input`` is computed in the forward pass and scaled by the upstream gradient in
    #: backward; unreduced, backward runs it with the upstream gradient as ``grad_output``.
    #: The front ends shape its loss by :meth:`OpSpec.result_shape`.
    FUSED_LOSS = "fused_loss"
    #: Hand-written in the front end (the LM heads: gradients of several inputs).
    CUSTOM = "custom"


class Group(enum.Enum):
    """The API page's section of an op."""

    ACTIVATION = "Activations and their gradients"
    LOSS = "Losses"
    LM_HEAD = "Language-model heads"


#: The Dask plans of :mod:`nblosses._dask` (``None`` in a spec: dask arrays are refused).
DaskPlan = Literal["softmax", "softmax_backward", "elementwise", "class_loss", "binary_loss",
                   "linear_ce", "kl_div", "distillation", "token_logprobs",
                   "linear_distillation", "linear_token_logprobs"]


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
    role : Role
        Where the parameter lives in the class API.
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
    role: Role = Role.CONFIG
    check: Callable[[str, Any], Any] | None = None
    kernel: bool = False
    torch: bool = True
    context_default: bool = False

    def replace(self, **changes: Any) -> Param:
        """A copy with ``changes`` (a shared parameter with another default or doc)."""
        return Param(**{**self.__dict__, **changes})


@dataclass(frozen=True)
class Sample:
    """One small call of an op, for the generic tests (parity, gradients, Dask, interop, host
    sync): positional and keyword arguments, NumPy arrays of float64 or int64.

    ``grad``: the call takes ``return_grad=True`` (the gradient tests compare the gradient with
    torch autograd of the reference). ``dask_chunks``: chunks for the Dask test, per array
    argument name (absent: each array in two chunks along its first axis).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad: bool = True
    dask_chunks: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        shapes = "x".join(str(getattr(a, "shape", a)) for a in self.args[:1])
        keys = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())
                        if not hasattr(v, "shape"))
        return f"{shapes}[{keys}]".replace(" ", "")


#: Shape layouts of the benchmark cases: how a shape label becomes arrays (the keys each one
#: makes are listed in :mod:`nblosses._bench.cases`).
Layout = Literal["softmax", "class", "elementwise", "linear", "pair", "topk", "linear_pair"]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked operation of an op (``nblosses bench``, asv, ``scripts/gpu_bench.py``).

    Parameters
    ----------
    name : str
        The case name on the command line and in the tables (``cross_entropy_grad``).
    layout : Layout
        How a shape label becomes the case's arrays (:func:`nblosses._bench.cases.make_inputs`).
    grad : bool
        A forward+gradient case (compared with torch's forward + backward).
    title : str
        The table's title.
    torch_ref : str
        What the torch peer runs, in words (for the table).
    run : callable
        ``run(F, arrays, dim, backend) -> result``: the nblosses call (public API only).
    torch : callable, optional
        ``torch(F, torch, tensors, dim) -> zero-argument callable``: the torch peer on tensors
        sharing the arrays' memory (``F`` is ``torch.nn.functional``); ``None``: no peer.
    prepare : callable, optional
        ``prepare(arrays, dim, rng) -> arrays``: the op's own inputs from the layout's arrays
        (e.g. log-probabilities for nll_loss). It returns only the arrays the case reads: each
        is counted once in the bytes moved.
    scipy : callable, optional
        ``scipy(special, arrays, dim) -> zero-argument callable``: the same op from a
        ``scipy.special``-like module (SciPy on the CPU, ``cupyx.scipy.special`` on CUDA);
        ``None``: no such peer.
    torch_peers : mapping of str to callable
        Further torch peers by their peer name in ``targets.json`` (``torch_chunked``), each
        called as ``torch`` is.
    groups : tuple of str
        Named groups of ``--ops`` the case belongs to; ``"slow"`` marks a case that runs only
        when named (seconds per call). ``all`` holds every case not ``slow``.
    shapes, quick_shapes : tuple of str
        The case's own shapes when its inputs are not arrays of the run's shapes (LM heads).
    writes : bool
        The case writes the layout's output (an array of the main input's size; the input
        and weight gradients for the ``linear`` layouts): counted in the bytes an ideal
        kernel moves, besides every input read once.
    moved : callable, optional
        ``moved(arrays) -> bytes`` read, replacing "every input read once" (a loss that
        gathers a few values); ``writes`` still adds the output.
    """

    name: str
    layout: Layout
    grad: bool
    title: str
    torch_ref: str
    run: Callable[..., Any]
    torch: Callable[..., Any] | None = None
    prepare: Callable[..., Any] | None = None
    scipy: Callable[..., Any] | None = None
    torch_peers: Mapping[str, Callable[..., Any]] = field(default_factory=dict, hash=False)
    groups: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()
    quick_shapes: tuple[str, ...] = ()
    writes: bool = False
    moved: Callable[[dict], int] | None = None


Runner = Callable[[Any, "OpSpec", dict, dict], Any]


@dataclass(frozen=True)
class OpSpec:
    """One public op (see the module docstring).

    Parameters
    ----------
    name : str
        The function's name in :mod:`nblosses.functional`.
    params : tuple of Param
        In call order.
    summary, description, returns, raises, notes, examples : str
        The numpydoc sections of the function's docstring.
    runner : callable
        ``runner(backend_runtime, spec, values, options)``: runs a call on the backend's own
        arrays (``values``: every parameter by name, as passed; ``options``: the checked ones).
    kernels : tuple of str
        The kernel-protocol names the runner asks a backend for (:mod:`nblosses.backends`).
    kernel_module : str
        The module, in each built-in backend package, that defines those kernels.
    group : Group
        The API page's section.
    docs_page : str
        The docs page (``docs/<page>.rst``) that explains the op; a test checks it names it.
    module, module_kind, module_examples
        The generated :mod:`nblosses.nn` class, how its ``backward`` works, its examples.
    gradient_op : str, optional
        The op computing this one's gradient from its output (activations).
    results : tuple of str
        Flags that each add one result when true (``return_grad``, ``return_lse``...).
    dask : DaskPlan, optional
        The plan of :mod:`nblosses._dask` that runs it on Dask arrays.
    autograd : Autograd
        How :mod:`nblosses.torch` / :mod:`nblosses.jax` wrap it.
    loss_shape : callable, optional
        ``loss_shape(values) -> shape`` (``FUSED_LOSS`` ops): the loss's shape from a call's
        arguments by name, arrays being anything with a ``shape`` (tensors, fake tensors, JAX
        tracers) and ``reduction`` resolved from torch's legacy pair. The front ends shape
        their fake and abstract results with it; ``None``: an element-wise loss's (see
        :meth:`result_shape`).
    torch_params : tuple of Param
        Keyword-only parameters only :mod:`nblosses.torch`'s function has, each a name that
        front end gives its meaning to (``inplace_grad``, ``process_group``).
    reference : callable, optional
        ``reference(torch, *args, **kwargs)``: the op written with torch (float64 tensors in,
        the result as :mod:`nblosses.functional` returns it, ``return_grad`` excluded); the
        tests and the benchmarks compare with it.
    samples : callable, optional
        ``samples(rng) -> list of Sample``: small calls for the generic tests.
    bench : tuple of BenchCase
        The op's benchmark cases.
    fast_path : callable, optional
        ``fast_path(*arguments in order)``: the plainest NumPy call served without the
        dispatcher, or :data:`nblosses._fast.MISS`.
    """

    name: str
    params: tuple[Param, ...]
    summary: str
    runner: Runner
    kernels: tuple[str, ...]
    kernel_module: str
    group: Group
    docs_page: str
    description: str = ""
    returns: str = ""
    raises: str = ""
    notes: str = ""
    examples: str = ""
    module: str | None = None
    module_kind: ModuleKind = ModuleKind.NONE
    module_examples: str = ""
    gradient_op: str | None = None
    results: tuple[str, ...] = ()
    dask: DaskPlan | None = None
    autograd: Autograd = Autograd.NONE
    loss_shape: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
    torch_params: tuple[Param, ...] = ()
    reference: Callable[..., Any] | None = None
    samples: Callable[[Any], list[Sample]] | None = None
    bench: tuple[BenchCase, ...] = ()
    fast_path: Callable[..., Any] | None = None

    def param(self, name: str) -> Param:
        """The parameter called ``name``."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def result_shape(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """The loss's shape for a ``FUSED_LOSS`` call's ``values`` (see ``loss_shape``); by
        default an element-wise loss's: 0-d unless ``reduction`` is ``"none"`` (or absent),
        else the broadcast shape of ``input`` and ``target``."""
        if self.loss_shape is not None:
            return tuple(self.loss_shape(values))
        if values.get("reduction", "none") != "none":
            return ()
        return _broadcast(tuple(values["input"].shape), tuple(values["target"].shape))

    # Derived views of ``params``, computed once: every call reads them.
    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:
        """Names of the array arguments a module's ``forward`` takes."""
        return tuple(p.name for p in self.params if p.role is Role.INPUT)

    @functools.cached_property
    def array_params(self) -> tuple[str, ...]:
        """Parameters that may hold arrays (they choose the backend and the array kind)."""
        return tuple(p.name for p in self.params if p.name in ARRAY_PARAMS)

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

    def signature(self, roles: tuple[Role, ...] = tuple(Role)) -> inspect.Signature:
        """The signature of the parameters with one of ``roles`` (in call order)."""
        params = []
        for p in self.params:
            if p.role not in roles:
                continue
            kind = (inspect.Parameter.KEYWORD_ONLY if p.keyword_only
                    else inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params.append(inspect.Parameter(p.name, kind, default=p.default))
        return inspect.Signature(params)

    def docstring(self, roles: tuple[Role, ...] = tuple(Role)) -> str:
        """numpydoc docstring of the function (or, with ``roles``, of a module's constructor)."""
        lines = [self.summary, ""]
        if self.description:
            lines += [inspect.cleandoc(self.description), ""]
        lines += ["Parameters", "----------"]
        for p in self.params:
            if p.role in roles and p.doc:
                kind, _, body = inspect.cleandoc(p.doc).partition("\n")
                lines.append(f"{p.name} : {kind}")
                lines += ["    " + ln if ln else "" for ln in textwrap.dedent(body).splitlines()]
        for title, text in (("Returns", self.returns), ("Raises", self.raises),
                            ("Notes", self.notes), ("Examples", self.examples)):
            if text:
                lines += ["", title, "-" * len(title), inspect.cleandoc(text)]
        return "\n".join(lines) + "\n"


def _broadcast(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """NumPy's broadcast of two shapes, unchecked (the op checks its arrays), in plain tuple
    arithmetic so that symbolic sizes (torch.compile's) pass through."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(y if x == 1 else x for x, y in zip(a, b))
