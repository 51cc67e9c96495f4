"""The Dask front end's structure and what it gained over the per-chunk public calls.

- Every spec's Dask plan is in the plan table; the package imports neither the public functions
  nor the dispatcher (no import circle, no validation again per chunk).
- The generic plan (:func:`nblosses._dask._blockwise.loss_plan`) serves an op it has never
  seen, from a block task alone.
- Tasks reach the kernels through the backend runtime: a spy backend sees the row-statistics
  kernel (softmax along a chunked ``dim``) and the LM head's block operations (cross-entropy
  with the class axis chunked, linear cross-entropy, which ignored ``backend=`` before, and
  linear_token_logprobs with the vocabulary chunked, token_logprobs with the class axis
  chunked); a backend without the block operations still serves whole class chunks (and
  token_logprobs' chunked class axis, gathered).
- cross_entropy with the class axis in several chunks takes every option (``z_loss``,
  ``softcap``, ``return_lse``), and linear_cross_entropy's vocabulary-parallel plan matches the
  eager call for every option on a 2-worker cluster.
- linear_token_logprobs with the weight in vocabulary chunks (the vocabulary-parallel plan)
  matches the eager call for every option, upstream gradient and layout, through the
  backend's block operations only.
- The LM heads' vocabulary-parallel graphs: calls on the same arrays that differ only in their
  options (reduction, gradient, upstream gradient), computed together, share no task.
- The CUDA block operations, called as the plans call them, launch kernels that match their
  compiled parameter lists (no device needed).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]')")
import dask  # noqa: E402

import nblosses  # noqa: E402
from nblosses import Backend, Runtime  # noqa: E402
from nblosses import functional as F  # noqa: E402
from nblosses._registry import load  # noqa: E402
from nblosses.errors import UnsupportedOpError  # noqa: E402
from nblosses.ops import SPECS  # noqa: E402

RNG = np.random.default_rng(20261207)
THREADS = {"scheduler": "threads"}


def close(got, want, rtol=1e-10, atol=1e-13):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)


def compare(lazy, eager, **tol):
    """Every leaf of a lazy result (dask arrays, nested tuples, None) equals the eager one."""
    flat_lazy, flat_eager = list(_leaves(lazy)), list(_leaves(eager))
    assert len(flat_lazy) == len(flat_eager)
    assert all(isinstance(a, da.Array) for a in flat_lazy if a is not None)
    computed = iter(dask.compute(*(a for a in flat_lazy if a is not None), **THREADS))
    for got, want in zip(flat_lazy, flat_eager):
        assert (got is None) == (want is None)
        if want is not None:
            close(next(computed), want, **tol)


def _leaves(value):
    if isinstance(value, tuple):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


# ----------------------------------------------------------------------------- structure
def test_every_spec_with_a_dask_plan_has_one():
    from nblosses import _dask

    assert {s.dask for s in SPECS.values() if s.dask is not None} <= set(_dask.PLANS)


def test_the_package_imports_neither_the_public_functions_nor_the_dispatcher():
    package = Path(nblosses.__file__).parent / "_dask"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{a.name}" if node.module else a.name
                         for a in node.names}
                assert not any(n.split(".")[-1] in ("functional", "_dispatch")
                               or (node.module or "").endswith(("functional", "_dispatch"))
                               for n in names), (path.name, ast.dump(node))
            elif isinstance(node, ast.Import):
                assert not any(a.name in ("nblosses.functional", "nblosses._dispatch")
                               for a in node.names), path.name


def _squared_error_block(xb, yb, gb, *, want_grad):
    """A block task of an op the package has never seen: ``(x - y)^2 / 2``, gradient
    ``g (x - y)``."""
    from nblosses._dask._common import rows_grad

    d = xb - yb
    loss = d * d / 2
    if not want_grad:
        return loss
    return loss, rows_grad(load("cpu"), gb, d.shape) * d


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_generic_plan_serves_a_new_op(reduction):
    from nblosses._dask._blockwise import Result, loss_plan
    from nblosses._dask._common import grad_arg

    be = load("cpu")
    x, y = RNG.standard_normal((7, 5)), RNG.standard_normal((7, 5))
    g_rows = RNG.standard_normal((7, 5))
    dx, dy = da.from_array(x, (3, 2)), da.from_array(y, (3, 2))
    denom = float(x.size)
    upstream = g_rows if reduction == "none" else 2.0
    grad = grad_arg(upstream, reduction, denom, x.shape, dx.chunks, "ab", be)
    loss, gx = loss_plan(_squared_error_block, [(dx, "ab"), (dy, "ab")], be=be,
                         loss=Result("ab", np.float64), others=[Result("ab", np.float64)],
                         reduction=reduction, denom=denom, dtype=np.float32, grad=grad,
                         want_grad=True)
    rows = (x - y) ** 2 / 2
    want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction].astype(np.float32)
    scale = {"none": g_rows, "sum": 2.0, "mean": 2.0 / denom}[reduction]
    got_loss, got_grad = dask.compute(loss, gx, **THREADS)
    close(got_loss, want, rtol=1e-6)
    close(got_grad, scale * (x - y))


# ----------------------------------------------------------------------------- backends
class _Spy(Backend):
    """The CPU kernels, each call recorded by name (block operations as ``kernel.op``);
    ``blocks=False``: the LM head kernel without its block operations."""

    name = "spy"

    def __init__(self, blocks: bool = True) -> None:
        self.blocks = blocks
        self.calls: list[str] = []

    def build(self) -> Runtime:
        cpu = load("cpu")
        return Runtime(self, xp=np, asarray=np.asarray, index_range=cpu.index_range,
                       kernels={n: self._wrap(n, k) for n, k in cpu.kernels.items()})

    def _wrap(self, name, kernel):
        def call(*args, **kwargs):
            self.calls.append(name)
            return kernel(*args, **kwargs)

        for op in ("block_stats", "block_grad"):
            if self.blocks and hasattr(kernel, op):
                setattr(call, op, self._wrap(f"{name}.{op}", getattr(kernel, op)))
        return call


@pytest.fixture(params=[True, False], ids=["blocks", "no-blocks"])
def spy(request):
    backend = nblosses.register_backend(_Spy(request.param))
    yield backend
    nblosses.unregister_backend("spy")


def test_tasks_reach_the_kernels_through_the_backend(spy):
    x, t = RNG.standard_normal((8, 6)), RNG.integers(0, 6, 8)
    whole = F.cross_entropy(da.from_array(x, (4, 6)), t, return_grad=True, backend="spy")
    compare(whole, F.cross_entropy(x, t, return_grad=True))
    assert "cross_entropy" in spy.calls
    compare(F.log_softmax(da.from_array(x, (4, 3)), 1, backend="spy"), F.log_softmax(x, 1))
    assert "logsumexp" in spy.calls
    split = F.cross_entropy(da.from_array(x, (4, 3)), t, return_grad=True, backend="spy")
    w2, b = RNG.standard_normal((6, 5)), RNG.standard_normal(6)
    xl = RNG.standard_normal((8, 5))
    lce = F.linear_cross_entropy(da.from_array(xl, (4, 5)), da.from_array(w2, (3, 5)), t,
                                 linear_bias=b, return_grad=True, backend="spy")
    ltl = F.linear_token_logprobs(da.from_array(xl, (4, 5)), da.from_array(w2, (3, 5)), t,
                                  linear_bias=b, return_entropy=True, return_grad=True,
                                  backend="spy")
    tlp = F.token_logprobs(da.from_array(x, (4, 3)), t, temperature=0.8, softcap=3.0,
                           return_entropy=True, return_grad=True, backend="spy")
    compare(tlp, F.token_logprobs(x, t, temperature=0.8, softcap=3.0, return_entropy=True,
                                  return_grad=True))
    # token_logprobs with the class axis split: the block operations, or (a backend without
    # them) the one-chunk plan's whole kernel
    assert ("token_logprobs" in spy.calls) is not spy.blocks
    if not spy.blocks:
        for lazy in (split, ltl):
            with pytest.raises(UnsupportedOpError, match="block_stats"):
                dask.compute(lazy, **THREADS)
        return
    compare(split, F.cross_entropy(x, t, return_grad=True))
    compare(lce, F.linear_cross_entropy(xl, w2, t, linear_bias=b, return_grad=True))
    compare(ltl, F.linear_token_logprobs(xl, w2, t, linear_bias=b, return_entropy=True,
                                         return_grad=True))
    for op in ("linear_cross_entropy", "linear_token_logprobs"):
        assert {f"{op}.block_stats", f"{op}.block_grad"} <= set(spy.calls)
        assert op not in spy.calls  # the blocks only, never the whole head


# ----------------------------------------------------------------------------- cross_entropy
CE_OPTIONS = [dict(z_loss=1e-2), dict(softcap=3.0, label_smoothing=0.1),
              dict(z_loss=2e-3, softcap=2.5, return_lse=True)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("shape", "chunks"), [((9, 7), (4, 3)), ((4, 6, 5), (3, 4, 2))],
                         ids=["2d", "3d"])
def test_cross_entropy_options_across_class_chunks(shape, chunks, reduction):
    x = RNG.standard_normal(shape) * 4
    t = RNG.integers(0, shape[1], shape[:1] + shape[2:])
    t.reshape(-1)[::4] = -100
    p = RNG.random(shape)
    p /= p.sum(1, keepdims=True)
    w = RNG.random(shape[1]) + 0.5
    g = RNG.standard_normal(t.shape) if reduction == "none" else 0.5
    for opts, target, weight in itertools.product(CE_OPTIONS, (t, p), (None, w)):
        kw = dict(opts, weight=weight, reduction=reduction, return_grad=True, grad_output=g)
        lazy = F.cross_entropy(da.from_array(x, chunks), target, **kw)
        compare(lazy, F.cross_entropy(x, target, **kw))


# ----------------------------------------------------------------------------- linear CE
N, D, V = 37, 11, 53
ROWS, COLS = (10, 13, 14), (20, 20, 13)
#: name -> (weight, bias, label_smoothing, z_loss, softcap)
LCE_OPTIONS = {"plain": (False, False, 0.0, 0.0, None), "all": (True, True, 0.1, 1e-2, 4.0)}


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(processes=False, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("probs", "opts"), [(False, "all"), (False, "plain"), (True, "all")],
                         ids=["index-all", "index-plain", "probs-all"])
def test_linear_ce_vocabulary_parallel(dask_client, probs, opts, reduction):
    """Batch chunks x vocabulary chunks on a 2-worker cluster == the eager call (float64),
    loss, lse and the three gradients."""
    use_w, use_b, eps, z_loss, cap = LCE_OPTIONS[opts]
    x = RNG.standard_normal((N, D))
    w2 = RNG.standard_normal((V, D)) * 0.7
    bias = RNG.standard_normal(V) if use_b else None
    weight = RNG.uniform(0.2, 2.0, V) if use_w else None
    if probs:
        target = RNG.random((N, V))
        target /= target.sum(1, keepdims=True)
    else:
        target = RNG.integers(0, V, N)
        target[::6] = -100
    kw = dict(linear_bias=bias, weight=weight, reduction=reduction, label_smoothing=eps,
              z_loss=z_loss, softcap=cap, return_grad=True, return_lse=True,
              grad_output=RNG.standard_normal(N) if reduction == "none" else 0.75)
    want = F.linear_cross_entropy(x, w2, target, **kw)
    lazy = F.linear_cross_entropy(
        da.from_array(x, (ROWS, D)), da.from_array(w2, (COLS, D)),
        da.from_array(target, (ROWS, COLS) if probs else (ROWS,)),
        **dict(kw, linear_bias=None if bias is None else da.from_array(bias, (COLS,)),
               weight=None if weight is None else da.from_array(weight, (COLS,))))
    loss, (gx, gw, gb), lse = lazy
    got = dask_client.compute([loss, gx, gw, lse, *([gb] if gb is not None else [])],
                              sync=True)
    for a, e in zip(got, [want[0], *want[1][:2], want[2], *want[1][2:3]]):
        close(a, e)
    assert (gb is None) == (want[1][2] is None)


# ----------------------------------------------------------------------------- LM-head logprobs
#: name -> (temperature, softcap)
LTL_OPTIONS = {"plain": (1.0, None), "hot": (1.6, None), "cold-capped": (0.7, 3.0)}
#: How the upstream gradients come: no gradient; the defaults (ones, zeros); both as rows (dask,
#: chunked unlike the rows); a scalar and a 0-d dask array.
LTL_UPSTREAM = ("forward", "default", "rows", "scalars")


def _ltl_upstream(kind: str, dask_arrays: bool) -> dict:
    r = np.random.default_rng(7)
    go, ge = r.standard_normal(N), r.standard_normal(N)
    if kind == "forward":
        return {}
    if kind == "rows":
        go, ge = ((da.from_array(a, ((20, 17),)) if dask_arrays else a) for a in (go, ge))
    elif kind == "scalars":
        go, ge = 0.5, (da.from_array(np.float64(-1.25)) if dask_arrays else np.float64(-1.25))
    else:
        go = ge = None
    return dict(return_grad=True, grad_output=go, grad_entropy=ge)


def _ltl_data(dtype=np.float64, bias=True):
    r = np.random.default_rng(11)
    x = (r.standard_normal((N, D)) * 1.3).astype(dtype)
    w2 = (r.standard_normal((V, D)) * 0.8).astype(dtype)
    t = r.integers(0, V, N)
    t[::6] = -100
    return x, w2, (r.standard_normal(V).astype(dtype) if bias else None), t


def _ltl_lazy(x, w2, t, linear_bias=None, **kw):
    """The call on the rows in ``ROWS`` and the vocabulary in ``COLS`` chunks."""
    return F.linear_token_logprobs(
        da.from_array(x, (ROWS, -1)), da.from_array(w2, (COLS, -1)), da.from_array(t, (ROWS,)),
        linear_bias=None if linear_bias is None else da.from_array(linear_bias, (COLS,)), **kw)


@pytest.mark.parametrize("upstream", LTL_UPSTREAM)
@pytest.mark.parametrize("opts", list(LTL_OPTIONS))
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_linear_token_logprobs_vocabulary_parallel(bias, entropy, opts, upstream):
    """The weight in vocabulary chunks (dividing neither ``N`` nor ``V``, as the rows): the
    vocabulary-parallel plan == the eager call (float64, rtol 1e-10): log-probabilities,
    entropy and the three gradients, ignored rows included."""
    x, w2, b, t = _ltl_data(bias=bias)
    temperature, softcap = LTL_OPTIONS[opts]
    kw = dict(linear_bias=b, temperature=temperature, softcap=softcap, return_entropy=entropy)
    lazy = _ltl_lazy(x, w2, t, **kw, **_ltl_upstream(upstream, True))
    first = lazy[0] if isinstance(lazy, tuple) else lazy
    assert first.name.startswith("linear-token-logprobs-logp-")  # not the rows plan
    compare(lazy, F.linear_token_logprobs(x, w2, t, **kw, **_ltl_upstream(upstream, False)))


LTL_LAYOUTS = {
    # one (d,) row, a scalar target: () results, a (d,) grad_input
    "one-row": dict(rows=1, squeeze=True),
    "float32": dict(dtype=np.float32, tol=dict(rtol=2e-5, atol=1e-6)),
    "ignore-index": dict(ignore_index=3),
    "all-ignored": dict(ignore_all=True),
    "features-chunked": dict(feature_chunks=(4, 7)),
}


@pytest.mark.parametrize("case", list(LTL_LAYOUTS))
def test_linear_token_logprobs_vocabulary_parallel_layouts(case):
    """The vocabulary-parallel plan on other layouts: one squeezed row, float32 (float32
    results and gradients), another ``ignore_index``, every row ignored (zeros), the features
    in chunks (gathered)."""
    spec = LTL_LAYOUTS[case]
    x, w2, b, t = _ltl_data(spec.get("dtype", np.float64))
    ignore = spec.get("ignore_index", -100)
    if spec.get("squeeze"):
        x, t = x[5], t[5]
    if spec.get("ignore_all"):
        t = np.full_like(t, ignore)
    if case == "ignore-index":
        t = np.where(t == -100, ignore, t)
    kw = dict(linear_bias=b, temperature=0.8, softcap=5.0, ignore_index=ignore,
              return_entropy=True, return_grad=True, grad_output=x[..., 0] * 0 + 1.5)
    want = F.linear_token_logprobs(x, w2, t, **kw)
    if spec.get("squeeze"):
        lazy = F.linear_token_logprobs(da.from_array(x), da.from_array(w2, (COLS, D)), t,
                                       **dict(kw, linear_bias=da.from_array(b, (COLS,))))
    elif "feature_chunks" in spec:
        chunks = spec["feature_chunks"]
        lazy = F.linear_token_logprobs(da.from_array(x, (ROWS, chunks)),
                                       da.from_array(w2, (COLS, chunks)), t, **kw)
    else:
        lazy = _ltl_lazy(x, w2, t, **kw)
    compare(lazy, want, **spec.get("tol", {}))


def _lm_head_args(op: str, dask_arrays: bool) -> tuple:
    """The positional arrays of an LM-head op (the same values every call), the rows and the
    vocabulary in several chunks for ``dask_arrays``."""
    r = np.random.default_rng(5)
    x, w2 = r.standard_normal((N, D)), r.standard_normal((V, D))
    t = r.integers(0, V, N)
    t[::6] = -100
    heads = [x, w2]
    if op == "linear_distillation_loss":
        heads += [r.standard_normal((N, 4)), r.standard_normal((V, 4))]
    if dask_arrays:
        heads = [da.from_array(a, (ROWS if len(a) == N else COLS, -1)) for a in heads]
    return (*heads, t)


#: op -> variants of one call that differ only in options the arrays do not hold
SAME_ARRAYS = {
    "linear_cross_entropy": [dict(reduction="none"), dict(reduction="sum"),
                             dict(reduction="sum", return_grad=True),
                             dict(reduction="sum", return_grad=True, grad_output=2.0)],
    "linear_distillation_loss": [dict(reduction="none"), dict(reduction="mean"),
                                 dict(reduction="mean", return_grad=True),
                                 dict(reduction="mean", return_grad=True, grad_output=-1.5)],
    "linear_token_logprobs": [dict(), dict(return_entropy=True),
                              dict(return_entropy=True, return_grad=True),
                              dict(return_entropy=True, return_grad=True, grad_output=2.0),
                              dict(return_entropy=True, return_grad=True, grad_entropy=0.5)],
}


@pytest.mark.parametrize("op", list(SAME_ARRAYS))
def test_calls_on_the_same_arrays_share_no_task(op):
    """Calls on the same dask arrays that differ only in the reduction, the gradient or the
    upstream gradient, computed together, each equal their eager call: their task keys are
    not named after the arrays alone (one call's tasks would replace the other's)."""
    fn = getattr(F, op)
    lazy = tuple(fn(*_lm_head_args(op, True), **kw) for kw in SAME_ARRAYS[op])
    compare(lazy, tuple(fn(*_lm_head_args(op, False), **kw) for kw in SAME_ARRAYS[op]))


# The fake launches write nothing: the statistics read back are uninitialised.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("probs", [False, True])
def test_cuda_block_operations_as_the_plans_call_them(monkeypatch, probs):
    """The CUDA LM-head block operations called alone, as the class-split plans call them (a
    block at a class offset, no error record: the plan checked the targets), launch their
    kernels with arguments matching the compiled parameter lists (no device: the launch
    checks of ``tests/kernels/test_cuda_compile.py``, skipped without CuPy and NVRTC)."""
    tcc = pytest.importorskip("test_cuda_compile")
    from nblosses.backends.cuda import _kernels as K
    from nblosses.backends.cuda import _loader as L
    from nblosses.backends.cuda import linear_ce

    monkeypatch.setattr(L, "sm_count", lambda: 132)
    monkeypatch.setattr(L, "launch", lambda *args: tcc.LAUNCHES.append(args))
    tcc.LAUNCHES.clear()
    rows, cols, c0, v = 6, 5, 10, 17
    for dtype in (np.float32, np.float64):
        z = tcc.fa(RNG.standard_normal((rows, cols)).astype(dtype))
        w = tcc.fa(RNG.random(cols).astype(dtype))
        target = (tcc.fa(RNG.random((rows, cols)).astype(dtype)) if probs
                  else tcc.fa(RNG.integers(0, v, rows)))
        stats = {k: tcc.fa(np.zeros(rows)) for k in ("m", "s", "xt", "swx", "a_sum", "b_sum")}
        kw = dict(c0=c0, ignore_index=-100, n_classes=v, label_smoothing=0.1, softcap=3.0)
        linear_ce.block_stats(z, None, target, w, stats, **kw)
        coefs = tuple(tcc.fa(np.ones(rows)) for _ in range(3))
        linear_ce.block_grad(z, None, target, w, stats["m"], coefs, raw=True, **kw)
    tcc.check_launches(4)
    names = {n: [a for a, _ in K.PARAMS[n]] for n in ("lce_stats", "lce_grad")}
    for _, _, kernel, _, _, args in tcc.LAUNCHES:
        family = kernel.split("<")[0]
        got = dict(zip(names[family], args))
        assert int(got["c0"]) == c0 and (family == "lce_grad" or got["err"] == 0)
        assert int(got["ldy"]) == (cols if probs else 0)
    tcc.LAUNCHES.clear()
