"""Property tests (hypothesis): shapes, dims, dtypes and options drawn at random, compared with
torch; softmax slices sum to 1 and log_softmax matches a float64 reference.

Settings come from the "nblosses" profile in conftest.py (max_examples=40, deadline=None:
the first example of a dtype/layout pays Numba's compile or cache load).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as TF
from helpers import assert_close, to_backend, to_numpy, torch_loss_and_grad, tt
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nblosses import functional as F

DTYPES = st.sampled_from(["float32", "float64"])


def _values(dtype, lo=-30.0, hi=30.0):
    if dtype == "float32":  # bounds must be float32 values
        lo, hi = float(np.float32(lo)), float(np.float32(hi))
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                     width=32 if dtype == "float32" else 64)


@st.composite
def float_arrays(draw, min_dims=0, max_dims=4, max_side=6, lo=-30.0, hi=30.0, dtype=None,
                 shape=None):
    dtype = dtype or draw(DTYPES)
    if shape is None:
        shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1,
                                      max_side=max_side))
    return draw(hnp.arrays(np.dtype(dtype), shape, elements=_values(dtype, lo, hi)))


# ----------------------------------------------------------------------------- softmax family
@given(data=st.data(), op=st.sampled_from(["softmax", "log_softmax"]))
def test_softmax_family_matches_torch(backend, data, op):
    x = data.draw(float_arrays())
    extent = max(x.ndim, 1)
    dim = data.draw(st.integers(-extent, extent - 1), label="dim")
    dtype = x.dtype.name
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    ref = getattr(TF, op)(tt(x), dim=dim).numpy()
    # log_softmax = x - lse cancels terms of size |x| <= 30
    assert_close(out, ref, dtype, f"{op} shape {x.shape} dim {dim}",
                 scale=30.0 if op == "log_softmax" else 1.0)


@given(data=st.data())
def test_softmax_sums_to_one_and_log_softmax_matches_float64(backend, data):
    x = data.draw(float_arrays(min_dims=1, lo=-80.0, hi=80.0))
    dim = data.draw(st.integers(-x.ndim, x.ndim - 1), label="dim")
    dtype = x.dtype.name
    p = to_numpy(F.softmax(to_backend(x, backend), dim=dim, backend=backend))
    assert ((p >= 0) & (p <= 1)).all()
    assert_close(p.sum(axis=dim), np.ones(np.delete(x.shape, dim)), dtype, "slice sums",
                 check_dtype=False, scale=float(x.shape[dim]))
    lp = F.log_softmax(to_backend(x, backend), dim=dim, backend=backend)
    x64 = x.astype(np.float64)
    m = x64.max(axis=dim, keepdims=True)
    ref = x64 - m - np.log(np.exp(x64 - m).sum(axis=dim, keepdims=True))
    assert_close(lp, ref.astype(dtype), dtype, "log_softmax vs float64", scale=80.0)


@given(data=st.data(), op=st.sampled_from(["softmax", "log_softmax"]))
def test_softmax_backward_matches_torch(backend, data, op):
    x = data.draw(float_arrays(min_dims=1, dtype="float64", lo=-10, hi=10))
    g = data.draw(float_arrays(shape=x.shape, dtype="float64", lo=-3, hi=3))
    dim = data.draw(st.integers(-x.ndim, x.ndim - 1), label="dim")
    xt = tt(x, requires_grad=True)
    y = getattr(TF, op)(xt, dim=dim)
    y.backward(tt(g))
    out = getattr(F, f"{op}_backward")(to_backend(g, backend), to_backend(y.detach().numpy(),
                                                                           backend),
                                       dim, backend=backend)
    assert_close(out, xt.grad.numpy(), "float64", f"{op}_backward", kind="grad")


# ----------------------------------------------------------------------------- class losses
def _torch_opts(opts, dtype):
    return {k: tt(v, dtype) if isinstance(v, np.ndarray) else v for k, v in opts.items()}


@st.composite
def class_loss_cases(draw):
    dtype = draw(DTYPES)
    n_classes = draw(st.integers(1, 7), label="C")
    ndim = draw(st.integers(1, 4), label="input ndim")
    if ndim == 1:
        shape = (n_classes,)
    else:
        n = draw(st.integers(0, 5), label="N")
        spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim - 2, max_size=ndim - 2)))
        shape = (n, n_classes) + spatial
    x = draw(float_arrays(shape=shape, dtype=dtype, lo=-20, hi=20))
    op = draw(st.sampled_from(["nll_loss", "cross_entropy", "cross_entropy_probs"]))
    tshape = () if ndim == 1 else (shape[0],) + shape[2:]
    opts = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])))
    if draw(st.booleans()):
        opts["weight"] = draw(hnp.arrays(np.dtype(dtype), (n_classes,),
                                         elements=_values(dtype, 0.1, 3.0)))
    if op == "cross_entropy_probs":
        t = draw(hnp.arrays(np.dtype(dtype), shape, elements=_values(dtype, 0.0, 1.0)))
    else:
        t = draw(hnp.arrays(np.int64, tshape, elements=st.integers(0, n_classes - 1)))
        ignore = draw(st.sampled_from([-100, -1, 0, n_classes - 1, 2]))
        opts["ignore_index"] = ignore
        ignored = draw(hnp.arrays(np.bool_, tshape))
        t = np.where(ignored, ignore, t) if ignore < 0 else t
    if op != "nll_loss":
        opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]) |
                                       st.floats(0.0, 1.0))
    return op, x, t, opts


@given(case=class_loss_cases(), seed=st.integers(0, 2**16))
def test_class_losses_match_torch(backend, case, seed):
    op, x, t, opts = case
    name = "nll_loss" if op == "nll_loss" else "cross_entropy"
    dtype = x.dtype.name
    if op == "nll_loss":  # nll expects log-probabilities
        x = TF.log_softmax(tt(x), dim=0 if x.ndim == 1 else 1).numpy()
    reduction = opts["reduction"]
    loss_shape = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
    go = (np.random.default_rng(seed).uniform(-2, 2, loss_shape) if reduction == "none"
          else 1.3)
    ref, ref_grad = torch_loss_and_grad(
        lambda xt: getattr(TF, name)(xt, tt(t, dtype), **_torch_opts(opts, dtype)),
        x, dtype, grad_output=go)
    bopts = {k: to_backend(v, backend) if isinstance(v, np.ndarray) else v
             for k, v in opts.items()}
    loss = getattr(F, name)(to_backend(x, backend), to_backend(t, backend), backend=backend,
                            **bopts)
    loss2, grad = getattr(F, name)(to_backend(x, backend), to_backend(t, backend),
                                   return_grad=True, grad_output=to_backend(np.asarray(go),
                                                                            backend),
                                   backend=backend, **bopts)
    what = f"{op} {x.shape} {opts}"
    # lse - x[t] cancels terms of size |x| <= 20
    assert_close(loss, ref.astype(dtype), dtype, what, scale=20.0)
    assert_close(loss2, ref.astype(dtype), dtype, what + " (return_grad)", scale=20.0)
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")
    if "ignore_index" in opts:
        ign = np.asarray(t) == opts["ignore_index"]
        g = np.moveaxis(to_numpy(grad), 0 if x.ndim == 1 else 1, -1)
        assert (g[ign] == 0).all() if x.ndim > 1 else (not ign or (g == 0).all())


# ----------------------------------------------------------------------------- binary losses
@st.composite
def binary_cases(draw):
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    logits = draw(st.booleans())
    if logits:
        x = draw(float_arrays(shape=shape, dtype=dtype, lo=-50, hi=50))
    else:
        x = draw(float_arrays(shape=shape, dtype=dtype, lo=0.0, hi=1.0))
    y = draw(float_arrays(shape=shape, dtype=dtype, lo=0.0, hi=1.0))
    opts = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])))
    if draw(st.booleans()):
        # a weight broadcastable to the input: a suffix of its shape with some sides set to 1
        k = draw(st.integers(0, len(shape)))
        wshape = tuple(s if draw(st.booleans()) else 1 for s in shape[len(shape) - k:])
        opts["weight"] = draw(float_arrays(shape=wshape, dtype=dtype, lo=0.0, hi=3.0))
    if logits and shape and draw(st.booleans()):
        opts["pos_weight"] = draw(float_arrays(shape=shape[-1:], dtype=dtype, lo=0.0, hi=5.0))
    return logits, x, y, opts


@given(case=binary_cases())
def test_binary_losses_match_torch(backend, case):
    logits, x, y, opts = case
    name = "binary_cross_entropy_with_logits" if logits else "binary_cross_entropy"
    dtype = x.dtype.name
    ref, ref_grad = torch_loss_and_grad(
        lambda xt: getattr(TF, name)(xt, tt(y, dtype), **_torch_opts(opts, dtype)),
        x, dtype)
    bopts = {k: to_backend(v, backend) if isinstance(v, np.ndarray) else v
             for k, v in opts.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, grad = getattr(F, name)(to_backend(x, backend), to_backend(y, backend),
                                      return_grad=True, backend=backend, **bopts)
    what = f"{name} {x.shape} {opts}"
    # with logits, (1-y)x - lw*logsigmoid(x) cancels terms of size |x| <= 50
    assert_close(loss, ref.astype(dtype), dtype, what, scale=50.0 if logits else 1.0)
    assert_close(grad, ref_grad.astype(dtype), dtype, what, kind="grad")


@given(x=float_arrays(lo=-100, hi=100))
def test_sigmoid_matches_torch(backend, x):
    out = F.sigmoid(to_backend(x, backend), backend=backend)
    assert_close(out, torch.sigmoid(tt(x)).numpy(), x.dtype.name, "sigmoid")
