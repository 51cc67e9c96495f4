"""kl_div: torch's Kullback-Leibler divergence loss, elementwise over arrays of any shape."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Sample
from . import _params as P
from ._results import back, device_scale, loss_back, rescale, results
from .class_losses import _torch_loss

REDUCTIONS = ("none", "batchmean", "sum", "mean")
#: torch 2.13's warning for ``reduction="mean"`` (given without the legacy arguments), verbatim.
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release.")


def infinite_log_target_error(position: int) -> ValueError:
    """The error for a log-probability target equal to ``+inf`` (``exp`` of it is infinite),
    wherever it is found: the eager check or a kernel."""
    return ValueError(f"kl_div: target must be < +inf with log_target=True (a log-probability), "
                      f"found +inf at flat position {position}")


# ----------------------------------------------------------------------------- arguments
def resolve_reduction(size_average: Any, reduce: Any, reduction: str) -> tuple[str, bool]:
    """``(kernel reduction, divide by the batch size?)`` as torch 2.13's ``F.kl_div`` decides:
    the legacy pair overrides ``reduction`` (and warns), yet ``"batchmean"`` still divides the
    legacy result by ``input.shape[0]``; ``"mean"`` warns (:data:`MEAN_WARNING`)."""
    batch = reduction == "batchmean"
    if size_average is not None or reduce is not None:
        return _args.reduction_from(size_average, reduce, "mean"), batch
    if reduction == "mean":
        _args.warn_at_caller(MEAN_WARNING)
    elif reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction; expected one of "
                         f"{', '.join(REDUCTIONS)}")
    return ("sum" if batch else reduction), batch


@dataclass(slots=True)
class KLDivArgs:
    """Canonical ``kl_div`` arrays: flat, of the broadcast shape, in the compute dtype."""

    x: Any
    t: Any
    input_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the broadcast shape: the unreduced loss's
    dtype: Any  # the loss's dtype (input and target promoted, as torch)
    grad_dtype: Any  # the input's


def check_kl_div(be: Runtime, name: str, x: Any, t: Any) -> tuple[tuple[int, ...], Any]:
    """Metadata checks (torch's rules): ``(broadcast shape, result dtype)``."""
    for a in (x, t):
        if not _args.is_float(a.dtype):
            raise TypeError(f"{name}: Integral inputs not supported (input dtype "
                            f"{x.dtype.name}, target dtype {t.dtype.name})")
    try:
        shape = _broadcast_shape(tuple(x.shape), tuple(t.shape))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    dtype = x.dtype if x.dtype == t.dtype else be.xp.result_type(x.dtype, t.dtype)
    _args.compute_dtype(be, dtype)
    return shape, dtype


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """NumPy's broadcast shape, with torch's message when there is none."""
    if a == b:
        return a
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da != db and 1 not in (da, db):
            raise ValueError(f"The size of tensor a ({da}) must match the size of tensor b "
                             f"({db}) at non-singleton dimension {max(len(a), len(b)) - i}")
        out.append(db if da == 1 else da)
    return tuple(reversed(out))


def kl_div_args(be: Runtime, name: str, input: Any, target: Any) -> KLDivArgs:
    """Validate ``kl_div``'s arrays and bring them to canonical form (a broadcast operand is
    materialised at the broadcast shape)."""
    x = _args.as_array(be, input, "input")
    t = _args.as_array(be, target, "target")
    shape, dtype = check_kl_div(be, name, x, t)
    cdt = _args.compute_dtype(be, dtype)

    def flat(a: Any) -> Any:
        full = a if tuple(a.shape) == shape else be.xp.broadcast_to(a, shape)
        return _args.to_compute(be, full, cdt).reshape(-1)

    return KLDivArgs(flat(x), flat(t), tuple(x.shape), shape, dtype, x.dtype)


def check_log_target(be: Runtime, t: Any, start: tuple[int, ...] = (),
                     shape: tuple[int, ...] | None = None) -> None:
    """``ValueError`` naming the first ``+inf`` log-target (reads ``t`` on the host: for
    ``validate="sync"`` on a device backend, whose kernels otherwise check it, and for each
    block of a Dask target). ``t``: flat, or a block starting at index ``start`` of an array
    of ``shape``, whose flat position is then named."""
    inf = t == math.inf
    if t.size and bool(inf.any()):
        pos = int(be.xp.argmax(inf))
        if shape is not None:
            at = np.unravel_index(pos, t.shape)
            pos = int(np.ravel_multi_index(tuple(i + s for i, s in zip(at, start)), shape))
        raise infinite_log_target_error(pos)


# ----------------------------------------------------------------------------- running
def sum_to(g: Any, shape: tuple[int, ...]) -> Any:
    """``g`` summed over the axes that broadcasting added or stretched, back to ``shape``
    (the gradient of a broadcast input; ``g`` a backend's array or a Dask array)."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=stretched, keepdims=True) if stretched else g


def execute(be: Runtime, a: KLDivArgs, *, reduction: str, batch: bool, log_target: bool,
            want_grad: bool, grad_output: Any, grad_buffer: Any) -> list:
    """One kernel call on canonical arrays: ``[loss, grad?]`` in the caller's shapes.

    ``reduction``: the kernel's (``"batchmean"`` is ``"sum"`` with ``batch``: the loss and the
    upstream gradient are divided by ``input.shape[0]``, as torch divides the reduced loss).
    ``grad_buffer``: a checked flat view of the input's size, or ``None``.
    """
    cdt = a.x.dtype
    divisor = a.input_shape[0] if batch and a.input_shape else None
    g = None
    if want_grad:
        g = _args.grad_output_arg(be, grad_output, reduction, a.shape, cdt, a.x.shape)
        if divisor:  # (an empty batch has no gradient to scale)
            g = g / divisor
    broadcast = a.shape != a.input_shape
    g, scale = device_scale(g)
    loss, grad = be.kernel("kl_div")(a.x, a.t, log_target=log_target, reduction=reduction,
                                     want_grad=want_grad, grad_output=g,
                                     grad_buffer=None if broadcast else grad_buffer)
    rescale(be.xp, (grad,), scale)
    if divisor is not None:  # torch divides the (reduced or elementwise) loss itself
        loss = be.xp.asarray(loss / (divisor or math.nan))  # an empty batch: 0 / 0 -> NaN
    out = [loss_back(loss, a.shape, a.dtype)]
    if want_grad:
        if broadcast:
            grad = sum_to(grad.reshape(a.shape), a.input_shape)
            if grad_buffer is not None:
                grad_buffer[...] = grad.reshape(-1)
                grad = grad_buffer
        out.append(back(grad, a.input_shape, a.grad_dtype))
    return out


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner of ``kl_div``."""
    reduction, batch = resolve_reduction(v["size_average"], v["reduce"], v["reduction"])
    a = kl_div_args(be, spec.name, v["input"], v["target"])
    log_target = bool(v["log_target"])
    if log_target and be.kernel_checks and opts["validate"] == "sync":
        check_log_target(be, a.t)
    want_grad = bool(v["return_grad"])
    buffer = None
    if want_grad:
        buffer = _args.grad_buffer_arg(be, v["grad_buffer"], a.input_shape,
                                       (math.prod(a.input_shape),), a.x.dtype)
    out = execute(be, a, reduction=reduction, batch=batch, log_target=log_target,
                  want_grad=want_grad, grad_output=v["grad_output"], grad_buffer=buffer)
    if want_grad and v["grad_buffer"] is not None:
        out[1] = v["grad_buffer"]
    return results(out)


# ----------------------------------------------------------------------------- reference
def _ref_kl_div(torch: Any, input: Any, target: Any, size_average: Any = None, reduce: Any = None,
                reduction: str = "mean", log_target: bool = False) -> Any:
    return torch.nn.functional.kl_div(input, target, size_average, reduce, reduction, log_target)


# ----------------------------------------------------------------------------- samples
def _log_softmax(x: Any, axis: int = 1) -> Any:
    import numpy as np

    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    x = _log_softmax(rng.standard_normal((4, 6)))
    p = np.exp(_log_softmax(rng.standard_normal((4, 6))))
    p[0, :2] = 0.0  # zero-probability targets contribute 0
    return [Sample((x, p), {"reduction": "batchmean"}),
            Sample((x, p), {"reduction": "sum"}),
            Sample((x, np.log(p + 0.1)), {"reduction": "none", "log_target": True}),
            Sample((x[:1], p), {"reduction": "batchmean"}),  # input broadcast over the batch
            Sample((_log_softmax(rng.standard_normal((3, 4, 5))), rng.random((3, 4, 5))),
                   {"reduction": "sum"}, dask_chunks={"input": (2, 4, 3), "target": (2, 4, 3)})]


# ----------------------------------------------------------------------------- bench
def _pair(a: dict, d: int, rng: Any) -> dict:
    """Log-probabilities and target probabilities from the layout's two arrays."""
    import numpy as np

    x, y = a["x"], a["y"]
    axis = d if x.ndim > 1 else 0
    return {"x": _log_softmax(x, axis).astype(x.dtype),
            "y": np.exp(_log_softmax(y, axis)).astype(x.dtype)}


BENCH = (BenchCase(
    "kl_div_grad", "pair", True, "kl_div fwd+grad (batchmean)",
    "F.kl_div + autograd.grad",
    run=lambda F, a, d, b: F.kl_div(a["x"], a["y"], reduction="batchmean", return_grad=True,
                                    backend=b),
    torch=lambda F, torch, t, d: _torch_loss(
        lambda x, y: F.kl_div(x, y, reduction="batchmean"), torch, t["x"], t["y"], True),
    prepare=_pair, groups=("grad", "losses"), writes=True),)


# ----------------------------------------------------------------------------- spec
KL_VALIDATE = P.VALIDATE.replace(doc="""{"async", "sync"}, optional
    How a device backend refuses ``+inf`` log-targets (``log_target=True``): ``"async"``
    inside the kernel (``ValueError`` raised by a later call or :func:`nblosses.synchronize`),
    ``"sync"`` before it (waits for the device). Default: :func:`nblosses.get_validation`. The
    CPU backend always checks eagerly.""")

SPECS = (OpSpec(
    "kl_div",
    (P.array_input("input", """array_like
        Log-probabilities, any shape."""),
     P.array_input("target", """array_like
        Probabilities (or log-probabilities with ``log_target``), broadcastable with
        ``input`` (as torch: the loss has the broadcast shape)."""),
     P.SIZE_AVERAGE, P.REDUCE,
     Param("reduction", "mean", """{"mean", "batchmean", "sum", "none"}
        ``"batchmean"`` divides the sum by ``input.shape[0]`` (the KL divergence per
        sample); ``"mean"`` divides by the number of elements and warns, as torch."""),
     Param("log_target", False, """bool
        ``target`` holds log-probabilities: the loss is
        :math:`e^{t}(t - x)` instead of :math:`t \\log t - t x`."""),
     *P.LOSS_TAIL, P.GRAD_BUFFER, KL_VALIDATE, P.BACKEND),
    r"Kullback-Leibler divergence of log-probabilities: :math:`l = t (\log t - x)`.",
    run, ("kl_div",), "kl_div", Group.LOSS, "losses",
    description=r"""torch's ``kl_div``, elementwise: with ``log_target=False``
    :math:`l = \operatorname{xlogy}(t, t) - t x` (0 where :math:`t = 0`: a zero-probability
    target contributes nothing; NaN for a negative target), with ``log_target=True``
    :math:`l = e^{t}(t - x)`. Loss and gradient come from one pass over both arrays.""",
    returns="""
    loss : array
        0-d, or the broadcast shape for ``"none"``.
    grad : array
        With ``return_grad=True``: :math:`-g\\,t` (``log_target``: :math:`-g\\,e^{t}`),
        shaped as ``input`` (summed over the axes broadcasting stretched).""",
    raises="""
    TypeError
        Integer input or target (torch: "Integral inputs not supported").
    ValueError
        Shapes that do not broadcast, a bad ``reduction``, or a ``+inf`` target with
        ``log_target=True`` (on a device backend reported asynchronously unless
        ``validate="sync"``).""",
    notes="""
    As torch 2.13: ``"mean"`` warns that it is not the KL divergence (use ``"batchmean"``);
    the legacy ``size_average`` / ``reduce`` override ``reduction``, yet ``"batchmean"`` then
    still divides their result by ``input.shape[0]``; a log-target of ``-inf`` (a zero
    probability) gives NaN, as :math:`0 \\cdot (-\\infty - x)` does in torch.""",
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> logp = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    >>> target = np.array([[0.5, 0.5], [0.0, 1.0]])
    >>> loss, grad = F.kl_div(logp, target, reduction="batchmean", return_grad=True)
    >>> round(float(loss), 4)
    0.4185
    >>> grad
    array([[-0.25, -0.25],
           [-0.  , -0.5 ]])""",
    module="KLDivLoss", module_kind=ModuleKind.LOSS,
    module_examples="""
    >>> import numpy as np
    >>> from nblosses import nn
    >>> m, loss = nn.LogSoftmax(dim=1), nn.KLDivLoss(reduction="sum")
    >>> x, target = np.zeros((2, 4)), np.full((2, 4), 0.25)
    >>> print(loss(m(x), target).round(4))
    0.0
    >>> m.backward(loss.backward())
    array([[0., 0., 0., 0.],
           [0., 0., 0., 0.]])""",
    results=("return_grad",), dask="kl_div", autograd=Autograd.FUSED_LOSS,
    reference=_ref_kl_div, samples=_samples, bench=BENCH),)
