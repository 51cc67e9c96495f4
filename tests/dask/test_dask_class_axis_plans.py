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
