"""kl_div on Dask arrays (nblosses._dask.kl_div) against the NumPy call.

Every reduction (``batchmean`` included) and torch's legacy ``size_average`` / ``reduce`` pair,
``log_target``, broadcasting either operand (the input's gradient summed back over the axes it
was stretched along or lacked), chunkings that split every axis, each form of ``grad_output``,
dtypes, empty batches; the graph stays lazy until computed; a ``+inf`` log-target raises when
its block is computed, naming its position; errors that need only metadata raise at once.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from helpers import assert_close

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]')")
import dask  # noqa: E402

from nblosses import functional as F  # noqa: E402

RNG = np.random.default_rng(20261207)


def _log_softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


X = _log_softmax(RNG.standard_normal((5, 4, 6)))
P = np.exp(_log_softmax(RNG.standard_normal((5, 4, 6))))
P[0, 0, :2] = 0.0  # zero-probability targets contribute 0
LOG_P = np.log(P + 0.05)

# (input, target): equal shapes; the input broadcast along the batch, along a middle axis, with
# a leading axis missing; the target broadcast.
PAIRS = {"same": (X, P), "input-batch": (X[:1], P), "input-middle": (X[:, :1], P),
         "input-lead": (X[0], P), "target": (X, P[:, :1, :1])}
REDUCTIONS = ["none", "batchmean", "sum", "mean"]
LEGACY = [(None, None), (False, None), (None, False), (True, True)]


def _chunks(a):
    """Chunks splitting every axis longer than 1."""
    return tuple(max(1, (n + 1) // 2) for n in a.shape)


def _lazy(a, chunks=None):
    return da.from_array(a, chunks=_chunks(a) if chunks is None else chunks)


def _refuse(*args, **kwargs):
    raise AssertionError("a Dask graph was computed during the call (it must stay lazy)")


def _check(args, kw, dtype=np.float64, chunks=None):
    """The Dask call (lazy, then computed) equals the NumPy call: loss and gradient."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "mean" and the legacy pair warn, as torch
        want = F.kl_div(*args, return_grad=True, **kw)
        with dask.config.set(scheduler=_refuse):
            lazy = F.kl_div(*(_lazy(a, chunks) for a in args), return_grad=True, **kw)
    assert all(isinstance(r, da.Array) for r in lazy)
    got = dask.compute(*lazy, scheduler="threads")
    for g, w, kind, dt in zip(got, want, ("value", "grad"), (dtype, args[0].dtype)):
        assert_close(g, w, dt, f"kl_div {kw} {kind}", kind=kind)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("log_target", [False, True])
def test_matches_numpy(pair, reduction, log_target):
    x, p = PAIRS[pair]
    _check((x, np.log(p + 0.05) if log_target else p),
           dict(reduction=reduction, log_target=log_target))


@pytest.mark.parametrize(("size_average", "reduce"), LEGACY[1:])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("pair", ["same", "input-batch"])
def test_legacy_pair(pair, reduction, size_average, reduce):
    """The legacy pair overrides ``reduction``, yet ``batchmean`` still divides its result (an
    elementwise one too) by ``input.shape[0]``, as torch 2.13."""
    _check(PAIRS[pair], dict(reduction=reduction, size_average=size_average, reduce=reduce))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_forms(reduction):
    """A scalar (Python, NumPy 0-d, Dask 0-d) for reduced losses, an array of the broadcast
    shape (NumPy or Dask) for ``"none"``."""
    x, p = PAIRS["input-batch"]
    forms = ([RNG.standard_normal(p.shape)] if reduction == "none"
             else [0.5, np.float64(-2.0), np.array(3.0)])
    for g in forms:
        for g_in in (g, _lazy(np.asarray(g))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = F.kl_div(x, p, reduction=reduction, return_grad=True, grad_output=g)
                lazy = F.kl_div(_lazy(x), _lazy(p), reduction=reduction, return_grad=True,
                                grad_output=g_in)
            for got, w in zip(dask.compute(*lazy, scheduler="threads"), want):
                assert_close(got, w, np.float64)


@pytest.mark.parametrize("chunks", [(5, 4, 6), (1, 1, 1), (2, 3, 5)])
def test_any_chunking(chunks):
    _check(PAIRS["same"], dict(reduction="batchmean"), chunks=chunks)


@pytest.mark.parametrize(("x_dtype", "t_dtype"), [("float32", "float32"),
                                                  ("float16", "float16"),
                                                  ("float32", "float64")])
@pytest.mark.parametrize("pair", ["same", "input-batch"])
def test_dtypes(pair, x_dtype, t_dtype):
    """The loss in the promoted dtype, the gradient in the input's (summed over broadcast
    axes in float64 here, where the eager call sums in the compute dtype)."""
    x, p = PAIRS[pair]
    args = (x.astype(x_dtype), p.astype(t_dtype))
    _check(args, dict(reduction="batchmean"), dtype=np.result_type(x_dtype, t_dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    """No position: a reduced loss is NaN for ``mean`` / ``batchmean`` (0 / 0), 0 for
    ``sum``, as the eager call."""
    _check((np.empty((0, 3)), np.empty((0, 3))), dict(reduction=reduction), chunks=(1, 3))


def test_infinite_log_target_raises_when_computed():
    t = LOG_P.copy()
    t[3, 2, 5] = np.inf
    flat = int(np.ravel_multi_index((3, 2, 5), t.shape))
    for x in (X, X[:1]):  # the error names the position in the broadcast shape
        loss = F.kl_div(_lazy(x), _lazy(t), reduction="sum", log_target=True)
        with pytest.raises(ValueError, match=f"found \\+inf at flat position {flat}$"):
            loss.compute(scheduler="threads")
    F.kl_div(_lazy(X), _lazy(t), reduction="sum")  # probabilities: +inf is no log-target


def test_metadata_errors_at_once():
    with pytest.raises(ValueError, match="must match the size of tensor b"):
        F.kl_div(_lazy(X), _lazy(P[:, :3]), reduction="sum")
    with pytest.raises(TypeError, match="Integral inputs not supported"):
        F.kl_div(_lazy(X), _lazy(np.ones(X.shape, np.int64)), reduction="sum")
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        F.kl_div(_lazy(X), _lazy(P), reduction="avg")
    with pytest.raises(TypeError, match="grad_buffer is not supported for dask arrays"):
        F.kl_div(_lazy(X), _lazy(P), reduction="sum", return_grad=True,
                 grad_buffer=np.empty_like(X))
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        F.kl_div(_lazy(X), _lazy(P), reduction="mean")


def test_every_option_together_on_mixed_arrays():
    """NumPy and Dask operands mixed (the NumPy one becomes one chunk)."""
    for (size_average, reduce), log_target in itertools.product(LEGACY, (False, True)):
        x, p = PAIRS["input-middle"]
        t = np.log(p + 0.05) if log_target else p
        kw = dict(size_average=size_average, reduce=reduce, reduction="batchmean",
                  log_target=log_target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = F.kl_div(x, t, return_grad=True, **kw)
            lazy = F.kl_div(x, _lazy(t), return_grad=True, **kw)
        for got, w in zip(dask.compute(*lazy, scheduler="threads"), want):
            assert_close(got, w, np.float64)
