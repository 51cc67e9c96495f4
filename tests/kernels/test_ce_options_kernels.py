"""The CPU cross-entropy kernels' options (``z_loss``, ``softcap``, ``lse_out``) against torch.

Kernels are called through ``nblosses.backends.cpu.KERNELS`` with canonical arguments (logits
``(N, C, inner)`` C-contiguous, targets ``(N, inner)`` int64 or probabilities ``(N, C, inner)``),
so every layout is reached: contiguous rows (C >= 24), short rows (transposed tiles, C < 24) and
a middle axis (inner > 1). The reference is torch autograd on float64 composites:
``xc = c tanh(x / c)``, ``lse = logsumexp(xc)``, ``l = ce(xc) + z lse^2`` at kept positions.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from helpers import ce_options_composite  # noqa: E402

from nblosses.backends.cpu import KERNELS  # noqa: E402

IGNORE = -100
LAYOUTS = {"rows": (6, 40, 1), "short-rows": (300, 10, 1), "middle-axis": (3, 21, 37)}
OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 5.0), (0.02, 3.0)]  # (z_loss, softcap)
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-6)}


def _data(shape, dtype, weighted, probs, seed=0):
    rng = np.random.default_rng(seed)
    n, c, inner = shape
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    w = (rng.random(c) + 0.5).astype(dtype) if weighted else None
    if probs:
        p = rng.random(shape)
        t = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        t = rng.integers(0, c, (n, inner))
        t[0, 0] = IGNORE
        t[-1, -1] = IGNORE
    return x, t, w


def _reference(x, t, w, *, probs, smoothing, reduction, z, cap, g):
    """torch loss, gradient and lse (float64), as the kernel protocol defines them."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t) if not probs else torch.tensor(t, dtype=torch.float64)
    wt = None if w is None else torch.tensor(w, dtype=torch.float64)
    loss, lse = ce_options_composite(xt, tt, wt, label_smoothing=smoothing, reduction=reduction,
                                     z_loss=z, softcap=cap, ignore_index=IGNORE)
    gout = torch.tensor(g, dtype=torch.float64) if reduction == "none" else torch.tensor(g)
    (grad,) = torch.autograd.grad(loss, xt, gout)
    return loss.detach().numpy(), grad.numpy(), lse.detach().numpy()


def _run(x, t, w, *, probs, smoothing, reduction, z, cap, in_place):
    n, _, inner = x.shape
    g = np.linspace(0.5, 1.5, n * inner).reshape(n, inner).astype(x.dtype) \
        if reduction == "none" else 0.75
    lse = np.full((n, inner), np.nan, x.dtype)
    logits = x.copy()
    common = dict(label_smoothing=smoothing, reduction=reduction, want_grad=True, grad_output=g,
                  grad_buffer=logits if in_place else None, z_loss=z, softcap=cap, lse_out=lse)
    if probs:
        loss, grad = KERNELS["cross_entropy_probs"](logits, t, w, **common)
    else:
        loss, grad = KERNELS["cross_entropy"](logits, t, w, ignore_index=IGNORE, **common)
    if in_place:
        assert grad is logits
    return loss, grad, lse, g


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("z,cap", OPTIONS, ids=[f"z{z}-cap{c}" for z, c in OPTIONS])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probs"])
def test_options_match_torch(layout, reduction, z, cap, dtype, probs):
    x, t, w = _data(LAYOUTS[layout], dtype, weighted=True, probs=probs)
    loss, grad, lse, g = _run(x, t, w, probs=probs, smoothing=0.1, reduction=reduction, z=z,
                              cap=cap, in_place=False)
    ref_loss, ref_grad, ref_lse = _reference(x, t, w, probs=probs, smoothing=0.1,
                                             reduction=reduction, z=z, cap=cap, g=g)
    tol = TOL[dtype]
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(loss, ref_loss, **tol)
    np.testing.assert_allclose(grad, ref_grad, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)  # every position, ignored ones included


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probs"])
def test_options_in_place_gradient(layout, smoothing, weighted, probs):
    """The gradient written over the logits (grad_buffer = the input) with both options on."""
    x, t, w = _data(LAYOUTS[layout], np.float64, weighted=weighted, probs=probs, seed=1)
    loss, grad, lse, g = _run(x, t, w, probs=probs, smoothing=smoothing, reduction="mean",
                              z=0.05, cap=4.0, in_place=True)
    ref = _reference(x, t, w, probs=probs, smoothing=smoothing, reduction="mean", z=0.05,
                     cap=4.0, g=g)
    for actual, expected in zip((loss, grad, lse), ref):
        np.testing.assert_allclose(actual, expected, **TOL[np.float64])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_defaults_unchanged(layout):
    """Explicit defaults give bit-identical results to a call without the options."""
    x, t, w = _data(LAYOUTS[layout], np.float32, weighted=True, probs=False)
    common = dict(ignore_index=IGNORE, label_smoothing=0.1, reduction="none", want_grad=True,
                  grad_output=np.ones(t.shape, np.float32), grad_buffer=None)
    loss0, grad0 = KERNELS["cross_entropy"](x, t, w, **common)
    loss1, grad1 = KERNELS["cross_entropy"](x, t, w, **common, z_loss=0.0, softcap=0.0,
                                            lse_out=None)
    np.testing.assert_array_equal(loss0, loss1)
    np.testing.assert_array_equal(grad0, grad1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lse_out_without_gradient(layout):
    """lse_out is filled on the forward-only path too, and the loss is unaffected by asking."""
    x, t, _ = _data(LAYOUTS[layout], np.float64, weighted=False, probs=False)
    lse = np.empty(t.shape)
    common = dict(ignore_index=IGNORE, label_smoothing=0.0, reduction="sum", want_grad=False,
                  grad_output=None, grad_buffer=None)
    loss, grad = KERNELS["cross_entropy"](x, t, None, **common, lse_out=lse)
    assert grad is None
    np.testing.assert_allclose(lse, torch.logsumexp(torch.tensor(x), 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(loss, KERNELS["cross_entropy"](x, t, None, **common)[0],
                               rtol=1e-12)
