"""The Dask plans of distillation_loss and token_logprobs beyond the spec samples
(``test_dask_specs.py``): the class axis split into chunks, per-position upstream gradients
chunked differently from the logits, a 1-d input, all positions ignored, and bad indices
raised when the graph is computed."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

from nblosses import functional as F

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]')")

RNG = np.random.default_rng(7)
X = RNG.standard_normal((6, 9, 2)) * 2
Y = RNG.standard_normal((6, 9, 2)) * 2
T = np.array([[0, 8], [-100, 3], [4, 4], [1, -100], [7, 2], [5, 6]])
G = RNG.standard_normal((6, 2))


def _dx(a: np.ndarray, chunks: tuple) -> object:
    return da.from_array(a, chunks=chunks)


def _same(got, want, what):
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple)
                                                             else (want,))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(np.asarray(g.compute()), w, w.dtype, f"{what} result {i}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_class_axis_in_chunks(reduction):
    kw = dict(beta=0.3, hard_weight=0.2, temperature=1.3, reduction=reduction, return_grad=True)
    grad = {"grad_output": G} if reduction == "none" else {}
    want = F.distillation_loss(X, Y, T, **kw, **grad)
    got = F.distillation_loss(_dx(X, (4, 4, 1)), _dx(Y, (3, 5, 2)), _dx(T, (5, 1)), **kw,
                              **{k: _dx(v, (2, 1)) for k, v in grad.items()})
    _same(got, want, f"distillation_loss {reduction}")


def test_distillation_topk_chunked_and_bad_index():
    idx = np.argsort(-Y, axis=1)[:, :3]
    lp = np.take_along_axis(Y - np.log(np.exp(Y).sum(1, keepdims=True)), idx, axis=1)
    want = F.distillation_loss(X, (idx, lp), T, hard_weight=0.4, return_grad=True)
    got = F.distillation_loss(_dx(X, (2, 5, 1)), (_dx(idx, (3, 2, 2)), _dx(lp, (4, 3, 1))),
                              _dx(T, (3, 2)), hard_weight=0.4, return_grad=True)
    _same(got, want, "distillation_loss top-k")
    bad = idx.copy()
    bad[5, 0, 1] = 9
    lazy = F.distillation_loss(_dx(X, (3, 9, 2)), (_dx(bad, (3, 3, 2)), _dx(lp, (3, 3, 2))))
    with pytest.raises(IndexError, match="teacher index 9 is out of bounds"):
        lazy.compute()


def test_distillation_all_ignored_mean_is_nan_and_1d_input():
    t = np.full((6, 2), -100)
    loss = F.distillation_loss(_dx(X, (3, 9, 2)), _dx(Y, (3, 9, 2)), _dx(t, (3, 2))).compute()
    assert np.isnan(loss)
    want = F.distillation_loss(X[0, :, 0], Y[0, :, 0], reduction="none", return_grad=True,
                               grad_output=np.float64(2.0))
    got = F.distillation_loss(_dx(X[0, :, 0].copy(), 4), _dx(Y[0, :, 0].copy(), 5),
                              reduction="none", return_grad=True, grad_output=np.float64(2.0))
    assert got[0].shape == ()
    _same(got, want, "distillation_loss 1-d")


def test_token_logprobs_upstream_gradients_chunked():
    kw = dict(temperature=0.8, softcap=5.0, return_entropy=True, return_grad=True)
    ge = RNG.standard_normal((6, 2))
    want = F.token_logprobs(X, T, **kw, grad_output=G, grad_entropy=ge)
    got = F.token_logprobs(_dx(X, (4, 3, 1)), _dx(T, (2, 2)), **kw,
                           grad_output=_dx(G, (5, 1)), grad_entropy=_dx(ge, (1, 2)))
    _same(got, want, "token_logprobs array upstream")
    want = F.token_logprobs(X, T, **kw, grad_output=0.5, grad_entropy=np.float64(-1.0))
    got = F.token_logprobs(_dx(X, (4, 3, 1)), _dx(T, (2, 2)), **kw, grad_output=0.5,
                           grad_entropy=np.float64(-1.0))
    _same(got, want, "token_logprobs scalar upstream")


def test_token_logprobs_1d_and_bad_target():
    want = F.token_logprobs(X[0, :, 0], np.int64(3), return_entropy=True, return_grad=True)
    got = F.token_logprobs(_dx(X[0, :, 0].copy(), 4), np.int64(3), return_entropy=True,
                           return_grad=True)
    assert got[0].shape == ()
    _same(got, want, "token_logprobs 1-d")
    t = T.copy()
    t[4, 1] = 9
    lazy = F.token_logprobs(_dx(X, (3, 9, 2)), _dx(t, (3, 2)))
    with pytest.raises(IndexError):
        lazy.compute()
    with pytest.raises(ValueError):
        F.token_logprobs(_dx(X, (3, 9, 2)), _dx(T[:5], (3, 2)))


# ----------------------------------------------------------------------------- class-parallel
# token_logprobs with the class axis in several chunks (the class-parallel plan): chunks that
# divide neither the positions nor the classes.
NP, NC = 37, 53
ROW_CHUNKS, CLASS_CHUNKS = (10, 13, 14), (20, 20, 13)
#: name -> (input shape, chunks of the input)
TLP_SHAPES = {"2d": ((NP, NC), (ROW_CHUNKS, CLASS_CHUNKS)),
              "3d": ((NP, NC, 3), (ROW_CHUNKS, CLASS_CHUNKS, (2, 1)))}
#: name -> (temperature, softcap)
TLP_OPTIONS = {"plain": (1.0, None), "cold": (0.7, None), "capped": (1.0, 3.0),
               "cold-capped": (0.7, 3.0)}
#: How the upstream gradients come: no gradient; the defaults (None: ones, zeros); both dask
#: arrays chunked unlike the logits' positions; a NumPy array and a 0-d dask array.
TLP_UPSTREAM = ("forward", "default", "arrays", "mixed")


def _tlp_data(shape):
    r = np.random.default_rng(3)
    x = r.standard_normal(shape) * 3
    t = r.integers(0, NC, shape[:1] + shape[2:])
    t.reshape(-1)[::5] = -100
    return x, t


def _tlp_upstream(kind, shape, dask_arrays):
    r = np.random.default_rng(9)
    go, ge = r.standard_normal(shape), r.standard_normal(shape)
    if kind == "forward":
        return {}
    if kind == "default":
        go = ge = None
    elif kind == "arrays" and dask_arrays:
        other = ((20, 17),) + tuple((1,) * n for n in shape[1:])
        go, ge = _dx(go, other), _dx(ge, ((5, 32),) + other[1:])
    elif kind == "mixed":
        ge = _dx(np.float64(-0.75), ()) if dask_arrays else np.float64(-0.75)
    return dict(return_grad=True, grad_output=go, grad_entropy=ge)


def _tlp_check(lazy, want, tol=None):
    tol = tol or dict(rtol=1e-10, atol=1e-12)
    lazy, want = (v if isinstance(v, tuple) else (v,) for v in (lazy, want))
    assert len(lazy) == len(want)
    for got, w in zip(da.compute(*lazy, scheduler="threads"), want):
        assert got.shape == w.shape and got.dtype == w.dtype, (got.shape, w.shape, got.dtype)
        np.testing.assert_allclose(got, w, **tol)


@pytest.mark.parametrize("upstream", TLP_UPSTREAM)
@pytest.mark.parametrize("opts", list(TLP_OPTIONS))
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
@pytest.mark.parametrize("shape", list(TLP_SHAPES))
def test_token_logprobs_class_parallel(shape, entropy, opts, upstream):
    """The class axis in chunks dividing neither N nor C: the class-parallel plan == the eager
    call (float64, rtol 1e-10): log-probabilities, entropy and gradient, ignored positions
    included; the input is never written."""
    shape, chunks = TLP_SHAPES[shape]
    x, t = _tlp_data(shape)
    temperature, softcap = TLP_OPTIONS[opts]
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=entropy)
    want = F.token_logprobs(x, t, **kw, **_tlp_upstream(upstream, t.shape, False))
    before = x.copy()
    lazy = F.token_logprobs(_dx(x, chunks), _dx(t, chunks[:1] + chunks[2:]), **kw,
                            **_tlp_upstream(upstream, t.shape, True))
    _tlp_check(lazy, want)
    np.testing.assert_array_equal(x, before)


def test_token_logprobs_class_parallel_ignore_index_and_float32():
    """Another ``ignore_index`` (a class the chunks hold), every position ignored, and float32
    logits (float32 results and gradient)."""
    x, t = _tlp_data((NP, NC))
    kw = dict(temperature=0.7, softcap=3.0, return_entropy=True, return_grad=True,
              grad_entropy=0.25)
    chunks = (ROW_CHUNKS, CLASS_CHUNKS)
    for ignore, target in ((21, np.where(t == -100, 21, t)), (-100, np.full_like(t, -100))):
        want = F.token_logprobs(x, target, ignore_index=ignore, **kw)
        _tlp_check(F.token_logprobs(_dx(x, chunks), _dx(target, ROW_CHUNKS),
                                    ignore_index=ignore, **kw), want)
    x32 = x.astype(np.float32)
    want = F.token_logprobs(x32, t, **kw)
    _tlp_check(F.token_logprobs(_dx(x32, chunks), _dx(t, ROW_CHUNKS), **kw), want,
               dict(rtol=2e-5, atol=2e-6))


def test_token_logprobs_class_parallel_masked_logits():
    """-inf logits: a whole class chunk masked in every row, and more in some rows."""
    x, t = _tlp_data((NP, NC))
    x[:, 40:] = -np.inf
    x[3, :15] = x[4, 20:25] = -np.inf
    t = np.where((t >= 40) | (t < 15), 30, t)
    for opts in TLP_OPTIONS.values():
        kw = dict(temperature=opts[0], softcap=opts[1], return_entropy=True, return_grad=True)
        want = F.token_logprobs(x, t, **kw)
        _tlp_check(F.token_logprobs(_dx(x, (ROW_CHUNKS, CLASS_CHUNKS)), _dx(t, ROW_CHUNKS),
                                    **kw), want)


def test_token_logprobs_class_parallel_bad_target_raises_at_compute():
    x, t = _tlp_data((NP, NC))
    t[30] = NC
    lazy = F.token_logprobs(_dx(x, (ROW_CHUNKS, CLASS_CHUNKS)), _dx(t, ROW_CHUNKS),
                            return_entropy=True, return_grad=True)
    with pytest.raises(IndexError):
        da.compute(*lazy, scheduler="sync")


@pytest.mark.parametrize("shape", list(TLP_SHAPES))
def test_token_logprobs_class_parallel_holds_one_class_chunk(shape):
    """Every value of the graph (every task's input and output, the logits' source aside) is
    at most one class chunk wide: no task gathers the class axis (the one-chunk plan's
    rechunk would hold ``(rows, C)`` blocks)."""
    from dask.local import get_sync

    shape, chunks = TLP_SHAPES[shape]
    x, t = _tlp_data(shape)
    lazy = F.token_logprobs(_dx(x, chunks), _dx(t, chunks[:1] + chunks[2:]),
                            return_entropy=True, return_grad=True,
                            grad_output=_dx(np.ones(t.shape), 16))
    dsk = dict(da.Array.__dask_graph__(lazy[2]))
    widest = max(ROW_CHUNKS) * max(CLASS_CHUNKS) * max(chunks[2] if len(chunks) > 2 else (1,))
    values = [v for v in get_sync(dsk, list(dsk)) if v is not x and hasattr(v, "shape")]
    assert any(v.shape[:2] == (ROW_CHUNKS[0], CLASS_CHUNKS[0]) for v in values)  # the chunks
    for v in values:
        assert NC not in v.shape[1:2] and v.size <= widest, v.shape
