"""linear_cross_entropy: the final linear layer and cross-entropy (a language-model head),
never forming the ``(N, V)`` logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Sample
from . import _params as P
from ._results import device_scale, loss_back, rescale, results
from .class_losses import class_loss_args, execute


# ----------------------------------------------------------------------------- arguments
@dataclass(slots=True)
class LinearCELayout:
    """What a ``linear_cross_entropy`` call's metadata says."""

    probs: bool
    squeeze: bool  # the caller's input was (d,): one row
    n: int
    d: int
    v: int
    out_features: tuple[int, ...]  # torch's K-dimensional loss: linear_weight (V, *out, d)


@dataclass(slots=True)
class LogitsShape:
    """Shape metadata standing in for the logits (which are never formed)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def check_linear_ce(be: Runtime, name: str, x: Any, w: Any, t: Any, b: Any, cw: Any,
                    ignore_index: int | None) -> LinearCELayout:
    """Metadata checks of ``linear_cross_entropy`` (torch 2.13's rules and wording)."""
    if not _args.is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if not 1 <= x.ndim <= 2:
        raise ValueError(f"{name}: expected input with dimensionality 1 or 2, got {x.ndim}")
    if w.ndim < 2:
        raise ValueError(f"{name}: expected linear_weight with dimensionality at least 2, got "
                         f"{w.ndim}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"{name}: expected equal input and linear_weight last dimensions "
                         f"(in_features), got {x.shape[-1]} and {w.shape[-1]}, respectively")
    _args.compute_dtype(be, x.dtype)
    v, out = int(w.shape[0]), tuple(w.shape[1:-1])
    if b is not None and tuple(b.shape) != (v, *out):
        raise ValueError(f"{name}: expected linear_bias shape {(v, *out)}, got "
                         f"{tuple(b.shape)}")
    if out and x.ndim == 1:
        raise ValueError(f"{name}: K-dimensional loss defined by linear_weight shape "
                         f"{tuple(w.shape)} requires batched input (N, {x.shape[-1]}), got "
                         f"unbatched input with shape {tuple(x.shape)}")
    logits_shape = (*x.shape[:-1], v, *out)
    probs = tuple(t.shape) == logits_shape
    if probs:
        if ignore_index is not None:
            raise ValueError(f"{name}: ignore_index cannot be specified when target contains "
                             f"probabilities")
        if not _args.is_float(t.dtype):
            raise TypeError(f"{name}: expected a floating-point target for class probabilities "
                            f"(shape {logits_shape}), got dtype {t.dtype.name}")
    else:
        _args.check_index_target(name, LogitsShape(logits_shape), t, tuple(x.shape[:-1]) + out)
    if cw is not None and (cw.ndim != 1 or cw.shape[0] != v):
        raise ValueError(f"{name}: weight must be a 1-D array of length C = {v}, got shape "
                         f"{tuple(cw.shape)}")
    n = int(x.shape[0]) if x.ndim == 2 else 1
    return LinearCELayout(probs, x.ndim == 1, n, int(x.shape[-1]), v, out)


@dataclass(slots=True)
class LinearCEArgs:
    """Canonical ``linear_cross_entropy`` arrays: ``x2`` (N, d), ``w2`` (V, d)."""

    x2: Any
    w2: Any
    bias: Any
    target: Any  # (N,) int64 or (N, V) probabilities
    weight: Any
    layout: LinearCELayout
    dtype: Any


def linear_ce_args(be: Runtime, name: str, input: Any, linear_weight: Any, target: Any,
                   linear_bias: Any, weight: Any, ignore_index: int | None, *,
                   check_indices: bool = True) -> LinearCEArgs:
    """Validate ``linear_cross_entropy`` arrays and bring them to canonical form
    (``check_indices`` as for :func:`nblosses.ops.class_losses.class_loss_args`)."""
    x = _args.as_array(be, input, "input")
    w = _args.as_array(be, linear_weight, "linear_weight")
    t = _args.as_array(be, target, "target")
    b = None if linear_bias is None else _args.as_array(be, linear_bias, "linear_bias")
    cw = None if weight is None else _args.as_array(be, weight, "weight")
    lay = check_linear_ce(be, name, x, w, t, b, cw, ignore_index)
    cdt = _args.compute_dtype(be, x.dtype)
    rows = (lay.n, *t.shape[x.ndim - 1:]) if lay.probs else (lay.n, *lay.out_features)
    if lay.probs:
        tc = _args.to_compute(be, t, cdt).reshape(rows)
    else:
        tc = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(rows)
        if check_indices:
            _args.check_targets(be, tc, lay.v, -100 if ignore_index is None else ignore_index)
    return LinearCEArgs(_args.to_compute(be, x, cdt).reshape(lay.n, lay.d),
                        _args.to_compute(be, w, cdt),
                        None if b is None else _args.to_compute(be, b, cdt), tc,
                        None if cw is None else _args.to_compute(be, cw, cdt), lay, x.dtype)


# ----------------------------------------------------------------------------- running
def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    reduction = _args.reduction_from(None, None, v["reduction"])
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = linear_ce_args(be, spec.name, v["input"], v["linear_weight"], v["target"],
                       v["linear_bias"], v["weight"], opts["ignore_index"],
                       check_indices=check_indices)
    lay = a.layout
    want_grad, want_lse = bool(v["return_grad"]), bool(v["return_lse"])
    loss_shape = () if lay.squeeze else (lay.n, *lay.out_features)
    ignore = -100 if opts["ignore_index"] is None else opts["ignore_index"]
    options = dict(ignore_index=ignore, label_smoothing=opts["label_smoothing"],
                   z_loss=opts["z_loss"], softcap=opts["softcap"], reduction=reduction,
                   want_grad=want_grad, want_lse=want_lse)
    if lay.out_features:
        loss, lse, grads = _materialised(be, a, v["grad_output"], **options)
    else:
        g = (_args.grad_output_arg(be, v["grad_output"], reduction, loss_shape, a.x2.dtype,
                                   (lay.n,)) if want_grad else None)
        g, scale = device_scale(g)
        loss, lse, grads = be.kernel(spec.name)(a.x2, a.w2, a.bias, a.target, a.weight,
                                                grad_output=g, chunk_rows=opts["options"],
                                                **options)
        if want_grad:
            rescale(be.xp, grads, scale)
    out = [loss_back(loss, loss_shape, a.dtype)]
    if want_grad:
        gx, gw, gb = grads
        gx = gx.reshape(v["input"].shape if lay.squeeze else gx.shape)
        out.append(tuple(None if t is None else t.astype(a.dtype, copy=False)
                         for t in (gx, gw, gb)))
    if want_lse:
        out.append(lse.reshape(loss_shape))
    return results(out)


def _materialised(be: Runtime, a: LinearCEArgs, grad_output: Any, *, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: float, reduction: str,
                  want_grad: bool, want_lse: bool) -> tuple[Any, Any, Any]:
    """torch's K-dimensional loss (``linear_weight`` ``(V, o1, ..., ok, d)``): the logits
    ``(N, V, o1, ..., ok)`` are formed (as torch does for it) and go through the fused
    cross-entropy; the gradients are two more products."""
    lay = a.layout
    w_flat = a.w2.reshape(-1, lay.d)
    logits = (a.x2 @ w_flat.T).reshape(lay.n, lay.v, *lay.out_features)
    if a.bias is not None:
        logits += a.bias
    ce = class_loss_args(be, "cross_entropy", logits, a.target, a.weight, ignore_index,
                         allow_probs=True, check_indices=False)
    options: dict[str, Any] = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    if z_loss:
        options["z_loss"] = z_loss
    if softcap:
        options["softcap"] = softcap
    out = execute(be, "cross_entropy", ce, reduction=reduction, options=options,
                  want_grad=want_grad, grad_output=grad_output,
                  grad_buffer=ce.x3 if want_grad else None, want_lse=want_lse)
    loss, lse = out[0], (out[-1] if want_lse else None)
    grads = None
    if want_grad:
        g = ce.x3.reshape(lay.n, -1)
        gb = None if a.bias is None else g.sum(axis=0).reshape(a.bias.shape)
        grads = (g @ w_flat, (g.T @ a.x2).reshape(a.w2.shape), gb)
    return loss, lse, grads


# ----------------------------------------------------------------------------- reference
def _ref_linear_ce(torch: Any, input: Any, linear_weight: Any, target: Any, *,
                   linear_bias: Any = None, weight: Any = None, reduction: str = "mean",
                   ignore_index: int | None = None, label_smoothing: float = 0.0,
                   options: Any = None, z_loss: float = 0.0, softcap: float | None = None,
                   return_lse: bool = False) -> Any:
    """The logits formed, then :func:`nblosses.ops.class_losses` reference's composite."""
    from .class_losses import _ref_cross_entropy

    w = linear_weight.reshape(linear_weight.shape[0], -1, linear_weight.shape[-1])
    logits = torch.einsum("...d,vkd->...vk", input, w).reshape(
        *input.shape[:-1], *linear_weight.shape[:-1])
    if linear_bias is not None:
        logits = logits + linear_bias
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    return _ref_cross_entropy(torch, logits, target, weight, reduction=reduction,
                              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                              return_lse=return_lse, **kw)


def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    x, w = rng.standard_normal((6, 5)), rng.standard_normal((9, 5))
    t = np.array([0, 8, 2, -100, 1, 4])
    return [Sample((x, w, t), {"linear_bias": rng.standard_normal(9)}),
            Sample((x, w, t), {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3,
                               "softcap": 5.0},
                   dask_chunks={"input": (3, 5), "linear_weight": (4, 5)})]


def _torch_linear_ce(F: Any, torch: Any, t: dict, d: int, options: Any = None) -> Any:
    """Loss and the gradients of input and linear weight, by autograd: the reference
    ``F.linear`` + ``F.cross_entropy`` (``options=None``), else torch's chunked
    ``F.linear_cross_entropy``."""
    x = t["x"].detach().requires_grad_(True)
    w = t["w"].detach().requires_grad_(True)
    target = t["t"]

    def run() -> Any:
        if options is None:
            loss = F.cross_entropy(F.linear(x, w), target)
        else:
            loss = F.linear_cross_entropy(x, w, target, options=options)
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach(), (gx, gw)

    return run


SPEC = OpSpec(
    "linear_cross_entropy",
    (P.array_input("input", """array_like
        Features ``(N, d)`` or ``(d,)``."""),
     P.array_input("linear_weight", """array_like
        Weight of the linear layer, ``(V, d)`` (or ``(V, o1, ..., ok, d)``: torch's
        K-dimensional loss, computed through materialised logits)."""),
     P.array_input("target", """array_like
        Class indices ``(N,)`` (integers) or class probabilities ``(N, V)`` (floats)."""),
     Param("linear_bias", None, """array_like, optional
        Bias of the linear layer, ``(V,)`` (or ``(V, o1, ..., ok)``).""", keyword_only=True,
           role=P.Role.INPUT),
     Param("weight", None, """array_like, optional
        Per-class weights of shape ``(V,)``.""", keyword_only=True),
     Param("reduction", "mean", """{"mean", "sum", "none"}
        How per-row losses are combined.""", keyword_only=True),
     Param("ignore_index", None, """int, optional
        Target value that contributes nothing; ``None`` means -100 for class indices and must
        stay ``None`` for probability targets (as in torch).""", keyword_only=True,
           check=_args.check_optional_ignore_index),
     P.LABEL_SMOOTHING.replace(keyword_only=True),
     Param("options", None, """object, optional
        torch's ``LinearCrossEntropyOptions``: accepted; its ``batch_chunk_size``, when set,
        is the rows per block, each block over the whole vocabulary as in torch (its logits
        take ``batch_chunk_size * V`` elements: more memory than the default plan buys fewer
        matrix products). nblosses always chunks (it never forms the ``(N, V)`` logits) and
        otherwise picks the blocks itself, within 5% of the logits' memory.""", keyword_only=True,
           check=_args.check_chunking),
     P.Z_LOSS, P.SOFTCAP, P.RETURN_LSE, P.RETURN_GRAD, P.GRAD_OUTPUT, P.VALIDATE, P.BACKEND),
    "The final linear layer and cross-entropy in one pass: "
    "``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the logits.",
    run, ("linear_cross_entropy",), "linear_ce", Group.LM_HEAD, "lm_head",
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
    raises=P.CLASS_RAISES,
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
    ((4, 8), (50, 8), True)""",
    module_kind=ModuleKind.NONE, results=("return_grad", "return_lse"), dask="linear_ce",
    autograd=Autograd.CUSTOM, reference=_ref_linear_ce, samples=_samples,
    bench=(BenchCase(
        "linear_cross_entropy_grad", "linear", True, "linear_cross_entropy fwd+grad (mean)",
        "F.linear + F.cross_entropy + autograd.grad",
        run=lambda F, a, d, b: F.linear_cross_entropy(a["x"], a["w"], a["t"],
                                                      return_grad=True, backend=b),
        torch=_torch_linear_ce,
        torch_peers={"torch_chunked": lambda F, torch, t, d: _torch_linear_ce(
            F, torch, t, d, torch.nn.LinearCrossEntropyOptions())},
        groups=("slow",), writes=True,
        shapes=("2048x256x[32000]", "2048x1024x[32000]", "1024x1024x[128256]"),
        quick_shapes=("256x128x[4096]",)),),
)
SPECS = (SPEC,)
