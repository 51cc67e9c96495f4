"""nll_loss and cross_entropy (class indices and class probabilities) against torch: forward,
``return_grad`` / ``grad_output`` gradients against autograd, ``grad_buffer`` (separate and
in-place), empty batches, legacy ``size_average`` / ``reduce`` and integer target dtypes."""

from __future__ import annotations

import itertools

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
    to_numpy,
    torch_loss_and_grad,
    tt,
    with_warnings,
)

from nblosses import functional as F

C = 5
# (C,) with a 0-d target; (N, C); (N, C, d1); (N, C, d1, d2); and an inner extent > 256 so the
# block layout has a full block plus a ragged one.
SHAPES = [(C,), (6, C), (4, C, 3), (3, C, 4, 2), (2, C, 300)]
REDUCTIONS = ["none", "mean", "sum"]
IGNORES = ["none", "class2", "neg1"]
SMOOTHING = [0.0, 0.1, 1.0]


def _target_shape(shape):
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


def make_case(shape, dtype, weighted, ignore, seed=0):
    """Logits, index targets, weight and ignore_index for one case of the matrix."""
    r = rng(seed)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (r.standard_normal(shape) * 2).astype(dtype)
    t = np.asarray(r.integers(0, n_classes, size=_target_shape(shape)))
    ignore_index = -100
    if ignore == "class2":  # a valid class index used as ignore_index
        ignore_index = 2
        t.reshape(-1)[::3] = 2
    elif ignore == "neg1":
        ignore_index = -1
        t.reshape(-1)[::3] = -1
    w = r.uniform(0.2, 2.0, n_classes).astype(dtype) if weighted else None
    return x, t, w, ignore_index


def make_probs(shape, dtype, seed=0):
    r = rng(seed)
    x = (r.standard_normal(shape) * 2).astype(dtype)
    cdim = 0 if len(shape) == 1 else 1
    p = np.exp(r.standard_normal(shape))
    p = (p / p.sum(axis=cdim, keepdims=True)).astype(dtype)
    return x, p


def grad_output_for(reduction, loss_shape, seed=0):
    if reduction == "none":
        return rng(seed + 100).uniform(-1.5, 1.5, loss_shape)
    return 0.7


def _ref(op, x, t, dtype, *, grad_output=None, **kw):
    fn = getattr(TF, op)
    kw = {k: (tt(v, dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    return torch_loss_and_grad(lambda xt: fn(xt, tt(t, dtype), **kw), x, dtype,
                               grad_output=grad_output)


def to_backend_all(backend, *arrays):
    return [to_backend(a, backend) for a in arrays]


def _check_loss(loss, ref, dtype, backend, reduction, what):
    assert is_backend_array(loss, backend), type(loss)
    if reduction != "none":
        assert loss.shape == (), f"{what}: reduced loss must be 0-d, got shape {loss.shape}"
    assert_close(loss, ref.astype(dtype), dtype, what)


# ----------------------------------------------------------------------------- index targets
CE_MATRIX = list(itertools.product(SHAPES, [False, True], IGNORES, SMOOTHING, REDUCTIONS))
NLL_MATRIX = list(itertools.product(SHAPES, [False, True], IGNORES, REDUCTIONS))




@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,weighted,ignore,eps,reduction", CE_MATRIX, ids=param_id)
def test_cross_entropy_forward_and_grad(backend, dtype, shape, weighted, ignore, eps, reduction):
    x, t, w, ii = make_case(shape, dtype, weighted, ignore, seed=len(shape))
    kw = dict(weight=to_backend(w, backend), ignore_index=ii, reduction=reduction,
              label_smoothing=eps, backend=backend)
    go = grad_output_for(reduction, _target_shape(shape))
    loss = F.cross_entropy(*to_backend_all(backend, x, t), **kw)  # forward-only kernel path
    loss2, grad = F.cross_entropy(*to_backend_all(backend, x, t), return_grad=True,
                                  grad_output=to_backend(np.asarray(go), backend), **kw)
    ref, ref_grad = _ref("cross_entropy", x, t, dtype, grad_output=go, weight=w, ignore_index=ii,
                         reduction=reduction, label_smoothing=eps)
    what = f"cross_entropy {shape} w={weighted} ignore={ignore} eps={eps} {reduction}"
    _check_loss(loss, ref, dtype, backend, reduction, what)
    _check_loss(loss2, ref, dtype, backend, reduction, what + " (return_grad)")
    assert is_backend_array(grad, backend)
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")
    _assert_ignored_grad_zero(grad, t, ii, what)


def _assert_ignored_grad_zero(grad, t, ignore_index, what):
    g = to_numpy(grad)
    ignored = np.asarray(t) == ignore_index
    if not ignored.any():
        return
    g_cls = np.moveaxis(g, 0 if g.ndim == 1 else 1, -1)  # (..., C)
    sel = g_cls[ignored] if g.ndim > 1 else g_cls[None]
    assert (sel == 0).all(), f"{what}: gradient at ignored positions is not exactly 0: {sel}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,weighted,ignore,reduction", NLL_MATRIX, ids=param_id)
def test_nll_loss_forward_and_grad(backend, dtype, shape, weighted, ignore, reduction):
    x, t, w, ii = make_case(shape, dtype, weighted, ignore, seed=len(shape) + 1)
    logp = torch.log_softmax(torch.from_numpy(x), dim=0 if len(shape) == 1 else 1).numpy()
    loss = F.nll_loss(*to_backend_all(backend, logp, t), weight=to_backend(w, backend),
                      ignore_index=ii, reduction=reduction, backend=backend)
    go = grad_output_for(reduction, _target_shape(shape))
    loss2, grad = F.nll_loss(*to_backend_all(backend, logp, t), weight=to_backend(w, backend),
                             ignore_index=ii, reduction=reduction, return_grad=True,
                             grad_output=to_backend(np.asarray(go), backend), backend=backend)
    ref, ref_grad = _ref("nll_loss", logp, t, dtype, grad_output=go, weight=w, ignore_index=ii,
                         reduction=reduction)
    what = f"nll_loss {shape} w={weighted} ignore={ignore} {reduction}"
    _check_loss(loss, ref, dtype, backend, reduction, what)
    _check_loss(loss2, ref, dtype, backend, reduction, what + " (return_grad)")
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")
    _assert_ignored_grad_zero(grad, t, ii, what)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("shape", [(6, C), (3, C, 4, 2)], ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_default_grad_output(backend, op, shape, reduction):
    """Without grad_output: 1 for reduced losses, ones for "none"."""
    x, t, w, ii = make_case(shape, "float64", True, "class2", seed=3)
    loss, grad = getattr(F, op)(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                                ignore_index=ii, reduction=reduction, return_grad=True,
                                backend=backend)
    ref, ref_grad = _ref(op, x, t, "float64", weight=w, ignore_index=ii, reduction=reduction)
    assert_close(loss, ref, "float64", f"{op} loss")
    assert_close(grad, ref_grad, "float64", f"{op} default grad_output", kind="grad")


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("shape", [(6, C), (3, C, 4, 2), (C,)], ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(backend, op, shape, reduction, weighted):
    """All targets ignored: NaN for mean, 0 for sum, zeros for none; the gradient is 0."""
    x, t, w, _ = make_case(shape, "float64", weighted, "none", seed=4)
    t = np.full_like(t, -100)
    loss, grad = getattr(F, op)(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                                reduction=reduction, return_grad=True, backend=backend)
    ref, ref_grad = _ref(op, x, t, "float64", weight=w, reduction=reduction)
    if reduction == "mean":
        assert np.isnan(ref)
    assert_close(loss, ref, "float64", f"{op} all ignored {reduction}")
    assert_close(grad, ref_grad, "float64", f"{op} all ignored grad", kind="grad")
    assert (to_numpy(grad) == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(6, C), (4, C, 3)], ids=param_id)
def test_cross_entropy_smoothing_with_weight_and_ignore_large_logits(backend, dtype, shape):
    """Label smoothing's S term cancels large terms; with |x| ~ 1e3 it must still match."""
    x, t, w, ii = make_case(shape, dtype, True, "class2", seed=5)
    x = (x * 500).astype(dtype)
    for reduction in REDUCTIONS:
        loss, grad = F.cross_entropy(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                                     ignore_index=ii, label_smoothing=0.2, reduction=reduction,
                                     return_grad=True, backend=backend)
        ref, ref_grad = _ref("cross_entropy", x, t, dtype, weight=w, ignore_index=ii,
                             label_smoothing=0.2, reduction=reduction)
        assert_close(loss, ref.astype(dtype), dtype, f"ce large {reduction}", scale=1e3)
        assert_close(grad, ref_grad.astype(dtype), dtype, f"ce large grad {reduction}",
                     kind="grad")


# ----------------------------------------------------------------------------- float16 inputs
@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("shape", [(6, C), (4, C, 3)], ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float16_input_computed_in_float32(backend, op, shape, reduction):
    """float16 in -> float16 loss and gradient (computed in float32 on the CPU)."""
    x, t, w, ii = make_case(shape, "float16", True, "class2", seed=6)
    kw = dict(weight=w, ignore_index=ii, reduction=reduction)
    if op == "cross_entropy":
        kw["label_smoothing"] = 0.1
    loss = getattr(F, op)(*to_backend_all(backend, x, t), backend=backend,
                          **dict(kw, weight=to_backend(w, backend)))
    loss2, grad = getattr(F, op)(*to_backend_all(backend, x, t), backend=backend, return_grad=True,
                                 **dict(kw, weight=to_backend(w, backend)))
    ref, ref_grad = _ref(op, x, t, "float16", **kw)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    assert_close(loss, ref.astype(np.float16), "float16", f"{op} fp16 {reduction}")
    assert_close(loss2, ref.astype(np.float16), "float16", f"{op} fp16 {reduction}")
    assert_close(grad, ref_grad.astype(np.float16), "float16", f"{op} fp16 grad", kind="grad")


@pytest.mark.parametrize("shape", [(6, C), (4, C, 3)], ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float16_probability_targets(backend, shape, reduction):
    x, p = make_probs(shape, "float16", seed=7)
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, p), reduction=reduction,
                                 return_grad=True, backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, p, "float16", reduction=reduction)
    assert_close(loss, ref.astype(np.float16), "float16", f"ce probs fp16 {reduction}")
    assert_close(grad, ref_grad.astype(np.float16), "float16", "ce probs fp16 grad", kind="grad")


# ----------------------------------------------------------------------------- probability targets
PROB_MATRIX = list(itertools.product(SHAPES, [False, True], SMOOTHING, REDUCTIONS))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,weighted,eps,reduction", PROB_MATRIX, ids=param_id)
def test_cross_entropy_probability_targets(backend, dtype, shape, weighted, eps, reduction):
    x, p = make_probs(shape, dtype, seed=8 + len(shape))
    w = rng(9).uniform(0.2, 2.0, C).astype(dtype) if weighted else None
    loss = F.cross_entropy(*to_backend_all(backend, x, p), weight=to_backend(w, backend),
                           label_smoothing=eps, reduction=reduction, backend=backend)
    go = grad_output_for(reduction, _target_shape(shape))
    loss2, grad = F.cross_entropy(*to_backend_all(backend, x, p), weight=to_backend(w, backend),
                                  label_smoothing=eps, reduction=reduction, return_grad=True,
                                  grad_output=to_backend(np.asarray(go), backend),
                                  backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, p, dtype, grad_output=go, weight=w,
                         label_smoothing=eps, reduction=reduction)
    what = f"cross_entropy probs {shape} w={weighted} eps={eps} {reduction}"
    _check_loss(loss, ref, dtype, backend, reduction, what)
    _check_loss(loss2, ref, dtype, backend, reduction, what + " (return_grad)")
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")


def test_probability_targets_need_not_be_normalised(backend):
    r = rng(10)
    x = r.standard_normal((5, C))
    p = r.uniform(0, 2, (5, C))
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, p), return_grad=True, backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, p, "float64")
    assert_close(loss, ref, "float64", "unnormalised probs")
    assert_close(grad, ref_grad, "float64", "unnormalised probs grad", kind="grad")


# ----------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["nll_loss", "cross_entropy", "cross_entropy_probs",
                                  "cross_entropy_nd"])
def test_empty_batch(backend, case, reduction):
    shape = (0, C, 3) if case == "cross_entropy_nd" else (0, C)
    x = np.zeros(shape)
    if case == "cross_entropy_probs":
        t = np.zeros(shape)
    else:
        t = np.zeros(_target_shape(shape), np.int64)
    op = "nll_loss" if case == "nll_loss" else "cross_entropy"
    loss = getattr(F, op)(*to_backend_all(backend, x, t), reduction=reduction, backend=backend)
    loss2, grad = getattr(F, op)(*to_backend_all(backend, x, t), reduction=reduction,
                                 return_grad=True, backend=backend)
    ref, ref_grad = _ref(op, x, t, "float64", reduction=reduction)
    assert_close(loss, ref, "float64", f"{case} N=0 {reduction}")
    assert_close(loss2, ref, "float64", f"{case} N=0 {reduction} (return_grad)")
    assert_close(grad, ref_grad, "float64", f"{case} N=0 grad", kind="grad")


# ----------------------------------------------------------------------------- legacy arguments




@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=param_id)
def test_legacy_size_average_reduce(backend, op, size_average, reduce):
    x, t, w, _ = make_case((6, C), "float64", True, "none", seed=11)
    ref, ref_warn = with_warnings(
        lambda: getattr(TF, op)(tt(x), tt(t), weight=tt(w), size_average=size_average,
                                reduce=reduce).numpy())
    out, warn = with_warnings(
        lambda: getattr(F, op)(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                               size_average=size_average, reduce=reduce, backend=backend))
    assert bool(warn) == bool(ref_warn), (
        f"torch warns: {[str(w.message) for w in ref_warn]}; nblosses: "
        f"{[str(w.message) for w in warn]}")
    if ref_warn:
        assert str(warn[0].message) == str(ref_warn[0].message)  # torch's text
        assert warn[0].filename == __file__, "the warning should point at the caller's line"
    assert_close(out, ref, "float64", f"{op} size_average={size_average} reduce={reduce}")


# ----------------------------------------------------------------------------- target dtypes
@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("tdtype", ["int32", "int16", "uint8", "int64"])
def test_integer_target_dtypes(backend, op, tdtype):
    x, t, w, _ = make_case((6, C, 2), "float64", True, "none", seed=12)
    loss, grad = getattr(F, op)(*to_backend_all(backend, x, t.astype(tdtype)),
                                weight=to_backend(w, backend), return_grad=True, backend=backend)
    ref, ref_grad = _ref(op, x, t, "float64", weight=w)  # torch takes int64 only
    assert_close(loss, ref, "float64", f"{op} {tdtype} target")
    assert_close(grad, ref_grad, "float64", f"{op} {tdtype} target grad", kind="grad")


def test_0d_target_for_1d_input(backend):
    x = rng(13).standard_normal(C)
    for t in (np.array(3), np.int64(3)):
        loss = F.cross_entropy(to_backend(x, backend), to_backend(np.asarray(t), backend),
                               backend=backend)
        assert_close(loss, TF.cross_entropy(tt(x), torch.tensor(3)).numpy(), "float64", "0-d")


# ----------------------------------------------------------------------------- grad_buffer
BUFFER_CASES = [
    ("cross_entropy", (6, C), dict()),
    ("cross_entropy", (6, C), dict(label_smoothing=0.1, ignore_index=2, weight=True)),
    ("cross_entropy", (3, C, 4, 2), dict(label_smoothing=0.1, ignore_index=2, weight=True)),
    ("cross_entropy", (2, C, 300), dict(reduction="sum", ignore_index=2)),
    ("cross_entropy_probs", (6, C), dict(label_smoothing=0.1, weight=True)),
    ("cross_entropy_probs", (3, C, 4, 2), dict(weight=True)),
    ("nll_loss", (6, C), dict(ignore_index=2, weight=True)),
    ("nll_loss", (3, C, 4, 2), dict(reduction="sum", ignore_index=2)),
    ("cross_entropy", (C,), dict()),
]


def _buffer_call(backend, case, shape, opts, dtype, seed):
    x, t, w, _ = make_case(shape, dtype, opts.get("weight", False), "class2", seed=seed)
    if case == "cross_entropy_probs":
        x, t = make_probs(shape, dtype, seed=seed)
    kw = dict(opts)
    kw["weight"] = to_backend(w, backend) if opts.get("weight") else None
    op = "nll_loss" if case == "nll_loss" else "cross_entropy"
    return getattr(F, op), x, to_backend(t, backend), kw


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case,shape,opts", BUFFER_CASES, ids=param_id)
def test_grad_buffer_separate(backend, dtype, case, shape, opts):
    fn, x, t, kw = _buffer_call(backend, case, shape, opts, dtype, seed=14)
    xb = to_backend(x, backend)
    ref_loss, ref_grad = fn(xb, t, return_grad=True, backend=backend, **kw)
    buf = to_backend(np.full(x.shape, 123.0, dtype), backend)  # garbage: must be overwritten
    loss, grad = fn(xb, t, return_grad=True, grad_buffer=buf, backend=backend, **kw)
    assert grad is buf, "the gradient must be returned in the caller's buffer"
    assert_close(loss, ref_loss, dtype, f"{case} loss with grad_buffer")
    assert_close(buf, ref_grad, dtype, f"{case} grad_buffer contents", kind="grad")
    assert_close(xb, x, dtype, "input untouched by grad_buffer=separate")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case,shape,opts", BUFFER_CASES, ids=param_id)
def test_grad_buffer_in_place(backend, dtype, case, shape, opts):
    """grad_buffer=logits: the logits array holds the gradient afterwards, equal to the
    out-of-place gradient, and the loss is unchanged."""
    fn, x, t, kw = _buffer_call(backend, case, shape, opts, dtype, seed=15)
    ref_loss, ref_grad = fn(to_backend(x.copy(), backend), t, return_grad=True, backend=backend,
                            **kw)
    logits = to_backend(x.copy(), backend)
    loss, grad = fn(logits, t, return_grad=True, grad_buffer=logits, backend=backend, **kw)
    assert grad is logits
    assert_close(loss, ref_loss, dtype, f"{case} loss computed in place")
    assert_close(logits, ref_grad, dtype, f"{case} in-place gradient", kind="grad")
    # and torch agrees with the out-of-place gradient
    op = "nll_loss" if case == "nll_loss" else "cross_entropy"
    tk = {k: (to_numpy(v) if v is not None and not isinstance(v, (int, float, str)) else v)
          for k, v in kw.items()}
    _, tgrad = _ref(op, x, to_numpy(t), dtype, **tk)
    assert_close(logits, tgrad.astype(dtype), dtype, f"{case} in-place vs torch", kind="grad")


# ----------------------------------------------------------------------------- special values
SPECIAL_LAYOUTS = [(4, C), (4, C, 3)]


def _special_logits(shape, dtype):
    """Row 0: a masked (-inf) non-target logit; row 1: NaN; row 2: +inf; row 3: a finite row.
    Targets: row 0's target is finite. For the 3-d layout every spatial position gets it."""
    x = (rng(30).standard_normal(shape) * 2).astype(dtype)
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    t[0] = 0
    x[0, 1] = -np.inf
    x[1, 2] = np.nan
    x[2, 3] = np.inf
    t[3] = 4
    return x, t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SPECIAL_LAYOUTS, ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_special_logits(backend, dtype, shape, reduction, eps):
    """NaN / +inf logits make their row NaN; a masked (-inf) logit is fine without smoothing and
    makes the loss inf with it (torch: -sum(logp) over all classes)."""
    x, t = _special_logits(shape, dtype)
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, t), reduction=reduction,
                                 label_smoothing=eps, return_grad=True, backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, t, dtype, reduction=reduction, label_smoothing=eps)
    assert_close(loss, ref.astype(dtype), dtype, f"ce special {reduction} eps={eps}")
    assert_close(grad, ref_grad.astype(dtype), dtype, f"ce special grad eps={eps}", kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SPECIAL_LAYOUTS, ids=param_id)
def test_cross_entropy_masked_target_is_inf(backend, dtype, shape):
    x, t = _special_logits(shape, dtype)
    t[0] = 1  # the masked class is the target: -log(0) = inf
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, t), reduction="none", return_grad=True,
                                 backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, t, dtype, reduction="none")
    assert np.isinf(ref[0]).all()
    assert_close(loss, ref.astype(dtype), dtype, "ce masked target")
    assert_close(grad, ref_grad.astype(dtype), dtype, "ce masked target grad", kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SPECIAL_LAYOUTS, ids=param_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_special_logits(backend, dtype, shape, reduction):
    """With probability targets, a masked logit with probability 0 gives 0 * -inf = NaN (torch)."""
    x, _ = _special_logits(shape, dtype)
    _, p = make_probs(shape, dtype, seed=31)
    p[0, 1] = 0
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, p), reduction=reduction,
                                 return_grad=True, backend=backend)
    ref, ref_grad = _ref("cross_entropy", x, p, dtype, reduction=reduction)
    assert_close(loss, ref.astype(dtype), dtype, f"ce probs special {reduction}")
    assert_close(grad, ref_grad.astype(dtype), dtype, "ce probs special grad", kind="grad")


@pytest.mark.parametrize("shape", SPECIAL_LAYOUTS, ids=param_id)
def test_nll_loss_of_log_zero_is_inf(backend, shape):
    x = np.log(np.abs(rng(32).standard_normal(shape)))
    x[:, 2] = -np.inf
    t = np.full((shape[0],) + shape[2:], 2)
    t[0] = 1
    loss, grad = F.nll_loss(*to_backend_all(backend, x, t), reduction="none", return_grad=True,
                            backend=backend)
    ref, ref_grad = _ref("nll_loss", x, t, "float64", reduction="none")
    assert_close(loss, ref, "float64", "nll of -inf")
    assert_close(grad, ref_grad, "float64", "nll of -inf grad", kind="grad")


# ----------------------------------------------------------------------------- long rows
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(4, 100_000), (2, 20_000, 3)], ids=param_id)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, weight=True, ignore_index=7),
                                  dict(probs=True, label_smoothing=0.1)], ids=param_id)
def test_cross_entropy_long_rows(backend, dtype, shape, opts):
    opts = dict(opts)
    r = rng(33)
    x = (r.standard_normal(shape) * 3).astype(dtype)
    n_classes = shape[1]
    if opts.pop("probs", False):
        t = r.uniform(0, 1, shape).astype(dtype)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = r.integers(0, n_classes, (shape[0],) + shape[2:])
        t.reshape(-1)[0] = 7
    w = r.uniform(0.5, 1.5, n_classes).astype(dtype) if opts.pop("weight", False) else None
    loss, grad = F.cross_entropy(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                                 return_grad=True, backend=backend, **opts)
    ref, ref_grad = _ref("cross_entropy", x, t, dtype, weight=w, **opts)
    assert_close(loss, ref.astype(dtype), dtype, f"ce long rows {shape} {opts}")
    assert_close(grad, ref_grad.astype(dtype), dtype, f"ce long rows grad {opts}", kind="grad")


# ----------------------------------------------------------------------------- layouts, scalars
@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy", "cross_entropy_probs"])
@pytest.mark.parametrize("view", ["fortran", "strided", "reversed"])
def test_non_contiguous_inputs(backend, op, view):
    r = rng(34)
    base = r.standard_normal((12, 2 * C, 6))
    x = {"fortran": np.asfortranarray(base[:6, :C, :3]), "strided": base[::2, ::2, ::2],
         "reversed": base[:6, :C, ::-1]}[view]
    if op == "cross_entropy_probs":
        t = np.asfortranarray(r.uniform(0, 1, x.shape))
    else:
        t = r.integers(0, C, (x.shape[0], x.shape[2]) if x.ndim == 3 else x.shape[:1]).T.copy().T
    name = "nll_loss" if op == "nll_loss" else "cross_entropy"
    w = r.uniform(0.5, 2, 2 * C)[::2]
    loss, grad = getattr(F, name)(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                                  reduction="none", return_grad=True, backend=backend)
    ref, ref_grad = _ref(name, np.ascontiguousarray(x), np.ascontiguousarray(t), "float64",
                         weight=np.ascontiguousarray(w), reduction="none")
    assert_close(loss, ref, "float64", f"{op} {view}")
    assert_close(grad, ref_grad, "float64", f"{op} {view} grad", kind="grad")


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("go", [0.25, 3, np.float32(-2.0), np.array([1.5])], ids=repr)
def test_grad_output_scalar_forms(backend, op, go):
    x, t, w, ii = make_case((6, C), "float64", True, "class2", seed=35)
    _, grad = getattr(F, op)(*to_backend_all(backend, x, t), weight=to_backend(w, backend),
                             ignore_index=ii, return_grad=True, grad_output=go, backend=backend)
    _, ref_grad = _ref(op, x, t, "float64", grad_output=float(np.asarray(go).reshape(())),
                       weight=w, ignore_index=ii)
    assert_close(grad, ref_grad, "float64", f"{op} grad_output={go!r}", kind="grad")
