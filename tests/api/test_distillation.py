"""distillation_loss and DistillationLoss against float64 torch composites (TRL's
``generalized_jsd_loss`` conventions, written in ``nblosses.ops.distillation``): values and
student gradients for every divergence (forward KL, reverse KL, JSD), temperature, soft cap,
hard loss, ``ignore_index``, reduction and layout, top-k teachers; finite differences; the
gradient written into the logits; masked (``-inf``) teacher classes; bad input; torch and JAX
arrays (the tuple teacher included); hypothesis over shapes and options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, is_backend_array, param_id, rng, to_backend, to_numpy
from hypothesis import given
from hypothesis import strategies as st

from nblosses import functional as F
from nblosses import nn
from nblosses.ops.distillation import _ref_distillation

DTYPES = ["float32", "float64"]
SHAPES = [(6, 40), (3, 7, 5), (40,), (2, 5000)]
#: (beta, temperature, hard_weight, softcap): each divergence, with and without the options
#: (hard_weight at T = 1 shares the student's softmax, at T != 1 it has its own).
OPTIONS = [(0.0, 1.0, 0.0, None), (0.0, 2.0, 0.3, 4.0), (0.0, 1.0, 0.5, None),
           (1.0, 1.0, 0.0, None), (1.0, 0.5, 0.2, 3.0), (0.5, 1.0, 0.0, None),
           (0.2, 3.0, 0.4, 5.0), (0.9, 1.0, 0.6, 2.0)]


def _labels(shape, seed=1, ignored=True):
    """Class indices for a student of ``shape`` (the first position ignored)."""
    loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    c = shape[1] if len(shape) > 1 else shape[0]
    t = rng(seed).integers(0, c, loss_shape)
    if ignored and t.ndim:
        t.reshape(-1)[0] = -100
    return t


def _logits(shape, dtype, seed=0, scale=2.0):
    r = rng(seed)
    return ((r.standard_normal(shape) * scale).astype(dtype),
            (r.standard_normal(shape) * scale).astype(dtype))


def _topk(y, k):
    """The top-k teacher of logits ``y``: ``(indices, log_probs)`` along the class axis."""
    ax = 1 if y.ndim > 1 else 0
    y64 = y.astype(np.float64)
    idx = np.argsort(-y64, axis=ax, kind="stable").take(range(k), axis=ax)
    full = y64 - np.log(np.exp(y64 - y64.max(ax, keepdims=True)).sum(ax, keepdims=True)) \
        - y64.max(ax, keepdims=True)
    return idx, np.take_along_axis(full, idx, axis=ax).astype(y.dtype)


def _ref(x, teacher, target=None, grad_output=None, **kw):
    """The float64 torch composite's loss and student gradient, from the same values."""
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    if isinstance(teacher, tuple):
        te = (torch.tensor(teacher[0]), torch.tensor(teacher[1].astype(np.float64)))
    else:
        te = torch.tensor(teacher.astype(np.float64))
    tg = None if target is None else torch.tensor(target)
    loss = _ref_distillation(torch, xt, te, tg, **kw)
    g = torch.ones_like(loss) if grad_output is None else torch.tensor(
        np.asarray(grad_output, np.float64)).reshape(loss.shape)
    loss.backward(g)
    return to_numpy(loss), to_numpy(xt.grad)


def _check(backend, dtype, x, teacher, target=None, grad_output=None, what="", scale=1.0,
           **kw):
    dev = (tuple(to_backend(a, backend) for a in teacher) if isinstance(teacher, tuple)
           else to_backend(teacher, backend))
    loss, grad = F.distillation_loss(to_backend(x, backend), dev, to_backend(target, backend),
                                     return_grad=True,
                                     grad_output=to_backend(grad_output, backend), **kw)
    ref, ref_grad = _ref(x, teacher, target, grad_output, **kw)
    assert is_backend_array(loss, backend) and is_backend_array(grad, backend)
    assert_close(loss, ref.astype(dtype), dtype, f"{what} loss", scale=scale)
    assert_close(grad, ref_grad.astype(dtype), dtype, f"{what} grad", kind="grad", scale=scale)
    forward = F.distillation_loss(to_backend(x, backend), dev, to_backend(target, backend),
                                  **kw)
    assert_close(forward, ref.astype(dtype), dtype, f"{what} forward only", scale=scale)


def _grad_output(reduction, shape, seed=3):
    loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    return rng(seed).uniform(-1.5, 1.5, loss_shape) if reduction == "none" else 0.7


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=param_id)
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_composite(backend, dtype, shape, options, reduction):
    beta, temperature, hard_weight, softcap = options
    x, y = _logits(shape, dtype)
    target = _labels(shape)
    go = _grad_output(reduction, shape)
    kw = dict(beta=beta, temperature=temperature, hard_weight=hard_weight, softcap=softcap,
              reduction=reduction)
    # float32: sums of logsumexps of size ~10 cancel to losses of ~0.1
    _check(backend, dtype, x, y, target, np.asarray(go, dtype), scale=10.0, **kw)
    if hard_weight == 0:  # no target: every position kept
        _check(backend, dtype, x, y, None, np.asarray(go, dtype), scale=10.0, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [(1.0, 0.0, None), (2.5, 0.4, 3.0), (1.0, 0.3, None),
                                     (0.5, 0.0, 4.0)], ids=param_id)
@pytest.mark.parametrize("shape,k", [((6, 40), 5), ((3, 7, 5), 3), ((40,), 40), ((2, 5000), 64)],
                         ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_teacher(backend, dtype, shape, k, options, reduction):
    temperature, hard_weight, softcap = options
    x, y = _logits(shape, dtype, seed=2)
    teacher = _topk(y, k)
    go = _grad_output(reduction, shape)
    _check(backend, dtype, x, teacher, _labels(shape), np.asarray(go, dtype), scale=10.0,
           temperature=temperature, hard_weight=hard_weight, softcap=softcap,
           reduction=reduction)


def test_topk_of_every_class_is_the_forward_kl():
    """k = C with the teacher's log-softmax: the same loss and gradient as its logits."""
    x, y = _logits((4, 9), "float64", seed=5)
    full = F.distillation_loss(x, y, temperature=1.0, return_grad=True)
    top = F.distillation_loss(x, _topk(y, 9), return_grad=True)
    assert_close(top[0], full[0], "float64")
    assert_close(top[1], full[1], "float64", kind="grad")


@pytest.mark.parametrize("options", OPTIONS + [("topk", 1.7, 0.3, 2.0)], ids=param_id)
def test_finite_differences(options):
    """The gradient against central differences of the loss (float64)."""
    beta, temperature, hard_weight, softcap = options
    x, y = _logits((3, 6), "float64", seed=6)
    teacher = _topk(y, 4) if beta == "topk" else y
    kw = dict(temperature=temperature, hard_weight=hard_weight, softcap=softcap,
              **({} if beta == "topk" else {"beta": beta}))
    t = np.array([2, 0, 5])
    _, grad = F.distillation_loss(x, teacher, t, return_grad=True, **kw)
    h = 1e-6
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        up, dn = x.copy(), x.copy()
        up[i] += h
        dn[i] -= h
        fd[i] = (float(F.distillation_loss(up, teacher, t, **kw))
                 - float(F.distillation_loss(dn, teacher, t, **kw))) / (2 * h)
    assert np.allclose(grad, fd, rtol=1e-6, atol=1e-8), (grad, fd)


@pytest.mark.parametrize("options", [(0.0, 1.0, 0.0, None), (1.0, 2.0, 0.3, None),
                                     (0.4, 1.0, 0.2, 3.0), ("topk", 1.0, 0.5, None)],
                         ids=param_id)
@pytest.mark.parametrize("shape", [(5, 300), (2, 6, 7)], ids=param_id)
def test_gradient_into_the_logits(backend, shape, options):
    """``grad_buffer=input``: the gradient replaces the logits, every logit read first."""
    beta, temperature, hard_weight, softcap = options
    x, y = _logits(shape, "float64", seed=8)
    teacher = _topk(y, 4) if beta == "topk" else y
    kw = dict(temperature=temperature, hard_weight=hard_weight, softcap=softcap,
              **({} if beta == "topk" else {"beta": beta}))
    target = _labels(shape)
    ref, ref_grad = _ref(x, teacher, target, **kw)
    dev = (tuple(to_backend(a, backend) for a in teacher) if beta == "topk"
           else to_backend(teacher, backend))
    xb = to_backend(x.copy(), backend)
    loss, g = F.distillation_loss(xb, dev, to_backend(target, backend), return_grad=True,
                                  grad_buffer=xb, **kw)
    assert g is xb
    assert_close(loss, ref, "float64")
    assert_close(xb, ref_grad, "float64", kind="grad")
    buf = to_backend(np.empty_like(x), backend)
    _, g = F.distillation_loss(to_backend(x, backend), dev, to_backend(target, backend),
                               return_grad=True, grad_buffer=buf, **kw)
    assert g is buf
    assert_close(buf, ref_grad, "float64", kind="grad")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_teacher_classes_contribute_nothing(beta):
    """A ``-inf`` teacher logit (a masked class) is a zero probability: 0 in every sum, as
    ``xlogy`` (the reverse KL is then infinite where the student keeps mass, as it should)."""
    x, y = _logits((4, 12), "float64", seed=11)
    y[:, 3] = -np.inf
    y[1, 7:] = -np.inf
    loss, grad = F.distillation_loss(x, y, beta=beta, reduction="none", return_grad=True)
    ref, ref_grad = _ref(x, y, beta=beta, reduction="none")
    assert_close(loss, ref, "float64")
    if beta < 1:
        assert np.isfinite(loss).all() and np.isfinite(grad).all()
        assert_close(grad, ref_grad, "float64", kind="grad")
    else:
        assert np.isinf(loss).all()
    idx, lp = _topk(y, 8)
    assert np.isneginf(lp[1, -1])  # teacher entries of probability 0
    loss, grad = F.distillation_loss(x, (idx, lp), reduction="none", return_grad=True)
    ref, ref_grad = _ref(x, (idx, lp), reduction="none")
    assert_close(loss, ref, "float64")
    assert_close(grad, ref_grad, "float64", kind="grad")


def test_ignored_positions_count_nowhere(backend):
    x, y = _logits((4, 10), "float64", seed=12)
    t = np.array([-100, 2, -100, 5])
    for reduction in ("mean", "sum", "none"):
        loss, grad = F.distillation_loss(to_backend(x, backend), to_backend(y, backend),
                                         to_backend(t, backend), hard_weight=0.3,
                                         reduction=reduction, return_grad=True)
        kept = F.distillation_loss(x[[1, 3]], y[[1, 3]], t[[1, 3]], hard_weight=0.3,
                                   reduction=reduction, return_grad=True)
        if reduction == "none":
            assert_close(loss, np.array([0, kept[0][0], 0, kept[0][1]]), "float64")
        else:
            assert_close(loss, kept[0], "float64")
        assert not to_numpy(grad)[[0, 2]].any()
        assert_close(to_numpy(grad)[[1, 3]], kept[1], "float64", kind="grad")
    loss, grad = F.distillation_loss(x, y, np.full(4, -100), return_grad=True)
    assert np.isnan(loss) and not grad.any()  # all ignored: 0 / 0, as cross_entropy


def test_empty_inputs():
    for shape in ((0, 5), (3, 0)):
        x = np.zeros(shape)
        loss, grad = F.distillation_loss(x, x, return_grad=True)
        assert grad.shape == shape
        assert np.isnan(loss) if shape[0] == 0 else loss == 0
        assert F.distillation_loss(x, x, reduction="none").shape == shape[:1]


def test_hinton_scaling_is_the_callers():
    """No T^2 factor: multiplying the loss by T^2 (or grad_output) gives Hinton's."""
    x, y = _logits((5, 8), "float64", seed=13)
    loss, grad = F.distillation_loss(x, y, temperature=4.0, return_grad=True)
    scaled, sgrad = F.distillation_loss(x, y, temperature=4.0, return_grad=True,
                                        grad_output=16.0)
    assert scaled == loss
    assert_close(sgrad, 16.0 * grad, "float64", kind="grad")


def test_bad_input():
    x, y = _logits((4, 6), "float64")
    t = np.array([0, 1, 2, 3])
    idx, lp = _topk(y, 3)
    cases = [
        (ValueError, "teacher logits must have the input's shape", (x, y[:, :5]), {}),
        (TypeError, "teacher logits must have the input's dtype", (x, y.astype(np.float32)),
         {}),
        (IndexError, "teacher index 6 is out of bounds", (x, (np.where(idx == idx[2, 1], 6,
                                                                          idx), lp)), {}),
        (IndexError, "teacher index -1 is out of bounds", (x, (np.where(idx == idx[0, 0], -1,
                                                                          idx), lp)), {}),
        (ValueError, r"k = 7 entries per position, more than the C = 6",
         (x, _topk(np.hstack([y, y[:, :1]]), 7)), {}),
        (ValueError, "indices and log_probs must have one shape", (x, (idx, lp[:, :2])), {}),
        (TypeError, "teacher indices must be integers", (x, (idx.astype(float), lp)), {}),
        (TypeError, "log_probs must have the input's dtype", (x, (idx, lp.astype(np.float32))),
         {}),
        (TypeError, "a pair \\(indices, log_probs\\)", (x, (idx, lp, lp)), {}),
        (ValueError, "beta must be 0", (x, (idx, lp)), {"beta": 0.5}),
        (ValueError, r"beta must be in \[0, 1\]", (x, y), {"beta": 1.5}),
        (ValueError, r"beta must be in \[0, 1\]", (x, y), {"beta": -0.1}),
        (ValueError, "temperature must be a finite number > 0", (x, y), {"temperature": 0}),
        (ValueError, "temperature must be a finite number > 0", (x, y),
         {"temperature": -2.0}),
        (ValueError, "temperature must be a finite number > 0", (x, y),
         {"temperature": float("inf")}),
        (ValueError, r"hard_weight must be in \[0, 1\]", (x, y, t), {"hard_weight": 1.2}),
        (ValueError, "hard_weight > 0 \\(0.5\\) needs a target", (x, y), {"hard_weight": 0.5}),
        (IndexError, "Target 6 is out of bounds", (x, y, np.array([0, 6, 1, 1])),
         {"hard_weight": 0.5}),
        (ValueError, "expected input batch_size", (x, y, t[:3]), {}),
        (TypeError, "integer target", (x, y, t.astype(float)), {}),
        (ValueError, "softcap must be None or a finite number > 0", (x, y), {"softcap": 0}),
        (ValueError, "not a valid value for reduction", (x, y), {"reduction": "batchmean"}),
        (TypeError, "input must be a floating-point array", (t, t), {}),
    ]
    for exc, match, args, kw in cases:
        with pytest.raises(exc, match=match):
            F.distillation_loss(*args, **kw)
    with pytest.raises(IndexError, match="Target 60 is out of bounds"):  # hard_weight 0 too
        F.distillation_loss(x, y, np.array([0, 60, -100, 1]))


def test_module_backward():
    x, y = _logits((5, 7), "float64", seed=14)
    t = _labels((5, 7))
    kw = dict(beta=0.3, temperature=2.0, hard_weight=0.4, softcap=5.0)
    m = nn.DistillationLoss(**kw)
    ref, ref_grad = _ref(x, y, t, **kw)
    assert_close(m(x, y, t), ref, "float64")
    assert_close(m.backward(), ref_grad, "float64", kind="grad")
    m = nn.DistillationLoss(reduction="none")
    m(x, _topk(y, 3))
    assert_close(m.backward(np.arange(5.0)), _ref(x, _topk(y, 3), None, np.arange(5.0),
                                                  reduction="none")[1], "float64", kind="grad")


def test_torch_and_jax_arrays_with_a_tuple_teacher():
    """Foreign arrays in, foreign arrays out, the top-k pair looked into."""
    x, y = _logits((3, 8), "float32", seed=15)
    idx, lp = _topk(y, 3)
    want = F.distillation_loss(x, (idx, lp), return_grad=True)
    got = F.distillation_loss(torch.from_numpy(x), (torch.from_numpy(idx), torch.from_numpy(lp)),
                              return_grad=True)
    assert all(isinstance(r, torch.Tensor) for r in got)
    for g, w in zip(got, want):
        assert_close(g, w, "float32")
    got = F.distillation_loss(torch.from_numpy(x), torch.from_numpy(y), return_grad=True)
    assert_close(got[1], F.distillation_loss(x, y, return_grad=True)[1], "float32", kind="grad")
    jnp = pytest.importorskip("jax.numpy")
    got = F.distillation_loss(jnp.asarray(x), (jnp.asarray(idx), jnp.asarray(lp)),
                              return_grad=True)
    assert type(got[0]).__module__.startswith("jax")
    for g, w in zip(got, want):
        assert_close(np.asarray(g), w, "float32")


def test_long_rows_float32():
    """Rows of 128256 classes (one vocabulary): float32 against the float64 composite."""
    x, y = _logits((2, 128_256), "float32", seed=16, scale=3.0)
    for beta in (0.0, 0.5, 1.0):
        _check("cpu", "float32", x, y, beta=beta, scale=10.0)


@given(n=st.integers(1, 4), c=st.integers(1, 30), inner=st.integers(1, 3),
       beta=st.sampled_from([0.0, 0.25, 1.0, "topk"]), temperature=st.floats(0.3, 4.0),
       hard=st.sampled_from([0.0, 0.5]), softcap=st.sampled_from([None, 2.5]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_hypothesis_shapes_and_options(n, c, inner, beta, temperature, hard, softcap,
                                       reduction):
    shape = (n, c, inner) if inner > 1 else (n, c)
    x, y = _logits(shape, "float64", seed=n * 31 + c)
    teacher = _topk(y, (c + 1) // 2) if beta == "topk" else y
    kw = dict(temperature=temperature, hard_weight=hard, softcap=softcap, reduction=reduction,
              **({} if beta == "topk" else {"beta": beta}))
    _check("cpu", "float64", x, teacher, _labels(shape, ignored=False), **kw)

