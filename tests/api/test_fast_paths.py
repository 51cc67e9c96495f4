"""Fast paths (:mod:`nblosses._fast`): same results and errors as the dispatcher, and they
step aside for every call they do not cover."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close

import nblosses
from nblosses import _fast
from nblosses import functional as F
from nblosses._dispatch import call
from nblosses.ops import SPECS as OPS

REDUCTIONS = ["mean", "sum", "none"]


def _dispatched(name: str, *args, **kwargs):
    """The dispatcher's result for the call, bypassing the fast path."""
    bound = OPS[name].signature().bind(*args, **kwargs)
    bound.apply_defaults()
    return call(OPS[name], dict(bound.arguments))


def _fast_call(name: str, *args, **kwargs):
    bound = OPS[name].signature().bind(*args, **kwargs)
    bound.apply_defaults()
    return OPS[name].fast_path(*bound.arguments.values())


@pytest.mark.parametrize("name", sorted(n for n, s in OPS.items() if s.fast_path))
def test_fast_path_takes_the_public_parameters_in_order(name):
    public = list(OPS[name].signature().parameters)
    assert list(inspect.signature(OPS[name].fast_path).parameters) == public


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n, c, ignore_every", [(64, 1000, 0), (7, 3, 2), (0, 5, 0),
                                                (40000, 4, 3), (5, 2, 1)])
def test_nll_loss_fast_path_equals_dispatcher_and_torch(dtype, reduction, n, c, ignore_every):
    x, t = _class_case(n, c, ignore_every, dtype, scale=1.0)
    reference = _assert_class_loss_fast_path("nll_loss", x, t, reduction)
    assert_close(F.nll_loss(x, t, reduction=reduction), reference, dtype, "public")


def _class_case(n, c, ignore_every, dtype, scale):
    """Logits ``(n, c)`` and targets, every ``ignore_every``-th one ignored (all of them when
    it is 1: the mean is then NaN)."""
    rng = np.random.default_rng(n + c)
    x = (rng.standard_normal((n, c)) * scale).astype(dtype)
    t = rng.integers(0, c, n)
    if ignore_every:
        t[::ignore_every] = -100
    return x, t


def _assert_class_loss_fast_path(name, x, t, reduction):
    """The fast path takes the call and gives the dispatcher's result bit for bit (the same
    kernel) and torch's within the dtype's tolerance; returns torch's."""
    result = _fast_call(name, x, t, reduction=reduction)
    assert result is not _fast.MISS
    expected = _dispatched(name, x, t, reduction=reduction)
    assert type(result) is np.ndarray and result.dtype == x.dtype
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)
    reference = getattr(TF, name)(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
    assert_close(result, reference.numpy(), x.dtype.name, f"{name} fast path {reduction}")
    return reference.numpy()


def test_nll_loss_fast_path_reads_strided_input_and_other_ignore_index():
    x = np.random.default_rng(1).standard_normal((6, 10))[:, ::2]  # not contiguous
    t = np.array([0, 4, 2, 7, 1, 7])
    result = _fast_call("nll_loss", x, t, ignore_index=7)
    assert result is not _fast.MISS
    np.testing.assert_array_equal(result, _dispatched("nll_loss", x, t, ignore_index=7))


@pytest.mark.parametrize("name, c", [("nll_loss", 5), ("cross_entropy", 30)])
@pytest.mark.parametrize("bad", ["c", -1, -101])
def test_class_loss_fast_paths_raise_the_dispatchers_index_error(name, c, bad):
    bad = c if bad == "c" else bad
    x = np.zeros((4, c), np.float32)
    t = np.array([0, 1, bad, 2])
    with pytest.raises(IndexError) as fast:
        _fast_call(name, x, t)
    with pytest.raises(IndexError) as dispatched:
        _dispatched(name, x, t)
    assert str(fast.value) == str(dispatched.value)
    assert f"Target {bad} is out of bounds" in str(fast.value)


# Options each class-loss fast path leaves to the dispatcher.
_CLASS_LOSS_MISSES = [dict(return_grad=True), dict(size_average=False), dict(reduce=False),
                      dict(validate="sync"), dict(reduction="bogus"),
                      dict(ignore_index=np.int64(1)), dict(ignore_index=True),
                      dict(backend="no-such-backend")]
_CE_MISSES = [dict(label_smoothing=0.1),
              dict(label_smoothing=0),  # an int: the dispatcher checks its type
              dict(z_loss=1e-4), dict(softcap=30.0), dict(return_lse=True)]


@pytest.mark.parametrize("name, c, case", [
    (name, c, case) for name, c, extra in [("nll_loss", 5, []), ("cross_entropy", 30, _CE_MISSES)]
    for case in [dict(weight=np.ones(c, np.float32)), *_CLASS_LOSS_MISSES, *extra]])
def test_class_loss_fast_paths_leave_other_calls_to_the_dispatcher(name, c, case):
    x = np.zeros((4, c), np.float32)
    t = np.array([0, 1, 2, 3])
    assert _fast_call(name, x, t, **case) is _fast.MISS


@pytest.mark.parametrize("x, t", [
    (np.zeros((4, 5), np.float16), np.arange(4)),  # half precision: computed in float32
    (np.zeros((4, 5), np.float32), np.arange(4, dtype=np.int32)),
    (np.zeros((4, 5, 2), np.float32), np.zeros((4, 2), np.int64)),
    (np.zeros(5, np.float32), np.array(1)),
    (np.zeros((4, 5), np.float32), np.arange(3)),  # the dispatcher's ValueError
    (np.zeros((4, 5), np.float32).tolist(), np.arange(4)),
])
def test_nll_loss_fast_path_leaves_other_arrays_to_the_dispatcher(x, t):
    assert _fast_call("nll_loss", x, t) is _fast.MISS


# ----------------------------------------------------------------------------- softmax family
# Each dtype on short calls; the threaded kernels (70000 rows) in float32 only: a parallel
# build compiles for seconds.
SOFTMAX_CASES = [(shape, dtype) for shape in [(8, 100), (32, 1000), (3, 4, 24), (24,),
                                              (2, 3, 5, 40)]
                 for dtype in ("float32", "float64")] + [((70000, 30), "float32")]


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, dtype", SOFTMAX_CASES)
def test_softmax_fast_paths_equal_dispatcher_and_torch(name, dtype, shape):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(dtype) * 5
    x.reshape(-1)[::7] = -np.inf  # masked classes stay finite elsewhere
    for dim in (-1, len(shape) - 1):
        result = _fast_call(name, x, dim)
        assert result is not _fast.MISS
        expected = _dispatched(name, x, dim)
        assert type(result) is np.ndarray and result.dtype == x.dtype
        np.testing.assert_array_equal(result, expected)  # the same kernel: bit for bit
    reference = getattr(torch, name)(torch.from_numpy(x), -1).numpy()
    assert_close(result, reference, dtype, f"{name} fast path {shape}")
    assert_close(getattr(F, name)(x, -1), reference, dtype, f"{name} public {shape}")


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("x, kwargs", [
    (np.zeros((4, 30), np.float32), dict(dim=0)),  # not the last axis
    (np.zeros((4, 30), np.float32), dict(dim=None)),  # torch's legacy choice, with a warning
    (np.zeros((4, 30), np.float32), dict(dim=np.int64(1))),
    (np.zeros((4, 30), np.float32), dict(dim=1, dtype="float64")),
    (np.zeros((4, 30), np.float32), dict(dim=1, backend="no-such-backend")),
    (np.zeros((4, 30), np.float32), dict(dim=5)),  # the dispatcher's IndexError
    (np.zeros((4, 10), np.float32), dict(dim=1)),  # short rows: the tile kernels
    (np.zeros((4, 0), np.float32), dict(dim=1)),
    (np.zeros((0, 30), np.float32), dict(dim=1)),
    (np.zeros((30, 4), np.float32).T, dict(dim=1)),  # not C-contiguous
    (np.zeros((4, 30), np.float16), dict(dim=1)),  # computed in float32
    (np.zeros((4, 30), ">f4"), dict(dim=1)),
    (np.zeros((4, 30), np.int64), dict(dim=1)),
    (np.float64(1.0), dict(dim=0)),
    (np.zeros((4, 30), np.float32).tolist(), dict(dim=1)),
])
def test_softmax_fast_paths_leave_other_calls_to_the_dispatcher(name, x, kwargs):
    assert _fast_call(name, x, **kwargs) is _fast.MISS


@pytest.mark.parametrize("name", ["softmax_backward", "log_softmax_backward"])
@pytest.mark.parametrize("shape, dtype", SOFTMAX_CASES)
def test_softmax_backward_fast_paths_equal_dispatcher_and_torch(name, dtype, shape):
    rng = np.random.default_rng(len(shape) + 5)
    x = rng.standard_normal(shape).astype(dtype) * 3
    forward = F.log_softmax if name.startswith("log") else F.softmax
    y, g = forward(x, -1), rng.standard_normal(shape).astype(dtype)
    for dim in (-1, len(shape) - 1):
        result = _fast_call(name, g, y, dim)
        assert result is not _fast.MISS
        expected = _dispatched(name, g, y, dim)
        assert type(result) is np.ndarray and result.dtype == y.dtype
        np.testing.assert_array_equal(result, expected)
    torch_backward = (torch._log_softmax_backward_data if name.startswith("log")
                      else torch._softmax_backward_data)
    yt = torch.from_numpy(y)
    reference = torch_backward(torch.from_numpy(g), yt, len(shape) - 1, yt.dtype).numpy()
    assert_close(result, reference, dtype, f"{name} fast path {shape}", kind="grad")


@pytest.mark.parametrize("name", ["softmax_backward", "log_softmax_backward"])
@pytest.mark.parametrize("g, y, dim", [
    (np.zeros((4, 30), np.float32), np.zeros((4, 30), np.float32), 0),  # not the last axis
    (np.zeros((4, 30), np.float32), np.zeros((4, 30), np.float64), 1),  # dtypes differ
    (np.zeros((4, 30), np.float32), np.zeros((4, 31), np.float32), 1),  # the ValueError
    (np.zeros((4, 30), np.float32), np.zeros((30, 4), np.float32).T, 1),
    (np.zeros((4, 30), np.float16), np.zeros((4, 30), np.float16), 1),
    (np.zeros((0, 30), np.float32), np.zeros((0, 30), np.float32), 1),
    (np.zeros((4, 30), np.float32), np.zeros((4, 30), np.float32), np.int64(1)),
])
def test_softmax_backward_fast_paths_leave_other_calls_to_the_dispatcher(name, g, y, dim):
    assert _fast_call(name, g, y, dim) is _fast.MISS


def test_log_softmax_backward_short_rows_go_to_the_split_kernel():
    g = y = np.zeros((4, 10), np.float32)
    assert _fast_call("log_softmax_backward", g, y, 1) is _fast.MISS
    assert _fast_call("softmax_backward", g, y, 1) is not _fast.MISS  # one kernel for every C


@pytest.mark.parametrize("shape, dtype", [(s, d) for s in [(8, 100), (5,), (3, 4, 5), (0, 3)]
                                          for d in ("float32", "float64")]
                         + [((100000,), "float32")])
def test_sigmoid_fast_path_equals_dispatcher_and_torch(dtype, shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype) * 20
    result = _fast_call("sigmoid", x)
    assert result is not _fast.MISS
    assert type(result) is np.ndarray and result.dtype == x.dtype and result.shape == shape
    np.testing.assert_array_equal(result, _dispatched("sigmoid", x))
    assert_close(result, torch.sigmoid(torch.from_numpy(x)).numpy(), dtype, "sigmoid")


@pytest.mark.parametrize("x", [np.float32(1.0), np.array(1.0), np.zeros((6, 4))[:, ::2],
                               np.zeros(3, np.float16), np.zeros(3, np.int32), [1.0, 2.0]])
def test_sigmoid_fast_path_leaves_other_arrays_to_the_dispatcher(x):
    assert _fast_call("sigmoid", x) is _fast.MISS


# ----------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n, c, ignore_every, dtype", [
    (n, c, i, d) for n, c, i in [(8, 100, 0), (32, 1000, 3), (5, 24, 1), (1, 128256, 0)]
    for d in ("float32", "float64")] + [(20000, 40, 4, "float32")])  # threaded: float32
def test_cross_entropy_fast_path_equals_dispatcher_and_torch(dtype, reduction, n, c,
                                                             ignore_every):
    x, t = _class_case(n, c, ignore_every, dtype, scale=4.0)
    _assert_class_loss_fast_path("cross_entropy", x, t, reduction)


@pytest.mark.parametrize("x, t", [
    (np.zeros((4, 10), np.float32), np.arange(4)),  # short rows: the tile kernels
    (np.zeros((4, 60), np.float32)[:, ::2], np.arange(4)),  # not C-contiguous
    (np.zeros((0, 30), np.float32), np.zeros(0, np.int64)),
    (np.zeros((4, 30), np.float32), np.zeros((4, 30), np.float32)),  # probabilities
    (np.zeros((4, 30, 2), np.float32), np.zeros((4, 2), np.int64)),
    (np.zeros((4, 30), np.float16), np.arange(4)),
])
def test_cross_entropy_fast_path_leaves_other_arrays_to_the_dispatcher(x, t):
    assert _fast_call("cross_entropy", x, t) is _fast.MISS


@pytest.mark.parametrize("name, args", [
    ("nll_loss", (np.zeros((4, 5), np.float32), np.arange(4))),
    ("cross_entropy", (np.zeros((4, 30), np.float32), np.arange(4))),
    ("softmax", (np.zeros((4, 30), np.float32), 1)),
    ("log_softmax", (np.zeros((4, 30), np.float32), 1)),
    ("sigmoid", (np.zeros((4, 30), np.float32),)),
    ("softmax_backward", (np.zeros((4, 30), np.float32), np.zeros((4, 30), np.float32), 1)),
    ("log_softmax_backward", (np.zeros((4, 30)), np.zeros((4, 30)), 1)),
])
def test_fast_paths_follow_the_context_backend(name, args):
    class Other(nblosses.Backend):
        name = "other-fast-test"
        array_modules = ("other_fast_mod",)

        def build(self):
            return nblosses.Runtime(self, xp=np, asarray=np.asarray, kernels={})

    nblosses.register_backend(Other())
    try:
        with nblosses.use_backend("other-fast-test"):
            assert _fast_call(name, *args) is _fast.MISS
            with pytest.raises(nblosses.UnsupportedOpError):
                getattr(F, name)(*args)
        assert _fast_call(name, *args, backend="cpu") is not _fast.MISS
    finally:
        nblosses.unregister_backend("other-fast-test")
