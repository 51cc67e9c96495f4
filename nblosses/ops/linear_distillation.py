"""linear_distillation_loss: ``distillation_loss`` of two language-model heads (the student's
and the teacher's last hidden states and output layers), never forming either ``(N, V)``
logits array."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Role, Sample
from . import _params as P
from ._results import device_scale, loss_back, rescale, results
from .distillation import (
    DISTILL_VALIDATE,
    _kw,
    _ref_distillation,
    check_beta,
    check_hard_weight,
    check_temperature,
)
from .linear_ce import LogitsShape


# ----------------------------------------------------------------------------- arguments
@dataclass(slots=True)
class LinearDistillLayout:
    """What a call's metadata says: ``rows`` positions (the input's leading dimensions,
    ``loss_shape``), ``d`` / ``d_teacher`` features, ``v`` classes."""

    loss_shape: tuple[int, ...]
    rows: int
    d: int
    d_teacher: int
    v: int


def _head(name: str, what: str, x: Any, w: Any, b: Any, dtype: Any) -> None:
    """One head's checks: ``x`` ``(..., d)`` of ``dtype``, ``w`` ``(V, d)`` and ``b`` ``(V,)``
    of ``x``'s dtype (``what``: ``""`` for the student, ``"teacher_"``)."""
    inp, weight, bias = (f"{what}input", f"{what}weight" if what else "linear_weight",
                         f"{what}bias" if what else "linear_bias")
    if not _args.is_float(x.dtype):
        raise TypeError(f"{name}: {inp} must be a floating-point array, got dtype "
                        f"{x.dtype.name}")
    if x.dtype != dtype:
        raise TypeError(f"{name}: {inp} must have the input's dtype {dtype.name}, got "
                        f"{x.dtype.name}")
    if x.ndim < 1:
        raise ValueError(f"{name}: {inp} must have 1 or more dimensions (got 0)")
    if w.ndim != 2:
        raise ValueError(f"{name}: expected {weight} of shape (V, {x.shape[-1]}), got shape "
                         f"{tuple(w.shape)}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: expected equal {inp} and {weight} last dimensions "
                         f"(in_features), got {x.shape[-1]} and {w.shape[1]}, respectively")
    for arr, label in ((w, weight), (b, bias)):
        if arr is not None and arr.dtype != dtype:
            raise TypeError(f"{name}: {label} must have the input's dtype {dtype.name}, got "
                            f"{arr.dtype.name}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{name}: expected {bias} shape {(w.shape[0],)}, got "
                         f"{tuple(b.shape)}")


def check_linear_distillation(be: Runtime, name: str, x: Any, w: Any, b: Any, tx: Any, tw: Any,
                              tb: Any, t: Any, hard_weight: float) -> LinearDistillLayout:
    """Every check that needs only dtypes and shapes (so Dask arrays pass it unevaluated):
    each head's, then the heads against each other and the target."""
    _head(name, "", x, w, b, x.dtype)
    _args.compute_dtype(be, x.dtype)
    _head(name, "teacher_", tx, tw, tb, x.dtype)
    if tuple(tx.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"{name}: teacher_input must have the input's leading dimensions "
                         f"{tuple(x.shape[:-1])}, got shape {tuple(tx.shape)}")
    v = int(w.shape[0])
    if tw.shape[0] != v:
        raise ValueError(f"{name}: the teacher's vocabulary (teacher_weight rows, "
                         f"{tw.shape[0]}) must be the student's (linear_weight rows, {v})")
    loss_shape = tuple(int(n) for n in x.shape[:-1])
    if t is None:
        if hard_weight > 0:
            raise ValueError(f"{name}: hard_weight > 0 ({hard_weight}) needs a target")
    else:
        _args.check_index_target(name, LogitsShape((*loss_shape, v)), t, loss_shape)
    return LinearDistillLayout(loss_shape, math.prod(loss_shape), int(x.shape[-1]),
                               int(tx.shape[-1]), v)


@dataclass(slots=True)
class LinearDistillArgs:
    """Canonical arrays: each head's ``(N, d)`` input, ``(V, d)`` weight and bias; the
    ``(N,)`` int64 targets or None."""

    student: tuple[Any, Any, Any]
    teacher: tuple[Any, Any, Any]
    target: Any
    layout: LinearDistillLayout
    dtype: Any


def linear_distillation_args(be: Runtime, name: str, v: dict, opts: dict, *,
                             check_indices: bool) -> LinearDistillArgs:
    """Validate the arrays and bring them to canonical form (``check_indices``: check the
    class indices here, eagerly)."""
    arrays: dict[str, Any] = {k: None if v[k] is None else _args.as_array(be, v[k], k)
              for k in ("input", "linear_weight", "linear_bias", "teacher_input",
                        "teacher_weight", "teacher_bias", "target")}
    x, tx = arrays["input"], arrays["teacher_input"]
    lay = check_linear_distillation(be, name, x, arrays["linear_weight"], arrays["linear_bias"],
                                    tx, arrays["teacher_weight"], arrays["teacher_bias"],
                                    arrays["target"], opts["hard_weight"])
    cdt = _args.compute_dtype(be, x.dtype)

    def head(inp: Any, w: Any, b: Any, d: int) -> tuple[Any, Any, Any]:
        return (_args.to_compute(be, inp, cdt).reshape(lay.rows, d),
                _args.to_compute(be, w, cdt),
                None if b is None else _args.to_compute(be, b, cdt))

    t = arrays["target"]
    if t is not None:
        t = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(lay.rows)
        if check_indices:
            _args.check_targets(be, t, lay.v, opts["ignore_index"])
    return LinearDistillArgs(
        head(x, arrays["linear_weight"], arrays["linear_bias"], lay.d),
        head(tx, arrays["teacher_weight"], arrays["teacher_bias"], lay.d_teacher), t, lay,
        x.dtype)


# ----------------------------------------------------------------------------- running
def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner of ``linear_distillation_loss``."""
    reduction = _args.reduction_from(None, None, v["reduction"])
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = linear_distillation_args(be, spec.name, v, opts, check_indices=check_indices)
    lay = a.layout
    want_grad = bool(v["return_grad"])
    g = None
    if want_grad:
        g = _args.grad_output_arg(be, v["grad_output"], reduction, lay.loss_shape,
                                  a.student[0].dtype, (lay.rows,))
    g, scale = device_scale(g)
    loss, grads = be.kernel(spec.name)(
        *a.student, *a.teacher, a.target, beta=opts["beta"], temperature=opts["temperature"],
        ignore_index=opts["ignore_index"], hard_weight=opts["hard_weight"],
        softcap=opts["softcap"], reduction=reduction, want_grad=want_grad, grad_output=g,
        chunk_rows=opts["options"])
    out = [loss_back(loss, lay.loss_shape, a.dtype)]
    if want_grad:
        rescale(be.xp, grads, scale)
        gx, gw, gb = grads
        out.append((gx.reshape(v["input"].shape).astype(a.dtype, copy=False),
                    gw.astype(a.dtype, copy=False),
                    None if gb is None else gb.astype(a.dtype, copy=False)))
    return results(out)


# ----------------------------------------------------------------------------- reference
def _ref_linear_distillation(torch: Any, input: Any, linear_weight: Any, teacher_input: Any,
                             teacher_weight: Any, target: Any = None, *,
                             linear_bias: Any = None, teacher_bias: Any = None,
                             reduction: str = "mean", options: Any = None,
                             **distill: Any) -> Any:
    """Both heads' logits by ``F.linear``, then ``distillation_loss``'s torch composite on the
    rows (the input's leading dimensions flattened)."""
    F = torch.nn.functional
    lead = tuple(input.shape[:-1])
    s = F.linear(input, linear_weight, linear_bias).reshape(-1, linear_weight.shape[0])
    t = F.linear(teacher_input, teacher_weight, teacher_bias).reshape(s.shape)
    tgt = None if target is None else target.reshape(-1)
    loss = _ref_distillation(torch, s, t, tgt, reduction=reduction, **distill)
    return loss.reshape(lead) if reduction == "none" else loss


def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    x, w = rng.standard_normal((6, 5)), rng.standard_normal((9, 5))
    tx, tw = rng.standard_normal((6, 4)), rng.standard_normal((9, 4)) * 1.5
    t = np.array([0, 8, 2, -100, 1, 4])
    chunks = {"input": (3, 5), "linear_weight": (4, 5), "teacher_input": (3, 4),
              "teacher_weight": (4, 4)}
    return [Sample((x, w, tx, tw), {"linear_bias": rng.standard_normal(9)}),
            Sample((x, w, tx, tw, t), {"beta": 1.0, "temperature": 2.0, "hard_weight": 0.3,
                                       "reduction": "sum",
                                       "teacher_bias": rng.standard_normal(9)},
                   dask_chunks=chunks),
            Sample((x, w, tx, tw, t), {"beta": 0.4, "softcap": 3.0, "reduction": "none",
                                       "linear_bias": rng.standard_normal(9)},
                   dask_chunks=chunks),
            Sample((rng.standard_normal((2, 3, 5)), w, rng.standard_normal((2, 3, 4)), tw,
                    t.reshape(2, 3)), {"temperature": 0.7, "hard_weight": 0.5})]


def _torch_linear_distillation(F: Any, torch: Any, t: dict, d: int) -> Any:
    """torch's reference: two ``F.linear`` (the teacher's without autograd: it is frozen),
    two ``log_softmax``, ``kl_div`` (mean over rows), the student's gradients by autograd."""
    x = t["x"].detach().requires_grad_(True)
    w = t["w"].detach().requires_grad_(True)

    def run() -> Any:
        with torch.no_grad():
            teacher = F.log_softmax(F.linear(t["tx"], t["tw"]), 1)
        s = F.linear(x, w)
        loss = F.kl_div(F.log_softmax(s, 1), teacher, reduction="sum",
                        log_target=True) / s.shape[0]
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach(), (gx, gw)

    return run


BENCH = (BenchCase(
    "linear_distillation_grad", "linear_pair", True,
    "linear_distillation_loss fwd+grad (forward KL)",
    "2x F.linear + 2x F.log_softmax + F.kl_div + autograd.grad",
    run=lambda F, a, d, b: F.linear_distillation_loss(a["x"], a["w"], a["tx"], a["tw"],
                                                      return_grad=True, backend=b),
    torch=_torch_linear_distillation, groups=("slow",), writes=True,
    shapes=("2048x256x[32000]",), quick_shapes=("256x128x[4096]",)),)


# ----------------------------------------------------------------------------- spec
SPEC = OpSpec(
    "linear_distillation_loss",
    (P.array_input("input", """array_like
        The student's features, ``(..., d)`` (one position per leading index; ``(N, d)``
        for a batch of tokens)."""),
     P.array_input("linear_weight", """array_like
        The student's output layer, ``(V, d)``."""),
     P.array_input("teacher_input", """array_like
        The teacher's features, ``(..., d_teacher)``: the input's leading dimensions and
        dtype; ``d_teacher`` may differ from ``d``."""),
     P.array_input("teacher_weight", """array_like
        The teacher's output layer, ``(V, d_teacher)`` (the same vocabulary). The teacher is
        frozen: it gets no gradient."""),
     Param("target", None, """array_like, optional
        Class indices shaped as the input's leading dimensions: positions equal to
        ``ignore_index`` count nowhere (loss, gradient, ``mean`` denominator); the labels of
        the hard loss (``hard_weight > 0``, then required).""", role=Role.INPUT),
     Param("linear_bias", None, """array_like, optional
        The student's output bias, ``(V,)``.""", keyword_only=True, role=Role.INPUT,
           torch=False),
     Param("teacher_bias", None, """array_like, optional
        The teacher's output bias, ``(V,)``.""", keyword_only=True, role=Role.INPUT,
           torch=False),
     _kw(Param("beta", 0.0, r"""float
        :math:`\beta \in [0, 1]`, as :func:`distillation_loss`'s: 0 the forward KL
        :math:`KL(p_t \| p_s)`, 1 the reverse KL, in between the generalised JSD.""",
               check=check_beta)),
     _kw(Param("temperature", 1.0, """float
        :math:`T > 0`, as :func:`distillation_loss`'s (no :math:`T^2` factor).""",
               check=check_temperature)),
     _kw(P.IGNORE_INDEX),
     _kw(Param("hard_weight", 0.0, r"""float
        :math:`w \in [0, 1]`: :math:`(1 - w)\,\mathrm{soft} + w\,\mathrm{CE}`, the
        cross-entropy of the student's (soft-capped, not tempered) logits on ``target``.""",
               check=check_hard_weight)),
     P.SOFTCAP.replace(doc=r"""float, optional
        Soft-caps both heads' logits first, :math:`c \tanh(x / c)`, before the
        temperature."""),
     _kw(P.REDUCTION.replace(doc="""{"mean", "sum", "none"}
        ``"none"``: one loss per position (the input's leading shape); ``"mean"`` divides
        the sum by the number of kept positions.""")),
     _kw(Param("options", None, """object, optional
        torch's ``LinearCrossEntropyOptions``: its ``batch_chunk_size``, when set, is the
        rows per block, each over the whole vocabulary (as torch's); otherwise nblosses
        picks the chunks (extra memory within 5% of one ``(N, V)`` logits array).""",
        check=_args.check_chunking)),
     P.RETURN_GRAD.replace(doc="""bool
        Also return the student's gradients ``(grad_input, grad_linear_weight,
        grad_linear_bias)`` of ``sum(grad_output * loss)``, from the same chunked
        sweep."""),
     P.GRAD_OUTPUT, DISTILL_VALIDATE, P.BACKEND),
    "Distillation between two language-model heads (features and output layers), fused with "
    "the student's gradients: ``distillation_loss`` of both heads' logits, without the "
    "logits.",
    run, ("linear_distillation_loss",), "linear_distillation", Group.LM_HEAD, "distillation",
    description=r"""The student's logits ``input @ linear_weight.T + linear_bias`` and the
    teacher's ``teacher_input @ teacher_weight.T + teacher_bias`` are formed a block of rows
    and vocabulary columns at a time (BLAS / cuBLAS products into one reused buffer per head),
    reduced to per-row statistics and turned into the student's gradient block by block, so
    the extra memory stays within 5% of one ``(N, V)`` logits array; the loss is
    :func:`distillation_loss`'s on those logits (forward KL, reverse KL or TRL's generalised
    JSD of :math:`\mathrm{softmax}(\mathrm{cap}(x) / T)`, the hard cross-entropy mixed
    in).""",
    returns="""
    loss : array
        0-d for ``mean`` / ``sum``, else one per position (the input's leading shape). All
        positions ignored with ``mean`` -> NaN.
    grads : tuple of array
        Only with ``return_grad=True``: ``(grad_input, grad_linear_weight,
        grad_linear_bias)`` (the last ``None`` without a bias).""",
    raises="""
    IndexError
        A target that is not ``ignore_index`` outside ``[0, V)`` (on a device backend
        reported asynchronously unless ``validate="sync"``).
    ValueError
        Features that do not match a head's weight, teacher leading dimensions or
        vocabulary other than the student's, bias or target shapes, ``beta`` or
        ``hard_weight`` outside ``[0, 1]``, ``temperature <= 0``, ``hard_weight > 0``
        without a target.
    TypeError
        Non-float input, a teacher array or weight of another dtype, a non-integer
        target.""",
    notes="""
    See :doc:`/distillation` (the LM-head form) for the passes each divergence takes and
    what they cost.""",
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> r = np.random.default_rng(0)
    >>> x, w = r.standard_normal((4, 8)), r.standard_normal((50, 8))
    >>> tx, tw = r.standard_normal((4, 16)), r.standard_normal((50, 16))
    >>> loss, (gx, gw, gb) = F.linear_distillation_loss(x, w, tx, tw, return_grad=True)
    >>> bool(np.isclose(loss, F.distillation_loss(x @ w.T, tx @ tw.T)))
    True
    >>> gx.shape, gw.shape, gb is None
    ((4, 8), (50, 8), True)""",
    module_kind=ModuleKind.NONE, results=("return_grad",), dask="linear_distillation",
    autograd=Autograd.CUSTOM, reference=_ref_linear_distillation, samples=_samples,
    bench=BENCH,
)
SPECS = (SPEC,)
