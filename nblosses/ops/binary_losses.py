"""binary_cross_entropy (on probabilities) and binary_cross_entropy_with_logits: elementwise
losses over arrays of any shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Sample
from . import _params as P
from ._results import back, device_scale, loss_back, rescale, results
from .class_losses import _torch_loss


# ----------------------------------------------------------------------------- arguments
@dataclass(slots=True)
class BinaryLossArgs:
    """Canonical binary-loss call: flat arrays of one length."""

    x: Any
    y: Any
    weight: Any
    pos_weight: Any
    shape: tuple[int, ...]
    dtype: Any


def _broadcast_flat(be: Runtime, name: str, what: str, value: Any, shape, cdt) -> Any:
    if value is None:
        return None
    v = _args.as_array(be, value, what)
    if not _args.is_float(v.dtype):
        v = v.astype(cdt)
    try:
        full = be.xp.broadcast_to(v, shape)
    except ValueError:
        raise ValueError(f"{name}: {what} of shape {tuple(v.shape)} cannot be broadcast to the "
                         f"input shape {tuple(shape)}") from None
    if v.size == full.size:
        # Nothing repeats (equal shapes, or size-1 axes): the array itself, not broadcast_to's
        # read-only view, which is another Numba type (every kernel compiled twice).
        full = v.reshape(shape)
    return _args.to_compute(be, full, cdt).reshape(-1)


def check_binary_loss(be: Runtime, name: str, x: Any, y: Any) -> Any:
    """Metadata checks of a binary loss; returns the compute dtype."""
    if not _args.is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"{name}: target size {tuple(y.shape)} must be the same as input size "
                         f"{tuple(x.shape)}")
    return _args.compute_dtype(be, x.dtype)


def check_probabilities(name: str, x: Any) -> None:
    """``binary_cross_entropy``'s check that its input lies in ``[0, 1]`` (NaN fails): reads the
    array's min and max (on a device backend: waits for the device)."""
    if x.size:
        lo, hi = float(x.min()), float(x.max())  # min/max propagate NaN
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"{name}: all elements of input should be between 0 and 1 "
                             f"(found min {lo}, max {hi})")


def binary_loss_args(be: Runtime, name: str, input: Any, target: Any, weight: Any,
                     pos_weight: Any, probabilities: bool,
                     check_range: bool = True) -> BinaryLossArgs:
    """Validate ``binary_cross_entropy`` (``probabilities=True``) or its logits variant.

    ``check_range``: check here that probabilities lie in ``[0, 1]`` (reads the input's min and
    max: a device backend whose kernel checks them passes ``False`` unless ``validate="sync"``).
    """
    x = _args.as_array(be, input, "input")
    y = _args.as_array(be, target, "target")
    cdt = check_binary_loss(be, name, x, y)
    xc = _args.to_compute(be, x, cdt).reshape(-1)
    if probabilities and check_range:
        check_probabilities(name, xc)
    yc = _args.to_compute(be, y if _args.is_float(y.dtype) else y.astype(cdt), cdt).reshape(-1)
    return BinaryLossArgs(
        xc, yc,
        _broadcast_flat(be, name, "weight", weight, x.shape, cdt),
        _broadcast_flat(be, name, "pos_weight", pos_weight, x.shape, cdt),
        tuple(x.shape), x.dtype,
    )


# ----------------------------------------------------------------------------- running
def execute(be: Runtime, name: str, a: BinaryLossArgs, *, reduction: str, want_grad: bool,
            grad_output: Any) -> list:
    """One kernel call on canonical arrays: ``[loss, grad?]`` in the caller's shapes (the
    Dask planner runs it on each block)."""
    g = (_args.grad_output_arg(be, grad_output, reduction, a.shape, a.x.dtype, a.x.shape)
         if want_grad else None)
    extra = () if name == "binary_cross_entropy" else (a.pos_weight,)
    g, scale = device_scale(g)
    loss, grad = be.kernel(name)(a.x, a.y, a.weight, *extra, reduction=reduction,
                                 want_grad=want_grad, grad_output=g)
    rescale(be.xp, (grad,), scale)
    out = [loss_back(loss, a.shape, a.dtype)]
    if want_grad:
        out.append(back(grad, a.shape, a.dtype))
    return out


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner of both binary losses."""
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    probabilities = spec.name == "binary_cross_entropy"
    check_range = ("probability_range" not in be.kernel_checks
                   or opts.get("validate") == "sync")
    a = binary_loss_args(be, spec.name, v["input"], v["target"], v["weight"],
                         v.get("pos_weight"), probabilities, check_range)
    return results(execute(be, spec.name, a, reduction=reduction,
                           want_grad=bool(v["return_grad"]), grad_output=v["grad_output"]))


# ----------------------------------------------------------------------------- references
def _ref_bce(torch: Any, input: Any, target: Any, weight: Any = None, size_average: Any = None,
             reduce: Any = None, reduction: str = "mean") -> Any:
    return torch.nn.functional.binary_cross_entropy(input, target, weight, size_average,
                                                    reduce, reduction)


def _ref_bce_logits(torch: Any, input: Any, target: Any, weight: Any = None,
                    size_average: Any = None, reduce: Any = None, reduction: str = "mean",
                    pos_weight: Any = None) -> Any:
    return torch.nn.functional.binary_cross_entropy_with_logits(
        input, target, weight, size_average, reduce, reduction, pos_weight)


# ----------------------------------------------------------------------------- samples
def _bce_samples(rng: Any) -> list[Sample]:
    p = rng.uniform(0.02, 0.98, (4, 6))
    y = rng.random((4, 6))
    return [Sample((p, y), {}), Sample((p, y), {"reduction": "none", "weight": rng.random(6)}),
            Sample((p[0], y[0]), {"reduction": "sum"})]


def _bce_logits_samples(rng: Any) -> list[Sample]:
    x = rng.standard_normal((4, 6)) * 3
    y = (rng.random((4, 6)) < 0.5) * 1.0
    return [Sample((x, y), {"pos_weight": rng.random(6) + 0.5}),
            Sample((x, y), {"reduction": "none", "weight": rng.random((4, 1))})]


# ----------------------------------------------------------------------------- bench cases
def _binary_case(name: str, case: str, title: str, grad: bool) -> BenchCase:
    torch_name = name
    return BenchCase(
        case + ("_grad" if grad else ""), "elementwise", grad,
        f"{title} fwd+grad" if grad else f"{title} fwd (mean)",
        f"F.{torch_name} + autograd.grad" if grad else f"F.{torch_name}",
        run=lambda F, a, d, b: getattr(F, name)(a["x"], a["y"], return_grad=grad, backend=b),
        torch=lambda F, torch, t, d: _torch_loss(getattr(F, torch_name), torch, t["x"],
                                                 t["y"], grad),
        prepare=_probabilities if name == "binary_cross_entropy" else None,
        groups=("grad" if grad else "forward", "losses"), writes=grad)


def _probabilities(a: dict, d: int, rng: Any) -> dict:
    """Probabilities strictly inside (0, 1) for binary_cross_entropy."""
    x = a["x"]
    return {"x": rng.uniform(0.01, 0.99, size=x.shape).astype(x.dtype), "y": a["y"]}


# ----------------------------------------------------------------------------- specs
BCE_VALIDATE = P.VALIDATE.replace(doc="""{"async", "sync"}, optional
    How a device backend checks that the input lies in ``[0, 1]``: ``"async"`` inside the
    kernel (``ValueError`` raised by a later call or :func:`nblosses.synchronize`), ``"sync"``
    before it (waits for the device). Default: :func:`nblosses.get_validation`. The CPU backend
    always checks eagerly.""")


def _binary_spec(name: str, case: str, title: str, extra: tuple[Param, ...], summary: str,
                 **docs: Any) -> OpSpec:
    params = (P.array_input("input", docs.pop("input_doc")), P.array_input("target", """array_like
        Same shape as ``input`` (usually 0/1; any value is allowed)."""),
              Param("weight", None, """array_like, optional
        Rescaling weight, broadcast to ``input``'s shape."""),
              P.SIZE_AVERAGE, P.REDUCE,
              Param("reduction", "mean", """{"mean", "sum", "none"}
        How per-element losses are combined; ``mean`` divides by the number of elements."""),
              *extra, *P.LOSS_TAIL, *docs.pop("validate", ()), P.BACKEND)
    return OpSpec(name, params, summary, run, (name,), "binary_losses", Group.LOSS, "losses",
                  module_kind=ModuleKind.LOSS, dask="binary_loss", autograd=Autograd.FUSED_LOSS,
                  results=("return_grad",),
                  bench=(_binary_case(name, case, title, False),
                         _binary_case(name, case, title, True)), **docs)


SPECS = (
    _binary_spec(
        "binary_cross_entropy", "bce", "binary_cross_entropy", (),
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
        array([-0.25,  0.25])""",
        reference=_ref_bce, samples=_bce_samples),
    _binary_spec(
        "binary_cross_entropy_with_logits", "bce_with_logits", "bce_with_logits",
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
        1.3863""",
        reference=_ref_bce_logits, samples=_bce_logits_samples),
)
