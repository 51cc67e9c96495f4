"""F.linear_cross_entropy / nn.LinearCrossEntropyLoss against torch 2.13, through the public API
(the chunked kernels themselves: tests/test_linear_cross_entropy.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, param_id, rng

from nblosses import functional as F
from nblosses import nn

N, D, V = 7, 6, 11


def _data(dtype, probs=False, kdim=(), bias=True, seed=0):
    r = rng(seed)
    x = r.standard_normal((N, D)).astype(dtype)
    w = r.standard_normal((V, *kdim, D)).astype(dtype)
    b = r.standard_normal((V, *kdim)).astype(dtype) if bias else None
    if probs:
        t = r.dirichlet(np.ones(V), (N, *kdim)).astype(dtype)
        t = np.moveaxis(t, -1, 1)
    else:
        t = r.integers(0, V, (N, *kdim))
        t.reshape(-1)[::4] = -100
    return x, w, b, t


def _torch(x, w, b, t, grad=True, **kw):
    xt, wt = (torch.tensor(a, requires_grad=True) for a in (x, w))
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    kw = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    loss = TF.linear_cross_entropy(xt, wt, torch.tensor(t), linear_bias=bt, **kw)
    if grad:
        loss.sum().backward()
    grads = (xt.grad, wt.grad, None if bt is None else bt.grad)
    return loss.detach().numpy(), [None if g is None else g.numpy() for g in grads]


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"weight": "w"},
    {"ignore_index": 3, "reduction": "none"},
    {"weight": "w", "label_smoothing": 0.1, "reduction": "mean"},
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opts", OPTIONS, ids=param_id)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(dtype, opts, bias):
    x, w, b, t = _data(dtype, bias=bias)
    opts = {k: (rng(5).uniform(0.5, 2, V).astype(dtype) if v == "w" else v)
            for k, v in opts.items()}
    if "ignore_index" in opts:
        t = np.where(t == -100, opts["ignore_index"], t)
    loss, grads = F.linear_cross_entropy(x, w, t, linear_bias=b, return_grad=True, **opts)
    ref, ref_grads = _torch(x, w, b, t, **opts)
    assert loss.dtype == np.dtype(dtype)
    assert_close(loss, ref, dtype, "loss")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        if want is None:
            assert got is None
        else:
            assert_close(got, want, dtype, name, kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["probabilities", "k-dimensional", "one row"])
def test_target_kinds_match_torch(dtype, kind):
    if kind == "probabilities":
        x, w, b, t = _data(dtype, probs=True)
    elif kind == "k-dimensional":
        x, w, b, t = _data(dtype, kdim=(3,))
    else:
        x, w, b, t = _data(dtype)
        x, t = x[0], np.array(t[1])
    loss, grads = F.linear_cross_entropy(x, w, t, linear_bias=b, return_grad=True,
                                         label_smoothing=0.1)
    ref, ref_grads = _torch(x, w, b, t, label_smoothing=0.1)
    assert_close(loss, ref, dtype, kind)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want, dtype, kind, kind="grad")


def test_extensions_match_composites():
    x, w, b, t = _data("float64")
    loss, grads, lse = F.linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-2,
                                              softcap=2.0, return_grad=True, return_lse=True)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    logits = 2.0 * torch.tanh((xt @ wt.T + bt) / 2.0)
    tt = torch.tensor(t)
    ref_lse = torch.logsumexp(logits, 1)
    keep = tt != -100
    per_row = TF.cross_entropy(logits, tt, reduction="none") + 1e-2 * ref_lse ** 2 * keep
    ref = per_row.sum() / keep.sum()
    ref.backward()
    assert_close(loss, ref.detach().numpy(), "float64", "z_loss + softcap")
    assert_close(lse, ref_lse.detach().numpy(), "float64", "lse")
    for got, want in zip(grads, (xt.grad, wt.grad, bt.grad)):
        assert_close(got, want.numpy(), "float64", "grad", kind="grad")


def test_all_ignored_mean_is_nan():
    x, w, _, _ = _data("float64")
    loss, (gx, gw, _) = F.linear_cross_entropy(x, w, np.full(N, -100), return_grad=True)
    assert np.isnan(loss) and not gx.any() and not gw.any()


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, t: F.linear_cross_entropy(x[None], w, t), ValueError, "dimensionality 1 or 2"),
    (lambda x, w, t: F.linear_cross_entropy(x, w[:, :-1], t), ValueError, "in_features"),
    (lambda x, w, t: F.linear_cross_entropy(x, w, t, linear_bias=np.zeros(3)), ValueError,
     "linear_bias shape"),
    (lambda x, w, t: F.linear_cross_entropy(x, w, np.full((N, V), 0.1), ignore_index=-1),
     ValueError, "ignore_index cannot be specified"),
    (lambda x, w, t: F.linear_cross_entropy(x, w, t + V + 100), IndexError, "out of bounds"),
    (lambda x, w, t: F.linear_cross_entropy(x, w, t[:-1]), ValueError, "batch_size"),
    (lambda x, w, t: F.linear_cross_entropy(x, w, t, label_smoothing=2.0), ValueError,
     "label_smoothing"),
])
def test_bad_input(call, error, match):
    x, w, _, t = _data("float64")
    with pytest.raises(error, match=match):
        call(x, w, t)


def test_torch_options_object_is_accepted():
    x, w, b, t = _data("float64")
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    got = F.linear_cross_entropy(x, w, t, linear_bias=b, options=opts)
    assert_close(got, F.linear_cross_entropy(x, w, t, linear_bias=b), "float64", "options")


def test_module_matches_torch_and_keeps_parameter_gradients():
    ours = nn.LinearCrossEntropyLoss(D, V, bias=True, dtype=np.float64, label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, bias=True, dtype=torch.float64,
                                             label_smoothing=0.1)
    with torch.no_grad():
        theirs.linear.weight.copy_(torch.tensor(ours.linear_weight))
        theirs.linear.bias.copy_(torch.tensor(ours.linear_bias))
    x, _, _, t = _data("float64")
    xt = torch.tensor(x, requires_grad=True)
    ref = theirs(xt, torch.tensor(t))
    ref.backward()
    assert_close(ours(x, t), ref.detach().numpy(), "float64", "module loss")
    assert_close(ours.backward(), xt.grad.numpy(), "float64", "module grad", kind="grad")
    assert_close(ours.linear_weight_grad, theirs.linear.weight.grad.numpy(), "float64",
                 "weight grad", kind="grad")
    assert_close(ours.linear_bias_grad, theirs.linear.bias.grad.numpy(), "float64",
                 "bias grad", kind="grad")
    bound = 1 / np.sqrt(D)
    assert np.abs(nn.LinearCrossEntropyLoss(D, V).linear_weight).max() <= bound


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dask_arrays_vocabulary_parallel(reduction):
    da = pytest.importorskip("dask.array")
    import dask

    x, w, b, t = _data("float64")
    kw = dict(linear_bias=b, reduction=reduction, label_smoothing=0.1, return_grad=True,
              return_lse=True)
    ref = F.linear_cross_entropy(x, w, t, **kw)
    lazy = F.linear_cross_entropy(da.from_array(x, chunks=(3, D)),
                                  da.from_array(w, chunks=(4, D)), t, **kw)
    (loss, grads, lse), = dask.compute(lazy)
    assert_close(loss, ref[0], "float64", "dask loss")
    assert_close(lse, ref[2], "float64", "dask lse")
    for got, want in zip(grads, ref[1]):
        assert_close(got, want, "float64", "dask grad", kind="grad")
    bad = t.copy()
    bad[0] = V + 3
    with pytest.raises(IndexError, match=f"Target {V + 3}"):
        dask.compute(F.linear_cross_entropy(da.from_array(x, chunks=(3, D)), w, bad))
