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
    rng = np.random.default_rng(n + c)
    x = rng.standard_normal((n, c)).astype(dtype)
    t = rng.integers(0, c, n)
    if ignore_every:
        t[::ignore_every] = -100  # every row ignored when ignore_every == 1: mean is NaN
    result = _fast_call("nll_loss", x, t, reduction=reduction)
    assert result is not _fast.MISS
    expected = _dispatched("nll_loss", x, t, reduction=reduction)
    assert type(result) is np.ndarray and result.dtype == x.dtype
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)  # the same kernel: bit for bit
    reference = TF.nll_loss(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
    assert_close(result, reference.numpy(), dtype, f"nll_loss fast path {reduction}")
    assert_close(F.nll_loss(x, t, reduction=reduction), reference.numpy(), dtype, "public")


def test_nll_loss_fast_path_reads_strided_input_and_other_ignore_index():
    x = np.random.default_rng(1).standard_normal((6, 10))[:, ::2]  # not contiguous
    t = np.array([0, 4, 2, 7, 1, 7])
    result = _fast_call("nll_loss", x, t, ignore_index=7)
    assert result is not _fast.MISS
    np.testing.assert_array_equal(result, _dispatched("nll_loss", x, t, ignore_index=7))


@pytest.mark.parametrize("bad", [5, -1, -101])
def test_nll_loss_fast_path_raises_the_dispatchers_index_error(bad):
    x = np.zeros((4, 5), np.float32)
    t = np.array([0, 1, bad, 2])
    with pytest.raises(IndexError) as fast:
        _fast_call("nll_loss", x, t)
    with pytest.raises(IndexError) as dispatched:
        _dispatched("nll_loss", x, t)
    assert str(fast.value) == str(dispatched.value)
    assert f"Target {bad} is out of bounds" in str(fast.value)


@pytest.mark.parametrize("case", [
    dict(weight=np.ones(5, np.float32)),
    dict(return_grad=True),
    dict(size_average=False),
    dict(reduce=False),
    dict(validate="sync"),
    dict(reduction="bogus"),
    dict(ignore_index=np.int64(1)),
    dict(ignore_index=True),
    dict(backend="no-such-backend"),
])
def test_nll_loss_fast_path_leaves_other_calls_to_the_dispatcher(case):
    x = np.zeros((4, 5), np.float32)
    t = np.array([0, 1, 2, 3])
    assert _fast_call("nll_loss", x, t, **case) is _fast.MISS


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


def test_nll_loss_fast_path_follows_the_context_backend():
    class Other(nblosses.Backend):
        name = "other-fast-test"
        array_modules = ("other_fast_mod",)

        def build(self):
            return nblosses.Runtime(self, xp=np, asarray=np.asarray, kernels={})

    nblosses.register_backend(Other())
    try:
        x, t = np.zeros((4, 5), np.float32), np.arange(4)
        with nblosses.use_backend("other-fast-test"):
            assert _fast_call("nll_loss", x, t) is _fast.MISS
            with pytest.raises(nblosses.UnsupportedOpError):
                F.nll_loss(x, t)
        assert _fast_call("nll_loss", x, t, backend="cpu") is not _fast.MISS
    finally:
        nblosses.unregister_backend("other-fast-test")
