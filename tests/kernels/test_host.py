"""The host plan every backend's losses share (:mod:`nblosses.backends._host`) and the
per-position algebra stated once (:mod:`nblosses.backends._formulas`): IEEE division, outputs,
upstream gradient, empty inputs and the reduced result; the CPU kernels compile the algebra
the array drivers apply."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nblosses import functional as F
from nblosses.backends import _formulas as FO
from nblosses.backends import _host as H

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("a,b,want", [(3.0, 2.0, 1.5), (0.0, 0.0, NAN), (NAN, 0.0, NAN),
                                      (1.0, 0.0, INF), (-1.0, 0.0, -INF), (1.0, -0.0, -INF)])
def test_div_is_ieee_on_the_host_and_where_the_denominator_lives(a, b, want):
    np.testing.assert_equal(H.div(a, b), want)
    with np.errstate(divide="ignore", invalid="ignore"):  # a 0-d array: divided by NumPy
        np.testing.assert_equal(float(H.div(a, np.array(b))), want)


def test_ignore_value_clips_to_int64():
    assert H.ignore_value(-100) == -100
    assert H.ignore_value(2 ** 70) == 2 ** 63 - 1
    assert H.ignore_value(-(2 ** 70)) == -(2 ** 63)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_outputs_upstream_and_result(reduction):
    keep = reduction == "none"
    g = np.full((4, 2), 2.0, np.float32) if keep else 3.0
    call = H.LossCall(np, (4, 3, 2), (4, 2), np.float32, reduction=reduction, want_grad=True,
                      grad_output=g, denom=4.0)
    assert call.grad.shape == (4, 3, 2) and call.grad.dtype == np.float32
    assert call.total is None
    if keep:
        assert call.losses.shape == (4, 2) and call.g_rows is g and call.g_scalar == 0.0
        assert call.result(123.0) is call.losses
    else:
        assert call.losses is None and call.g_rows is None
        assert call.g_scalar == (0.75 if reduction == "mean" else 3.0)
        loss = call.result(6.0)
        assert loss.shape == () and loss.dtype == np.float32
        assert float(loss) == (1.5 if reduction == "mean" else 6.0)


def test_gradient_buffer_and_no_gradient():
    buf = np.empty((2, 3, 1))
    call = H.LossCall(np, buf.shape, (2, 1), buf.dtype, reduction="sum", want_grad=True,
                      grad_output=1.0, grad_buffer=buf)
    assert call.grad is buf
    call = H.LossCall(np, buf.shape, (2, 1), buf.dtype, reduction="mean", want_grad=False,
                      grad_output=None, denom=2.0)
    assert call.grad is None and call.g_rows is None and call.g_scalar == 0.0


def test_denominator_found_by_the_kernel():
    """``denom=None``: the upstream scalar stays undivided (a device kernel divides it), until
    the host learns the denominator (the CPU's NLL sums it with the losses)."""
    call = H.LossCall(np, (2, 3, 1), (2, 1), np.float64, reduction="mean", want_grad=True,
                      grad_output=3.0, denom=None)
    assert call.g_scalar == 3.0
    call.set_denominator(2.0)
    assert call.g_scalar == 1.5 and float(call.result(4.0)) == 2.0
    call.set_denominator(0.0)  # every target ignored: 0/0 and x/0
    assert call.g_scalar == INF and math.isnan(call.result(0.0))


@pytest.mark.parametrize("reduction,denom,want", [("mean", None, NAN), ("mean", 0.0, NAN),
                                                  ("mean", 5.0, 0.0), ("sum", None, 0.0)])
def test_empty_inputs(reduction, denom, want):
    """No logits: zero losses and gradient, -inf logsumexp, and a device total of the mean of
    nothing (0/0) or of zeros over positions (probability targets with C = 0), or the sum 0."""
    call = H.LossCall(np, (5, 0, 1), (5, 1), np.float32, reduction=reduction, want_grad=True,
                      grad_output=1.0, denom=denom, device_total=True)
    lse = np.ones((5, 1), np.float32)
    call.fill_empty(lse)
    np.testing.assert_equal(float(call.result()), want)
    assert (lse == -INF).all() and call.grad.shape == (5, 0, 1)
    rows = H.LossCall(np, (5, 0, 1), (5, 1), np.float32, reduction="none", want_grad=False,
                      grad_output=None)
    rows.fill_empty()
    assert (rows.result() == 0).all()


def test_cpu_kernels_compile_the_drivers_algebra():
    """One statement of the cross-entropy's coefficients: the CPU kernels' compiled point
    functions give what the array drivers (the linear cross-entropy) compute from them."""
    from nblosses.backends.cpu import class_losses as CL

    rng = np.random.default_rng(0)
    lse, xt, swx, wt, scale, a_sum, b_sum = (rng.standard_normal(6) for _ in range(7))
    for eps, z in ((0.0, 0.0), (0.1, 1e-3)):
        arrays = FO.ce_point(lse, xt, swx, wt, eps, 7, 6.5, scale, z)
        points = [CL._ce_point(*v, eps, 7, 6.5, s, z) for *v, s in zip(lse, xt, swx, wt, scale)]
        np.testing.assert_allclose(np.array(points).T, np.array(arrays), rtol=1e-12, atol=1e-15)
        arrays = FO.probs_point(lse, a_sum, b_sum, scale, z)
        points = [CL._probs_point(*v, z) for v in zip(lse, a_sum, b_sum, scale)]
        np.testing.assert_allclose(np.array(points).T, np.array(arrays), rtol=1e-12, atol=1e-15)


def test_ignore_index_beyond_int64_ignores_nothing():
    x = np.random.default_rng(1).standard_normal((6, 4))
    t = np.array([0, 1, 2, 3, 0, 1])
    for fn, xx in ((F.cross_entropy, x), (F.nll_loss, x - np.log(np.exp(x).sum(1))[:, None])):
        for big in (2 ** 70, -(2 ** 70)):
            np.testing.assert_equal(fn(xx, t, ignore_index=big, backend="cpu"),
                                    fn(xx, t, backend="cpu"))


def test_linear_cross_entropy_without_classes():
    """A vocabulary of 0 classes (every target ignored): zero losses, -inf logsumexp, NaN
    mean, zero gradients."""
    x = np.ones((4, 3), np.float32)
    w = np.zeros((0, 3), np.float32)
    t = np.full(4, -100)
    loss, lse = F.linear_cross_entropy(x, w, t, reduction="none", return_lse=True,
                                       backend="cpu")
    assert (loss == 0).all() and (lse == -INF).all()
    loss, (gx, gw, _), lse = F.linear_cross_entropy(x, w, t, return_grad=True, return_lse=True,
                                                    backend="cpu")
    assert math.isnan(loss) and (gx == 0).all() and gw.shape == (0, 3) and (lse == -INF).all()
