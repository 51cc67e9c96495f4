"""softmax, log_softmax, sigmoid and their gradient functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _args, _fast
from .._registry import Runtime
from .._spec import (
    REQUIRED,
    Autograd,
    BenchCase,
    DaskPlan,
    Group,
    ModuleKind,
    OpSpec,
    Param,
    Role,
    Sample,
)
from ._params import BACKEND, array_input
from ._results import back

DIM = Param("dim", None, """int, optional
    Axis to normalise over; negative counts from the end. ``None`` is deprecated (as in
    torch): it warns and picks 0 for 0-, 1- and 3-d input, else 1.""")
_SOFTMAX_RAISES = """
TypeError
    Integer input without ``dtype=``.
IndexError
    ``dim`` out of range."""


# ----------------------------------------------------------------------------- arguments
@dataclass(slots=True)
class ArrayArgs:
    """Canonical arrays of an activation-type call, with the shape and dtype to return."""

    arrays: tuple[Any, ...]  # (outer, C, inner) views for the softmax family, flat otherwise
    shape: tuple[int, ...]
    dtype: Any


def check_softmax_input(be: Runtime, name: str, x: Any, dim: Any) -> int:
    """Metadata checks of a softmax-family input; returns the normalised ``dim``."""
    return _checked_softmax_input(be, name, x, dim)[0]


def _checked_softmax_input(be: Runtime, name: str, x: Any, dim: Any) -> tuple[int, Any]:
    """:func:`check_softmax_input`'s checks; returns ``(dim, compute dtype)``."""
    if not _args.is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array (or pass dtype=), "
                        f"got dtype {x.dtype.name}")
    return _args.softmax_dim(name, x.ndim, dim), _args.compute_dtype(be, x.dtype)


def softmax_args(be: Runtime, name: str, input: Any, dim: Any, dtype: Any) -> ArrayArgs:
    """Validate and canonicalise ``softmax`` / ``log_softmax`` arguments."""
    x = _args.as_array(be, input, "input")
    if dtype is not None:
        x = x.astype(be.xp.dtype(dtype), copy=False)
    d, cdt = _checked_softmax_input(be, name, x, dim)
    x3 = _args.to_compute(be, x, cdt).reshape(_args.split_shape(x.shape, d))
    return ArrayArgs((x3,), tuple(x.shape), x.dtype)


def softmax_backward_args(be: Runtime, name: str, grad_output: Any, output: Any,
                          dim: Any) -> ArrayArgs:
    """Canonical ``(g3, y3)`` for the softmax-family backwards."""
    y = _args.as_array(be, output, "output")
    g = _args.as_array(be, grad_output, "grad_output")
    _args.check_same_shape(name, g, y)
    cdt = _args.check_backward_dtypes(be, name, g, y)
    s3 = _args.split_shape(y.shape, _args.softmax_dim(name, y.ndim, dim))
    return ArrayArgs((_args.to_compute(be, g, cdt).reshape(s3),
                      _args.to_compute(be, y, cdt).reshape(s3)), tuple(y.shape), y.dtype)


def elementwise_args(be: Runtime, name: str, *arrays: Any) -> ArrayArgs:
    """Flat compute-dtype arrays of same-shaped float arrays (sigmoid and its gradient)."""
    xs = [_args.as_array(be, a, "input") for a in arrays]
    if len(xs) == 2:
        _args.check_same_shape(name, xs[0], xs[1])
        cdt = _args.check_backward_dtypes(be, name, xs[0], xs[1])
    else:
        cdt = _args.compute_dtype(be, xs[0].dtype)
    return ArrayArgs(tuple(_args.to_compute(be, a, cdt).reshape(-1) for a in xs),
                     tuple(xs[-1].shape), xs[-1].dtype)


# ----------------------------------------------------------------------------- runners
def run_softmax(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    a = softmax_args(be, spec.name, v["input"], v["dim"], v["dtype"])
    return back(be.kernel(spec.name)(*a.arrays), a.shape, a.dtype)


def run_softmax_backward(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    a = softmax_backward_args(be, spec.name, v["grad_output"], v["output"], v["dim"])
    return back(be.kernel(spec.name)(*a.arrays), a.shape, a.dtype)


def run_elementwise(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    a = elementwise_args(be, spec.name, *(v[n] for n in spec.inputs))
    return back(be.kernel(spec.name)(*a.arrays), a.shape, a.dtype)


# ----------------------------------------------------------------------------- references
def _ref_softmax(torch: Any, input: Any, dim: Any = None, _stacklevel: int = 3,
                 dtype: Any = None) -> Any:
    return torch.softmax(input, dim)


def _ref_log_softmax(torch: Any, input: Any, dim: Any = None, _stacklevel: int = 3,
                     dtype: Any = None) -> Any:
    return torch.log_softmax(input, dim)


def _ref_softmax_backward(torch: Any, grad_output: Any, output: Any, dim: int) -> Any:
    return torch._softmax_backward_data(grad_output, output, dim, output.dtype)


def _ref_log_softmax_backward(torch: Any, grad_output: Any, output: Any, dim: int) -> Any:
    return torch._log_softmax_backward_data(grad_output, output, dim, output.dtype)


def _ref_sigmoid(torch: Any, input: Any) -> Any:
    return torch.sigmoid(input)


def _ref_sigmoid_backward(torch: Any, grad_output: Any, output: Any) -> Any:
    return torch.ops.aten.sigmoid_backward(grad_output, output)


# ----------------------------------------------------------------------------- samples
def _softmax_samples(rng: Any) -> list[Sample]:
    return [Sample((rng.standard_normal((4, 6)),), {"dim": 1}, grad=False),
            Sample((rng.standard_normal((3, 5, 4)),), {"dim": 1}, grad=False,
                   dask_chunks={"input": (2, 2, 2)}),
            Sample((rng.standard_normal(7),), {"dim": 0}, grad=False)]


def _backward_samples(log: bool) -> Any:
    def samples(rng: Any) -> list[Sample]:
        out = []
        for shape, dim in (((4, 6), 1), ((3, 5, 4), 1)):
            x = rng.standard_normal(shape)
            y = x - x.max(dim, keepdims=True)
            y = y - _np_log_sum_exp(y, dim)
            out.append(Sample((rng.standard_normal(shape), y if log else _np_exp(y)),
                              {"dim": dim}, grad=False))
        return out
    return samples


def _np_log_sum_exp(y: Any, dim: int) -> Any:
    import numpy as np

    return np.log(np.exp(y).sum(dim, keepdims=True))


def _np_exp(y: Any) -> Any:
    import numpy as np

    return np.exp(y)


def _sigmoid_samples(rng: Any) -> list[Sample]:
    return [Sample((rng.standard_normal((4, 6)) * 4,), grad=False)]


def _sigmoid_backward_samples(rng: Any) -> list[Sample]:
    y = 1 / (1 + _np_exp(-rng.standard_normal((4, 6))))
    return [Sample((rng.standard_normal((4, 6)), y), grad=False)]


# ----------------------------------------------------------------------------- bench cases
def _softmax_bench(name: str) -> BenchCase:
    return BenchCase(
        name, "softmax", False, name, f"F.{name}",
        run=lambda F, a, d, b: getattr(F, name)(a["x"], d, backend=b),
        torch=lambda F, torch, t, d: lambda: getattr(F, name)(t["x"], d),
        scipy=lambda special, a, d: lambda: getattr(special, name)(a["x"], axis=d),
        groups=("forward", "softmax_family", "targets", "layouts"), writes=True)


def _softmax_backward_bench(name: str) -> BenchCase:
    aten = "_softmax_backward_data" if name == "softmax_backward" else \
        "_log_softmax_backward_data"
    return BenchCase(
        name, "softmax", True, name.replace("_backward", " backward"), f"aten.{aten}",
        run=lambda F, a, d, b: getattr(F, name)(a["g"], a["y"], d, backend=b),
        torch=lambda F, torch, t, d: lambda: getattr(torch, aten)(t["g"], t["y"], d,
                                                                   t["y"].dtype),
        prepare=lambda a, d, rng: _backward_inputs(a, d, rng, name == "log_softmax_backward"),
        groups=("grad", "softmax_family", "targets"), writes=True)


def _backward_inputs(a: dict, d: int, rng: Any, log: bool) -> dict:
    import numpy as np

    x = a["x"]
    y = x - x.max(axis=d, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=d, keepdims=True))
    g = rng.standard_normal(x.shape).astype(x.dtype)
    return {"g": g, "y": (y if log else np.exp(y)).astype(x.dtype)}


# ----------------------------------------------------------------------------- specs
def _softmax_spec(name: str, summary: str, description: str, examples: str, module: str,
                  module_examples: str, reference: Any, fast_path: Any) -> OpSpec:
    return OpSpec(
        name,
        (array_input("input", """array_like
            Floating-point array of any shape (0-d included)."""),
         DIM,
         Param("_stacklevel", 3, """int
            Accepted for torch compatibility; unused.""", role=Role.CALL),
         Param("dtype", None, """dtype, optional
            Cast the input to this dtype before computing; the result has this dtype.""",
               role=Role.CALL),
         BACKEND),
        summary, run_softmax, (name, "logsumexp"), "softmax", Group.ACTIVATION, "math",
        description=description,
        returns="""
        array
            Same shape as ``input``. A slice containing NaN or ``+inf``, or only ``-inf``, is
            NaN.""",
        raises=_SOFTMAX_RAISES, examples=examples, module=module,
        module_kind=ModuleKind.ACTIVATION, module_examples=module_examples,
        gradient_op=f"{name}_backward", dask="softmax", autograd=Autograd.SOFTMAX,
        reference=reference, samples=_softmax_samples, bench=(_softmax_bench(name),),
        fast_path=fast_path)


def _softmax_backward_spec(name: str, summary: str, examples: str, reference: Any,
                           fast_path: Any) -> OpSpec:
    plan: DaskPlan = "softmax_backward"
    return OpSpec(
        name,
        (array_input("grad_output", """array_like
            Gradient of the objective with respect to the output."""),
         array_input("output", """array_like
            The forward output (same shape)."""),
         Param("dim", REQUIRED, """int
            The axis the forward op normalised over."""),
         BACKEND),
        summary, run_softmax_backward, (name,), "softmax", Group.ACTIVATION, "math",
        returns="""
        array
            Gradient with respect to the forward input, same shape and dtype as ``output``.""",
        raises="""
        ValueError
            ``grad_output`` and ``output`` differ in shape.""",
        examples=examples, dask=plan, reference=reference,
        samples=_backward_samples(name.startswith("log")),
        bench=(_softmax_backward_bench(name),), fast_path=fast_path)


SPECS = (
    _softmax_spec(
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
        True""", _ref_softmax, _fast.softmax),
    _softmax_spec(
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
        array([[-0.6931, -0.6931]])""", _ref_log_softmax, _fast.log_softmax),
    OpSpec(
        "sigmoid",
        (array_input("input", """array_like
            Floating-point array of any shape."""), BACKEND),
        r"Logistic sigmoid :math:`1 / (1 + e^{-x})`, elementwise.",
        run_elementwise, ("sigmoid",), "softmax", Group.ACTIVATION, "math",
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
        module="Sigmoid", module_kind=ModuleKind.ACTIVATION,
        module_examples="""
        >>> import numpy as np
        >>> from nblosses import nn
        >>> m = nn.Sigmoid()
        >>> m(np.array([0.0]))
        array([0.5])
        >>> m.backward(np.array([1.0]))
        array([0.25])""",
        gradient_op="sigmoid_backward", dask="elementwise", reference=_ref_sigmoid,
        samples=_sigmoid_samples, fast_path=_fast.sigmoid,
        bench=(BenchCase("sigmoid", "elementwise", False, "sigmoid", "torch.sigmoid",
                         run=lambda F, a, d, b: F.sigmoid(a["x"], backend=b),
                         torch=lambda F, torch, t, d: lambda: torch.sigmoid(t["x"]),
                         scipy=lambda special, a, d: lambda: special.expit(a["x"]),
                         prepare=lambda a, d, rng: {"x": a["x"]},  # no targets
                         groups=("forward",), writes=True),)),
    _softmax_backward_spec(
        "softmax_backward",
        r"Gradient of :func:`softmax` given its ``output`` :math:`y`: :math:`y (g - \sum g y)`.",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> y = F.softmax(np.array([1.0, 2.0]), dim=0)
        >>> F.softmax_backward(np.array([1.0, 1.0]), y, dim=0)
        array([0., 0.])""", _ref_softmax_backward, _fast.softmax_backward),
    _softmax_backward_spec(
        "log_softmax_backward",
        r"Gradient of :func:`log_softmax` given its ``output`` :math:`y`: "
        r":math:`g - e^y \sum g`.",
        """
        >>> import numpy as np
        >>> from nblosses import functional as F
        >>> y = F.log_softmax(np.array([0.0, 0.0]), dim=0)
        >>> F.log_softmax_backward(np.array([1.0, 0.0]), y, dim=0)
        array([ 0.5, -0.5])""", _ref_log_softmax_backward, _fast.log_softmax_backward),
    OpSpec(
        "sigmoid_backward",
        (array_input("grad_output", """array_like
            Gradient of the objective with respect to the sigmoid output."""),
         array_input("output", """array_like
            The sigmoid output (same shape)."""), BACKEND),
        r"Gradient of :func:`sigmoid` given its ``output`` :math:`y`: :math:`g\,y(1-y)`.",
        run_elementwise, ("sigmoid_backward",), "softmax", Group.ACTIVATION, "math",
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
        array([0.25])""",
        dask="elementwise", reference=_ref_sigmoid_backward, samples=_sigmoid_backward_samples,
        bench=(BenchCase(
            "sigmoid_backward", "elementwise", True, "sigmoid backward",
            "aten.sigmoid_backward",
            run=lambda F, a, d, b: F.sigmoid_backward(a["g"], a["y"], backend=b),
            torch=lambda F, torch, t, d: lambda: torch.ops.aten.sigmoid_backward(t["g"],
                                                                                 t["y"]),
            prepare=lambda a, d, rng: _sigmoid_backward_inputs(a, rng),
            groups=("grad",), writes=True),)),
)


def _sigmoid_backward_inputs(a: dict, rng: Any) -> dict:
    x = a["x"]
    y = (1.0 / (1.0 + _np_exp(-x))).astype(x.dtype)
    return {"g": rng.standard_normal(x.shape).astype(x.dtype), "y": y}
