"""Dask arrays through the functional and nn APIs (nblosses._dask).

References: nblosses itself on the same NumPy arrays (every op, option and chunking: batch /
spatial axes only, the class axis only, both), torch for a few cases. Schedulers: the threaded
one (``scheduler="threads"``) everywhere, a 2-process ``distributed.LocalCluster`` for a subset.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]')")
import dask  # noqa: E402

import nblosses  # noqa: E402
from nblosses import functional as F  # noqa: E402
from nblosses import nn  # noqa: E402

RNG = np.random.default_rng(20261127)
THREADS = {"scheduler": "threads"}

# (shape, chunkings): the class axis whole, split alone, split with the others.
CASES_2D = ((10, 7), {"batch": (4, 7), "class": (10, 3), "both": (4, 2)})
CASES_3D = ((4, 5, 6), {"batch": (2, 5, 4), "class": (4, 2, 6), "both": (3, 2, 4)})
CASES_1D = ((7,), {"batch": (7,), "class": (3,)})
CLASS_CASES = [(shape, name, ch) for shape, chunks in (CASES_2D, CASES_3D, CASES_1D)
               for name, ch in chunks.items()]
CLASS_IDS = [f"{'x'.join(map(str, s))}-{n}" for s, n, _ in CLASS_CASES]


def compute(*arrays, **kw):
    return dask.compute(*arrays, **(kw or THREADS))


def assert_close(actual, expected, rtol=1e-9, atol=1e-12):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def class_inputs(shape, ignore_index=-100, every=3):
    """Float64 logits, int targets (every ``every``-th ignored), weights, probability targets."""
    x = RNG.standard_normal(shape) * 3
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    axis = 0 if len(shape) == 1 else 1
    t = RNG.integers(0, n_classes, shape[:1] + shape[2:] if len(shape) > 1 else ())
    if t.ndim:
        t.reshape(-1)[::every] = ignore_index
    w = RNG.random(n_classes) + 0.25
    p = RNG.random(shape)
    p /= p.sum(axis=axis, keepdims=True)
    return x, t, w, p


def target_chunks(chunks):
    return chunks[:1] + chunks[2:] if len(chunks) > 1 else ()


def to_dask(a, chunks):
    return da.from_array(a, chunks=chunks)


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("chunks", [(5, 7, 2), (2, 3, 4), (8, 2, 1)], ids=str)
def test_softmax_family_every_dim(op, chunks):
    x = RNG.standard_normal((8, 7, 4))
    dx = to_dask(x, chunks)
    outs = [getattr(F, op)(dx, d) for d in (0, 1, 2, -1)]
    assert all(isinstance(o, da.Array) and o.chunks == dx.chunks for o in outs)
    for d, out in zip((0, 1, 2, -1), compute(*outs)):
        assert_close(out, getattr(F, op)(x, d))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_special_values_across_class_chunks(op):
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    x[1, 5] = np.nan  # NaN in one chunk -> the whole row NaN
    x[2, 0] = np.inf  # +inf -> NaN row
    x[3] = -np.inf  # only -inf -> NaN row
    x[4, :4] = -np.inf  # one chunk only -inf: ignored by the merge
    x[5] = [1e4, -1e4, 3e3, 0, 88, -88, 1e4, 5]  # large spread
    out = getattr(F, op)(to_dask(x, (3, 4)), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the merge
        (got,) = compute(out)
    # float64 reference: x - max - log(sum(exp(x - max))) exactly as torch rounds it
    assert_close(got, getattr(F, op)(x.astype(np.float64), 1).astype(np.float32),
                 rtol=2e-6, atol=1e-6)


def test_softmax_dtype_and_implicit_dim():
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    got = F.softmax(to_dask(x, (2, 3)), 1, dtype=np.float64)
    assert got.dtype == np.float64
    assert_close(compute(got)[0], F.softmax(x, 1, dtype=np.float64))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        implicit = F.log_softmax(to_dask(x, (2, 3)))
    assert_close(compute(implicit)[0], F.log_softmax(x, 1), rtol=2e-6, atol=1e-6)
    with pytest.raises(TypeError, match="floating-point"):
        F.softmax(to_dask(np.arange(6).reshape(2, 3), 1), 1)
    with pytest.raises(IndexError, match="Dimension out of range"):
        F.softmax(to_dask(x, 2), 2)


@pytest.mark.parametrize("op", ["softmax_backward", "log_softmax_backward"])
@pytest.mark.parametrize("chunks", [(3, 6), (6, 2), (2, 4)], ids=str)
def test_softmax_backward(op, chunks):
    x, g = RNG.standard_normal((6, 6)), RNG.standard_normal((6, 6))
    y = (F.softmax if op == "softmax_backward" else F.log_softmax)(x, 1)
    got = getattr(F, op)(to_dask(g, chunks), to_dask(y, chunks), 1)
    assert_close(compute(got)[0], getattr(F, op)(g, y, 1))
    with pytest.raises(ValueError, match="does not match"):
        getattr(F, op)(to_dask(g[:3], 3), to_dask(y, chunks), 1)


def test_sigmoid_and_backward():
    x = (RNG.standard_normal((9, 5)) * 10).astype(np.float32)
    dx = to_dask(x, (4, 2))
    y = F.sigmoid(dx)
    g = to_dask(RNG.standard_normal((9, 5)).astype(np.float32), (3, 5))  # other chunks
    gy, yy = compute(F.sigmoid_backward(g, y), y)
    assert_close(yy, F.sigmoid(x))
    assert_close(gy, F.sigmoid_backward(np.asarray(g), F.sigmoid(x)))


# ----------------------------------------------------------------------------- class losses
# Each reduction with a covering set of (weighted, label_smoothing, ignore_index).
OPTIONS = [dict(reduction=r, weighted=w, label_smoothing=e, ignore_index=i)
           for r in ("mean", "sum", "none")
           for w, e, i in ((False, 0.0, -100), (True, 0.0, 1), (False, 0.2, 1), (True, 0.2, -100))]


def _kwargs(opt, w, op):
    kw = dict(reduction=opt["reduction"], ignore_index=opt["ignore_index"],
              weight=w if opt["weighted"] else None)
    if op == "cross_entropy":
        kw["label_smoothing"] = opt["label_smoothing"]
    return kw


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("shape,name,chunks", CLASS_CASES, ids=CLASS_IDS)
def test_class_losses_match_numpy(op, shape, name, chunks):
    """Loss, loss+gradient, every reduction / weight / smoothing / ignore_index combination."""
    opts = [o for o in OPTIONS if op == "cross_entropy" or o["label_smoothing"] == 0]
    lazy, expected = [], []
    for opt in opts:
        x, t, w, _ = class_inputs(shape, ignore_index=opt["ignore_index"])
        if op == "nll_loss":
            x = F.log_softmax(x, 0 if len(shape) == 1 else 1)
        kw = _kwargs(opt, w, op)
        dx, dt = to_dask(x, chunks), to_dask(t, target_chunks(chunks))
        dw = None if kw["weight"] is None else to_dask(w, chunks[1] if len(shape) > 1 else chunks)
        ref_loss, ref_grad = getattr(F, op)(x, t, return_grad=True, **kw)
        lazy += getattr(F, op)(dx, dt, return_grad=True, **kw)
        expected += [ref_loss, ref_grad]
        if opt["reduction"] != "sum":  # the loss alone (a dask weight chunked like the classes)
            lazy.append(getattr(F, op)(dx, dt, **{**kw, "weight": dw}))
            expected.append(ref_loss)
    assert all(isinstance(a, da.Array) for a in lazy)
    for got, want in zip(compute(*lazy), expected):
        assert_close(got, want)


@pytest.mark.parametrize("shape,name,chunks", CLASS_CASES, ids=CLASS_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probability_targets(shape, name, chunks, reduction):
    x, _, w, p = class_inputs(shape)
    lazy, expected = [], []
    for weight, eps in itertools.product((None, w), (0.0, 0.3)):
        kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
        lazy += F.cross_entropy(to_dask(x, chunks), to_dask(p, chunks), return_grad=True, **kw)
        expected += F.cross_entropy(x, p, return_grad=True, **kw)
    for got, want in zip(compute(*lazy), expected):
        assert_close(got, want)


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("chunks", [(4, 7), (4, 3)], ids=["batch", "both"])
def test_grad_output_forms(op, chunks):
    x, t, w, _ = class_inputs((10, 7))
    dx, dt = to_dask(x, chunks), to_dask(t, chunks[0])
    g_rows = RNG.standard_normal(10)
    fn = getattr(F, op)

    def grad(*args, **kw):
        return fn(*args, w, return_grad=True, **kw)[1]

    lazy = [grad(dx, dt, reduction="none", grad_output=g_rows),
            grad(dx, dt, reduction="none", grad_output=to_dask(g_rows, 3)),
            grad(dx, dt, grad_output=2.5),
            grad(dx, dt, grad_output=da.from_array(np.array([2.5]))),
            grad(dx, dt, reduction="sum", grad_output=np.float64(-1))]
    expected = [grad(x, t, reduction="none", grad_output=g_rows)] * 2
    expected += [grad(x, t, grad_output=2.5)] * 2
    expected += [grad(x, t, reduction="sum", grad_output=-1.0)]
    for got, want in zip(compute(*lazy), expected):
        assert_close(got, want)
    with pytest.raises(ValueError, match="must be a scalar"):
        getattr(F, op)(dx, dt, return_grad=True, grad_output=np.ones(2))
    with pytest.raises(ValueError, match="does not match the loss shape"):
        getattr(F, op)(dx, dt, reduction="none", return_grad=True, grad_output=np.ones(3))


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("chunks", [(3, 6), (3, 2)], ids=["batch", "both"])
def test_all_ignored_and_empty(op, chunks):
    x = RNG.standard_normal((8, 6))
    t = np.full(8, -100)
    loss, grad = getattr(F, op)(to_dask(x, chunks), t, return_grad=True)
    total = getattr(F, op)(to_dask(x, chunks), t, reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad, total = compute(loss, grad, total)
    assert np.isnan(loss) and loss.shape == () and not grad.any() and total == 0
    empty = da.zeros((0, 6), chunks=(1, 3))
    mean, summed = compute(getattr(F, op)(empty, np.zeros(0, np.int64)),
                           getattr(F, op)(empty, np.zeros(0, np.int64), reduction="sum"))
    assert np.isnan(mean) and summed == 0


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("chunks", [(4, 6), (4, 2)], ids=["batch", "class"])
def test_out_of_range_target_raises_at_compute(op, chunks):
    x = RNG.standard_normal((8, 6))
    for bad in (6, -1):
        t = np.array([0, 1, 2, 3, 4, 5, bad, 0])
        lazy = getattr(F, op)(to_dask(x, chunks), to_dask(t, 4), reduction="none")  # lazy: fine
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            compute(lazy)


def test_class_loss_eager_errors():
    x = to_dask(RNG.standard_normal((8, 6)), (4, 3))
    t = np.zeros(8, np.int64)
    with pytest.raises(ValueError, match="batch_size"):
        F.cross_entropy(x, np.zeros(7, np.int64))
    with pytest.raises(TypeError, match="integer target"):
        F.nll_loss(x, np.zeros(8))
    with pytest.raises(TypeError, match="floating-point"):
        F.cross_entropy(to_dask(np.zeros((8, 6), np.int64), 4), t)
    with pytest.raises(ValueError, match="weight must be a 1-D array of length C = 6"):
        F.cross_entropy(x, t, weight=np.ones(5))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="ignore_index"):
        F.cross_entropy(x, to_dask(np.full((8, 6), 1 / 6), 4), ignore_index=0)
    with pytest.raises(TypeError, match="grad_buffer"):
        F.cross_entropy(x, t, return_grad=True, grad_buffer=np.empty((8, 6)))
    with pytest.raises(ValueError, match="unknown backend"):
        F.cross_entropy(x, t, backend="nope")
    with pytest.warns(UserWarning, match="size_average"):
        summed = F.cross_entropy(x, t, size_average=False)
    assert_close(compute(summed)[0], F.cross_entropy(np.asarray(x), t, reduction="sum"))


def test_cross_entropy_special_values_across_class_chunks():
    x = RNG.standard_normal((6, 8))
    x[0, :4] = -np.inf  # one chunk of only -inf (the target lies in the other one)
    x[1, 6] = np.inf
    x[2, 2] = np.nan
    x[3] = -np.inf
    x[4] = [1e4, -1e4, 3e3, 0, 88, -88, 1e4, 5]
    t = np.array([5, 1, 2, 3, 0, 7])
    for kw in ({}, {"label_smoothing": 0.1, "reduction": "none"}, {"reduction": "none"}):
        lazy = F.cross_entropy(to_dask(x, (3, 4)), t, return_grad=True, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, grad = compute(*lazy)
        ref_loss, ref_grad = F.cross_entropy(x, t, return_grad=True, **kw)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_float32_and_float16_keep_dtype():
    x, t, w, _ = class_inputs((12, 10))
    for dtype, tol in ((np.float32, 2e-6), (np.float16, 2e-3)):
        xd = x.astype(dtype)
        for chunks in ((4, 10), (4, 3)):
            loss, grad = F.cross_entropy(to_dask(xd, chunks), t, w, label_smoothing=0.1,
                                         return_grad=True)
            loss, grad = compute(loss, grad)
            ref_loss, ref_grad = F.cross_entropy(xd, t, w, label_smoothing=0.1, return_grad=True)
            assert_close(loss, ref_loss, rtol=tol, atol=tol)
            assert_close(grad, ref_grad, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- binary losses
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_losses(reduction):
    x = RNG.standard_normal((9, 6, 2))
    prob = F.sigmoid(x)
    y = (RNG.random(x.shape) > 0.4).astype(np.float64)
    w = RNG.random((6, 1)) + 0.5
    pw = RNG.random(2) + 0.5
    chunks = (4, 3, 1)
    lazy, expected = [], []
    for weight in (None, w, to_dask(w, (2, 1))):
        wn = None if weight is None else np.asarray(weight)
        lazy += F.binary_cross_entropy(to_dask(prob, chunks), y, weight, reduction=reduction,
                                       return_grad=True)
        expected += F.binary_cross_entropy(prob, y, wn, reduction=reduction, return_grad=True)
        lazy += F.binary_cross_entropy_with_logits(to_dask(x, chunks), to_dask(y, 3), weight,
                                                   reduction=reduction, pos_weight=pw,
                                                   return_grad=True)
        expected += F.binary_cross_entropy_with_logits(x, y, wn, reduction=reduction,
                                                       pos_weight=pw, return_grad=True)
    for got, want in zip(compute(*lazy), expected):
        assert_close(got, want)


def test_binary_errors():
    x = to_dask(RNG.random((6, 4)), 3)
    with pytest.raises(ValueError, match="must be the same as input size"):
        F.binary_cross_entropy(x, np.zeros((6, 3)))
    with pytest.raises(ValueError, match="cannot be broadcast"):
        F.binary_cross_entropy_with_logits(x, np.zeros((6, 4)), pos_weight=np.ones(3))
    lazy = F.binary_cross_entropy(x * 3 - 1, np.zeros((6, 4)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        compute(lazy)


# ----------------------------------------------------------------------------- torch
def test_against_torch_autograd():
    torch = pytest.importorskip("torch")
    x, t, w, p = class_inputs((16, 9))
    for chunks in ((5, 9), (5, 4)):
        dx = to_dask(x, chunks)
        loss, grad = compute(*F.cross_entropy(dx, t, w, label_smoothing=0.15, return_grad=True))
        ploss, pgrad = compute(*F.cross_entropy(dx, to_dask(p, chunks), w, return_grad=True))
        for target, got_loss, got_grad, eps in ((t, loss, grad, 0.15), (p, ploss, pgrad, 0.0)):
            xt = torch.tensor(x, requires_grad=True)
            ref = torch.nn.functional.cross_entropy(xt, torch.tensor(target), torch.tensor(w),
                                                    label_smoothing=eps)
            ref.backward()
            np.testing.assert_allclose(got_loss, ref.item(), rtol=1e-10)
            np.testing.assert_allclose(got_grad, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    logp = F.log_softmax(x, 1)
    (nll,) = compute(F.nll_loss(to_dask(logp, (4, 3)), t, w, reduction="sum"))
    ref = torch.nn.functional.nll_loss(torch.tensor(logp), torch.tensor(t), torch.tensor(w),
                                       reduction="sum")
    np.testing.assert_allclose(nll, ref.item(), rtol=1e-10)


# ----------------------------------------------------------------------------- nn modules
@pytest.mark.parametrize("chunks", [(3, 6), (3, 2)], ids=["batch", "both"])
def test_modules_forward_backward(chunks):
    x, t, w, _ = class_inputs((9, 6))
    dx = to_dask(x, chunks)
    logsm, nll = nn.LogSoftmax(dim=1), nn.NLLLoss(weight=w)
    ce = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    sig, bce = nn.Sigmoid(), nn.BCELoss()
    y = (RNG.random(x.shape) > 0.5).astype(np.float64)
    lazy = [nll(logsm(dx), t), ce(dx, t), bce(sig(dx), y)]
    lazy += [logsm.backward(nll.backward()), ce.backward(), sig.backward(bce.backward())]
    assert all(isinstance(a, da.Array) for a in lazy)
    m1, m2 = nn.LogSoftmax(dim=1), nn.NLLLoss(weight=w)
    ce2 = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    s2, b2 = nn.Sigmoid(), nn.BCELoss()
    expected = [m2(m1(x), t), ce2(x, t), b2(s2(x), y)]
    expected += [m1.backward(m2.backward()), ce2.backward(), s2.backward(b2.backward())]
    for got, want in zip(compute(*lazy), expected):
        assert_close(got, want)


# ----------------------------------------------------------------------------- plumbing
def test_lazy_graph_on_huge_array_and_backend_captured(restore_backend_default):
    x = da.zeros((1 << 20, 1 << 17), dtype=np.float32, chunks=(1 << 14, 1 << 15))  # 512 GiB
    t = da.zeros(1 << 20, dtype=np.int64, chunks=1 << 14)
    with nblosses.use_backend("cpu"):
        loss, grad = F.cross_entropy(x, t, return_grad=True)
    assert loss.shape == () and loss.dtype == np.float32
    assert grad.shape == x.shape and grad.chunks == x.chunks
    small = to_dask(RNG.standard_normal((4, 6)), (2, 3))
    with nblosses.use_backend("cpu"):
        lazy = F.cross_entropy(small, np.arange(4))
    nblosses.set_backend("auto")
    assert_close(compute(lazy)[0], F.cross_entropy(np.asarray(small), np.arange(4)))


def test_import_nblosses_does_not_import_dask():
    code = ("import sys, numpy as np, nblosses as nbl; "
            "nbl.functional.cross_entropy(np.zeros((2, 3)), np.array([0, 1])); "
            "assert 'dask' not in sys.modules, 'dask imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_many_threads_share_the_kernels():
    x, t, w, _ = class_inputs((64, 40))
    lazy = [F.cross_entropy(to_dask(x, (4, 40)), t, w, return_grad=True)[1],
            F.cross_entropy(to_dask(x, (4, 10)), t, w, return_grad=True)[1]]
    ref = F.cross_entropy(x, t, w, return_grad=True)[1]
    for got in dask.compute(*lazy, scheduler="threads", num_workers=8):
        assert_close(got, ref)


# ----------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip(
        "distributed", reason="distributed is not installed (pip install distributed)")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


def test_distributed_local_cluster(cluster_client):
    x, t, w, p = class_inputs((24, 10))
    logits = RNG.standard_normal((6, 8, 5))
    lazy, expected = [], []
    for chunks in ((8, 10), (8, 4)):
        dx = to_dask(x, chunks)
        lazy += F.cross_entropy(dx, to_dask(t, 8), w, label_smoothing=0.1, return_grad=True)
        expected += F.cross_entropy(x, t, w, label_smoothing=0.1, return_grad=True)
        lazy += F.cross_entropy(dx, to_dask(p, chunks), return_grad=True)
        expected += F.cross_entropy(x, p, return_grad=True)
    lazy.append(F.softmax(to_dask(x, (8, 4)), 1))
    expected.append(F.softmax(x, 1))
    lazy.append(F.log_softmax(to_dask(logits, (3, 3, 5)), 1))
    expected.append(F.log_softmax(logits, 1))
    futures = cluster_client.compute(lazy)
    for got, want in zip(cluster_client.gather(futures), expected):
        assert_close(got, want)
    bad = F.nll_loss(to_dask(x, (8, 4)), np.full(24, 10))
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        cluster_client.compute(bad).result()


# ----------------------------------------------------------------------------- CuPy chunks
@pytest.mark.cuda
def test_cupy_chunks():
    from conftest import CUDA_AVAILABLE

    if not CUDA_AVAILABLE:
        pytest.skip("backend 'cuda' not available here (no CuPy or no CUDA device)")
    import cupy

    x, t, w, _ = class_inputs((64, 50))
    x32 = x.astype(np.float32)
    for chunks in ((16, 50), (16, 13)):
        dx = da.from_array(cupy.asarray(x32), chunks=chunks)
        dt = da.from_array(cupy.asarray(t), chunks=16)
        loss, grad = F.cross_entropy(dx, dt, cupy.asarray(w), label_smoothing=0.1,
                                     return_grad=True)
        sm = F.softmax(dx, 1)
        loss, grad, sm = compute(loss, grad, sm)
        assert isinstance(loss, cupy.ndarray) and isinstance(grad, cupy.ndarray)
        ref_loss, ref_grad = F.cross_entropy(x32, t, w.astype(np.float32), label_smoothing=0.1,
                                             return_grad=True)
        np.testing.assert_allclose(loss.get(), ref_loss, rtol=2e-5)
        np.testing.assert_allclose(grad.get(), ref_grad, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(sm.get(), F.softmax(x32, 1), rtol=2e-5, atol=1e-7)
