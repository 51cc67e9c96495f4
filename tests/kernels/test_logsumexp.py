"""The ``logsumexp`` kernel of the protocol (the row statistic Dask merges across chunks).

CPU: every layout (long rows, short rows as tiles, a middle axis), float32 and float64, the
result in the input's dtype or written into a float64 ``out``, against ``torch.logsumexp`` in
float64; the special values (a slice of only ``-inf`` gives ``-inf``; NaN or ``+inf`` give NaN,
as softmax does, where torch gives ``+inf`` for the latter); no classes; no rows.

CUDA without a device: every launch of the host function, recorded on fake arrays, checked
against the compiled kernel's parameters and launch bounds (the checks of
``test_cuda_compile.py``, which skips without CuPy and NVRTC), and the row kernel's registers
at 512 threads. With a device: the CUDA kernel against the CPU one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nblosses._registry import load
from nblosses.backends.cpu import softmax as cpu

#: (outer, C, inner): long rows, short rows (split tiles, gathering tiles), a middle axis.
SHAPES = [(7, 40, 1), (300, 1000, 1), (300, 10, 1), (130, 13, 1), (5, 1, 1), (3, 33, 70),
          (2, 5, 4099)]
TOL = {np.float32: dict(rtol=2e-6, atol=2e-6), np.float64: dict(rtol=1e-13, atol=1e-13)}


def reference(x: np.ndarray) -> np.ndarray:
    return torch.logsumexp(torch.tensor(x, dtype=torch.float64), 1).numpy()


def special_values(shape: tuple[int, int, int], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Logits with a slice of only -inf, one with NaN, one with +inf and one with a -inf
    among finite values; and the expected result (NaN where softmax would be NaN)."""
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype) * 4
    x[0, :, 0] = -np.inf
    x[1, 1, 0] = np.nan
    x[2, -1, 0] = np.inf
    x[3, 0, 0] = -np.inf
    want = reference(np.where(np.isinf(x) & (x > 0), np.nan, x))  # torch: +inf -> +inf
    return x, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_matches_torch(shape, dtype):
    x = (np.random.default_rng(0).standard_normal(shape) * 5).astype(dtype)
    got = cpu.logsumexp(x)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    np.testing.assert_allclose(got, reference(x), **TOL[dtype])
    out = np.full((shape[0], shape[2]), np.nan)
    assert cpu.logsumexp(x, out) is out
    np.testing.assert_allclose(out, reference(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 40, 1), (4, 10, 1), (4, 13, 1), (4, 6, 5)], ids=str)
def test_cpu_special_values(shape, dtype):
    x, want = special_values(shape, dtype)
    got = cpu.logsumexp(x, np.empty((shape[0], shape[2])))
    assert got[0, 0] == -np.inf and np.isnan(got[1, 0]) and np.isnan(got[2, 0])
    np.testing.assert_allclose(got, want, equal_nan=True, **TOL[dtype])


def test_cpu_empty_and_no_classes():
    assert cpu.logsumexp(np.zeros((0, 3, 2))).shape == (0, 2)
    got = cpu.logsumexp(np.zeros((2, 0, 3), np.float32))
    assert got.dtype == np.float32 and (got == -np.inf).all() and got.shape == (2, 3)


def test_in_the_kernel_table():
    assert load("cpu").kernel("logsumexp") is cpu.logsumexp


# ----------------------------------------------------------------------------- CUDA
@pytest.fixture
def launches(monkeypatch):
    """The CUDA host module with its launches recorded on fake arrays (no device), and the
    launch checks of ``test_cuda_compile.py`` (skipped without CuPy and NVRTC)."""
    tcc = pytest.importorskip("test_cuda_compile")
    from nblosses.backends.cuda import _loader as L
    from nblosses.backends.cuda import softmax

    monkeypatch.setattr(softmax, "cupy", tcc.FAKE_CUPY)
    monkeypatch.setattr(L, "sm_count", lambda: 132)
    monkeypatch.setattr(L, "launch", lambda *args: tcc.LAUNCHES.append(args))
    # lse_cols has no BLOCK template parameter: its launch bounds fix 256 threads.
    monkeypatch.setitem(tcc.FIXED_BLOCKS, "lse_cols", 256)
    tcc.LAUNCHES.clear()
    yield tcc, softmax
    tcc.LAUNCHES.clear()


# The fake launches write nothing: casting the float64 results reads uninitialised memory.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cuda_launches(launches, dtype):
    tcc, softmax = launches
    rows = [(5, 1, 1), (7, 3, 1), (64, 16, 1), (3, 1000, 1), (2, 5000, 1), (1, 70000, 1)]
    for shape in rows + [(2, 3, 5), (3, 4, 2)]:
        for x in (tcc.fa(np.random.rand(*shape).astype(dtype)), tcc._unaligned(shape, dtype)):
            got = softmax.logsumexp(x)
            assert got.shape == (shape[0], shape[2]) and got.dtype == dtype
            out = tcc.fa(np.empty((shape[0], shape[2])))
            assert softmax.logsumexp(x, out) is out
    tcc.check_launches(8 * 2 * 2)
    kernels = {a[2].split("<")[0] for a in tcc.LAUNCHES}
    assert kernels == {"lse_rows", "lse_cols"}
    tcc.LAUNCHES.clear()  # nothing to launch: no rows, or no classes (-inf)
    assert softmax.logsumexp(tcc.fa(np.zeros((0, 3, 1), dtype))).shape == (0, 1)
    assert (softmax.logsumexp(tcc.fa(np.zeros((2, 0, 1), dtype))) == -np.inf).all()
    assert not tcc.LAUNCHES


@pytest.mark.parametrize("ct", ["float", "__half"])
def test_cuda_row_kernel_registers(ct):
    """The widest row kernel (512 threads, two blocks per SM) stays within 64 registers
    without spilling, as the other looped row kernels."""
    tcc = pytest.importorskip("test_cuda_compile")
    from nblosses.backends.cuda import _kernels as K

    names = [K.lse_rows(ct, v, K.LONG_ROW_G, K.LONG_ROW_G) for v in K.vec_choices(ct)]
    for name, (regs, spill) in tcc.ptxas_usage("softmax.cu", ct, names).items():
        assert regs <= 64 and spill == 0, (name, regs, spill)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cuda_matches_cpu_on_device(dtype):
    from conftest import CUDA_AVAILABLE

    if not CUDA_AVAILABLE:
        pytest.skip("backend 'cuda' not available here (no CuPy or no CUDA device)")
    import cupy

    kernel = load("cuda").kernel("logsumexp")
    for shape in SHAPES + [(4, 40, 1), (4, 6, 5), (2, 70000, 1)]:
        x = special_values(shape, np.float32 if dtype == np.float16 else dtype)[0].astype(dtype)
        got = kernel(cupy.asarray(x), cupy.empty((shape[0], shape[2])))
        ref = cpu.logsumexp(x.astype(np.float32 if dtype == np.float16 else dtype),
                            np.empty((shape[0], shape[2])))
        tol = dict(rtol=2e-3, atol=2e-3) if dtype == np.float16 else TOL[dtype]
        np.testing.assert_allclose(cupy.asnumpy(got), ref, equal_nan=True, **tol)
        assert kernel(cupy.asarray(x)).dtype == dtype
