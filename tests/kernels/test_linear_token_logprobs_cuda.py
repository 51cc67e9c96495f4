"""linear_token_logprobs' CUDA host module (``nblosses/backends/cuda/linear_token_logprobs.py``)
on a fake device, and on a real one where there is one.

Without a device: the host module runs the chunked LM-head driver on fake device arrays (the
fixtures of ``test_cuda_compile.py``). Every launch it makes (``ltlp_stats``, ``ltlp_grad`` and
the bias gradient's ``lce_col_sums``) is recorded, checked against the compiled kernel's
parameter list (NVRTC, demangled), its launch bounds and the device's grid, and then run by a
NumPy stand-in of the kernel written from the contract at the top of
``linear_token_logprobs.cu``, so that what the host module hands the kernels (row and column
offsets, bias slices, merged maxima, coefficients, the error record) is also checked by the
results: the log-probabilities, the entropy and the three gradients against a dense float64
reference, over whole-vocabulary and split blocks, bias, soft cap, temperature, ignored rows,
both upstream gradients and half-precision inputs. The arrays refuse every host read
(``float``, ``int``, ``bool``, ``item``...): the call never synchronises.

With a device (``cuda`` mark): the kernels against the CPU backend, and a bad target reported
at the next poll.
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
from test_cuda_compile import (  # the NVRTC and fake-device machinery of the CUDA tests
    FAKE_CUPY,
    LAUNCHES,
    FakeArray,
    _check_arg,
    _close,
    _param_types,
    cupy,
    fake_device,  # noqa: F401  (a fixture: used by ltlp below)
    needs_device,
)

from nblosses.backends.cuda import _device_errors as E
from nblosses.backends.cuda import _kernels as K
from nblosses.backends.cuda import _loader as L
from nblosses.backends.cuda import linear_ce as LCE
from nblosses.backends.cuda import linear_token_logprobs as G

IGNORE = -100
#: The kernels this module launches -> the parameter family (the column sums are
#: linear_ce.cu's) and the block size fixed by the kernel's launch bounds.
KERNELS = {"ltlp_stats": ("ltlp_stats", G.STATS_BLOCK), "ltlp_grad": ("ltlp_grad", K.COL_BLOCK),
           "lce_col_sums": ("lce_col_sums", K.COL_BLOCK)}


# ----------------------------------------------------------------------------- fake device
class DeviceArray(FakeArray):
    """A fake device array that, like a CuPy array, cannot be read on the host: an element or
    a whole reduction is a 0-d device array (NumPy would give a host scalar)."""

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(DeviceArray)

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return arr.view(DeviceArray)

    def _sync(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host")

    __float__ = __int__ = __bool__ = __index__ = __complex__ = _sync
    item = tolist = tobytes = get = _sync


def dev(a) -> DeviceArray:
    return np.ascontiguousarray(a).view(DeviceArray)


def _namespace() -> types.SimpleNamespace:
    """NumPy standing in for CuPy in the driver (the module's ``cupy`` and the head's ``xp``):
    every array it returns is a :class:`DeviceArray`."""
    def wrap(fn):
        def f(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.view(DeviceArray) if isinstance(out, np.ndarray) else out
        return f

    names = ("empty", "zeros", "ones", "full", "stack", "where", "exp", "log", "maximum",
             "minimum", "clip", "ascontiguousarray", "asarray", "concatenate", "matmul")
    return types.SimpleNamespace(float16=np.float16, float32=np.float32, float64=np.float64,
                                 cuda=FAKE_CUPY.cuda, **{n: wrap(getattr(np, n)) for n in names})


def _logit(z, bias, cap: float):
    """The kernels' ``ltlp_logit``: bias (a null pointer: none), then the soft cap."""
    v = z + bias if isinstance(bias, np.ndarray) else z
    return cap * np.tanh(v / cap) if cap > 0 else v


def _shift(y, m, inv_t):
    with np.errstate(invalid="ignore"):
        return np.maximum((y - m[:, None]) * inv_t, -1000.0)


def _run_stats(a: dict) -> None:
    """``ltlp_stats``: the block prepared in place, the rows' ``(m, s, q, yt)``; a bad target
    of the first vocabulary block recorded."""
    z, c0, t = a["z"], int(a["c0"]), np.asarray(a["t"])
    rows, cols = z.shape
    cap, inv = float(a["cap"]), float(a["inv_t"])
    z[...] = _logit(np.asarray(z), a["bias"], cap)
    y = np.asarray(z, np.float64)
    m = y.max(axis=1)
    d = _shift(y, m, inv)
    e = np.exp(d)
    live = m != -np.inf
    tc = t - c0
    here = (tc >= 0) & (tc < cols)
    out = np.asarray(a["out"])
    out[:, 0] = m
    out[:, 1] = np.where(live, e.sum(axis=1), 0.0)
    out[:, 2] = np.where(live, (e * d).sum(axis=1), 0.0)
    out[:, 3] = np.where(here, y[np.arange(rows), np.clip(tc, 0, cols - 1)], 0.0)
    err = a["err"]
    if isinstance(err, np.ndarray) and c0 == 0:
        n = int(a["n_classes"])
        for r in np.flatnonzero((t != int(a["ignore"])) & ((t < 0) | (t >= n))):
            BAD.append((int(a["row0"]) + int(r), int(t[r])))


def _run_grad(a: dict) -> None:
    """``ltlp_grad``: the block overwritten with ``dL/dz``."""
    z, c0, t = a["z"], int(a["c0"]), np.asarray(a["t"])
    rows, cols = z.shape
    cap, inv = float(a["cap"]), float(a["inv_t"])
    v = np.asarray(_logit(np.asarray(z), a["bias"], cap) if int(a["raw"]) else z, np.float64)
    coefs = np.asarray(a["coefs"]).reshape(rows, 3)
    d = _shift(v, np.asarray(a["m"]), inv)
    with np.errstate(invalid="ignore"):
        g = np.exp(d) * (coefs[:, :1] + coefs[:, 1:2] * d)
        g += np.where(c0 + np.arange(cols) == t[:, None], coefs[:, 2:], 0.0)
        if cap > 0:
            g *= 1.0 - (v / cap) ** 2
    g[t == int(a["ignore"])] = 0.0
    z[...] = g


def _run_col_sums(a: dict) -> None:
    out = a["out"]
    out += np.asarray(a["z"]).sum(axis=0, dtype=out.dtype)


RUN = {"ltlp_stats": _run_stats, "ltlp_grad": _run_grad, "lce_col_sums": _run_col_sums}
#: Bad class indices the fake stats kernel recorded: ``(row, target)``.
BAD: list = []


@pytest.fixture
def ltlp(fake_device, monkeypatch):  # noqa: F811  (the imported fixture, by name)
    """The host module on the fake device: launches recorded (as ``fake_device`` records them)
    and run by :data:`RUN`, products on the host."""
    xp = _namespace()
    monkeypatch.setattr(G, "cupy", xp)
    monkeypatch.setattr(G._CudaLinearTokenLogprobs, "xp", xp)

    def gemm(self, a, b, c, beta):
        c[...] = a @ b if beta == 0 else a @ b + beta * c

    monkeypatch.setattr(G._CudaLinearTokenLogprobs, "gemm", gemm)
    record = dev(np.zeros(E.RECORD_WORDS, np.int64))
    monkeypatch.setattr(E, "record_for_launch", lambda stream: record)

    def launch(src, dtype, name, grid, block, args):
        LAUNCHES.append((src, dtype, name, grid, block, args))
        family = KERNELS[name.split("<")[0]][0]
        RUN[name.split("<")[0]](dict(zip((n for n, _ in K.PARAMS[family]), args)))

    monkeypatch.setattr(L, "launch", launch)
    BAD.clear()
    yield G
    BAD.clear()


def test_the_fake_arrays_refuse_host_reads():
    a = dev(np.arange(3.0))
    for read in (lambda: float(a[0]), lambda: int(a[1]), lambda: bool(a[0]), a.item, a.tolist,
                 lambda: a[1:] @ a[1:] > 0 and None):
        with pytest.raises(AssertionError, match="read on the host"):
            read()


def check_launches() -> list[tuple[str, dict]]:
    """Each recorded launch against its compiled kernel: the parameter list (types, C-contiguous
    device arrays of the right element type), the block size of its launch bounds, a grid
    within the device's; returns ``(kernel, arguments by name)`` in launch order."""
    out = []
    for launch in LAUNCHES:
        if launch[0] in ("memset", "poll"):
            continue
        src, dtype, name, grid, block, args = launch
        kernel = name.split("<")[0]
        family, bound = KERNELS[kernel]
        assert src == (LCE.SOURCE if kernel == "lce_col_sums" else G.SRC), name
        ct = K.ctype_of(dtype.name)
        assert name in K.instantiations(src, ct), name
        params = _param_types(src, ct, name)
        names = [n for n, _ in K.PARAMS[family]]
        assert len(params) == len(args) == len(names), name
        for p, a, n in zip(params, args, names):
            _check_arg(p, a, f"{name} argument {n}")
            assert not isinstance(a, np.ndarray) or isinstance(a, DeviceArray), (name, n)
        assert block == bound, (name, block)
        assert 1 <= grid <= 132 * (K.THREADS_PER_SM // block), (name, grid)
        out.append((kernel, dict(zip(names, args))))
    return out


# ----------------------------------------------------------------------------- reference
def reference(x, w, b, t, temperature, softcap, go, ge):
    """Dense float64 ``token_logprobs`` of ``x @ w.T + b`` and its three gradients."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    z = x @ w.T + (0.0 if b is None else b.astype(np.float64))
    y = softcap * np.tanh(z / softcap) if softcap else z
    u = y / temperature
    lse = np.log(np.exp(u - u.max(1, keepdims=True)).sum(1)) + u.max(1)
    lp = u - lse[:, None]
    p = np.exp(lp)
    valid = t != IGNORE
    rows = np.arange(len(t))
    tc = np.where(valid, t, 0)
    ent = -(p * lp).sum(1)
    onehot = np.zeros_like(p)
    onehot[rows, tc] = 1.0
    gu = go[:, None] * (onehot - p) - ge[:, None] * p * (lp + ent[:, None])
    gu[~valid] = 0.0
    gz = gu / temperature * ((1.0 - (y / softcap) ** 2) if softcap else 1.0)
    return (np.where(valid, lp[rows, tc], 0.0), np.where(valid, ent, 0.0),
            (gz @ w, gz.T @ x, gz.sum(0)))


N, D, V = 37, 6, 45
#: name -> (chunk_rows, chunk_classes): one block; rows only; rows x vocabulary (raw blocks);
#: fewer rows than features (grad_x of a row block goes transposed; a last block of one row)
CHUNKS = {"whole": (None, None), "rows": (16, None), "split": (16, 20), "narrow": (4, 13)}
TOL = {np.float64: 1e-12, np.float32: 2e-5, np.float16: 2e-2}


def _data(dtype, seed=0, bias=True):
    r = np.random.default_rng(seed)
    x = (r.standard_normal((N, D)) * 1.5).astype(dtype)
    w = r.standard_normal((V, D)).astype(dtype)
    b = r.standard_normal(V).astype(dtype) if bias else None
    t = r.integers(0, V, N)
    t[::5] = IGNORE
    go = r.standard_normal(N)
    ge = r.standard_normal(N)
    return x, w, b, t, go, ge


def _call(G_, x, w, b, t, stats_dtype, *, temperature, softcap, want_entropy=True,
          want_grad=True, go=None, ge=None, chunks=(None, None), ignore_index=IGNORE):
    return G_.linear_token_logprobs(
        dev(x), dev(w), None if b is None else dev(b), dev(t), ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, want_entropy=want_entropy,
        want_grad=want_grad, grad_output=None if go is None else dev(go.astype(stats_dtype)),
        grad_entropy=None if ge is None else dev(ge.astype(stats_dtype)),
        chunk_rows=chunks[0], chunk_classes=chunks[1])


# ----------------------------------------------------------------------------- launches
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize(("bias", "temperature", "softcap"),
                         [(True, 0.7, 3.0), (False, 1.0, 0.0), (True, 1.6, 0.0)],
                         ids=["bias-capped", "plain", "bias-hot"])
def test_launches_and_results(ltlp, dtype, chunks, bias, temperature, softcap):
    """Every launch matches its compiled kernel; the results (both upstream gradients) equal
    the dense reference; the blocks are launched where the plan puts them."""
    x, w, b, t, go, ge = _data(dtype, bias=bias)
    stats = np.float32 if dtype == np.float16 else dtype
    logp, ent, (gx, gw, gb) = _call(ltlp, x, w, b, t, stats, temperature=temperature,
                                    softcap=softcap, go=go, ge=ge, chunks=CHUNKS[chunks])
    assert logp.dtype == ent.dtype == stats and logp.shape == ent.shape == (N,)
    assert gx.dtype == gw.dtype == dtype and gx.shape == (N, D) and gw.shape == (V, D)
    assert (gb is None) == (b is None)
    assert b is None or (gb.shape == (V,) and gb.dtype == dtype)
    want = reference(x, w, b, t, temperature, softcap, go.astype(stats), ge.astype(stats))
    tol = TOL[dtype]
    for got, exp, what in ((logp, want[0], "logp"), (ent, want[1], "entropy"),
                           *zip((gx, gw, gb), want[2], ("grad_x", "grad_w", "grad_b"))):
        if got is not None:
            np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=tol,
                                       atol=tol * max(1.0, np.abs(exp).max()), err_msg=what)

    launches = check_launches()
    rows, cols = CHUNKS[chunks]
    split = cols is not None
    row0s = list(range(0, N, rows or N))
    c0s = list(range(0, V, cols or V))
    stats_l = [a for k, a in launches if k == "ltlp_stats"]
    grad_l = [a for k, a in launches if k == "ltlp_grad"]
    sums_l = [a for k, a in launches if k == "lce_col_sums"]
    blocks = [(r, c) for r in row0s for c in c0s]
    assert [(int(a["row0"]), int(a["c0"])) for a in stats_l] == blocks
    # The gradient takes each row block's vocabulary blocks last to first: the last is still
    # in the buffer as the statistics pass left it (reused, not raw).
    assert [int(a["c0"]) for a in grad_l] == [c for _ in row0s for c in reversed(c0s)]
    assert len(sums_l) == (len(blocks) if b is not None else 0)
    cdt = np.float32 if dtype == np.float16 else dtype  # half inputs: computed in float32
    for a in stats_l:
        assert a["z"].dtype == cdt and a["err"] is stats_l[0]["err"]
        assert isinstance(a["err"], DeviceArray) and a["err"].dtype == np.int64
        assert int(a["n_classes"]) == V and int(a["ignore"]) == IGNORE
        assert float(a["inv_t"]) == 1.0 / temperature and float(a["cap"]) == softcap
        assert (b is None) == (not isinstance(a["bias"], np.ndarray))
        assert a["out"].shape == (a["z"].shape[0], 4) and a["out"].dtype == np.float64
    for a in grad_l:
        # reused (not raw): the whole vocabulary's block, or a split row block's last one
        assert int(a["raw"]) == (split and int(a["c0"]) != c0s[-1])
        assert a["m"].shape == (a["z"].shape[0],) and a["coefs"].shape == (a["z"].shape[0], 3)
    assert LAUNCHES[-1] == ("poll",)  # the error record's copy-back, queued after the launches


@pytest.mark.parametrize("chunks", ["whole", "split"])
def test_forward_only_and_defaults(ltlp, chunks):
    """No gradient: the statistics launches only; without the entropy, None; the upstream
    gradients default to ones and zeros."""
    x, w, b, t, _, _ = _data(np.float64, seed=1)
    logp, ent, grads = _call(ltlp, x, w, b, t, np.float64, temperature=0.9, softcap=0.0,
                             want_entropy=False, want_grad=False, chunks=CHUNKS[chunks])
    assert ent is None and grads is None
    assert {k for k, _ in check_launches()} == {"ltlp_stats"}
    want = reference(x, w, b, t, 0.9, 0.0, np.ones(N), np.zeros(N))
    np.testing.assert_allclose(np.asarray(logp), want[0], rtol=1e-12, atol=1e-12)
    LAUNCHES.clear()
    _, _, grads = _call(ltlp, x, w, b, t, np.float64, temperature=0.9, softcap=0.0,
                        chunks=CHUNKS[chunks])
    for g, e in zip(grads, want[2]):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-12, atol=1e-12)


def test_bad_target_is_recorded_not_read(ltlp):
    """A class index outside ``[0, V)``: recorded by the first vocabulary block's statistics
    launch with its row (``row0`` + the block's row), its row's results and gradient NaN, the
    other rows unaffected; an ``ignore_index`` beyond int64 is clipped for the kernels."""
    x, w, b, t, go, ge = _data(np.float64, seed=2)
    t[20] = V + 3
    logp, ent, (gx, gw, _) = _call(ltlp, x, w, b, t, np.float64, temperature=1.0, softcap=0.0,
                                   go=go, ge=ge, chunks=(16, 20))
    assert BAD == [(20, V + 3)]
    logp, ent, gx = np.asarray(logp), np.asarray(ent), np.asarray(gx)
    assert np.isnan(logp[20]) and np.isnan(ent[20]) and np.isnan(gx[20]).all()
    assert not np.isnan(np.delete(logp, 20)).any() and not np.isnan(np.delete(gx, 20, 0)).any()
    assert np.isnan(np.asarray(gw)).all()  # every column's product sums row 20 in
    LAUNCHES.clear()
    t[20] = 0
    _call(ltlp, x, w, b, t, np.float64, temperature=1.0, softcap=0.0, want_grad=False,
          ignore_index=-(1 << 70))
    assert all(int(a["ignore"]) == -(1 << 63) for _, a in check_launches())


def test_empty_batch_launches_nothing(ltlp):
    x = np.zeros((0, D), np.float32)
    w = np.ones((V, D), np.float32)
    logp, ent, (gx, gw, gb) = _call(ltlp, x, w, np.ones(V, np.float32),
                                    np.zeros(0, np.int64), np.float32, temperature=1.0,
                                    softcap=0.0)
    assert not check_launches()
    assert logp.shape == ent.shape == (0,) and gx.shape == (0, D)
    assert not np.asarray(gw).any() and not np.asarray(gb).any()


@pytest.mark.parametrize("bias", [False, True])
def test_block_operations_as_the_dask_plan_calls_them(ltlp, bias):
    """The block operations alone, as the vocabulary-parallel Dask plan calls them (a block at
    a class offset, the CPU keywords only: no error record, the plan checked the targets):
    their launches match the compiled kernels, and their results the CPU block operations'."""
    from nblosses.backends.cpu import linear_token_logprobs as cpu

    r = np.random.default_rng(6)
    rows, cols, c0 = 7, 9, 20
    z = r.standard_normal((rows, cols)) * 3
    b = r.standard_normal(cols) if bias else None
    t = r.integers(0, 40, rows)
    t[2] = IGNORE
    t[3] = c0 + 4  # in the block
    kw = dict(c0=c0, temperature=0.6, softcap=4.0)
    devs = [None if a is None else dev(a.copy()) for a in (z, b, t)]
    got = ltlp.linear_token_logprobs.block_stats(*devs, **kw)
    zc = z.copy()
    want = cpu.linear_token_logprobs.block_stats(zc, b, t, **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(devs[0]), zc, rtol=1e-12)  # prepared in place
    m = dev(want[:, 0] + 0.25)
    coefs = dev(r.standard_normal((rows, 3)))
    devs[0] = dev(z.copy())
    ltlp.linear_token_logprobs.block_grad(*devs, m, coefs, raw=True, ignore_index=IGNORE, **kw)
    zc = z.copy()
    cpu.linear_token_logprobs.block_grad(zc, b, t, np.asarray(m), np.asarray(coefs), raw=True,
                                         ignore_index=IGNORE, **kw)
    np.testing.assert_allclose(np.asarray(devs[0]), zc, rtol=1e-12, atol=1e-15)
    (_, st), (_, gr) = check_launches()
    assert int(st["c0"]) == int(gr["c0"]) == c0 and int(gr["raw"]) == 1
    assert st["err"] == 0 and int(st["row0"]) == 0  # null: nothing recorded


def test_kernel_and_block_operations_have_the_cpu_signatures():
    """The kernel's signature is the CPU kernel's; its block operations (which the Dask plan
    calls without the driver's extra arguments) take the CPU ones' parameters first, the rest
    defaulted."""
    from nblosses.backends.cpu import linear_token_logprobs as cpu

    def params(fn):
        return inspect.signature(inspect.unwrap(fn)).parameters

    assert list(params(G.linear_token_logprobs)) == list(params(cpu.linear_token_logprobs))
    for op in ("block_stats", "block_grad"):
        ours = params(getattr(G.linear_token_logprobs, op))
        theirs = params(getattr(cpu.linear_token_logprobs, op))
        assert list(ours)[:len(theirs)] == list(theirs), op
        assert all(p.default is not p.empty for p in list(ours.values())[len(theirs):]), op


# ----------------------------------------------------------------------------- on a device
@pytest.mark.cuda
@needs_device
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunks", list(CHUNKS), ids=list(CHUNKS))
def test_device_matches_cpu(dtype, chunks):
    from nblosses.backends.cpu import linear_token_logprobs as cpu
    from nblosses.backends.cuda import _device_errors

    _device_errors.synchronize()
    x, w, b, t, go, ge = _data(dtype, seed=4)
    for temperature, softcap in ((1.0, 0.0), (0.6, 4.0)):
        kw = dict(ignore_index=IGNORE, temperature=temperature, softcap=softcap,
                  want_entropy=True, want_grad=True, chunk_rows=CHUNKS[chunks][0],
                  chunk_classes=CHUNKS[chunks][1])
        want = cpu.linear_token_logprobs(x, w, b, t, grad_output=go.astype(dtype),
                                         grad_entropy=ge.astype(dtype), **kw)
        got = G.linear_token_logprobs(*(cupy.asarray(a) for a in (x, w, b, t)),
                                      grad_output=cupy.asarray(go.astype(dtype)),
                                      grad_entropy=cupy.asarray(ge.astype(dtype)), **kw)
        what = f"{chunks} T={temperature} cap={softcap}"
        _close(got[0], want[0], dtype, what + " logp")
        _close(got[1], want[1], dtype, what + " entropy")
        for g, e, name in zip(got[2], want[2], ("grad_x", "grad_w", "grad_b")):
            _close(g, e, dtype, f"{what} {name}")


@pytest.mark.cuda
@needs_device
def test_device_bad_target_is_deferred():
    from nblosses.backends.cuda import _device_errors

    _device_errors.synchronize()
    x, w, b, t, _, _ = _data(np.float32, seed=5)
    t[3] = V + 7
    logp, _, _ = G.linear_token_logprobs(
        *(cupy.asarray(a) for a in (x, w, b, t)), ignore_index=IGNORE, temperature=1.0,
        softcap=0.0, want_entropy=True, want_grad=False, grad_output=None, grad_entropy=None)
    cupy.cuda.get_current_stream().synchronize()
    assert bool(cupy.isnan(logp[3])) and int(cupy.isnan(logp).sum()) == 1
    with pytest.raises(IndexError, match=f"Target {V + 7} is out of bounds"):
        _device_errors.poll_errors()

