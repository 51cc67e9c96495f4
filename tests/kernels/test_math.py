"""Accuracy of the CPU backend's vectorisable exp and log against float64 NumPy.

The kernels' float32 tolerance table assumes these stay within a couple of ulp; a regression
here (a lost bit in the range reduction, a wrong polynomial term) shows up as scattered
tolerance failures elsewhere, so it is pinned down directly.
"""

from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from nblosses.backends.cpu._math import (  # noqa: E402
    JIT,
    fast_exp,
    fast_exp_nonpos,
    fast_log,
    fast_tanh,
    prefetch_next_row,
)


@numba.njit(**JIT)
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


@numba.njit(**JIT)
def _exp_nonpos_all(x, out):
    for i in range(x.size):
        out[i] = fast_exp_nonpos(x[i])


@numba.njit(**JIT)
def _log_all(x, out):
    for i in range(x.size):
        out[i] = fast_log(x[i])


@numba.njit(**JIT)
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = fast_tanh(x[i])


def _ulps(actual, expected, dtype):
    return np.abs(actual.astype(np.float64) - expected) / (np.abs(expected) * np.finfo(dtype).eps)


def _assert_within_ulps(kernel, reference, x, limit):
    """``kernel`` (a Numba loop into ``out``) within ``limit`` ulps of NumPy's float64
    ``reference`` on every ``x``; the message names the worst input."""
    out = np.empty_like(x)
    kernel(x, out)
    ulps = _ulps(out, reference(x.astype(np.float64)), x.dtype)
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= limit, (f"{reference.__name__}({x[worst]!r}) = {out[worst]!r}: "
                                  f"{ulps[worst]:.2f} ulp")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_within_two_ulp(dtype):
    lo, hi = (-86.0, 88.7) if dtype == np.float32 else (-706.0, 709.7)
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(lo, hi, 400_001), rng.normal(0, 5, 100_000)]).astype(dtype)
    _assert_within_ulps(_exp_all, np.exp, x, 2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_edges(dtype):
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -1000.0, 1000.0], dtype)
    out = np.empty_like(x)
    _exp_all(x, out)
    assert out[0] == 0.0 and out[1] == np.inf and np.isnan(out[2]) and out[3] == 1.0
    assert out[4] == 0.0 and out[5] == np.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_nonpos_is_fast_exp_below_zero(dtype):
    """The same values bit for bit on x <= 0, -inf and NaN; 1 for x > 0 (its callers' x is
    a logit minus its maximum, above 0 only by a rounding error)."""
    lo = -90.0 if dtype == np.float32 else -710.0
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(lo, 0.0, 400_001), -rng.exponential(5, 100_000),
                        [-np.inf, np.nan, -0.0, -1000.0, -1e-30]]).astype(dtype)
    ours, theirs = np.empty_like(x), np.empty_like(x)
    _exp_nonpos_all(x, ours)
    _exp_all(x, theirs)
    np.testing.assert_array_equal(ours, theirs)
    positive = np.array([1e-30, 1e-7, 1.0, 100.0, np.inf], dtype)
    _exp_nonpos_all(positive, ours[:5])
    np.testing.assert_array_equal(ours[:5], np.ones(5, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_log_within_two_ulp(dtype):
    tiny = np.finfo(dtype).tiny
    x = np.concatenate([np.geomspace(tiny, 1e30, 400_001),
                        1 + np.random.default_rng(1).random(100_000) * 1e5]).astype(dtype)
    x = x[np.abs(x - 1) > 1e-3]  # near 1 the result is ~0: judge it by absolute error below
    _assert_within_ulps(_log_all, np.log, x, 2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_log_near_one_and_edges(dtype):
    x = (1 + np.linspace(-1e-3, 1e-3, 2001)).astype(dtype)
    out = np.empty_like(x)
    _log_all(x, out)
    err = np.abs(out - np.log(x.astype(np.float64)))
    assert err.max() <= 2 * np.finfo(dtype).eps * 1e-3 + np.finfo(dtype).eps * 1e-3
    edges = np.array([1.0, np.inf, np.nan], dtype)
    _log_all(edges, edges)
    assert edges[0] == 0.0 and edges[1] == np.inf and np.isnan(edges[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_tanh_within_four_ulp(dtype):
    """Both sides of the switch from the series to (1 - e) / (1 + e) at |y| = 1/16."""
    small = np.geomspace(1e-30, 30, 200_001)
    x = np.concatenate([np.linspace(-30, 30, 400_001), small, -small]).astype(dtype)
    _assert_within_ulps(_tanh_all, np.tanh, x, 4.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_tanh_edges(dtype):
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 1000.0, -1000.0], dtype)
    out = np.empty_like(x)
    _tanh_all(x, out)
    assert out[0] == 1 and out[1] == -1 and np.isnan(out[2]) and out[3] == 0
    assert out[4] == 1 and out[5] == -1


# ----------------------------------------------------------------------------- prefetch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_cols", [1, 10, 1000, 5000])
def test_prefetch_next_row_is_a_hint_only(dtype, n_cols):
    """Every row index, the last included, long rows (beyond PREFETCH_BYTES: no prefetch) and
    short ones: nothing is written, nothing faults, and the hint is in the code."""
    @numba.njit
    def walk(a):
        for i in range(a.shape[0]):
            prefetch_next_row(a, i)

    a = np.arange(3 * n_cols, dtype=dtype).reshape(3, n_cols)
    before = a.copy()
    walk(a)
    np.testing.assert_array_equal(a, before)
    assert "llvm.prefetch" in next(iter(walk.inspect_llvm().values()))
