"""Memory of the fused cross-entropy on a large float32 input (2048 x 32000 = 262 MB).

NumPy reports its data allocations to ``tracemalloc``, so the peak traced memory during a warm
call is what the call allocated on top of its inputs: the gradient plus small O(N) buffers,
nothing of size N x C besides. Marked ``slow``, still part of the default run.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from nblosses import functional as F

N, C = 2048, 32_000
MB = 1 << 20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big():
    r = np.random.default_rng(0)
    x = r.standard_normal((N, C), dtype=np.float32)
    t = r.integers(0, C, N)
    # warm: compile (or load) the kernels for this dtype and layout, outside the measurement
    F.cross_entropy(x[:4], t[:4], return_grad=True)
    F.cross_entropy(x[:4], t[:4])
    return x, t


def _peak_of(fn):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


def test_tracemalloc_sees_numpy_allocations():
    """The measurement itself works: an N x C float32 temporary shows up in the peak."""
    _, peak = _peak_of(lambda: np.empty((N, 1000), np.float32).fill(1))
    assert peak >= N * 1000 * 4


def test_fused_loss_and_grad_allocates_only_the_gradient(big):
    x, t = big
    (loss, grad), peak = _peak_of(lambda: F.cross_entropy(x, t, return_grad=True))
    assert grad.shape == x.shape and grad.dtype == np.float32 and np.isfinite(loss)
    limit = grad.nbytes * 1.02 + MB
    assert peak <= limit, (f"peak extra {peak / MB:.1f} MiB > {limit / MB:.1f} MiB "
                           f"(gradient {grad.nbytes / MB:.1f} MiB)")


def test_forward_only_allocates_almost_nothing(big):
    x, t = big
    loss, peak = _peak_of(lambda: F.cross_entropy(x, t))
    assert np.isfinite(loss)
    assert peak <= 0.01 * x.nbytes, f"peak extra {peak / MB:.1f} MiB for a forward-only call"


def test_in_place_gradient_allocates_almost_nothing(big):
    x, t = big
    ref_loss = F.cross_entropy(x, t)
    logits = x.copy()
    (loss, grad), peak = _peak_of(
        lambda: F.cross_entropy(logits, t, return_grad=True, grad_buffer=logits))
    assert grad is logits
    assert peak <= 0.01 * x.nbytes, f"peak extra {peak / MB:.1f} MiB in place"
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # spot-check the in-place gradient on a few rows against the out-of-place one
    _, g_rows = F.cross_entropy(x[:8], t[:8], return_grad=True)
    np.testing.assert_allclose(logits[:8], g_rows * 8 / N, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(32, 21, 4096), (65536, 10)], ids=["middle-axis", "short-rows"])
def test_other_layouts_stay_under_one_percent(shape):
    """The middle-axis blocks and the short-row tiles keep per-task scratch (statistics and
    gradient coefficients share buffers) under 1% of the logits, with or without a gradient."""
    r = np.random.default_rng(1)
    x = r.standard_normal(shape, dtype=np.float32)
    t = r.integers(0, shape[1], (shape[0],) + shape[2:])
    F.cross_entropy(x, t, return_grad=True)  # warm: compile or load both specialisations
    F.cross_entropy(x, t)
    _, peak = _peak_of(lambda: F.cross_entropy(x, t))
    assert peak <= 0.01 * x.nbytes, f"forward: peak extra {peak / 1024:.0f} KiB"
    (_, grad), peak = _peak_of(lambda: F.cross_entropy(x, t, return_grad=True))
    extra = peak - grad.nbytes
    assert extra <= 0.01 * x.nbytes, f"forward+grad: {extra / 1024:.0f} KiB beyond the gradient"
