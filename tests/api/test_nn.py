"""nblosses.nn modules: agree with the functional API and with torch's modules (forward and
backward), mirror torch's constructors (TypeError on unknown keywords), refuse backward()
before a call, and port torch autograd chains as ``m.backward(loss.backward())``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_close, rng, to_backend, to_numpy, tt

from nblosses import functional as F
from nblosses import nn

C = 5


def _b(backend, *arrays):
    return [to_backend(a, backend) for a in arrays]


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("name,fname", [("Softmax", "softmax"), ("LogSoftmax", "log_softmax")])
@pytest.mark.parametrize("shape,dim", [((4, C), 1), ((3, 4, 5), 2), ((3, 4, 5), -3),
                                       ((2, 3, 4, 5), 1)], ids=str)
def test_softmax_modules(backend, name, fname, shape, dim):
    x = rng(0).standard_normal(shape)
    g = rng(1).standard_normal(shape)
    m = getattr(nn, name)(dim=dim, backend=backend)
    out = m(to_backend(x, backend))
    xt = tt(x, requires_grad=True)
    ref = getattr(torch.nn, name)(dim=dim)(xt)
    ref.backward(tt(g))
    assert_close(out, ref.detach().numpy(), "float64", f"nn.{name} forward")
    assert_close(out, getattr(F, fname)(to_backend(x, backend), dim=dim, backend=backend),
                 "float64", f"nn.{name} vs functional")
    assert_close(m.backward(to_backend(g, backend)), xt.grad.numpy(), "float64",
                 f"nn.{name}.backward", kind="grad")
    # default grad_output: ones
    xt.grad = None
    getattr(torch.nn, name)(dim=dim)(xt).backward(torch.ones(shape, dtype=torch.float64))
    assert_close(m.backward(), xt.grad.numpy(), "float64", f"nn.{name}.backward()", kind="grad")


@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("shape", [(5,), (4, C), (3, 4, 5)], ids=str)
def test_softmax_module_without_dim(backend, name, shape):
    """dim=None: warns on the call like torch, picks torch's implicit dim, backward follows."""
    x = rng(2).standard_normal(shape)
    g = rng(3).standard_normal(shape)
    m = getattr(nn, name)(backend=backend)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        out = m(to_backend(x, backend))
    xt = tt(x, requires_grad=True)
    ref = _quiet(lambda: getattr(torch.nn, name)()(xt))
    ref.backward(tt(g))
    assert_close(out, ref.detach().numpy(), "float64", f"nn.{name}() forward")
    assert_close(m.backward(to_backend(g, backend)), xt.grad.numpy(), "float64",
                 f"nn.{name}() backward", kind="grad")


def test_sigmoid_module(backend):
    x = rng(4).standard_normal((3, 4)) * 4
    g = rng(5).standard_normal((3, 4))
    m = nn.Sigmoid(backend=backend)
    out = m(to_backend(x, backend))
    xt = tt(x, requires_grad=True)
    ref = torch.nn.Sigmoid()(xt)
    ref.backward(tt(g))
    assert_close(out, ref.detach().numpy(), "float64", "nn.Sigmoid")
    assert_close(out, F.sigmoid(to_backend(x, backend), backend=backend), "float64", "vs F")
    assert_close(m.backward(to_backend(g, backend)), xt.grad.numpy(), "float64",
                 "nn.Sigmoid.backward", kind="grad")


# ----------------------------------------------------------------------------- losses
def _class_data(shape, seed=0):
    r = rng(seed)
    x = r.standard_normal(shape)
    tshape = (shape[0],) + shape[2:]
    t = r.integers(0, C, tshape)
    t.reshape(-1)[::4] = 1
    return x, t


LOSS_CASES = [
    ("NLLLoss", "nll_loss", dict()),
    ("NLLLoss", "nll_loss", dict(weight=True, ignore_index=1, reduction="sum")),
    ("NLLLoss", "nll_loss", dict(weight=True, reduction="none")),
    ("CrossEntropyLoss", "cross_entropy", dict()),
    ("CrossEntropyLoss", "cross_entropy", dict(weight=True, ignore_index=1, label_smoothing=0.1)),
    ("CrossEntropyLoss", "cross_entropy", dict(label_smoothing=0.3, reduction="none")),
    ("CrossEntropyLoss", "cross_entropy", dict(weight=True, reduction="sum")),
]


@pytest.mark.parametrize("shape", [(6, C), (3, C, 2, 2)], ids=str)
@pytest.mark.parametrize("name,fname,opts", LOSS_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_class_loss_modules(backend, name, fname, opts, shape):
    x, t = _class_data(shape, seed=6)
    if name == "NLLLoss":
        x = torch.log_softmax(torch.from_numpy(x), 1).numpy()
    kw = dict(opts)
    w = rng(7).uniform(0.3, 2, C) if kw.pop("weight", False) else None
    m = getattr(nn, name)(weight=to_backend(w, backend), backend=backend, **kw)
    out = m(*_b(backend, x, t))
    xt = tt(x, requires_grad=True)
    ref = getattr(torch.nn, name)(weight=tt(w), **kw)(xt, tt(t))
    go = rng(8).uniform(-1, 1, ref.shape) if ref.ndim else np.asarray(0.6)
    ref.backward(tt(go))
    assert_close(out, ref.detach().numpy(), "float64", f"nn.{name}{opts}")
    fn_out = getattr(F, fname)(*_b(backend, x, t), weight=to_backend(w, backend),
                               backend=backend, **kw)
    assert_close(out, fn_out, "float64", f"nn.{name} vs functional")
    assert_close(m.backward(to_backend(go, backend)), xt.grad.numpy(), "float64",
                 f"nn.{name}.backward(g)", kind="grad")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_modules(backend, reduction, weighted):
    r = rng(9)
    x = r.standard_normal((4, 3)) * 2
    y = r.uniform(0, 1, (4, 3))
    w = r.uniform(0.3, 2, (3,)) if weighted else None
    pw = r.uniform(0.5, 3, (3,))
    p = 1 / (1 + np.exp(-x))
    cases = [
        ("BCELoss", nn.BCELoss(weight=to_backend(w, backend), reduction=reduction,
                               backend=backend),
         torch.nn.BCELoss(weight=tt(w), reduction=reduction), p,
         lambda: F.binary_cross_entropy(*_b(backend, p, y), weight=to_backend(w, backend),
                                        reduction=reduction, backend=backend)),
        ("BCEWithLogitsLoss",
         nn.BCEWithLogitsLoss(weight=to_backend(w, backend), reduction=reduction,
                              pos_weight=to_backend(pw, backend), backend=backend),
         torch.nn.BCEWithLogitsLoss(weight=tt(w), reduction=reduction, pos_weight=tt(pw)), x,
         lambda: F.binary_cross_entropy_with_logits(
             *_b(backend, x, y), weight=to_backend(w, backend), pos_weight=to_backend(pw, backend),
             reduction=reduction, backend=backend)),
    ]
    for name, m, tm, inp, fn in cases:
        out = m(*_b(backend, inp, y))
        xt = tt(inp, requires_grad=True)
        ref = tm(xt, tt(y))
        assert_close(out, ref.detach().numpy(), "float64", f"nn.{name} {reduction}")
        assert_close(out, fn(), "float64", f"nn.{name} vs functional")
        ref.backward(torch.ones_like(ref))
        assert_close(m.backward(), xt.grad.numpy(), "float64", f"nn.{name}.backward()",
                     kind="grad")


def test_loss_module_backward_uses_last_call(backend):
    crit = nn.CrossEntropyLoss(backend=backend)
    x1, t1 = _class_data((4, C), seed=10)
    x2, t2 = _class_data((3, C), seed=11)
    crit(*_b(backend, x1, t1))
    crit(*_b(backend, x2, t2))
    xt = tt(x2, requires_grad=True)
    torch.nn.CrossEntropyLoss()(xt, tt(t2)).backward()
    assert_close(crit.backward(), xt.grad.numpy(), "float64", "backward after two calls",
                 kind="grad")


# ----------------------------------------------------------------------------- constructors
ALL = ["Softmax", "LogSoftmax", "Sigmoid", "NLLLoss", "CrossEntropyLoss", "BCELoss",
       "BCEWithLogitsLoss"]


@pytest.mark.parametrize("name,kwargs", [
    ("CrossEntropyLoss", dict(dim=1)),  # the seed document's mistake
    ("NLLLoss", dict(label_smoothing=0.1)),
    ("BCELoss", dict(pos_weight=1.0)),
    ("BCEWithLogitsLoss", dict(ignore_index=0)),
    ("Sigmoid", dict(dim=1)),
    ("Softmax", dict(axis=1)),
    ("LogSoftmax", dict(dtype="float32")),
])
def test_constructor_rejects_unknown_keyword(name, kwargs):
    with pytest.raises(TypeError):
        getattr(torch.nn, name)(**kwargs)  # torch rejects it too
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        getattr(nn, name)(**kwargs)


def test_positional_constructor_arguments_follow_torch_order(backend):
    w = rng(12).uniform(0.5, 2, C)
    x, t = _class_data((5, C), seed=13)
    ours = nn.CrossEntropyLoss(to_backend(w, backend), None, 1, None, "sum", 0.2, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(tt(w), None, 1, None, "sum", 0.2)
    assert_close(ours(*_b(backend, x, t)), theirs(tt(x), tt(t)).numpy(), "float64", "positional")
    ours = nn.BCEWithLogitsLoss(None, None, None, "sum", to_backend(w, backend), backend=backend)
    theirs = torch.nn.BCEWithLogitsLoss(None, None, None, "sum", tt(w))
    y = rng(14).uniform(0, 1, (5, C))
    assert_close(ours(*_b(backend, x, y)), theirs(tt(x), tt(y)).numpy(), "float64", "pos bcel")


@pytest.mark.parametrize("name", ["NLLLoss", "CrossEntropyLoss", "BCELoss", "BCEWithLogitsLoss"])
@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True),
                                                 (False, True)])
def test_module_legacy_arguments(name, size_average, reduce):
    with warnings.catch_warnings(record=True) as theirs_w:
        warnings.simplefilter("always")
        theirs = getattr(torch.nn, name)(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match="deprecated") as ours_w:
        ours = getattr(nn, name)(size_average=size_average, reduce=reduce)
    assert theirs_w and ours.reduction == theirs.reduction
    assert str(ours_w[0].message) == str(theirs_w[0].message)
    assert ours_w[0].filename == __file__, "the warning should point at the caller's line"


@pytest.mark.parametrize("name", ["NLLLoss", "CrossEntropyLoss", "BCELoss", "BCEWithLogitsLoss"])
def test_module_bad_reduction(name):
    with pytest.raises(ValueError, match="bogus"):
        m = getattr(nn, name)(reduction="bogus")
        # torch defers the check to the call; either place is fine if the call fails
        m(np.zeros((2, 3)) + 0.5, np.zeros((2, 3)))


@pytest.mark.parametrize("name,args", [
    ("Softmax", dict(dim=1)), ("LogSoftmax", dict(dim=1)), ("Sigmoid", {}), ("NLLLoss", {}),
    ("CrossEntropyLoss", {}), ("BCELoss", {}), ("BCEWithLogitsLoss", {}),
])
def test_backward_before_forward_raises(name, args):
    m = getattr(nn, name)(**args)
    with pytest.raises(RuntimeError, match=name):
        m.backward()


# ----------------------------------------------------------------------------- chains
@pytest.mark.parametrize("shape", [(3, C), (2, C, 4)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_chain_logsoftmax_nllloss(backend, shape, weighted):
    x, t = _class_data(shape, seed=15)
    w = rng(16).uniform(0.5, 2, C) if weighted else None
    m, crit = nn.LogSoftmax(dim=1, backend=backend), nn.NLLLoss(weight=to_backend(w, backend),
                                                                backend=backend)
    loss = crit(m(to_backend(x, backend)), to_backend(t, backend))
    grad = m.backward(crit.backward())
    xt = tt(x, requires_grad=True)
    ref = torch.nn.NLLLoss(weight=tt(w))(torch.nn.LogSoftmax(dim=1)(xt), tt(t))
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float64", "LogSoftmax+NLLLoss loss")
    assert_close(grad, xt.grad.numpy(), "float64", "LogSoftmax+NLLLoss grad", kind="grad")
    # the fused loss gives the same gradient
    _, fused = F.cross_entropy(*_b(backend, x, t), weight=to_backend(w, backend),
                               return_grad=True, backend=backend)
    assert_close(grad, fused, "float64", "chain vs fused cross_entropy", kind="grad")


@pytest.mark.parametrize("shape", [(3,), (3, 2), (2, 3, 4)], ids=str)
def test_chain_sigmoid_bceloss(backend, shape):
    r = rng(17)
    x = r.standard_normal(shape) * 2
    y = r.integers(0, 2, shape).astype(np.float64)
    m, crit = nn.Sigmoid(backend=backend), nn.BCELoss(backend=backend)
    loss = crit(m(to_backend(x, backend)), to_backend(y, backend))
    grad = m.backward(crit.backward())
    xt = tt(x, requires_grad=True)
    ref = torch.nn.BCELoss()(torch.nn.Sigmoid()(xt), tt(y))
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float64", "Sigmoid+BCELoss loss")
    assert_close(grad, xt.grad.numpy(), "float64", "Sigmoid+BCELoss grad", kind="grad")


@pytest.mark.parametrize("shape", [(3, C), (2, C, 3)], ids=str)
def test_chain_crossentropyloss_backward(backend, shape):
    x, t = _class_data(shape, seed=18)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    loss = crit(*_b(backend, x, t))
    grad = crit.backward()
    xt = tt(x, requires_grad=True)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(xt, tt(t))
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float64", "CrossEntropyLoss")
    assert_close(grad, xt.grad.numpy(), "float64", "CrossEntropyLoss.backward()", kind="grad")
    assert_close(crit.backward(np.asarray(2.5)), 2.5 * xt.grad.numpy(), "float64",
                 "CrossEntropyLoss.backward(2.5)", kind="grad")


def test_chain_softmax_into_custom_loss(backend):
    """Softmax.backward given an upstream gradient computed by hand (sum of squares)."""
    x = rng(19).standard_normal((4, C))
    m = nn.Softmax(dim=1, backend=backend)
    p = m(to_backend(x, backend))
    grad = m.backward(2 * p)  # d/dp sum(p^2)
    xt = tt(x, requires_grad=True)
    (torch.softmax(xt, 1) ** 2).sum().backward()
    assert_close(grad, xt.grad.numpy(), "float64", "Softmax chain", kind="grad")
    assert to_numpy(grad).shape == x.shape
