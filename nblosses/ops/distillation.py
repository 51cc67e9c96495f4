"""distillation_loss: knowledge distillation from teacher logits (forward KL, reverse KL or the
generalised JSD of TRL's ``generalized_jsd_loss``) or from a cached top-k teacher, with the hard
cross-entropy mixed in, fused with the student's gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Role, Sample
from . import _params as P
from ._results import class_loss_shape, device_scale, loss_back, rescale, results
from .class_losses import _torch_loss, check_class_input


# ----------------------------------------------------------------------------- options
def _unit(op: str, name: str, value: Any) -> float:
    v = _args._real(op, name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {value!r}")
    return v


def check_beta(op: str, value: Any) -> float:
    """``beta`` in ``[0, 1]``: 0 forward KL, 1 reverse KL, between: the generalised JSD."""
    return _unit(op, "beta", value)


def check_hard_weight(op: str, value: Any) -> float:
    """``hard_weight`` in ``[0, 1]``."""
    return _unit(op, "hard_weight", value)


def check_temperature(op: str, value: Any) -> float:
    """``temperature``: a finite float > 0."""
    v = _args._real(op, "temperature", value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {value!r}")
    return v


# ----------------------------------------------------------------------------- arguments
@dataclass(slots=True)
class DistillLayout:
    """What a ``distillation_loss`` call's metadata says."""

    topk: bool  # teacher = (indices, log_probs)
    input_shape: tuple[int, ...]
    shape3: tuple[int, int, int]  # the student as (N, C, inner)
    k: int  # top-k entries per position (C for a logits teacher)
    loss_shape: tuple[int, ...]


@dataclass(slots=True)
class DistillArgs:
    """Canonical arrays (see the kernel protocol in :mod:`nblosses.backends`)."""

    x3: Any
    teacher: tuple[Any, ...]  # (t3,) logits, or (idx3 int64, lp3) of (N, k, inner)
    target: Any  # (N, inner) int64, or None
    layout: DistillLayout
    dtype: Any


def _topk_shape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    """``shape`` with its class axis (1, or 0 of a 1-d input) replaced by ``k``."""
    return (k,) if len(shape) == 1 else (shape[0], k, *shape[2:])


def check_distillation(be: Runtime, name: str, x: Any, teacher: tuple[Any, ...], t: Any,
                       opts: dict) -> DistillLayout:
    """Every check that needs only dtypes and shapes (so Dask arrays pass it unevaluated)."""
    shape, shape3, loss_shape = check_class_input(be, name, x)
    topk = len(teacher) == 2
    if topk:
        k = _check_topk(name, shape, shape3[1], teacher[0], teacher[1], x.dtype)
        if opts["beta"] != 0.0:
            raise ValueError(f"{name}: a top-k teacher gives forward KL only: beta must be 0 "
                             f"(got {opts['beta']}); reverse KL and the JSD need the teacher's "
                             f"whole distribution")
    else:
        k = shape3[1]
        tl = teacher[0]
        if tuple(tl.shape) != shape:
            raise ValueError(f"{name}: teacher logits must have the input's shape {shape}, got "
                             f"{tuple(tl.shape)}")
        if tl.dtype != x.dtype:
            raise TypeError(f"{name}: teacher logits must have the input's dtype "
                            f"{x.dtype.name}, got {tl.dtype.name}")
    if t is None:
        if opts["hard_weight"] > 0:
            raise ValueError(f"{name}: hard_weight > 0 ({opts['hard_weight']}) needs a target")
    else:
        _args.check_index_target(name, x, t, loss_shape)
    return DistillLayout(topk, shape, shape3, k, loss_shape)


def _check_topk(name: str, shape: tuple[int, ...], n_classes: int, idx: Any, lp: Any,
                dtype: Any) -> int:
    """The top-k teacher's checks; returns ``k``."""
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{name}: teacher indices must be integers, got dtype {idx.dtype.name}")
    if lp.dtype != dtype:
        raise TypeError(f"{name}: teacher log_probs must have the input's dtype {dtype.name}, "
                        f"got {lp.dtype.name}")
    if tuple(idx.shape) != tuple(lp.shape) or idx.ndim != len(shape):
        raise ValueError(f"{name}: teacher indices and log_probs must have one shape, the "
                         f"input's {shape} with k entries on the class axis; got "
                         f"{tuple(idx.shape)} and {tuple(lp.shape)}")
    k = int(idx.shape[0] if len(shape) == 1 else idx.shape[1])
    if tuple(idx.shape) != _topk_shape(shape, k):
        raise ValueError(f"{name}: teacher indices shape {tuple(idx.shape)} must be the input's "
                         f"{shape} with k entries on the class axis")
    if k > n_classes:
        raise ValueError(f"{name}: the top-k teacher has k = {k} entries per position, more "
                         f"than the C = {n_classes} classes")
    return k


def teacher_arrays(be: Runtime, teacher: Any) -> tuple[Any, ...]:
    """``(logits,)`` or ``(indices, log_probs)`` as the backend's arrays."""
    if isinstance(teacher, tuple):
        if len(teacher) != 2:
            raise TypeError(f"distillation_loss: a top-k teacher is a pair (indices, "
                            f"log_probs), got a tuple of {len(teacher)}")
        return (_args.as_array(be, teacher[0], "teacher indices"),
                _args.as_array(be, teacher[1], "teacher log_probs"))
    return (_args.as_array(be, teacher, "teacher"),)


def check_topk_indices(be: Runtime, idx3: Any, n_classes: int) -> None:
    """``IndexError`` naming the first top-k index outside ``[0, C)`` (one pass over them)."""
    if idx3.size == 0:
        return
    lo, hi = be.index_range(idx3) if be.index_range else (int(idx3.min()), int(idx3.max()))
    if lo >= 0 and hi < n_classes:
        return
    flat = idx3.reshape(-1)
    bad = (flat < 0) | (flat >= n_classes)
    value = int(flat[int(be.xp.argmax(bad))])
    raise IndexError(f"distillation_loss: teacher index {value} is out of bounds (number of "
                     f"classes: {n_classes})")


def distillation_args(be: Runtime, name: str, v: dict, opts: dict, *,
                      check_indices: bool) -> DistillArgs:
    """Validate the arrays and bring them to canonical form (``check_indices``: check the
    top-k indices and the class indices here, eagerly)."""
    x = _args.as_array(be, v["input"], "input")
    teacher = teacher_arrays(be, v["teacher"])
    t = None if v["target"] is None else _args.as_array(be, v["target"], "target")
    layout = check_distillation(be, name, x, teacher, t, opts)
    cdt = _args.compute_dtype(be, x.dtype)
    n, c, inner = layout.shape3
    x3 = _args.to_compute(be, x, cdt).reshape(layout.shape3)
    canon: tuple[Any, ...]
    if layout.topk:
        idx3 = be.xp.ascontiguousarray(teacher[0].astype("int64", copy=False)).reshape(
            n, layout.k, inner)
        if check_indices:
            check_topk_indices(be, idx3, c)
        canon = (idx3, _args.to_compute(be, teacher[1], cdt).reshape(n, layout.k, inner))
    else:
        canon = (_args.to_compute(be, teacher[0], cdt).reshape(layout.shape3),)
    t2 = None
    if t is not None:
        t2 = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(n, inner)
        if check_indices:
            _args.check_targets(be, t2, c, opts["ignore_index"])
    return DistillArgs(x3, canon, t2, layout, x.dtype)


# ----------------------------------------------------------------------------- running
def execute(be: Runtime, a: DistillArgs, *, reduction: str, opts: dict, want_grad: bool,
            grad_output: Any, grad_buffer: Any) -> list:
    """One kernel call on canonical arrays: ``[loss, grad?]`` in the caller's shapes."""
    n, _, inner = a.layout.shape3
    g = None
    if want_grad:
        g = _args.grad_output_arg(be, grad_output, reduction, a.layout.loss_shape, a.x3.dtype,
                                  (n, inner))
    g, scale = device_scale(g)
    kw = dict(temperature=opts["temperature"], ignore_index=opts["ignore_index"],
              hard_weight=opts["hard_weight"], softcap=opts["softcap"], reduction=reduction,
              want_grad=want_grad, grad_output=g, grad_buffer=grad_buffer)
    if a.layout.topk:
        loss, grad = be.kernel("distillation_topk")(a.x3, *a.teacher, a.target, **kw)
    else:
        loss, grad = be.kernel("distillation")(a.x3, a.teacher[0], a.target,
                                               beta=opts["beta"], **kw)
    rescale(be.xp, (grad,), scale)
    out = [loss_back(loss, a.layout.loss_shape, a.dtype)]
    if want_grad:
        out.append(grad)
    return out


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner of ``distillation_loss``."""
    reduction = _args.reduction_from(None, None, v["reduction"])
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = distillation_args(be, spec.name, v, opts, check_indices=check_indices)
    want_grad = bool(v["return_grad"])
    buffer = None
    if want_grad:
        buffer = _args.grad_buffer_arg(be, v["grad_buffer"], a.layout.input_shape, a.x3.shape,
                                       a.x3.dtype)
    out = execute(be, a, reduction=reduction, opts=opts, want_grad=want_grad,
                  grad_output=v["grad_output"], grad_buffer=buffer)
    if want_grad:
        out[1] = (v["grad_buffer"] if v["grad_buffer"] is not None
                  else out[1].reshape(a.layout.input_shape).astype(a.dtype, copy=False))
    return results(out)


# ----------------------------------------------------------------------------- reference
def _ref_distillation(torch: Any, input: Any, teacher: Any, target: Any = None, *,
                      beta: float = 0.0, temperature: float = 1.0, ignore_index: int = -100,
                      hard_weight: float = 0.0, softcap: float | None = None,
                      reduction: str = "mean") -> Any:
    """The loss as torch composites (TRL's ``generalized_jsd_loss`` conventions), zero
    probabilities contributing 0 (``kl_div`` on probabilities: ``xlogy``)."""
    F = torch.nn.functional
    dim = 1 if input.dim() > 1 else 0

    def cap(v: Any) -> Any:
        return softcap * torch.tanh(v / softcap) if softcap else v

    s = cap(input)
    ls = F.log_softmax(s / temperature, dim)
    if isinstance(teacher, tuple):
        idx, lp = teacher
        q = lp.exp()
        soft = torch.where(q > 0, q * (lp - ls.gather(dim, idx)), 0.0).sum(dim)
    else:
        lt = F.log_softmax(cap(teacher) / temperature, dim)
        ps, pt = ls.exp(), lt.exp()
        if beta == 0:
            soft = F.kl_div(ls, pt, reduction="none").sum(dim)
        elif beta == 1:
            soft = F.kl_div(lt, ps, reduction="none").sum(dim)
        else:
            lm = (beta * pt + (1 - beta) * ps).log()
            soft = (beta * F.kl_div(lm, pt, reduction="none").sum(dim)
                    + (1 - beta) * F.kl_div(lm, ps, reduction="none").sum(dim))
    per = (1 - hard_weight) * soft
    if hard_weight:
        per = per + hard_weight * F.cross_entropy(s, target, ignore_index=ignore_index,
                                                  reduction="none")
    keep = torch.ones_like(per) if target is None else (target != ignore_index).to(per.dtype)
    per = torch.where(keep > 0, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / keep.sum()


# ----------------------------------------------------------------------------- samples
def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    x, y = rng.standard_normal((5, 12)) * 2, rng.standard_normal((5, 12)) * 2
    t = np.array([3, -100, 0, 11, 7])
    idx = np.argsort(-y, axis=1)[:, :4]
    lp = np.take_along_axis(y - np.log(np.exp(y).sum(1, keepdims=True)), idx, axis=1)
    return [Sample((x, y), {}),
            Sample((x, y), {"beta": 1.0, "temperature": 2.0, "reduction": "sum"}),
            Sample((x, y, t), {"beta": 0.4, "hard_weight": 0.3, "softcap": 3.0}),
            Sample((x, y, t), {"temperature": 0.7, "hard_weight": 0.5, "reduction": "none"}),
            Sample((x, (idx, lp), t), {"temperature": 1.5, "hard_weight": 0.2}),
            Sample((rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6, 4))),
                   {"beta": 0.5, "reduction": "sum"},
                   dask_chunks={"input": (2, 6, 3), "teacher": (2, 6, 3)})]


# ----------------------------------------------------------------------------- bench
def _rows_of(a: Any, d: int) -> Any:
    """A bench array with its class axis at dim 1: a last class axis of three or more dims is
    flattened to ``(-1, C)`` (as the class losses' layout)."""
    return a.reshape(-1, a.shape[-1]) if a.ndim > 2 and d == a.ndim - 1 else a


def _pair_rows(a: dict, d: int, rng: Any) -> dict:
    return {"x": _rows_of(a["x"], d), "y": _rows_of(a["y"], d)}


def _topk_rows(a: dict, d: int, rng: Any) -> dict:
    return {k: _rows_of(a[k], d) for k in ("x", "top_index", "top_logp")}


def _torch_composite(F: Any, torch: Any, x: Any, y: Any) -> Any:
    """torch's composite: two log_softmax and kl_div (log-target), mean over rows."""
    return _torch_loss(lambda s, t: F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1),
                                             reduction="sum", log_target=True) / s.shape[0],
                       torch, x, y, True)


def _torch_topk(F: Any, torch: Any, x: Any, idx: Any, lp: Any) -> Any:
    """torch's top-k composite: log_softmax, gather, the teacher's weights, mean over rows."""
    def loss(s: Any, _: Any) -> Any:
        return (lp.exp() * (lp - F.log_softmax(s, 1).gather(1, idx))).sum() / s.shape[0]

    return _torch_loss(loss, torch, x, None, True)


#: The vocabulary-sized rows issue 24 states its targets on (and, as every case, one smaller
#: shape for --quick).
SHAPES = ("4096x[1000]", "512x[32000]", "64x[128256]")
QUICK_SHAPES = ("32x[32000]",)

BENCH = (
    BenchCase("distillation_grad", "pair", True, "distillation_loss fwd+grad (forward KL)",
              "2x F.log_softmax + F.kl_div + autograd.grad",
              run=lambda F, a, d, b: F.distillation_loss(a["x"], a["y"], return_grad=True,
                                                         backend=b),
              torch=lambda F, torch, t, d: _torch_composite(F, torch, t["x"], t["y"]),
              prepare=_pair_rows, groups=("grad", "losses"), shapes=SHAPES,
              quick_shapes=QUICK_SHAPES, writes=True),
    BenchCase("distillation_topk_grad", "topk", True,
              "distillation_loss fwd+grad (top-k teacher)",
              "F.log_softmax + gather + autograd.grad",
              run=lambda F, a, d, b: F.distillation_loss(
                  a["x"], (a["top_index"], a["top_logp"]), return_grad=True, backend=b),
              torch=lambda F, torch, t, d: _torch_topk(F, torch, t["x"], t["top_index"],
                                                       t["top_logp"]),
              prepare=_topk_rows, groups=("grad", "losses"), shapes=SHAPES,
              quick_shapes=QUICK_SHAPES, writes=True),
)


# ----------------------------------------------------------------------------- spec
DISTILL_VALIDATE = P.VALIDATE.replace(doc="""{"async", "sync"}, optional
    How a device backend checks the top-k teacher's indices and the class indices:
    ``"async"`` inside the kernels (``IndexError`` raised by a later call
    or :func:`nblosses.synchronize`), ``"sync"`` before them (waits for the device). Default:
    :func:`nblosses.get_validation`. The CPU backend always checks eagerly.""")


def _kw(param: Param) -> Param:
    """nblosses' own parameter (no torch counterpart): keyword-only."""
    return param.replace(keyword_only=True, torch=False)


SPECS = (OpSpec(
    "distillation_loss",
    (P.array_input("input", """array_like
        Student logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class axis 1)."""),
     P.array_input("teacher", """array_like or tuple
        Teacher logits of the input's shape and dtype, or a top-k teacher
        ``(indices, log_probs)``: two arrays shaped as the input with ``k <= C`` entries on
        the class axis, the teacher's largest log-probabilities (int indices; log-probabilities
        of the input's dtype), e.g. cached offline."""),
     Param("target", None, """array_like, optional
        Class indices shaped as the input without its class axis: positions equal to
        ``ignore_index`` count nowhere (loss, gradient, ``mean`` denominator); the labels of
        the hard loss (``hard_weight > 0``, then required).""", role=Role.INPUT),
     _kw(Param("beta", 0.0, r"""float
        :math:`\beta \in [0, 1]`: 0 is the forward KL :math:`KL(p_t \| p_s)`, 1 the reverse
        KL :math:`KL(p_s \| p_t)`, in between the generalised Jensen-Shannon divergence
        :math:`\beta KL(p_t \| m) + (1 - \beta) KL(p_s \| m)`,
        :math:`m = \beta p_t + (1 - \beta) p_s` (TRL's ``generalized_jsd_loss``). A top-k
        teacher takes 0 only.""", check=check_beta)),
     _kw(Param("temperature", 1.0, """float
        :math:`T > 0`: both softmaxes are of the (soft-capped) logits over ``T``. No
        :math:`T^2` factor is applied (multiply the loss, or ``grad_output``, by ``T**2`` for
        Hinton's scaling).""", check=check_temperature)),
     _kw(P.IGNORE_INDEX),
     _kw(Param("hard_weight", 0.0, r"""float
        :math:`w \in [0, 1]`: the loss is :math:`(1 - w)\,\mathrm{soft} + w\,\mathrm{CE}`,
        the cross-entropy of the (soft-capped, not tempered) student logits on ``target``.""",
         check=check_hard_weight)),
     P.SOFTCAP.replace(doc=r"""float, optional
        Soft-caps both logits first, :math:`c \tanh(x / c)` (Gemma 2), before the
        temperature, with the chain rule in the gradient."""),
     _kw(P.REDUCTION.replace(doc="""{"mean", "sum", "none"}
        ``"none"``: one loss per position; ``"mean"`` divides the sum by the number of kept
        positions (``target != ignore_index``; all of them without a target).""")),
     *P.LOSS_TAIL, P.GRAD_BUFFER, DISTILL_VALIDATE, P.BACKEND),
    "Knowledge distillation from teacher logits or a top-k teacher, fused with the student's "
    "gradient.",
    run, ("distillation", "distillation_topk"), "distillation", Group.LOSS, "distillation",
    description=r"""With :math:`p_s = \mathrm{softmax}(\mathrm{cap}(s) / T)` and
    :math:`p_t = \mathrm{softmax}(\mathrm{cap}(t) / T)` over the class axis, the per-position
    soft loss is the divergence ``beta`` picks; one pass over both logit arrays gives the loss
    and the student's gradient (the teacher gets none). A top-k teacher
    ``(indices, log_probs)`` gives the forward KL on its support,
    :math:`\sum_j e^{lp_j}(lp_j - \log p_s[idx_j])`, the student's softmax taken over all
    classes; its memory does not grow with :math:`C`.""",
    returns="""
    loss : array
        0-d for ``mean`` / ``sum``, else one per position (the input's shape without its
        class axis). All positions ignored with ``mean`` -> NaN.
    grad : array
        Only with ``return_grad=True``: the gradient with respect to ``input``.""",
    raises="""
    IndexError
        A top-k index, or a target that is not ``ignore_index``, outside ``[0, C)`` (on a
        device backend reported asynchronously unless ``validate="sync"``).
    ValueError
        Teacher or target shapes that do not match the input, ``k > C``, ``beta``,
        ``hard_weight`` outside ``[0, 1]``, ``temperature <= 0``, ``hard_weight > 0``
        without a target, ``beta != 0`` with a top-k teacher.
    TypeError
        Non-float input, a teacher of another dtype, non-integer indices or target.""",
    notes="""
    Zero probabilities contribute 0 (the ``xlogy`` convention: a ``-inf`` teacher logit is a
    masked class; torch's ``kl_div(..., log_target=True)`` composite gives NaN there).
    Duplicate top-k indices count once each. See :doc:`/distillation` for the gradients.""",
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> student = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    >>> teacher = np.array([[1.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    >>> loss, grad = F.distillation_loss(student, teacher, return_grad=True)
    >>> round(float(loss), 4)
    0.4221
    >>> grad.round(4)
    array([[ 0.1877, -0.1771, -0.0107],
           [-0.2268,  0.1134,  0.1134]])
    >>> top = (np.array([[0, 1], [0, 2]]), np.log(np.array([[0.5, 0.4], [0.7, 0.2]])))
    >>> round(float(F.distillation_loss(student, top)), 4)
    0.3285""",
    module="DistillationLoss", module_kind=ModuleKind.LOSS,
    module_examples="""
    >>> import numpy as np
    >>> from nblosses import nn
    >>> loss = nn.DistillationLoss(temperature=2.0, hard_weight=0.5)
    >>> s, t = np.zeros((2, 4)), np.ones((2, 4))
    >>> print(loss(s, t, np.array([1, 2])).round(4))
    0.6931
    >>> loss.backward().shape
    (2, 4)""",
    results=("return_grad",), dask="distillation", autograd=Autograd.FUSED_LOSS,
    loss_shape=class_loss_shape,
    reference=_ref_distillation, samples=_samples, bench=BENCH),)
