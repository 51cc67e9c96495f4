"""nll_loss and cross_entropy: losses over a class axis (axis 1, or 0 of a ``(C,)`` input)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _args, _fast
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Sample
from . import _params as P
from ._results import (
    at_least_float32,
    class_loss_shape,
    device_scale,
    loss_back,
    rescale,
    results,
)


# ----------------------------------------------------------------------------- arguments
# The argument records below are plain slotted dataclasses, not frozen ones: they are built on
# every call, and a frozen dataclass's __init__ costs a microsecond or two more.
@dataclass(slots=True)
class ClassLossLayout:
    """What a class-loss call's metadata says: target kind and shapes."""

    probs: bool  # probability targets (the input's shape) rather than class indices
    input_shape: tuple[int, ...]
    shape3: tuple[int, int, int]  # the input as (N, C, inner)
    loss_shape: tuple[int, ...]  # shape of the unreduced loss


@dataclass(slots=True)
class ClassLossArgs:
    """Canonical class-loss arrays (see the kernel protocol in :mod:`nblosses.backends`)."""

    x3: Any
    target: Any  # (N, inner) int64, or (N, C, inner) probabilities
    weight: Any
    layout: ClassLossLayout
    dtype: Any  # the caller's input dtype: results are returned in it


def canonical_input(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(N, C, inner)`` of a class-axis input: ``(C,)`` is one row, the class axis is 1."""
    if len(input_shape) <= 2:  # (C,) and (N, C), the common cases, without math.prod
        return (1, input_shape[0], 1) if len(input_shape) == 1 else (input_shape[0],
                                                                      input_shape[1], 1)
    return _args.split_shape(input_shape, 1)


def check_class_input(be: Runtime, name: str,
                      x: Any) -> tuple[tuple[int, ...], tuple[int, int, int], tuple[int, ...]]:
    """The checks of a class-axis input (floating point, 1 or more dimensions, a dtype the
    backend computes in), shared by the losses over a class axis: ``(its shape, (N, C,
    inner), the unreduced loss's shape)``."""
    if not _args.is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if x.ndim < 1:
        raise ValueError(f"{name}: input must have 1 or more dimensions (got 0)")
    _args.compute_dtype(be, x.dtype)
    shape = tuple(x.shape)
    return shape, canonical_input(shape), shape[:1] + shape[2:] if len(shape) > 1 else ()


def check_class_loss(be: Runtime, name: str, x: Any, t: Any, w: Any, ignore_index: int,
                     allow_probs: bool) -> ClassLossLayout:
    """Every class-loss check that needs only dtypes and shapes (so dask arrays pass through
    it unevaluated)."""
    shape, shape3, loss_shape = check_class_input(be, name, x)
    # A target of the input's shape, or a float one of its rank, is meant as class
    # probabilities: tell what is wrong with it in those terms.
    probs = allow_probs and (tuple(t.shape) == shape
                             or (_args.is_float(t.dtype) and t.ndim == x.ndim))
    if probs:
        _check_probability_target(name, x, t, ignore_index)
    else:
        _args.check_index_target(name, x, t, loss_shape)
    _args.check_class_weight(name, w, shape3[1], shape)
    return ClassLossLayout(probs, shape, shape3, loss_shape)


def _check_probability_target(name: str, x: Any, t: Any, ignore_index: int) -> None:
    if not _args.is_float(t.dtype):
        raise TypeError(f"{name}: expected a floating-point target for class probabilities "
                        f"(target shape equals input shape {tuple(x.shape)}), got dtype "
                        f"{t.dtype.name}")
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name}: probability targets must have the input's shape "
                         f"{tuple(x.shape)}, got target shape {tuple(t.shape)} (class-index "
                         f"targets are integers of shape {tuple(x.shape[:1] + x.shape[2:])})")
    if ignore_index >= 0:
        raise ValueError(f"{name}: ignore_index ({ignore_index}) is not supported for "
                         f"class-probability targets")


def class_loss_args(be: Runtime, name: str, input: Any, target: Any, weight: Any,
                    ignore_index: int, *, allow_probs: bool, check_indices: bool) -> ClassLossArgs:
    """Validate ``nll_loss`` / ``cross_entropy`` arrays and bring them to canonical form.

    ``check_indices``: check class indices here, eagerly (a device backend whose kernels check
    them asynchronously passes ``False`` unless the caller asked for ``validate="sync"``).
    """
    x = _args.as_array(be, input, "input")
    t = _args.as_array(be, target, "target")
    w = None if weight is None else _args.as_array(be, weight, "weight")
    layout = check_class_loss(be, name, x, t, w, ignore_index, allow_probs)
    cdt = _args.compute_dtype(be, x.dtype)
    if layout.probs:
        target_c = _args.to_compute(be, t, cdt).reshape(layout.shape3)
    else:
        n, c, inner = layout.shape3
        target_c = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(n, inner)
        if check_indices:
            _args.check_targets(be, target_c, c, ignore_index)
    if w is not None:
        w = _args.to_compute(be, w, cdt)
    x3 = _args.to_compute(be, x, cdt).reshape(layout.shape3)
    return ClassLossArgs(x3, target_c, w, layout, x.dtype)


# ----------------------------------------------------------------------------- running
def execute(be: Runtime, name: str, a: ClassLossArgs, *, reduction: str, options: dict,
            want_grad: bool, grad_output: Any, grad_buffer: Any, want_lse: bool) -> list:
    """One kernel call on canonical arrays: ``[loss, grad?, lse?]`` in the caller's shapes.

    ``options``: the kernel's keywords beyond the protocol's own (``ignore_index``,
    ``label_smoothing`` and the extensions not at their defaults). ``grad_output``: the
    caller's value (checked here); ``grad_buffer``: a checked canonical view or ``None``.
    The Dask planner runs it on each block of canonical arrays.
    """
    n, _, inner = a.layout.shape3
    cdt = a.x3.dtype
    kw = dict(options)
    lse = be.xp.empty((n, inner), dtype=cdt) if want_lse else None
    if lse is not None:
        kw["lse_out"] = lse
    g = None
    if want_grad:
        g = _args.grad_output_arg(be, grad_output, reduction, a.layout.loss_shape, cdt,
                                  (n, inner))
    if a.layout.probs:
        kw.pop("ignore_index", None)
    kernel = be.kernel("cross_entropy_probs" if a.layout.probs else name)
    g, scale = device_scale(g)
    loss, grad = kernel(a.x3, a.target, a.weight, reduction=reduction, want_grad=want_grad,
                        grad_output=g, grad_buffer=grad_buffer, **kw)
    rescale(be.xp, (grad,), scale)
    out = [loss_back(loss, a.layout.loss_shape, a.dtype)]
    if want_grad:
        out.append(grad)
    if lse is not None:  # float32 at least: a half-precision logsumexp loses the z-loss
        out.append(lse.reshape(a.layout.loss_shape).astype(at_least_float32(lse.dtype),
                                                           copy=False))
    return out


def kernel_options(spec: OpSpec, opts: dict) -> dict:
    """Options the kernel takes as keywords beyond the protocol's own, left out while at their
    defaults so kernels without them (third-party backends) still serve the default call."""
    return {k: opts[k] for k, default in spec.kernel_options if opts[k] != default}


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner of both class losses."""
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = class_loss_args(be, spec.name, v["input"], v["target"], v["weight"],
                        opts["ignore_index"], allow_probs=spec.name == "cross_entropy",
                        check_indices=check_indices)
    kw = kernel_options(spec, opts)
    kw["ignore_index"] = opts["ignore_index"]
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    want_grad = bool(v["return_grad"])
    buffer = None
    if want_grad:
        buffer = _args.grad_buffer_arg(be, v["grad_buffer"], a.layout.input_shape, a.x3.shape,
                                       a.x3.dtype)
    out = execute(be, spec.name, a, reduction=reduction, options=kw, want_grad=want_grad,
                  grad_output=v["grad_output"], grad_buffer=buffer,
                  want_lse=bool(v.get("return_lse")))
    if want_grad:
        out[1] = (v["grad_buffer"] if v["grad_buffer"] is not None
                  else out[1].reshape(a.layout.input_shape).astype(a.dtype, copy=False))
    return results(out)


# ----------------------------------------------------------------------------- references
def _ref_nll_loss(torch: Any, input: Any, target: Any, weight: Any = None,
                  size_average: Any = None, ignore_index: int = -100, reduce: Any = None,
                  reduction: str = "mean") -> Any:
    return torch.nn.functional.nll_loss(input, target, weight, size_average, ignore_index,
                                        reduce, reduction)


def _ref_cross_entropy(torch: Any, input: Any, target: Any, weight: Any = None,
                       size_average: Any = None, ignore_index: int = -100, reduce: Any = None,
                       reduction: str = "mean", label_smoothing: float = 0.0, *,
                       z_loss: float = 0.0, softcap: float | None = None,
                       return_lse: bool = False) -> Any:
    """torch's cross-entropy with nblosses' options: ``xc = c tanh(x / c)``, per position
    ``ce(xc) + z lse(xc)^2`` where the target is kept, reduced as the loss."""
    F = torch.nn.functional
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    xc = softcap * torch.tanh(input / softcap) if softcap else input
    lse = torch.logsumexp(xc, dim=1 if xc.dim() > 1 else 0)
    probs = target.is_floating_point()
    kw = {} if probs else {"ignore_index": ignore_index}
    per = F.cross_entropy(xc, target, weight, reduction="none",
                          label_smoothing=label_smoothing, **kw)
    keep = torch.ones_like(lse) if probs else (target != ignore_index).to(lse.dtype)
    per = per + z_loss * lse ** 2 * keep
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    elif probs:
        loss = per.sum() / per.numel()
    else:
        kept = keep if weight is None else weight[target.clamp(min=0)] * keep
        loss = per.sum() / kept.sum()
    return (loss, lse) if return_lse else loss


# ----------------------------------------------------------------------------- samples
def _nll_samples(rng: Any) -> list[Sample]:
    import numpy as np

    def logp(shape: tuple[int, ...]) -> Any:
        x = rng.standard_normal(shape)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    t = np.array([0, 4, 2, -100, 1])
    return [Sample((logp((5, 6)), t), {"reduction": "mean"}),
            Sample((logp((5, 6)), t), {"reduction": "none", "weight": rng.random(6)}),
            Sample((logp((3, 4, 5)), rng.integers(0, 4, (3, 5))), {"reduction": "sum"},
                   dask_chunks={"input": (2, 4, 3), "target": (2, 3)})]


def _ce_samples(rng: Any) -> list[Sample]:
    import numpy as np

    t = np.array([0, 4, 2, -100, 1])
    x = rng.standard_normal((5, 6)) * 3
    p = rng.random((5, 6))
    return [Sample((x, t), {"label_smoothing": 0.1}),
            Sample((x, t), {"reduction": "none", "weight": rng.random(6) + 0.5}),
            Sample((x, t), {"z_loss": 1e-3, "softcap": 4.0, "return_lse": True}),
            Sample((x, p / p.sum(1, keepdims=True)), {"reduction": "sum"}),
            Sample((rng.standard_normal((3, 4, 5)), rng.integers(0, 4, (3, 5))), {},
                   dask_chunks={"input": (2, 2, 3), "target": (2, 3)})]


# ----------------------------------------------------------------------------- bench cases
def _loss_case(name: str, title: str, torch_name: str, grad: bool,
               groups: tuple[str, ...] = (), **kw: Any) -> BenchCase:
    suffix = "_grad" if grad else ""
    groups = groups or ("grad" if grad else "forward", "losses")
    return BenchCase(
        name + suffix, "class", grad,
        f"{title} fwd+grad (mean)" if grad else f"{title} fwd (mean)",
        f"F.{torch_name} + autograd.grad" if grad else f"F.{torch_name}",
        run=lambda F, a, d, b: getattr(F, name)(a["x"], a["t"], return_grad=grad, backend=b),
        torch=lambda F, torch, t, d: _torch_loss(getattr(F, torch_name), torch, t["x"],
                                                 t["t"], grad),
        groups=groups, writes=grad, **kw)


def _torch_loss(fn: Any, torch: Any, x: Any, target: Any, grad: bool) -> Any:
    """A torch loss on ``x``: forward, or forward + ``torch.autograd.grad``."""
    if not grad:
        return lambda: fn(x, target)
    leaf = x.detach().requires_grad_(True)

    def run() -> Any:
        loss = fn(leaf, target)
        (gx,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), gx

    return run


def _log_probs(a: dict, d: int, rng: Any) -> dict:
    import numpy as np

    x = a["x"]
    axis = 1 if x.ndim > 1 else 0
    z = x - x.max(axis=axis, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return {"x": z.astype(x.dtype), "t": a["t"]}


def _nll_moved(a: dict) -> int:
    """nll_loss reads the targets and gathers one log-probability per position (its gradient
    writes the whole array besides: ``writes``)."""
    return a["t"].nbytes + max(a["t"].size, 1) * a["x"].itemsize


# ----------------------------------------------------------------------------- specs
def _class_loss_spec(name: str, input_doc: str, target_doc: str, extra: tuple[Param, ...],
                     summary: str, bench: tuple[BenchCase, ...], **docs: Any) -> OpSpec:
    params = (P.array_input("input", input_doc), P.array_input("target", target_doc),
              P.WEIGHT, P.SIZE_AVERAGE, P.IGNORE_INDEX, P.REDUCE, P.REDUCTION, *extra,
              *P.LOSS_TAIL, P.GRAD_BUFFER, P.VALIDATE, P.BACKEND)
    return OpSpec(name, params, summary, run, (name,) + (("cross_entropy_probs",)
                                                        if name == "cross_entropy" else ()),
                  "class_losses", Group.LOSS, "losses", returns=P.LOSS_RETURNS,
                  raises=P.CLASS_RAISES, module_kind=ModuleKind.LOSS, dask="class_loss",
                  autograd=Autograd.FUSED_LOSS, loss_shape=class_loss_shape, bench=bench,
                  results=("return_grad", "return_lse") if name == "cross_entropy"
                  else ("return_grad",),
                  torch_params=(P.INPLACE_GRAD, P.PROCESS_GROUP) if name == "cross_entropy"
                  else (), **docs)


SPECS = (
    _class_loss_spec(
        "nll_loss",
        """array_like
            Log-probabilities of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.""",
        """array_like of int
            Class indices in ``[0, C)`` (or ``ignore_index``) of shape ``()``, ``(N,)`` or
            ``(N, d1, ..., dk)``.""",
        (),
        r"Negative log-likelihood loss on log-probabilities: :math:`l_i = -w_{t_i} x_{i, t_i}`.",
        (_loss_case("nll_loss", "nll_loss", "nll_loss", False, prepare=_log_probs,
                    moved=_nll_moved),
         _loss_case("nll_loss", "nll_loss", "nll_loss", True, prepare=_log_probs,
                    moved=_nll_moved)),
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
        array([ 0.067, -0.267,  0.067,  0.067,  0.067])""",
        reference=_ref_nll_loss, samples=_nll_samples, fast_path=_fast.nll_loss),
    _class_loss_spec(
        "cross_entropy",
        """array_like
            Unnormalised logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.""",
        """array_like
            Either class indices (integers, shaped as the input without its class axis) or
            class probabilities (floats, shaped as ``input``; then ``ignore_index`` must stay
            negative).""",
        (P.LABEL_SMOOTHING, P.Z_LOSS, P.SOFTCAP, P.RETURN_LSE),
        "Cross-entropy of logits: log-softmax and NLL fused, never materialising "
        "log-probabilities.",
        (_loss_case("cross_entropy", "cross_entropy", "cross_entropy", False,
                    groups=("forward", "losses", "targets", "layouts")),
         _loss_case("cross_entropy", "cross_entropy", "cross_entropy", True,
                    groups=("grad", "losses", "targets", "layouts"))),
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
        (2, 4)""",
        reference=_ref_cross_entropy, samples=_ce_samples, fast_path=_fast.cross_entropy),
)
