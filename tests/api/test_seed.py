"""Every torch example that ``docs/functional_or_nn.rst`` ports ("torch examples, ported"),
run with NumPy arrays and nblosses and compared with the torch original on the same data.

torch's ``output.backward()`` becomes ``module.backward(...)`` chains or ``return_grad=True``
(then the ``*_backward`` functions for the activation in front of the loss).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF
from helpers import assert_close, rng, to_backend, to_numpy, tt

import nblosses.functional as F
import nblosses.nn as nn


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# ----------------------------------------------------------------------------- 1. softmax
def test_softmax_formula(backend):
    """S_i = e^{x_i - shift} / sum_j e^{x_j - shift}, shift = max: values in (0, 1), sum 1."""
    v = rng(0).standard_normal(6)
    s = to_numpy(F.softmax(to_backend(v, backend), dim=0, backend=backend))
    shifted = np.exp(v - v.max())
    assert_close(s, shifted / shifted.sum(), "float64", "softmax formula")
    assert ((s > 0) & (s < 1)).all()
    assert_close(s.sum(), np.float64(1.0), "float64", "softmax sum")


def test_nn_softmax_dim2(backend):
    """m = nn.Softmax(dim=2); input = torch.rand((3,4,5,6)); output = m(input);
    torch.sum(output, dim=2) is all ones."""
    x = rng(1).random((3, 4, 5, 6)).astype(np.float32)  # torch.rand: float32 in [0, 1)
    m = nn.Softmax(dim=2, backend=backend)
    output = m(to_backend(x, backend))
    assert_close(output, tnn.Softmax(dim=2)(tt(x)).numpy(), "float32", "nn.Softmax(dim=2)")
    assert_close(output.sum(axis=2), np.ones((3, 4, 6), np.float32), "float32", "sums to 1")


def test_functional_softmax_dim2(backend):
    """output = F.softmax(input, dim=2); torch.sum(output, dim=2) is all ones."""
    x = rng(2).random((3, 4, 5, 6)).astype(np.float32)
    output = F.softmax(to_backend(x, backend), dim=2, backend=backend)
    assert_close(output, TF.softmax(tt(x), dim=2).numpy(), "float32", "F.softmax(dim=2)")
    assert_close(output.sum(axis=2), np.ones((3, 4, 6), np.float32), "float32", "sums to 1")


# ----------------------------------------------------------------------------- 2. log softmax
def test_nn_logsoftmax_dim2(backend):
    """m = nn.LogSoftmax(dim=2); output = m(torch.rand((3,4,5,6))): all values negative."""
    x = rng(3).random((3, 4, 5, 6)).astype(np.float32)
    output = nn.LogSoftmax(dim=2, backend=backend)(to_backend(x, backend))
    assert_close(output, tnn.LogSoftmax(dim=2)(tt(x)).numpy(), "float32", "nn.LogSoftmax")
    assert (to_numpy(output) < 0).all()


def test_functional_log_softmax_equals_log_of_softmax(backend):
    """output = F.log_softmax(input, dim=2); output2 = torch.log(F.softmax(input, dim=2));
    the post says output.equal(output2) is True: equal up to rounding here."""
    x = rng(4).random((3, 4, 5, 6)).astype(np.float32)
    xb = to_backend(x, backend)
    output = F.log_softmax(xb, dim=2, backend=backend)
    output2 = np.log(to_numpy(F.softmax(xb, dim=2, backend=backend)))
    assert_close(output, TF.log_softmax(tt(x), dim=2).numpy(), "float32", "F.log_softmax")
    assert_close(output, output2, "float32", "log_softmax vs log(softmax)")


# ----------------------------------------------------------------------------- 3. NLL loss
def test_nll_formula(backend):
    """loss(x, class) = -x[class]; with weights: -weights[class] * x[class]; the mini-batch mean
    divides by the summed weights of the targets (torch)."""
    logp = torch.log_softmax(torch.from_numpy(rng(5).standard_normal((3, 5))), 1).numpy()
    target = np.array([1, 0, 4])
    w = rng(6).uniform(0.5, 2, 5)
    rows = np.arange(3)
    b = lambda a: to_backend(a, backend)  # noqa: E731
    assert_close(F.nll_loss(b(logp), b(target), reduction="none", backend=backend),
                 -logp[rows, target], "float64", "nll per element")
    assert_close(F.nll_loss(b(logp), b(target), weight=b(w), reduction="none", backend=backend),
                 -w[target] * logp[rows, target], "float64", "weighted nll per element")
    assert_close(F.nll_loss(b(logp), b(target), weight=b(w), backend=backend),
                 np.asarray((-w[target] * logp[rows, target]).sum() / w[target].sum()),
                 "float64", "weighted nll mean")
    with pytest.warns(UserWarning, match="deprecated"):  # "size_average=False": sum
        total = F.nll_loss(b(logp), b(target), size_average=False, backend=backend)
    assert_close(total, np.asarray(-logp[rows, target].sum()), "float64", "size_average=False")


def test_nn_nllloss_example(backend):
    """m = nn.LogSoftmax(); loss = nn.NLLLoss(); input = randn(3, 5) (requires_grad);
    target = LongTensor([1, 0, 4]); output = loss(m(input), target); output.backward()."""
    x = rng(7).standard_normal((3, 5)).astype(np.float32)
    target = np.array([1, 0, 4])
    m = nn.LogSoftmax(backend=backend)  # no dim: warns, picks dim 1 for 2-d input, like torch
    loss = nn.NLLLoss(backend=backend)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        output = loss(m(to_backend(x, backend)), to_backend(target, backend))
    grad = m.backward(loss.backward())

    xt = tt(x, requires_grad=True)
    ref = _quiet(lambda: tnn.NLLLoss()(tnn.LogSoftmax()(xt), tt(target)))
    ref.backward()
    assert_close(output, ref.detach().numpy(), "float32", "NLLLoss(LogSoftmax) loss")
    assert_close(grad, xt.grad.numpy(), "float32", "NLLLoss(LogSoftmax) backward", kind="grad")


def test_functional_nll_loss_example(backend):
    """output = F.nll_loss(F.log_softmax(input), target); output.backward()."""
    x = rng(8).standard_normal((3, 5)).astype(np.float32)
    target = np.array([1, 0, 4])
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        logp = F.log_softmax(to_backend(x, backend), backend=backend)
    output, g_logp = F.nll_loss(logp, to_backend(target, backend), return_grad=True,
                                backend=backend)
    grad = F.log_softmax_backward(g_logp, logp, dim=1, backend=backend)

    xt = tt(x, requires_grad=True)
    ref = _quiet(lambda: TF.nll_loss(TF.log_softmax(xt), tt(target)))
    ref.backward()
    assert_close(output, ref.detach().numpy(), "float32", "F.nll_loss(F.log_softmax)")
    assert_close(grad, xt.grad.numpy(), "float32", "F.nll_loss backward", kind="grad")


# ----------------------------------------------------------------------------- 4. cross entropy
def test_cross_entropy_formula(backend):
    """loss(x, class) = -x[class] + log(sum_j exp(x[j])); weighted: weights[class] * (...);
    averaged over the mini-batch (by the summed target weights, as torch)."""
    x = rng(9).standard_normal((3, 5)) * 3
    target = np.array([1, 0, 4])
    w = rng(10).uniform(0.5, 2, 5)
    per = -x[np.arange(3), target] + np.log(np.exp(x).sum(axis=1))
    b = lambda a: to_backend(a, backend)  # noqa: E731
    assert_close(F.cross_entropy(b(x), b(target), reduction="none", backend=backend), per,
                 "float64", "ce per element")
    assert_close(F.cross_entropy(b(x), b(target), backend=backend), np.asarray(per.mean()),
                 "float64", "ce mean")
    assert_close(F.cross_entropy(b(x), b(target), weight=b(w), reduction="none",
                                 backend=backend), w[target] * per, "float64", "weighted ce")
    assert_close(F.cross_entropy(b(x), b(target), weight=b(w), backend=backend),
                 np.asarray((w[target] * per).sum() / w[target].sum()), "float64",
                 "weighted ce mean")
    # cross entropy = LogSoftmax + NLLLoss
    logp = F.log_softmax(b(x), dim=1, backend=backend)
    assert_close(F.cross_entropy(b(x), b(target), weight=b(w), backend=backend),
                 F.nll_loss(logp, b(target), weight=b(w), backend=backend), "float64",
                 "ce == nll(log_softmax)")


def test_nn_crossentropyloss_example(backend):
    """input = randn(3, 5); target = tensor([1, 0, 4]); loss = nn.CrossEntropyLoss(dim=1) is the
    post's mistake (TypeError in torch and here); without dim it works; then backward."""
    x = rng(11).standard_normal((3, 5)).astype(np.float32)
    target = np.array([1, 0, 4])
    with pytest.raises(TypeError):
        tnn.CrossEntropyLoss(dim=1)
    with pytest.raises(TypeError, match="dim"):
        nn.CrossEntropyLoss(dim=1)
    loss = nn.CrossEntropyLoss(backend=backend)
    output = loss(to_backend(x, backend), to_backend(target, backend))
    grad = loss.backward()
    xt = tt(x, requires_grad=True)
    ref = tnn.CrossEntropyLoss()(xt, tt(target))
    ref.backward()
    assert_close(output, ref.detach().numpy(), "float32", "nn.CrossEntropyLoss")
    assert_close(grad, xt.grad.numpy(), "float32", "nn.CrossEntropyLoss backward", kind="grad")


def test_functional_cross_entropy_example(backend):
    """loss = F.cross_entropy(input, target); loss.backward()."""
    x = rng(12).standard_normal((3, 5)).astype(np.float32)
    target = np.array([1, 0, 4])
    loss, grad = F.cross_entropy(to_backend(x, backend), to_backend(target, backend),
                                 return_grad=True, backend=backend)
    xt = tt(x, requires_grad=True)
    ref = TF.cross_entropy(xt, tt(target))
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float32", "F.cross_entropy")
    assert_close(grad, xt.grad.numpy(), "float32", "F.cross_entropy backward", kind="grad")


# ----------------------------------------------------------------------------- 5. BCE
def test_bce_formula(backend):
    """loss(o, t) = -1/n sum_i (t_i log o_i + (1 - t_i) log(1 - o_i)); with weights:
    -1/n sum_i w_i (...); size_average=False sums instead."""
    r = rng(13)
    o = r.uniform(0.05, 0.95, 8)
    t = r.integers(0, 2, 8).astype(np.float64)
    w = r.uniform(0.5, 2, 8)
    per = -(t * np.log(o) + (1 - t) * np.log(1 - o))
    b = lambda a: to_backend(a, backend)  # noqa: E731
    assert_close(F.binary_cross_entropy(b(o), b(t), backend=backend), np.asarray(per.mean()),
                 "float64", "bce mean")
    assert_close(F.binary_cross_entropy(b(o), b(t), weight=b(w), backend=backend),
                 np.asarray((w * per).mean()), "float64", "weighted bce mean")
    with pytest.warns(UserWarning, match="deprecated"):
        total = F.binary_cross_entropy(b(o), b(t), size_average=False, backend=backend)
    assert_close(total, np.asarray(per.sum()), "float64", "bce size_average=False")


def test_nn_bceloss_example(backend):
    """m = nn.Sigmoid(); loss = nn.BCELoss(); input = randn(3) (requires_grad);
    target = empty(3).random_(2); output = loss(m(input), target); output.backward()."""
    r = rng(14)
    x = r.standard_normal(3).astype(np.float32)
    target = r.integers(0, 2, 3).astype(np.float32)
    m, loss = nn.Sigmoid(backend=backend), nn.BCELoss(backend=backend)
    output = loss(m(to_backend(x, backend)), to_backend(target, backend))
    grad = m.backward(loss.backward())
    xt = tt(x, requires_grad=True)
    ref = tnn.BCELoss()(tnn.Sigmoid()(xt), tt(target))
    ref.backward()
    assert_close(output, ref.detach().numpy(), "float32", "BCELoss(Sigmoid)")
    assert_close(grad, xt.grad.numpy(), "float32", "BCELoss(Sigmoid) backward", kind="grad")


def test_functional_bce_example(backend):
    """input = randn((3, 2)) (requires_grad); target = rand((3, 2));
    loss = F.binary_cross_entropy(F.sigmoid(input), target); loss.backward()."""
    r = rng(15)
    x = r.standard_normal((3, 2)).astype(np.float32)
    target = r.random((3, 2)).astype(np.float32)
    p = F.sigmoid(to_backend(x, backend), backend=backend)
    loss, g_p = F.binary_cross_entropy(p, to_backend(target, backend), return_grad=True,
                                       backend=backend)
    grad = F.sigmoid_backward(g_p, p, backend=backend)
    xt = tt(x, requires_grad=True)
    ref = TF.binary_cross_entropy(torch.sigmoid(xt), tt(target))
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float32", "F.binary_cross_entropy(F.sigmoid)")
    assert_close(grad, xt.grad.numpy(), "float32", "F.binary_cross_entropy backward",
                 kind="grad")
    # the fused logits form gives the same loss and gradient
    loss2, grad2 = F.binary_cross_entropy_with_logits(
        to_backend(x, backend), to_backend(target, backend), return_grad=True, backend=backend)
    assert_close(loss2, loss, "float32", "with_logits == bce(sigmoid)")
    assert_close(grad2, grad, "float32", "with_logits grad == chain grad", kind="grad")
