"""binary_cross_entropy and binary_cross_entropy_with_logits against torch: forward, gradients
(``return_grad`` / ``grad_output``), weight and pos_weight broadcasting, clamped logs at 0 and
1, large logits, empty inputs and legacy ``size_average`` / ``reduce``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import (
    LEGACY,
    assert_close,
    is_backend_array,
    param_id,
    rng,
    to_backend,
    to_backend_all,
    torch_loss_and_grad,
    tt,
    with_warnings,
)

from nblosses import functional as F

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = ["float32", "float64", "float16"]
# (input shape, weight shape or None): weights of the full shape and broadcast ones.
WEIGHT_CASES = [((), None), ((7,), None), ((7,), (7,)), ((4, 9), None), ((4, 9), (9,)),
                ((4, 9), (4, 1)), ((4, 9), (1,)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (2, 3, 4)),
                ((3, 20_000), (20_000,))]






def _ref(op, x, y, dtype, grad_output=None, **kw):
    fn = getattr(TF, op)
    kw = {k: (tt(v, dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    return torch_loss_and_grad(lambda xt: fn(xt, tt(y, dtype), **kw), x, dtype,
                               grad_output=grad_output)


def _grad_output(reduction, shape, seed=0):
    return rng(seed + 50).uniform(-1.5, 1.5, shape) if reduction == "none" else 0.7


def _check(backend, dtype, reduction, what, loss, grad, ref, ref_grad, scale=1.0):
    assert is_backend_array(loss, backend) and is_backend_array(grad, backend)
    if reduction != "none":
        assert loss.shape == ()
    assert_close(loss, ref.astype(dtype), dtype, what, scale=scale)
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")


# ----------------------------------------------------------------------------- BCE
def _bce_data(shape, dtype, seed, soft):
    r = rng(seed)
    x = np.asarray(1 / (1 + np.exp(-r.standard_normal(shape) * 2))).astype(dtype)
    y = np.asarray(r.uniform(0, 1, shape) if soft else r.integers(0, 2, shape)).astype(dtype)
    return x, y


def _not_fp16_overflow(cases):
    """(dtype, *case) combinations, without float16 for the long arrays (their sums overflow
    float16's range, which says nothing about the kernel)."""
    return [(d, *c) for d in DTYPES for c in cases
            if not (d == "float16" and np.prod(c[0], dtype=np.int64) > 10_000)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype,shape,wshape", _not_fp16_overflow(WEIGHT_CASES), ids=param_id)
def test_bce_matches_torch(backend, dtype, reduction, soft, shape, wshape):
    x, y = _bce_data(shape, dtype, seed=len(shape), soft=soft)
    w = None if wshape is None else rng(1).uniform(0.2, 2, wshape).astype(dtype)
    loss = F.binary_cross_entropy(*to_backend_all(backend, x, y), weight=to_backend(w, backend),
                                  reduction=reduction, backend=backend)
    go = _grad_output(reduction, shape)
    loss2, grad = F.binary_cross_entropy(*to_backend_all(backend, x, y),
                                         weight=to_backend(w, backend),
                                         reduction=reduction, return_grad=True,
                                         grad_output=to_backend(np.asarray(go), backend),
                                         backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy", x, y, dtype, grad_output=go, weight=w,
                         reduction=reduction)
    what = f"bce {shape} w={wshape} {reduction}"
    _check(backend, dtype, reduction, what, loss2, grad, ref, ref_grad)
    assert_close(loss, ref.astype(dtype), dtype, what + " (no grad)")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_input_exactly_zero_and_one_is_finite(backend, dtype, reduction):
    """log is clamped at -100 (torch): x in {0, 1} gives finite losses and gradients."""
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0], dtype)
    y = np.array([0.0, 1.0, 1.0, 0.0, 0.3, 0.5, 0.25], dtype)
    loss, grad = F.binary_cross_entropy(*to_backend_all(backend, x, y), reduction=reduction,
                                        return_grad=True, backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy", x, y, dtype, reduction=reduction)
    assert np.isfinite(ref).all()
    _check(backend, dtype, reduction, f"bce at 0/1 {reduction}", loss, grad, ref, ref_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_empty(backend, reduction):
    x = np.zeros((0, 3))
    loss, grad = F.binary_cross_entropy(*to_backend_all(backend, x, x), reduction=reduction,
                                        return_grad=True, backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy", x, x, "float64", reduction=reduction)
    assert_close(loss, ref, "float64", f"bce empty {reduction}")
    assert_close(grad, ref_grad, "float64", "bce empty grad", kind="grad")


# ----------------------------------------------------------------------------- BCE with logits
# (input shape, weight shape, pos_weight shape); pos_weight broadcasts along the last dims.
LOGIT_CASES = [
    ((), None, None), ((7,), None, (7,)), ((4, 9), None, None), ((4, 9), (9,), None),
    ((4, 9), None, (9,)), ((4, 9), (4, 1), (9,)), ((2, 3, 4), None, (4,)),
    ((2, 3, 4), (2, 3, 4), (3, 4)), ((2, 3, 4), None, (1,)), ((3, 20_000), None, (20_000,)),
]


def _logit_data(shape, dtype, seed, scale=3.0):
    r = rng(seed)
    x = np.asarray(r.standard_normal(shape) * scale).astype(dtype)
    y = np.asarray(r.uniform(0, 1, shape)).astype(dtype)
    return x, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype,shape,wshape,pwshape", _not_fp16_overflow(LOGIT_CASES),
                         ids=param_id)
def test_bce_with_logits_matches_torch(backend, dtype, reduction, shape, wshape, pwshape):
    x, y = _logit_data(shape, dtype, seed=len(shape) + 3)
    w = None if wshape is None else rng(4).uniform(0.2, 2, wshape).astype(dtype)
    pw = None if pwshape is None else rng(5).uniform(0.2, 4, pwshape).astype(dtype)
    loss = F.binary_cross_entropy_with_logits(*to_backend_all(backend, x, y),
                                              weight=to_backend(w, backend),
                                              pos_weight=to_backend(pw, backend),
                                              reduction=reduction, backend=backend)
    go = _grad_output(reduction, shape)
    loss2, grad = F.binary_cross_entropy_with_logits(
        *to_backend_all(backend, x, y), weight=to_backend(w, backend),
        pos_weight=to_backend(pw, backend), reduction=reduction, return_grad=True,
        grad_output=to_backend(np.asarray(go), backend), backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy_with_logits", x, y, dtype, grad_output=go,
                         weight=w, pos_weight=pw, reduction=reduction)
    what = f"bce_with_logits {shape} w={wshape} pw={pwshape} {reduction}"
    # (1-y)x - lw*logsigmoid(x) cancels terms of size |x|: absolute error ~ ulp(max |x|)
    scale = max(1.0, float(np.abs(x.astype(np.float64)).max(initial=0.0)))
    _check(backend, dtype, reduction, what, loss2, grad, ref, ref_grad, scale=scale)
    assert_close(loss, ref.astype(dtype), dtype, what + " (no grad)", scale=scale)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
@pytest.mark.parametrize("with_pos_weight", [False, True])
def test_bce_with_logits_large_logits(backend, dtype, reduction, magnitude, with_pos_weight):
    """Stable log-sigmoid: |x| = 100 or 1e4 gives finite, exact losses and gradients."""
    x = np.array([magnitude, -magnitude] * 3, dtype).reshape(3, 2)
    y = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.8]], dtype)
    pw = np.array([2.5, 0.5], dtype) if with_pos_weight else None
    loss, grad = F.binary_cross_entropy_with_logits(
        *to_backend_all(backend, x, y), pos_weight=to_backend(pw, backend), reduction=reduction,
        return_grad=True, backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy_with_logits", x, y, dtype, pos_weight=pw,
                         reduction=reduction)
    assert np.isfinite(ref).all()
    _check(backend, dtype, reduction, f"bce_with_logits |x|={magnitude} {reduction}", loss, grad,
           ref, ref_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_empty(backend, reduction):
    x = np.zeros((0, 3))
    loss, grad = F.binary_cross_entropy_with_logits(*to_backend_all(backend, x, x),
                                                    reduction=reduction,
                                                    pos_weight=to_backend(np.ones(3), backend),
                                                    return_grad=True, backend=backend)
    ref, ref_grad = _ref("binary_cross_entropy_with_logits", x, x, "float64",
                         reduction=reduction, pos_weight=np.ones(3))
    assert_close(loss, ref, "float64", f"bce_with_logits empty {reduction}")
    assert_close(grad, ref_grad, "float64", "bce_with_logits empty grad", kind="grad")


def test_default_grad_output(backend):
    x, y = _logit_data((4, 6), "float64", seed=6)
    p = 1 / (1 + np.exp(-x))
    for reduction in REDUCTIONS:
        for op, inp in (("binary_cross_entropy_with_logits", x), ("binary_cross_entropy", p)):
            loss, grad = getattr(F, op)(*to_backend_all(backend, inp, y), reduction=reduction,
                                        return_grad=True, backend=backend)
            ref, ref_grad = _ref(op, inp, y, "float64", reduction=reduction)
            assert_close(loss, ref, "float64", f"{op} {reduction}")
            assert_close(grad, ref_grad, "float64", f"{op} {reduction} grad", kind="grad")


# ----------------------------------------------------------------------------- legacy arguments




@pytest.mark.parametrize("op", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=param_id)
def test_legacy_size_average_reduce(backend, op, size_average, reduce):
    x, y = _bce_data((4, 5), "float64", seed=7, soft=True)
    w = rng(8).uniform(0.5, 1.5, (5,))
    ref, ref_warn = with_warnings(
        lambda: getattr(TF, op)(tt(x), tt(y), weight=tt(w), size_average=size_average,
                                reduce=reduce).numpy())
    out, warn = with_warnings(
        lambda: getattr(F, op)(*to_backend_all(backend, x, y), weight=to_backend(w, backend),
                               size_average=size_average, reduce=reduce, backend=backend))
    assert bool(warn) == bool(ref_warn), (
        f"torch warns: {[str(m.message) for m in ref_warn]}; nblosses: "
        f"{[str(m.message) for m in warn]}")
    if ref_warn:
        assert str(warn[0].message) == str(ref_warn[0].message)  # torch's text
        assert warn[0].filename == __file__, "the warning should point at the caller's line"
    assert_close(out, ref, "float64", f"{op} size_average={size_average} reduce={reduce}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_tiny_and_near_one_inputs(backend, dtype):
    """Subnormal and smallest-normal inputs (log > -100 for some), and the largest values below
    1, whose log(1 - x) is finite and > -100."""
    fi = np.finfo(dtype)
    x = np.array([fi.tiny, fi.tiny / 4, fi.smallest_subnormal, 1e-30, 1e-40, 1e-44,
                  1 - fi.epsneg, 1 - 2 * fi.epsneg, 1 - 1e-6, 1e-6], dtype)
    y = np.tile(np.array([1.0, 0.0], dtype), 5)
    y2 = 1 - y
    for target in (y, y2):
        loss = F.binary_cross_entropy(*to_backend_all(backend, x, target), reduction="none",
                                      backend=backend)
        ref, _ = _ref("binary_cross_entropy", x, target, dtype, reduction="none")
        assert np.isfinite(ref).all()
        assert_close(loss, ref.astype(dtype), dtype, f"bce tiny/near-one inputs {dtype}")


def _ulps(got, ref64):
    """``|got - ref64|`` in units in the last place of ``ref64`` rounded to float32."""
    ulp = np.spacing(np.abs(ref64.astype(np.float32))).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref64) / ulp


#: The per-element error bound of float32 BCE on the CPU, in ulp of the correctly rounded loss
#: (its logs are float64 and rounded once, so only that rounding remains); torch computes
#: them in float32 (0.8 ulp at hard labels, 1.3-5.7 at soft ones, measured by the test below).
BCE_FLOAT32_ULPS = 0.51


@pytest.mark.parametrize("y", [0.0, 1.0, 0.25, 0.5, 0.9])
def test_bce_float32_error_bound_in_ulp(y):
    """Per-element float32 losses within :data:`BCE_FLOAT32_ULPS` of the loss computed in
    float64 and at least as close as torch's, over inputs spread over (0, 1): log-uniform down
    to the subnormals, geometric towards 1, the last 2^14 floats below 1, 0 and 1."""
    g = np.random.default_rng(7)
    x = np.concatenate([np.exp(g.uniform(np.log(1e-45), 0, 200_000)),
                        1 - np.exp(g.uniform(np.log(6e-8), 0, 200_000)),
                        1 - np.arange(1, 1 << 14) * 2.0**-24, [0.0, 1.0, 0.5]])
    x = np.clip(x.astype(np.float32), 0, 1)
    target = np.full_like(x, y)
    x64, y = x.astype(np.float64), float(np.float32(y))  # the float32 target's value
    with np.errstate(divide="ignore"):
        ref = -(y * np.maximum(np.log(x64), -100) + (1 - y) * np.maximum(np.log1p(-x64), -100))
    ours = _ulps(F.binary_cross_entropy(x, target, reduction="none", backend="cpu"), ref)
    theirs = _ulps(TF.binary_cross_entropy(torch.from_numpy(x), torch.from_numpy(target),
                                           reduction="none").numpy(), ref)
    worst = int(np.argmax(ours))
    assert ours[worst] <= BCE_FLOAT32_ULPS, f"{ours[worst]:.3f} ulp at x={x[worst]!r}, y={y}"
    assert ours.max() <= theirs.max(), (ours.max(), theirs.max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_with_logits_large_logits_relative_error(dtype):
    """Target 1 and logits 5..40: the loss is log1p(exp(-x)), down to 4e-18. It must keep its
    relative accuracy, which an ``(1 + e) - 1`` folded by fast-math reassociation lost (0 for
    float32 logits of 20, 17% off at 15)."""
    x = np.linspace(5, 40, 20_001).astype(dtype)
    loss = F.binary_cross_entropy_with_logits(x, np.ones_like(x), reduction="none",
                                              backend="cpu")
    ref = np.log1p(np.exp(-x.astype(np.float64)))
    rel = np.abs(loss.astype(np.float64) - ref) / ref
    bound = 4 * np.finfo(dtype).eps
    assert rel.max() <= bound, f"{rel.max():.3g} at x={x[np.argmax(rel)]!r}"
