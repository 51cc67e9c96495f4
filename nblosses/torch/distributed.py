"""Vocabulary-parallel cross-entropy over :mod:`torch.distributed`.

Each rank of a process group holds one slice of the class (vocabulary) axis, the slices in rank
order, widths free to differ: for :func:`cross_entropy` its columns of the logits, for
:func:`linear_cross_entropy` its rows of the output layer's weight and bias (the input, the
hidden states, is the same on every rank). Both return the loss of the whole vocabulary, the
same on every rank, and are differentiable by torch autograd: each rank gets the gradient of its
own shard, and no rank ever holds the whole vocabulary.

The method is Megatron-LM's vocabulary-parallel cross-entropy: every rank reduces its shard to
per-position statistics, and all-reduces combine them; per position (``y`` the logits, soft-capped
when asked, ``w`` the class weights, ``lse`` the logsumexp over the whole vocabulary):

1. each rank computes its shard's logsumexp ``lse_r`` with nblosses' kernel (one fused pass, no
   logits for the linear head); an all-reduce of the maximum gives ``m``, an all-reduce of the sum
   of ``exp(lse_r - m)`` (the sum of exponentials) gives ``lse = m + log(sum)``;
2. the same sum all-reduce carries the target's logit ``y_t`` and weight ``w_t`` (nonzero on the
   rank that owns the target only) and, with label smoothing, ``sum_c w_c y_c`` and ``sum_c w_c``;
3. every rank then knows the loss; the gradient of its shard is
   ``A p_c - B [c == t] - S w_c`` (times the softcap's derivative), ``p = exp(y - lse)``, with
   per-position coefficients ``A``, ``B``, ``S`` (see :mod:`nblosses.backends._linear_ce`).

nblosses' kernel computes that gradient for the shard in one more pass: called with an upstream
gradient of ``A exp(lse_r - lse)`` per position (which turns the shard's own softmax into the
global one) and a target inside the shard, it writes ``A p_c`` minus that coefficient at the
target; a correction at one entry per position puts ``B`` there instead. Label smoothing's
``S w_c`` term is one more in-place pass over the logits' gradient, and, for the linear head, a
second kernel call whose gradients are added. The extra memory of a rank is its shard's
gradient and O(positions) vectors: half the single-process memory on two ranks.

For :func:`linear_cross_entropy` the input is replicated, so its gradient is summed over the
ranks (an all-reduce in the forward pass, or in the backward pass for ``reduction="none"``):
every rank gets the input gradient of the whole vocabulary, as the unsharded call gives.

Every rank must make the same calls with the same targets; the collectives are those of
``process_group`` (``gloo`` for CPU tensors, ``nccl`` for CUDA tensors).

Examples
--------
One process standing in for a group (a group of one holds the whole vocabulary):

>>> import os, tempfile
>>> import torch
>>> import torch.distributed as dist
>>> from nblosses.torch import distributed as vp
>>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
>>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
>>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
>>> loss = vp.cross_entropy(logits, torch.tensor([0, 2]), process_group=dist.group.WORLD)
>>> loss.backward()
>>> print(round(loss.item(), 4), logits.grad[1])
0.6691 tensor([ 0.1667,  0.1667, -0.3333])
>>> dist.destroy_process_group()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import _reduction as _legacy

from .. import functional as _functional
from ._autograd import scaled, wants_grad

# Untyped on purpose: the functional stubs type reduction as a Literal, here it is a str.
_F: Any = _functional

__all__ = ["cross_entropy", "linear_cross_entropy"]

#: ``ignore_index`` of the per-shard kernel calls, whose targets are built here: never a class.
_KERNEL_IGNORE = -1
#: Elements per block of the chunked softcap-and-smoothing pass over a logits shard (16 MiB of
#: float32): the pass's temporaries stay small next to the shard.
_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class _Options:
    """A call's options, shared by the forward and the backward pass."""

    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    group: Any
    in_place: bool = False  # cross_entropy's inplace_grad, where it applies


@dataclass(frozen=True)
class _Shard:
    """Where this rank's slice lies: ``[offset, offset + width)`` of ``classes`` classes."""

    offset: int
    width: int
    classes: int


def _shard(width: int, device: torch.device, group: Any) -> _Shard:
    """Every rank's width (an all-gather), hence this rank's offset and the class count."""
    if width < 1:
        raise ValueError("nblosses.torch.distributed: every rank must hold at least one class "
                         f"(this rank's shard has {width})")
    widths = [torch.zeros(1, dtype=torch.int64, device=device)
              for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, torch.tensor([width], dtype=torch.int64, device=device), group=group)
    sizes = torch.cat(widths).tolist()
    rank = dist.get_rank(group)
    return _Shard(sum(sizes[:rank]), width, sum(sizes))


def _reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _legacy.legacy_get_string(size_average, reduce)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _check_common(target: Tensor, weight: Tensor | None, shard_width: int,
                  opts: _Options) -> None:
    wants_grad(target.new_empty(0), target=target, weight=weight)  # refuses their gradients
    if target.is_floating_point():
        raise NotImplementedError("nblosses.torch.distributed: class-index targets only (a "
                                  "probability target would be sharded like the logits)")
    if weight is not None and tuple(weight.shape) != (shard_width,):
        raise ValueError("nblosses.torch.distributed: weight must be this rank's shard of the "
                         f"class weights, shape ({shard_width},), got {tuple(weight.shape)}")
    if not 0.0 <= opts.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: "
                         f"{opts.label_smoothing}")


# ----------------------------------------------------------------------------- per position
@dataclass
class _Rows:
    """Per-position quantities (shaped as the unreduced loss), equal on every rank once
    :func:`_combine` has run, except ``local``, ``col`` and ``scale``, which are this rank's."""

    keep: Tensor  # the target is not ignore_index
    local: Tensor  # the target lies in this rank's shard
    col: Tensor  # the column of this shard the kernel takes as target: the local one, else 0
    y_col: Tensor  # the (soft-capped) logit at ``col``
    lse: Tensor  # logsumexp over the shard, then (after _combine) over the vocabulary
    scale: Tensor  # exp(shard lse - lse): this shard's softmax times it is the global one
    y_t: Tensor  # the target's (soft-capped) logit
    w_t: Tensor  # the target's class weight (1 without weights), 0 where ignored
    wy: Tensor | None  # label smoothing: sum over the classes of w_c y_c
    weight_sum: Tensor | float  # sum of the class weights (the class count without weights)
    classes: int


def _targets(target: Tensor, shard: _Shard, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(keep, local, col)`` of class-index targets; raises on a target outside the
    vocabulary (torch's ``IndexError``), so no position is silently treated as elsewhere."""
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= shard.classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
    rel = target - shard.offset
    local = keep & (rel >= 0) & (rel < shard.width)
    return keep, local, torch.where(local, rel, 0)


def _softcapped(z: Tensor, cap: float | None) -> Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _cap_slope(y: Tensor, cap: float | None) -> Tensor | float:
    """``dy/dz`` of ``y = cap tanh(z / cap)``, from ``y``."""
    return 1.0 if cap is None else 1.0 - (y / cap) ** 2


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least, as the kernels compute half-precision logits."""
    return torch.promote_types(dtype, torch.float32)


def _combine(rows: _Rows, weight: Tensor | None, smoothing: bool, group: Any) -> None:
    """The all-reduces, in place on ``rows``: the maximum of the shards' logsumexps, then one sum
    of the exponentials, target logits, target weights and smoothing sums, packed."""
    m = rows.lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    parts = [torch.exp(rows.lse - m), rows.y_t]
    if weight is not None:
        parts.append(rows.w_t)
    if smoothing:
        assert rows.wy is not None
        parts.append(rows.wy)
        if weight is not None:
            parts.append(torch.as_tensor(rows.weight_sum, dtype=m.dtype,
                                         device=m.device).reshape(1))
    packed = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(packed, group=group)
    n = m.numel()
    sums = packed[:n].view_as(m)
    lse = m + torch.log(sums)
    rows.scale = torch.exp(rows.lse - lse)
    rows.lse = lse
    rows.y_t = packed[n:2 * n].view_as(m)
    at = 2 * n
    if weight is not None:
        rows.w_t, at = packed[at:at + n].view_as(m), at + n
    if smoothing:
        rows.wy, at = packed[at:at + n].view_as(m), at + n
    rows.weight_sum = float(rows.classes) if weight is None or not smoothing else packed[at]


def _rows(keep: Tensor, local: Tensor, col: Tensor, y_col: Tensor, lse: Tensor,
          shard_loss: Tensor | None, weight: Tensor | None, shard: _Shard) -> _Rows:
    """This shard's statistics. ``shard_loss``: with label smoothing, the per-position loss of
    the shard's kernel pass with ``label_smoothing=1`` and ``weight``, which is
    ``(W_r lse_r - sum_c w_c y_c) / width``: it yields the shard's ``sum_c w_c y_c``."""
    dt = lse.dtype
    if weight is None:
        w_t: Tensor = keep.to(dt)
        weight_sum: Tensor | float = float(shard.width)
    else:
        w = weight.to(dt)
        w_t = torch.where(local, w[col], 0.0)
        weight_sum = w.sum()
    wy = None
    if shard_loss is not None:
        wy = weight_sum * lse - shard.width * shard_loss.to(dt)
    y_t = torch.where(local, y_col, 0.0)
    return _Rows(keep, local, col, y_col, lse, torch.ones_like(lse), y_t, w_t, wy, weight_sum,
                 shard.classes)


def _position_losses(rows: _Rows, opts: _Options) -> Tensor:
    """``(1 - eps) w_t (lse - y_t) + eps / C (W lse - sum_c w_c y_c) + z lse^2`` where kept."""
    eps = opts.label_smoothing
    loss = (1.0 - eps) * rows.w_t * (rows.lse - rows.y_t) + opts.z_loss * rows.lse ** 2
    if eps:
        assert rows.wy is not None
        loss = loss + eps / rows.classes * (rows.weight_sum * rows.lse - rows.wy)
    return torch.where(rows.keep, loss, 0.0)


def _reduce(per: Tensor, rows: _Rows, reduction: str) -> Tensor:
    if reduction == "none":
        return per
    return per.sum() / rows.w_t.sum() if reduction == "mean" else per.sum()


def _upstream(rows: _Rows, reduction: str) -> Tensor | float:
    """The gradient's per-position scale for an upstream gradient of 1."""
    return 1.0 / rows.w_t.sum() if reduction == "mean" else 1.0


@dataclass
class _Coefficients:
    """``dL/dy_c = a p_c - b [c == t] - s w_c`` per position, for a given upstream gradient."""

    a: Tensor
    b: Tensor
    s: Tensor


def _coefficients(rows: _Rows, u: Tensor | float, opts: _Options) -> _Coefficients:
    eps = opts.label_smoothing
    b = u * (1.0 - eps) * rows.w_t
    a = b + u * (eps / rows.classes * rows.weight_sum + 2.0 * opts.z_loss * rows.lse)
    s = u * (eps / rows.classes) * rows.keep.to(rows.lse.dtype)
    zero = torch.zeros((), dtype=rows.lse.dtype, device=rows.lse.device)
    return _Coefficients(torch.where(rows.keep, a, zero), torch.where(rows.keep, b, zero), s)


def _kernel_target(rows: _Rows) -> Tensor:
    """The target of the gradient pass: ``col``, or the kernel's ignore value."""
    return torch.where(rows.keep, rows.col, _KERNEL_IGNORE)


def _target_fix(rows: _Rows, c: _Coefficients, g: Tensor, cap: float | None) -> Tensor:
    """What to add to the gradient at ``col`` (before the softcap's slope, which is applied
    here): the kernel subtracted its upstream gradient ``g`` there; ``b`` belongs there only
    when the target is local."""
    fix = g - torch.where(rows.local, c.b, 0.0)
    return torch.where(rows.keep, fix * _cap_slope(rows.y_col, cap), 0.0)


# ----------------------------------------------------------------------------- logits shard
def _logit_statistics(x: Tensor, target: Tensor, weight: Tensor | None, shard: _Shard,
                      opts: _Options) -> _Rows:
    """One kernel pass over the shard (its logsumexp, and the smoothing sum), the gathers at the
    targets, then the all-reduces."""
    keep, local, col = _targets(target, shard, opts.ignore_index)
    smoothing = opts.label_smoothing > 0
    shard_loss, lse = _F.cross_entropy(
        x, torch.zeros_like(target), weight if smoothing else None, reduction="none",
        ignore_index=_KERNEL_IGNORE, label_smoothing=1.0 if smoothing else 0.0,
        softcap=opts.softcap, return_lse=True)
    dt = _stats_dtype(x.dtype)
    y_col = _softcapped(x.gather(1, col.unsqueeze(1)).squeeze(1).to(dt), opts.softcap)
    rows = _rows(keep, local, col, y_col, lse.to(dt), shard_loss if smoothing else None,
                 weight, shard)
    _combine(rows, weight, smoothing, opts.group)
    return rows


def _class_view(v: Tensor, ndim: int) -> Tensor:
    """A per-class vector shaped to broadcast along axis 1 of an ``ndim``-d array."""
    return v.reshape(1, -1, *(1,) * (ndim - 2))


def _logit_gradient(x: Tensor, rows: _Rows, c: _Coefficients, weight: Tensor | None,
                    opts: _Options) -> Tensor:
    """The shard's gradient: the kernel's pass, the fix at one entry per position, and label
    smoothing's ``- s w_c`` term (times the softcap's slope, in blocks of positions). With
    ``opts.in_place`` the gradient overwrites ``x``."""
    g = c.a * rows.scale
    grad = _F.cross_entropy(x, _kernel_target(rows), None, reduction="none",
                            ignore_index=_KERNEL_IGNORE, softcap=opts.softcap, grad_output=g,
                            return_grad=True, grad_buffer=x if opts.in_place else None)[1]
    fix = _target_fix(rows, c, g, opts.softcap)
    grad.scatter_add_(1, rows.col.unsqueeze(1), fix.unsqueeze(1).to(grad.dtype))
    if opts.label_smoothing:
        s = c.s.unsqueeze(1).to(grad.dtype)
        w = _class_view(torch.ones(1, dtype=grad.dtype, device=grad.device) if weight is None
                        else weight.to(grad.dtype), grad.dim())
        if opts.softcap is None:
            grad.addcmul_(s, w, value=-1.0)
        else:
            step = max(1, _BLOCK_ELEMENTS // max(1, x[0].numel()))
            for i in range(0, x.shape[0], step):
                slope = torch.tanh(x[i:i + step] / opts.softcap).square_().neg_().add_(1.0)
                grad[i:i + step].addcmul_(slope.mul_(w), s[i:i + step], value=-1.0)
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits sharded along axis 1 (``x`` at least 2-d)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, target: Tensor, weight: Tensor | None, shard: _Shard,
                opts: _Options, want_grad: bool) -> Tensor:
        x = x.detach()
        rows = _logit_statistics(x, target, weight, shard, opts)
        loss = _reduce(_position_losses(rows, opts), rows, opts.reduction).to(x.dtype)
        ctx.set_materialize_grads(False)
        ctx.rows, ctx.opts, ctx.reduction = rows, opts, opts.reduction
        if want_grad and opts.reduction != "none":
            c = _coefficients(rows, _upstream(rows, opts.reduction), opts)
            ctx.save_for_backward(_logit_gradient(x, rows, c, weight, opts))
        elif want_grad:  # each position's upstream gradient is needed: backward computes it
            ctx.save_for_backward(x, weight)
        return loss

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor | None) -> tuple[Tensor | None, ...]:
        if g_loss is None:
            return (None,) * 6
        if ctx.reduction == "none":
            x, weight = ctx.saved_tensors
            c = _coefficients(ctx.rows, g_loss.to(ctx.rows.lse.dtype), ctx.opts)
            return _logit_gradient(x, ctx.rows, c, weight, ctx.opts), *(None,) * 5
        (grad,) = ctx.saved_tensors
        return scaled(grad, g_loss), *(None,) * 5


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100,
                  reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None, inplace_grad: bool = False,
                  process_group: Any) -> Tensor:
    """Cross-entropy of logits sharded along the class axis over ``process_group``.

    Parameters
    ----------
    input : Tensor
        This rank's columns of the logits, ``(C_r,)``, ``(N, C_r)`` or ``(N, C_r, d1, ...)``:
        the ranks' shards, in rank order, make up the ``C`` classes (widths may differ, each at
        least 1).
    target : Tensor
        Class indices into the whole vocabulary (``[0, C)`` or ``ignore_index``), the same on
        every rank, shaped as ``input`` without its class axis.
    weight : Tensor, optional
        This rank's shard of the class weights, ``(C_r,)``.
    size_average, ignore_index, reduce, reduction, label_smoothing
        As in :func:`torch.nn.functional.cross_entropy`.
    z_loss, softcap, inplace_grad
        As in :func:`nblosses.torch.cross_entropy`; ``inplace_grad`` is ignored when label
        smoothing and ``softcap`` are both on (the smoothing term's softcap slope is computed
        from the logits after the kernel's pass).
    process_group : ProcessGroup
        The ranks sharing the vocabulary (``torch.distributed.group.WORLD`` for all; ``None``
        means the default group).

    Returns
    -------
    Tensor
        The loss over the whole vocabulary, the same on every rank; differentiable with respect
        to ``input`` (each rank gets its shard's gradient).

    Raises
    ------
    IndexError
        A target outside ``[0, C)`` that is not ``ignore_index``.
    NotImplementedError
        Probability targets, or a gradient asked for ``target`` or ``weight``.
    ValueError
        A bad reduction, ``weight`` not of this shard's width, or an empty shard.
    """
    opts = _Options(_reduction(size_average, reduce, reduction), ignore_index,
                    float(label_smoothing), float(z_loss), softcap or None, process_group,
                    inplace_grad and not (label_smoothing and softcap))
    squeeze = input.dim() == 1
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    _check_common(t, weight, x.shape[1], opts)
    if tuple(t.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"nblosses.torch.distributed: target shape {tuple(target.shape)} does "
                         f"not match the logits' positions {(x.shape[0], *x.shape[2:])}")
    shard = _shard(x.shape[1], x.device, process_group)
    want_grad = torch.is_grad_enabled() and input.requires_grad
    loss = _VocabParallelCrossEntropy.apply(x, t, weight, shard, opts, want_grad)
    return loss.reshape(()) if squeeze and opts.reduction == "none" else loss


# ----------------------------------------------------------------------------- linear shard
def _linear_statistics(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor,
                       weight: Tensor | None, shard: _Shard, opts: _Options,
                       options: Any) -> tuple[_Rows, Tensor]:
    """As :func:`_logit_statistics`, the logits never formed; also returns the weight rows at
    ``col`` (the fix of the gradient pass needs them)."""
    keep, local, col = _targets(target, shard, opts.ignore_index)
    smoothing = opts.label_smoothing > 0
    shard_loss, lse = _F.linear_cross_entropy(
        x, w, torch.zeros_like(target), linear_bias=b, weight=weight if smoothing else None,
        reduction="none", ignore_index=_KERNEL_IGNORE,
        label_smoothing=1.0 if smoothing else 0.0, options=options, softcap=opts.softcap,
        return_lse=True)
    dt = _stats_dtype(x.dtype)
    w_col = w[col]
    z_col = (x.to(dt) * w_col.to(dt)).sum(1)
    if b is not None:
        z_col = z_col + b[col].to(dt)
    rows = _rows(keep, local, col, _softcapped(z_col, opts.softcap), lse.to(dt),
                 shard_loss if smoothing else None, weight, shard)
    _combine(rows, weight, smoothing, opts.group)
    return rows, w_col


def _linear_gradients(x: Tensor, w: Tensor, b: Tensor | None, w_col: Tensor, rows: _Rows,
                      c: _Coefficients, weight: Tensor | None, opts: _Options, options: Any,
                      sum_input_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(grad_x, grad_w, grad_b)`` of this shard, ``grad_x`` summed over the ranks when
    ``sum_input_grad``.

    With label smoothing, a first kernel call (``label_smoothing=1``, the class weights, upstream
    ``s C_r``) gives ``s W_r p'_c - s w_c`` (``p'`` the shard's softmax, ``W_r`` its weight sum);
    the second (no smoothing, no weights, upstream ``a scale - s W_r``) adds the rest of the
    ``a p_c`` term and subtracts its upstream at ``col``, which the fix then corrects.
    """
    g = c.a * rows.scale
    calls = []
    if opts.label_smoothing:
        local_sum = w.shape[0] if weight is None else weight.to(g.dtype).sum()
        g = g - c.s * local_sum
        calls.append((torch.where(rows.keep, 0, _KERNEL_IGNORE), weight, 1.0,
                      c.s * w.shape[0]))
    calls.append((_kernel_target(rows), None, 0.0, g))
    grads: list[Any] = []
    for target, class_weight, eps, upstream in calls:
        _, out = _F.linear_cross_entropy(
            x, w, target, linear_bias=b, weight=class_weight, reduction="none",
            ignore_index=_KERNEL_IGNORE, label_smoothing=eps, options=options,
            softcap=opts.softcap, grad_output=upstream, return_grad=True)
        grads = list(out) if not grads else [
            None if a is None else a.add_(o) for a, o in zip(grads, out)]
    gx, gw, gb = grads
    fix = _target_fix(rows, c, g, opts.softcap).unsqueeze(1)
    gx.addcmul_(fix.to(gx.dtype), w_col.to(gx.dtype))
    gw.index_add_(0, rows.col, fix.to(gw.dtype) * x.to(gw.dtype))
    if gb is not None:
        gb.index_add_(0, rows.col, fix.squeeze(1).to(gb.dtype))
    if sum_input_grad:
        dist.all_reduce(gx, group=opts.group)
    return gx, gw, gb


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Linear cross-entropy with the weight (and bias) sharded along the vocabulary; ``x``
    ``(N, d)``, replicated."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor,
                weight: Tensor | None, shard: _Shard, opts: _Options, options: Any,
                want_grad: bool) -> Tensor:
        x, w = x.detach(), w.detach()
        b = None if b is None else b.detach()
        rows, w_col = _linear_statistics(x, w, b, target, weight, shard, opts, options)
        loss = _reduce(_position_losses(rows, opts), rows, opts.reduction).to(x.dtype)
        ctx.set_materialize_grads(False)
        ctx.rows, ctx.opts, ctx.options = rows, opts, options
        ctx.sum_input_grad = ctx.needs_input_grad[0]
        if want_grad and opts.reduction != "none":
            c = _coefficients(rows, _upstream(rows, opts.reduction), opts)
            ctx.save_for_backward(*_linear_gradients(x, w, b, w_col, rows, c, weight, opts,
                                                     options, ctx.sum_input_grad))
        elif want_grad:  # each position's upstream gradient is needed: backward computes it
            ctx.save_for_backward(x, w, b, w_col, weight)
        return loss

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor | None) -> tuple[Tensor | None, ...]:
        if g_loss is None:
            return (None,) * 9
        grads: tuple[Tensor | None, ...]
        if ctx.opts.reduction == "none":
            x, w, b, w_col, weight = ctx.saved_tensors
            c = _coefficients(ctx.rows, g_loss.to(ctx.rows.lse.dtype), ctx.opts)
            grads = _linear_gradients(x, w, b, w_col, ctx.rows, c, weight, ctx.opts,
                                      ctx.options, ctx.sum_input_grad)
        else:
            grads = tuple(None if t is None else scaled(t, g_loss) for t in ctx.saved_tensors)
        gx, gw, gb = grads
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                *(None,) * 6)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options: Any = None,
                         z_loss: float = 0.0, softcap: float | None = None,
                         process_group: Any) -> Tensor:
    """Linear cross-entropy (a language-model head) with the vocabulary sharded over
    ``process_group``, never forming the logits.

    Parameters
    ----------
    input : Tensor
        The features, ``(N, d)`` or ``(d,)``, the same on every rank.
    linear_weight : Tensor
        This rank's rows of the output layer's weight, ``(V_r, d)``: the ranks' shards, in rank
        order, make up the ``V`` classes (widths may differ, each at least 1).
    target : Tensor
        Class indices into the whole vocabulary, ``(N,)`` (or ``()``), the same on every rank.
    linear_bias : Tensor, optional
        This rank's shard of the bias, ``(V_r,)``.
    weight : Tensor, optional
        This rank's shard of the class weights, ``(V_r,)``.
    reduction, ignore_index, label_smoothing, options, z_loss, softcap
        As in :func:`nblosses.torch.linear_cross_entropy`.
    process_group : ProcessGroup
        The ranks sharing the vocabulary (``None`` means the default group).

    Returns
    -------
    Tensor
        The loss over the whole vocabulary, the same on every rank; differentiable with respect
        to ``input`` (its gradient summed over the ranks, as the unsharded call gives it),
        ``linear_weight`` and ``linear_bias`` (each rank gets its shard's gradient).

    Raises
    ------
    IndexError
        A target outside ``[0, V)`` that is not ``ignore_index``.
    NotImplementedError
        Probability targets, a K-dimensional ``linear_weight``, or a gradient asked for
        ``target`` or ``weight``.
    ValueError
        Mismatched shapes, a bad reduction, or an empty shard.
    """
    opts = _Options(_reduction(None, None, reduction),
                    -100 if ignore_index is None else ignore_index, float(label_smoothing),
                    float(z_loss), softcap or None, process_group)
    if linear_weight.dim() != 2:
        raise NotImplementedError("nblosses.torch.distributed: linear_weight must be (V_r, d) "
                                  f"(got shape {tuple(linear_weight.shape)})")
    squeeze = input.dim() == 1
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    width = linear_weight.shape[0]
    _check_common(t, weight, width, opts)
    if x.dim() != 2 or x.shape[1] != linear_weight.shape[1] or tuple(t.shape) != x.shape[:1]:
        raise ValueError(f"nblosses.torch.distributed: expected input (N, d), linear_weight "
                         f"(V_r, d) and target (N,), got {tuple(input.shape)}, "
                         f"{tuple(linear_weight.shape)} and {tuple(target.shape)}")
    if linear_bias is not None and tuple(linear_bias.shape) != (width,):
        raise ValueError(f"nblosses.torch.distributed: linear_bias must be ({width},), got "
                         f"{tuple(linear_bias.shape)}")
    shard = _shard(width, x.device, process_group)
    want_grad = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (input, linear_weight, linear_bias))
    loss = _VocabParallelLinearCrossEntropy.apply(x, linear_weight, linear_bias, t, weight,
                                                  shard, opts, options, want_grad)
    return loss.reshape(()) if squeeze and opts.reduction == "none" else loss
