"""kl_div and KLDivLoss against torch's own ``F.kl_div``: every reduction (``"batchmean"`` and
the warning of ``"mean"`` included), ``log_target``, the legacy ``size_average`` / ``reduce``
(and their interplay with ``"batchmean"``), shapes and broadcasting, dtype promotion, the edge
cases of ``xlogy`` (zero, negative, NaN and subnormal targets, ``-inf`` inputs), gradients
(``grad_output``, ``grad_buffer``, broadcast inputs), bad input, and hypothesis over shapes."""

from __future__ import annotations

import math

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
    tt,
    with_warnings,
)
from hypothesis import given
from hypothesis import strategies as st

from nblosses import functional as F
from nblosses import nn
from nblosses.ops.kl_div import MEAN_WARNING

REDUCTIONS = ["none", "batchmean", "sum", "mean"]
DTYPES = ["float32", "float64"]
SHAPES = [(), (7,), (4, 9), (2, 3, 5), (3, 20_000)]


def _data(shape, dtype, seed=0, log_target=False):
    """Log-probabilities ``x`` and a target: probabilities with some exact zeros, or
    log-probabilities (some ``-inf``: zero probabilities) with ``log_target``."""
    r = rng(seed)
    x = np.log(r.dirichlet(np.ones(shape[-1]), shape[:-1])) if shape else np.log(r.random())
    p = r.random(shape)
    p = np.where(r.random(shape) < 0.2, 0.0, p)
    t = np.log(p + 0.01) if log_target else p
    return np.asarray(x, dtype), np.asarray(t, dtype)


def _torch(x, t, dtype, grad_output=None, **kw):
    """torch's loss (float64 from the same values) and the input's gradient."""
    xt = tt(x, dtype, requires_grad=True)
    loss = TF.kl_div(xt, tt(t, dtype), **kw)
    g = (torch.ones_like(loss) if grad_output is None
         else torch.as_tensor(np.asarray(grad_output), dtype=loss.dtype).reshape(loss.shape))
    loss.backward(g)
    return to_numpy(loss), to_numpy(xt.grad)


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, silencing the warnings it raises (``"mean"``, legacy
    arguments)."""
    return with_warnings(lambda: fn(*args, **kwargs))[0]


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(backend, dtype, shape, reduction, log_target):
    x, t = _data(shape, dtype, log_target=log_target)
    if log_target:
        t = np.maximum(t, -20).astype(dtype)  # finite: -inf log-targets give NaN (own test)
    go = rng(5).uniform(-1, 1, shape).astype(dtype) if reduction == "none" else 0.7
    loss, grad = _quiet(F.kl_div, to_backend(x, backend), to_backend(t, backend),
                        reduction=reduction, log_target=log_target, return_grad=True,
                        grad_output=to_backend(go, backend))
    ref, ref_grad = _quiet(_torch, x, t, dtype, go, reduction=reduction, log_target=log_target)
    assert is_backend_array(loss, backend) and is_backend_array(grad, backend)
    assert loss.shape == (shape if reduction == "none" else ())
    # float32 sums of 60000 elements: torch's own float32 result is off by as much
    rscale = 10.0 if dtype == "float32" and reduction != "none" else 1.0
    assert_close(loss, ref.astype(dtype), dtype, "loss", rscale=rscale)
    assert_close(grad, ref_grad.astype(dtype), dtype, "grad", kind="grad")
    assert_close(F.kl_div(to_backend(x, backend), to_backend(t, backend), reduction="sum",
                          log_target=log_target),
                 _torch(x, t, dtype, reduction="sum", log_target=log_target)[0].astype(dtype),
                 dtype, "forward only", rscale=rscale)


def test_mean_warns_as_torch():
    x, t = _data((3, 4), "float64")
    ours, w_ours = with_warnings(lambda: F.kl_div(x, t))
    ref, w_ref = with_warnings(lambda: TF.kl_div(tt(x), tt(t)))
    assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref] == [MEAN_WARNING]
    assert w_ours[0].filename == __file__  # attributed to the caller's line
    assert_close(ours, to_numpy(ref), "float64")
    for reduction in ("batchmean", "sum", "none"):
        assert not with_warnings(lambda r=reduction: F.kl_div(x, t, reduction=r))[1]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("legacy", LEGACY, ids=param_id)
def test_legacy_arguments(legacy, reduction):
    """size_average / reduce override ``reduction`` and warn as torch's do; ``"batchmean"``
    still divides their result by ``input.shape[0]`` (torch 2.13's order of operations)."""
    size_average, reduce = legacy
    x, t = _data((4, 5), "float64", seed=3)
    (ours, grad), w_ours = with_warnings(lambda: F.kl_div(
        x, t, size_average, reduce, reduction, return_grad=True))
    (ref, ref_grad), w_ref = with_warnings(lambda: _torch(
        x, t, "float64", size_average=size_average, reduce=reduce, reduction=reduction))
    assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref]
    assert_close(ours, ref, "float64")
    assert_close(grad, ref_grad, "float64", kind="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("xs,ts", [((1, 6), (4, 6)), ((4, 6), (6,)), ((4, 1), (4, 6)),
                                   ((6,), (3, 4, 6)), ((3, 1, 6), (1, 4, 6)), ((), (2, 3))],
                         ids=param_id)
def test_broadcasting(backend, xs, ts, reduction):
    """The loss has the broadcast shape; the input's gradient is summed over the axes that
    broadcasting added or stretched; ``"batchmean"`` divides by ``input.shape[0]``."""
    r = rng(7)
    x, t = r.standard_normal(xs) - 2, r.random(ts)
    go = r.uniform(-1, 1, np.broadcast_shapes(xs, ts)) if reduction == "none" else 1.3
    loss, grad = _quiet(F.kl_div, to_backend(x, backend), to_backend(t, backend),
                        reduction=reduction, return_grad=True,
                        grad_output=to_backend(go, backend))
    ref, ref_grad = _quiet(_torch, x, t, "float64", go, reduction=reduction)
    assert grad.shape == xs
    assert_close(loss, ref, "float64")
    assert_close(grad, ref_grad, "float64", kind="grad")
    buf = to_backend(np.empty(xs), backend)  # the summed gradient lands in the buffer
    _, g2 = _quiet(F.kl_div, to_backend(x, backend), to_backend(t, backend),
                   reduction=reduction, return_grad=True, grad_output=to_backend(go, backend),
                   grad_buffer=buf)
    assert g2 is buf
    assert_close(buf, ref_grad, "float64", kind="grad")


def test_dtype_promotion():
    """float32 input with a float64 target: a float64 loss, the gradient in the input's dtype
    (torch's promotion); half-precision input is computed in float32 and rounded once."""
    x, t = _data((3, 8), "float32")
    loss, grad = F.kl_div(x, t.astype(np.float64), reduction="sum", return_grad=True)
    ref, ref_grad = _torch(x, t.astype(np.float64), "float64", reduction="sum")
    assert loss.dtype == np.float64 and grad.dtype == np.float32
    assert_close(loss, ref, "float64")
    assert_close(grad, ref_grad.astype(np.float32), "float32", kind="grad")
    loss = F.kl_div(x.astype(np.float16), t.astype(np.float16), reduction="none")
    ref = TF.kl_div(torch.from_numpy(x).half(), torch.from_numpy(t).half(), reduction="none")
    assert loss.dtype == np.float16
    assert_close(loss, to_numpy(ref), "float16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_xlogy_edge_cases_are_torchs(dtype):
    """Zero targets contribute 0 (but 0 * -inf input is NaN), negative and NaN targets give
    NaN, subnormal targets their exact ``t log t``, +inf targets +inf; the gradient is
    ``-t``; log-targets of -inf give NaN, as in torch."""
    tiny = np.finfo(dtype).tiny
    x = np.array([-np.inf, -1.0, 0.5, -2.0, -0.3, 0.1, -1.0, np.nan, -3.0, 2.0], dtype)
    t = np.array([0.0, 0.0, -0.5, 1e-3 * tiny, tiny, np.nan, np.inf, 0.4, 1.0, 0.25], dtype)
    loss, grad = F.kl_div(x, t, reduction="none", return_grad=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = TF.kl_div(xt, torch.from_numpy(t), reduction="none")
    ref.sum().backward()
    assert_close(loss, to_numpy(ref), dtype, "loss")
    assert_close(grad, to_numpy(xt.grad), dtype, "grad", kind="grad")
    lt = np.array([-np.inf, -np.inf, 0.0, -np.inf, np.nan, -1.0, -80.0, -0.5, 1.0, -2.0],
                  dtype)
    loss, grad = F.kl_div(x, lt, reduction="none", log_target=True, return_grad=True)
    xt.grad = None
    ref = TF.kl_div(xt, torch.from_numpy(lt), reduction="none", log_target=True)
    ref.sum().backward()
    assert_close(loss, to_numpy(ref), dtype, "log-target loss")
    assert_close(grad, to_numpy(xt.grad), dtype, "log-target grad", kind="grad")


def test_infinite_log_target_is_refused(backend):
    x, t = _data((3, 40_000), "float32", log_target=True)
    t[2, 1234] = np.inf
    for reduction in ("none", "sum"):
        with pytest.raises(ValueError, match=r"target must be < \+inf with log_target=True"):
            F.kl_div(to_backend(x, backend), to_backend(t, backend), reduction=reduction,
                     log_target=True, validate="sync")
    p = np.where(np.isinf(t), np.inf, 0.5).astype(np.float32)  # +inf probability: as torch
    assert float(F.kl_div(x, p, reduction="sum")) == math.inf


def test_gradient_into_a_buffer_and_in_place(backend):
    x, t = _data((5, 33), "float64", seed=4)
    ref, ref_grad = _torch(x, t, "float64", reduction="batchmean")
    buf = to_backend(np.empty_like(x), backend)
    loss, g = F.kl_div(to_backend(x, backend), to_backend(t, backend), reduction="batchmean",
                       return_grad=True, grad_buffer=buf)
    assert g is buf
    assert_close(buf, ref_grad, "float64", kind="grad")
    xb = to_backend(x.copy(), backend)
    loss, g = F.kl_div(xb, to_backend(t, backend), reduction="batchmean", return_grad=True,
                       grad_buffer=xb)
    assert g is xb
    assert_close(loss, ref, "float64")
    assert_close(xb, ref_grad, "float64", kind="grad")


def test_empty_inputs_as_torch():
    for shape in ((0, 4), (3, 0)):
        x, t = np.zeros(shape), np.zeros(shape)
        for reduction in REDUCTIONS:
            loss, grad = _quiet(F.kl_div, x, t, reduction=reduction, return_grad=True)
            ref = _quiet(TF.kl_div, tt(x), tt(t), reduction=reduction)
            assert_close(loss, to_numpy(ref), "float64", f"{shape} {reduction}")
            assert grad.shape == shape


def test_bad_input():
    x, t = _data((3, 4), "float64")
    with pytest.raises(TypeError, match="Integral inputs not supported"):
        F.kl_div(x, np.ones((3, 4), np.int64), reduction="sum")
    with pytest.raises(TypeError, match="Integral inputs not supported"):
        F.kl_div(np.zeros((3, 4), np.int32), t, reduction="sum")
    with pytest.raises(ValueError, match=r"size of tensor a \(4\) must match the size of "
                                         r"tensor b \(5\) at non-singleton dimension 1"):
        F.kl_div(x, np.ones((3, 5)), reduction="sum")
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        F.kl_div(x, t, reduction="foo")
    with pytest.raises(ValueError, match="grad_buffer shape"):
        F.kl_div(x, t, reduction="sum", return_grad=True, grad_buffer=np.empty((4, 3)))


def test_module_backward_matches_torch():
    x, t = _data((6, 10), "float64", seed=9)
    for kw in (dict(reduction="sum"), dict(reduction="none", log_target=True),
               dict(size_average=False)):
        target = np.log(t + 0.01) if kw.get("log_target") else t
        m = _quiet(nn.KLDivLoss, **kw)
        loss = _quiet(m, x, target)
        ref, ref_grad = _quiet(_torch, x, target, "float64", **kw)
        assert_close(loss, ref, "float64")
        assert_close(_quiet(m.backward), ref_grad, "float64", kind="grad")


def test_module_batchmean():
    """The module keeps reduction="batchmean" (the legacy pair is resolved only when given)."""
    x, t = _data((6, 10), "float64", seed=9)
    m = nn.KLDivLoss(reduction="batchmean")
    ref, ref_grad = _torch(x, t, "float64", reduction="batchmean")
    assert_close(m(x, t), ref, "float64")
    assert_close(m.backward(), ref_grad, "float64", kind="grad")


@given(xs=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       drop=st.integers(0, 3), ones=st.lists(st.booleans(), min_size=3, max_size=3),
       reduction=st.sampled_from(REDUCTIONS), log_target=st.booleans())
def test_hypothesis_shapes_and_options(xs, drop, ones, reduction, log_target):
    """Random broadcastable pairs (the target may drop leading axes and have unit axes)."""
    ts = [1 if one and i < len(xs) - min(drop, len(xs)) else n
          for i, (n, one) in enumerate(zip(xs, ones + [False] * len(xs)))]
    ts = ts[min(drop, len(xs)):]
    r = rng(len(xs) + drop)
    x = r.standard_normal(tuple(xs)) - 1
    t = r.random(tuple(ts))
    t = np.log(t) if log_target else t
    loss, grad = _quiet(F.kl_div, x, t, reduction=reduction, log_target=log_target,
                        return_grad=True)
    ref, ref_grad = _quiet(_torch, x, t, "float64", reduction=reduction, log_target=log_target)
    assert_close(loss, ref, "float64")
    assert_close(grad, ref_grad, "float64", kind="grad")
