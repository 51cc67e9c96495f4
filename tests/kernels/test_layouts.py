"""Kernel-layout boundaries, against torch: every softmax-family and class-loss op over shapes
that cross the CPU kernels' internal switches (short rows transposed into tiles of rows below
some C, long contiguous rows, middle-axis blocks whose width adapts to the shape, ragged tails,
C = 1). The shapes are chosen by layout, not by the current constants, so they stay meaningful
when those change: row counts below, at and past a 64-row tile with a ragged tail; C from 1
through the mid twenties and beyond; inner extents from 1 to past 4096.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import (
    assert_close,
    param_id,
    rng,
    to_backend,
    to_backend_all,
    torch_loss_and_grad,
    tt,
)

from nblosses import functional as F

ROWS = [1, 63, 64, 130]
CLASSES = [1, 2, 10, 23, 24, 25, 67]
ROW_SHAPES = [(n, c) for n in ROWS for c in CLASSES]
# (outer/N, C, inner): middle-axis blocks, narrow and wide, with ragged tails; (2, 70, 2001):
# slabs too big for softmax's backward to take whole (BACKWARD_SLAB_BYTES), ragged blocks
BLOCK_SHAPES = [(1, 3, 2), (300, 7, 3), (2, 7, 257), (1, 5, 5000), (3, 30, 1100), (2, 1, 9),
                (2, 70, 2001)]






@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", ROW_SHAPES + BLOCK_SHAPES, ids=param_id)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_family_layouts(backend, op, shape, dtype):
    x = (rng(sum(shape)).standard_normal(shape) * 4).astype(dtype)
    x.reshape(-1)[::7] = -np.inf  # masked entries in every layout
    x[(0,) * len(shape)] = 1.0  # ... never a fully masked slice
    g = rng(1).standard_normal(shape).astype(dtype)
    dim = 1
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    xt = tt(x, dtype, requires_grad=True)
    ref = getattr(TF, op)(xt, dim=dim)
    assert_close(out, ref.detach().numpy().astype(dtype), dtype, f"{op} {shape}")
    # backward from torch's own output (masked entries: y = 0 / -inf)
    y = ref.detach().numpy().astype(dtype)
    gx = getattr(F, f"{op}_backward")(*to_backend_all(backend, g, y), dim, backend=backend)
    if op == "softmax":
        ref_g = torch.ops.aten._softmax_backward_data(tt(g, dtype), tt(y, dtype), dim,
                                                      torch.float64)
    else:
        ref_g = torch.ops.aten._log_softmax_backward_data(tt(g, dtype), tt(y, dtype), dim,
                                                          torch.float64)
    assert_close(gx, ref_g.numpy().astype(dtype), dtype, f"{op}_backward {shape}", kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_classes", range(1, 24))
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_short_rows_every_class_count(op, n_classes, dtype):
    """Each C below the tiles' limit, forward and backward: the split kernels compile per
    factorisation of C (10 is read as 2 x 5, 21 as 3 x 7, ...), the primes above 8 take the
    gathering tiles or the row loop; ragged tails, masked entries, a row with a large logit."""
    shape = (130, n_classes)
    x = (rng(n_classes).standard_normal(shape) * 4).astype(dtype)
    x.reshape(-1)[::7] = -np.inf
    x[:, 0] = 1.0  # never a fully masked row
    x[3, -1] = 80.0
    out = getattr(F, op)(x, dim=1, backend="cpu")
    ref = getattr(TF, op)(tt(x, dtype), dim=1).numpy().astype(dtype)
    assert_close(out, ref, dtype, f"{op} C={n_classes}")
    g = rng(n_classes + 1).standard_normal(shape).astype(dtype)
    gx = getattr(F, f"{op}_backward")(g, ref, 1, backend="cpu")
    backward = getattr(torch.ops.aten, f"_{op}_backward_data")
    ref_g = backward(tt(g, dtype), tt(ref, dtype), 1, torch.float64).numpy().astype(dtype)
    assert_close(gx, ref_g, dtype, f"{op}_backward C={n_classes}", kind="grad")


# Every C with the richest options; the other option sets on one C per kind of layout (the
# split kernels compile per factorisation and per option set: all of them for every C cost
# CI several minutes of compilation).
_CE_SHORT_CASES = ([("weighted_smoothed", c) for c in range(1, 24)]
                   + [(case, c) for case in ("plain", "none_reduction") for c in (4, 10, 21, 23)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("case", "n_classes"), _CE_SHORT_CASES)
def test_cross_entropy_short_rows_every_class_count(case, n_classes, dtype):
    """The cross-entropy on each C below the tiles' limit (the split kernels compile per
    factorisation of C, the primes above 8 take the gathering tiles), with its options, its
    lse output and its gradient (also in place); a row with a large logit, ignored targets."""
    shape = (130, n_classes)
    r = rng(n_classes + 50)
    x = (r.standard_normal(shape) * 4).astype(dtype)
    x[3, -1] = 80.0
    t = r.integers(0, n_classes, shape[0])
    kw = {}
    if case == "weighted_smoothed":
        t[::5] = 255
        kw = dict(weight=r.uniform(0.5, 2, n_classes).astype(dtype), label_smoothing=0.15,
                  ignore_index=255)
    elif case == "none_reduction":
        t[::7] = -100
        kw = dict(reduction="none")
    loss, lse = F.cross_entropy(x, t, backend="cpu", return_lse=True, **kw)
    tkw = {k: tt(v, dtype) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    ref = TF.cross_entropy(tt(x, dtype), torch.from_numpy(t), **tkw).numpy().astype(dtype)
    assert_close(loss, ref, dtype, f"cross_entropy {case} C={n_classes}")
    ref_lse = torch.logsumexp(tt(x, dtype), 1).numpy().astype(dtype)
    assert_close(lse, ref_lse, dtype, f"cross_entropy lse C={n_classes}")
    go = r.uniform(-1, 1, shape[0]).astype(dtype) if case == "none_reduction" else None
    _, grad = F.cross_entropy(x, t, backend="cpu", return_grad=True, grad_output=go, **kw)
    _, ref_grad = torch_loss_and_grad(
        lambda xt: TF.cross_entropy(xt, torch.from_numpy(t), **tkw), x, dtype, grad_output=go)
    assert_close(grad, ref_grad.astype(dtype), dtype, f"cross_entropy grad C={n_classes}",
                 kind="grad")
    buf = x.copy()
    _, grad_in_place = F.cross_entropy(buf, t, backend="cpu", return_grad=True, grad_output=go,
                                       grad_buffer=buf, **kw)
    assert grad_in_place is buf
    np.testing.assert_array_equal(buf, grad)


def _targets(shape, ignore_index, seed):
    r = rng(seed)
    t = r.integers(0, shape[1], (shape[0],) + shape[2:])
    t.reshape(-1)[::5] = ignore_index
    return t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", ROW_SHAPES + BLOCK_SHAPES, ids=param_id)
@pytest.mark.parametrize("case", ["plain", "weighted_smoothed", "none_reduction", "probs",
                                  "nll"])
def test_class_losses_layouts(backend, case, shape, dtype):
    r = rng(sum(shape) + 1)
    x = (r.standard_normal(shape) * 3).astype(dtype)
    n_classes = shape[1]
    kw, go = {}, None
    if case == "probs":
        t = np.exp(r.standard_normal(shape))
        t = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
        kw = dict(label_smoothing=0.2, weight=r.uniform(0.5, 2, n_classes).astype(dtype))
    else:
        # "weighted_smoothed": ignore_index 255 (>= C, as in segmentation masks)
        t = _targets(shape, 255 if case == "weighted_smoothed" else -100, seed=sum(shape))
    if case == "weighted_smoothed":
        kw = dict(weight=r.uniform(0.5, 2, n_classes).astype(dtype), label_smoothing=0.15,
                  ignore_index=255)
    if case == "none_reduction":
        kw = dict(reduction="none", label_smoothing=0.05)
        go = r.uniform(-1, 1, (shape[0],) + shape[2:])
    name = "cross_entropy"
    if case == "nll":
        name = "nll_loss"
        x = TF.log_softmax(tt(x), 1).numpy()
        kw = dict(weight=r.uniform(0.5, 2, n_classes).astype(dtype))
    bkw = {k: to_backend(v, backend) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    loss = getattr(F, name)(*to_backend_all(backend, x, t), backend=backend, **bkw)
    loss2, grad = getattr(F, name)(*to_backend_all(backend, x, t), return_grad=True,
                                   grad_output=to_backend(go, backend), backend=backend, **bkw)
    tkw = {k: tt(v, dtype) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    ref, ref_grad = torch_loss_and_grad(
        lambda xt: getattr(TF, name)(xt, tt(t, dtype), **tkw), x, dtype, grad_output=go)
    what = f"{name} {case} {shape}"
    assert_close(loss, ref.astype(dtype), dtype, what)
    assert_close(loss2, ref.astype(dtype), dtype, what + " (return_grad)")
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(130, 10), (130, 67), (2, 7, 257), (1, 5, 5000)], ids=param_id)
def test_in_place_gradient_layouts(backend, shape, dtype):
    """grad_buffer=logits in every layout: the buffer ends up equal to the out-of-place grad."""
    r = rng(7)
    x = (r.standard_normal(shape) * 3).astype(dtype)
    t = _targets(shape, 3, seed=8)
    kw = dict(ignore_index=3, label_smoothing=0.1,
              weight=to_backend(r.uniform(0.5, 2, shape[1]).astype(dtype), backend))
    ref_loss, ref_grad = F.cross_entropy(*to_backend_all(backend, x, t), return_grad=True,
                                         backend=backend, **kw)
    logits = to_backend(x.copy(), backend)
    loss, grad = F.cross_entropy(logits, to_backend(t, backend), return_grad=True,
                                 grad_buffer=logits, backend=backend, **kw)
    assert grad is logits
    assert_close(loss, ref_loss, dtype, f"in-place loss {shape}")
    assert_close(logits, ref_grad, dtype, f"in-place grad {shape}", kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 17, 16384, 16385, 40_000])
def test_binary_losses_lengths(backend, n, dtype):
    """Elementwise kernels run in chunks: lengths around a chunk boundary."""
    r = rng(n)
    x = (r.standard_normal(n) * 4).astype(dtype)
    y = r.uniform(0, 1, n).astype(dtype)
    w = r.uniform(0.5, 2, n).astype(dtype)
    p = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(dtype)
    for name, inp, kw in (("binary_cross_entropy", p, dict(weight=w)),
                          ("binary_cross_entropy_with_logits", x, dict(weight=w, pos_weight=w))):
        bkw = {k: to_backend(v, backend) for k, v in kw.items()}
        for reduction in ("none", "sum"):
            loss, grad = getattr(F, name)(*to_backend_all(backend, inp, y), reduction=reduction,
                                          return_grad=True, backend=backend, **bkw)
            ref, ref_grad = torch_loss_and_grad(
                lambda xt, name=name, reduction=reduction, kw=kw: getattr(TF, name)(
                    xt, tt(y, dtype), reduction=reduction,
                    **{k: tt(v, dtype) for k, v in kw.items()}),
                inp, dtype)
            # with logits, (1-y)x - lw*logsigmoid(x) cancels terms of size |x| (torch's own
            # float32 result is off by as much)
            scale = float(np.abs(x).max()) if name.endswith("logits") else 1.0
            assert_close(loss, ref.astype(dtype), dtype, f"{name} n={n} {reduction}",
                         scale=scale)
            assert_close(grad, ref_grad.astype(dtype), dtype, f"{name} n={n}", kind="grad")
