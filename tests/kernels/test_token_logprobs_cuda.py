"""token_logprobs' CUDA kernels (``token_logprobs.cu``) and their host glue.

Without a device: every instantiation compiles with NVRTC for every element type, optimised
(the generic NVRTC tests of ``test_cuda_compile.py`` compile the debug form, and the optimised
one for float only); the plain rows keep 50% occupancy (at most 64 registers at 512 threads)
without spills; and every launch the glue makes over a matrix of shapes, dtypes, options,
alignments and in-place gradients (fake device arrays, as ``test_cuda_compile.py``'s launch
tests) matches the compiled kernel's parameter list, launch bounds and alignment.

With a device (``cuda`` mark): the kernels against the CPU backend, and a bad target reported
at the next poll.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from test_cuda_compile import (  # the NVRTC and fake-device machinery of the CUDA tests
    FAKE_CUPY,
    LAUNCHES,
    _check_arg,
    _close,
    _copy_unaligned,
    _entries,
    _param_types,
    compiled,
    cupy,
    fa,
    fake_device,  # noqa: F401  (a fixture: used by tlp below)
    needs_device,
    ptxas_usage,
)

from nblosses.backends.cuda import _kernels as K
from nblosses.backends.cuda import token_logprobs as G

CTYPES = ("__half", "__nv_bfloat16", "float", "double")
DTYPES = (np.float16, np.float32, np.float64)
SHAPES = [(5, 1, 1), (7, 3, 1), (64, 16, 1), (3, 1000, 1), (2, 1001, 1), (2, 32000, 1),
          (1, 70000, 1), (2, 3, 5), (3, 4, 2)]


@pytest.mark.parametrize("ct", [pytest.param(ct, marks=() if ct == "float" else
                                              pytest.mark.slow) for ct in CTYPES])
def test_every_instantiation_compiles_optimised(ct):
    ptx, lowered = compiled(G.SRC, ct, debug=False)
    names = K.instantiations(G.SRC, ct)
    assert len(names) == len(set(names)) == 2 * (2 * len(K.LOOPED_GS) + 1)
    assert set(lowered) == set(names) and all(v in _entries(ptx) for v in lowered.values())


@pytest.mark.slow  # ptxas for sm_90 (~10 s per type)
@pytest.mark.parametrize("ct", CTYPES)
def test_plain_rows_keep_half_occupancy_without_spills(ct):
    """Rows without a soft cap: no spills at any group size, and at most 64 registers at 512
    threads for the 16-bit and 32-bit types (two blocks of 512 per SM, as the looped
    cross-entropy rows)."""
    names = [G.rows_kernel(ct, 0, v, g, b) for v in K.vec_choices(ct) for g, b in K.LOOPED_GS]
    usage = ptxas_usage(G.SRC, ct, names)
    assert set(usage) == set(names)
    for name, (regs, spill) in usage.items():
        assert spill == 0, (name, regs, spill)
        if name.endswith(f"{K.LONG_ROW_G}, {K.LONG_ROW_G}>") and ct != "double":
            assert regs <= 64, (name, regs)


def test_kernel_has_the_cpu_signature():
    from nblosses.backends.cpu import token_logprobs as cpu

    assert (list(inspect.signature(G.token_logprobs).parameters)
            == list(inspect.signature(inspect.unwrap(cpu.token_logprobs)).parameters))


# ----------------------------------------------------------------------------- launches
@pytest.fixture
def tlp(fake_device, monkeypatch):  # noqa: F811  (the imported fixture, by name)
    monkeypatch.setattr(G, "cupy", FAKE_CUPY)
    return G


def _param(ct: str, p: str) -> str:
    """A demangled parameter with the accumulator type spelled out (``AccT<__half>::type``
    is float: the statistics and upstream gradients of the half types are float32)."""
    return re.sub(r"AccT<([\w ]+)>::type", lambda m: "double" if m.group(1) == "double"
                  else "float", p)


def _check_launches(count: int) -> list:
    """Each recorded launch against its compiled kernel; returns the launches."""
    launches = [x for x in LAUNCHES if x[0] == G.SRC]
    assert len(launches) == count
    names = [n for n, _ in K.PARAMS["tlp"]]
    for src, dtype, name, grid, block, args in launches:
        ct = K.ctype_of(dtype.name)
        assert name in K.instantiations(src, ct), name
        params = [_param(ct, p) for p in _param_types(src, ct, name)]
        assert len(params) == len(args) == len(names), name
        for p, a, n in zip(params, args, names):
            _check_arg(p, a, f"{name} argument {n}")
        kernel = name.split("<")[0]
        assert block == (K.COL_BLOCK if kernel == "tlp_cols"
                         else int(name.rstrip(">").split(",")[-1])), name
        assert 1 <= grid <= 132 * (K.THREADS_PER_SM // block), (name, grid)
        template = name.rstrip(">").split("<")[1].split(", ")  # T, CAP[, VEC, G, BLOCK]
        if kernel == "tlp_rows" and int(template[2]) == K.vec_width(ct):  # 16-byte accesses
            for n in ("x", "gx"):
                a = args[names.index(n)]
                assert not isinstance(a, np.ndarray) or a.data.ptr % 16 == 0, (name, n)
    return launches


@pytest.mark.parametrize("dtype", DTYPES)
def test_launches(tlp, dtype):
    r = np.random.default_rng(0)
    calls = 0
    for n, C, inner in SHAPES:
        t = r.integers(0, C, (n, inner))
        t.reshape(-1)[0] = -100
        t = fa(t)
        stats = np.float32 if dtype == np.float16 else dtype
        for make in (fa, _copy_unaligned):
            x = make(r.standard_normal((n, C, inner)).astype(dtype))
            for softcap in (0.0, 30.0):
                for want_grad, go, ge, buffer in (
                        (False, None, None, None), (True, None, None, None),
                        (True, fa(np.ones((n, inner), stats)), None, None),
                        (True, fa(np.ones((n, inner), stats)), fa(np.ones((n, inner), stats)),
                         x)):
                    for want_entropy in (False, True):
                        logp, ent, gx = tlp.token_logprobs(
                            x, t, ignore_index=-100, temperature=0.7, softcap=softcap,
                            want_entropy=want_entropy, want_grad=want_grad, grad_output=go,
                            grad_entropy=ge, grad_buffer=buffer)
                        calls += 1
                        assert logp.shape == (n, inner) and logp.dtype == stats
                        assert (ent is not None) == want_entropy
                        assert gx is None if not want_grad else (
                            gx.shape == x.shape and gx.dtype == x.dtype)
                        assert buffer is None or gx is buffer
    launches = _check_launches(calls)
    kernels = {x[2] for x in launches}
    ct = K.ctype_of(np.dtype(dtype).name)
    vec = K.vec_width(ct)
    # long rows: a block of 512 per row; soft cap: the CAP instantiations; a middle class
    # axis: the columns kernel; unaligned rows: scalar access
    assert G.rows_kernel(ct, 0, vec, K.LONG_ROW_G, K.LONG_ROW_G) in kernels
    assert G.rows_kernel(ct, 1, vec, K.LONG_ROW_G, K.LONG_ROW_G) in kernels
    assert G.rows_kernel(ct, 0, 1, K.LONG_ROW_G, K.LONG_ROW_G) in kernels
    assert {G.cols_kernel(ct, 0), G.cols_kernel(ct, 1)} <= kernels
    assert ("poll",) in LAUNCHES  # the error record's copy-back follows each launch


def test_empty_input_launches_nothing(tlp):
    logp, ent, gx = tlp.token_logprobs(
        fa(np.zeros((3, 0, 1), np.float16)), fa(np.full((3, 1), -100)), ignore_index=-100,
        temperature=1.0, softcap=0.0, want_entropy=True, want_grad=True, grad_output=None,
        grad_entropy=None, grad_buffer=None)
    assert not [x for x in LAUNCHES if x[0] == G.SRC]
    assert not logp.any() and not ent.any() and logp.dtype == np.float32
    assert gx.shape == (3, 0, 1)


def test_launch_arguments(tlp):
    """The kernel gets 1 / T, the soft cap, the clipped ignore_index and null pointers for
    what the call leaves out."""
    x = fa(np.zeros((4, 64, 1), np.float32))
    t = fa(np.zeros((4, 1), np.int64))
    tlp.token_logprobs(x, t, ignore_index=-(1 << 70), temperature=0.5, softcap=0.0,
                       want_entropy=False, want_grad=False, grad_output=None,
                       grad_entropy=None, grad_buffer=None)
    (launch,) = _check_launches(1)
    args = dict(zip((n for n, _ in K.PARAMS["tlp"]), launch[5]))
    assert args["inv_t"] == 2.0 and args["cap"] == 0.0 and args["ignore"] == -(1 << 63)
    assert all(args[n] == 0 for n in ("go", "ge", "ent", "gx"))


# ----------------------------------------------------------------------------- on a device
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 10), (16, 1000), (4, 1001), (3, 32000), (2, 70001),
                                   (3, 6, 5)])
@pytest.mark.cuda
@needs_device
def test_device_matches_cpu(shape, dtype):
    from nblosses import functional as F

    r = np.random.default_rng(3)
    x = (r.standard_normal(shape) * 3).astype(dtype)
    C = shape[1]
    t = r.integers(0, C, (shape[0], *shape[2:]))
    t.reshape(-1)[0] = -100
    stats = np.float32 if dtype == np.float16 else dtype
    go = r.standard_normal(t.shape).astype(stats)
    ge = r.standard_normal(t.shape).astype(stats)
    for options in (dict(), dict(temperature=0.4, softcap=20.0)):
        kw = dict(return_entropy=True, return_grad=True, **options)
        want = F.token_logprobs(x, t, grad_output=go, grad_entropy=ge, backend="cpu", **kw)
        xg = cupy.asarray(x)
        got = F.token_logprobs(xg, cupy.asarray(t), grad_output=cupy.asarray(go),
                               grad_entropy=cupy.asarray(ge), backend="cuda", **kw)
        for g, w, what in zip(got, want, ("logp", "entropy", "grad")):
            _close(g, w, stats if what != "grad" else dtype, f"{shape} {options} {what}")
        got = F.token_logprobs(xg, cupy.asarray(t), grad_output=cupy.asarray(go),
                               grad_entropy=cupy.asarray(ge), grad_buffer=xg, backend="cuda",
                               **kw)
        assert got[2] is xg
        _close(xg, want[2], dtype, f"{shape} {options} in place")


@pytest.mark.cuda
@needs_device
def test_device_bad_target_is_deferred():
    from nblosses.backends.cuda import _device_errors

    _device_errors.synchronize()
    x = cupy.asarray(np.zeros((4, 100, 1), np.float32))
    t = cupy.asarray(np.array([[1], [100 + 3], [2], [-100]]))
    logp, ent, gx = G.token_logprobs(x, t, ignore_index=-100, temperature=1.0, softcap=0.0,
                                     want_entropy=True, want_grad=True, grad_output=None,
                                     grad_entropy=None, grad_buffer=None)
    cupy.cuda.get_current_stream().synchronize()
    assert bool(cupy.isnan(logp[1, 0])) and int(cupy.isnan(logp).sum()) == 1
    assert bool(cupy.isnan(ent[1, 0])) and float(ent[3, 0]) == 0.0
    assert bool(cupy.isnan(gx[1]).all()) and not bool(gx[3].any())
    with pytest.raises(IndexError, match="Target 103 is out of bounds"):
        _device_errors.poll_errors()
