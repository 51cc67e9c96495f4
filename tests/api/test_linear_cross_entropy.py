"""The CPU ``linear_cross_entropy`` kernel (canonical arguments) against torch 2.13.

References, in float64 from the very values tested: ``torch.nn.functional.linear_cross_entropy``
where it covers the options (no z-loss, no softcap), else the composite ``xc = c tanh(z / c)``,
``lse = logsumexp(xc)``, ``F.cross_entropy(xc, ...) + z_loss * lse**2`` on kept rows. All three
gradients by torch autograd. Small shapes; chunk sizes that divide neither N nor V force several
row blocks and the two-pass vocabulary-chunked path.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, ce_options_composite, rng, tt

from nblosses.backends import _lm_head as H
from nblosses.backends.cpu import linear_ce_blas
from nblosses.backends.cpu.linear_ce import linear_cross_entropy

N, D, V = 37, 11, 53
IGNORE = -100
#: (chunk_rows, chunk_classes): automatic; several row blocks; row and vocabulary blocks.
CHUNKS = [(None, None), (8, None), (5, 7), (N, 20)]
#: name -> (weight, bias, label_smoothing, z_loss, softcap)
OPTIONS = {
    "plain": (False, False, 0.0, 0.0, 0.0),
    "weight-smoothing": (True, False, 0.15, 0.0, 0.0),
    "bias": (False, True, 0.0, 0.0, 0.0),
    "all": (True, True, 0.1, 1e-2, 4.0),
    "zloss-softcap": (False, False, 0.0, 3e-3, 2.5),
}


def _data(dtype, probs: bool, opts: str, seed: int = 0, ignore: int = IGNORE):
    r = rng(seed)
    use_w, use_b, *_ = OPTIONS[opts]
    x = r.standard_normal((N, D)).astype(dtype)
    w2 = (r.standard_normal((V, D)) * 0.7).astype(dtype)
    bias = r.standard_normal(V).astype(dtype) if use_b else None
    weight = r.uniform(0.2, 2.0, V).astype(dtype) if use_w else None
    if probs:
        target = r.random((N, V)).astype(dtype)
        target /= target.sum(1, keepdims=True)
    else:
        target = r.integers(0, V, N)
        target[::6] = ignore
    return x, w2, bias, target, weight


def _grad_output(reduction: str, dtype, seed: int = 1):
    return rng(seed).standard_normal(N).astype(dtype) if reduction == "none" else 0.75


def torch_reference(x, w2, bias, target, weight, *, ignore_index, label_smoothing, reduction,
                    z_loss, softcap, grad_output, dtype):
    """``(loss, lse, grad_x, grad_w, grad_bias)`` by torch (float64)."""
    xt, wt, bt = (tt(a, dtype, requires_grad=True) for a in (x, w2, bias))
    probs = target.ndim == 2
    t = tt(target, dtype)
    cw = tt(weight, dtype)
    logits = TF.linear(xt, wt, bt)
    xc = softcap * torch.tanh(logits / softcap) if softcap else logits
    lse = torch.logsumexp(xc, dim=1)
    if z_loss == 0 and softcap == 0:
        loss = TF.linear_cross_entropy(xt, wt, t, linear_bias=bt, weight=cw, reduction=reduction,
                                       ignore_index=None if probs else ignore_index,
                                       label_smoothing=label_smoothing)
    else:
        loss, _ = ce_options_composite(logits, t, cw, label_smoothing=label_smoothing,
                                       reduction=reduction, z_loss=z_loss,
                                       softcap=softcap or None, ignore_index=ignore_index)
    g = torch.as_tensor(np.asarray(grad_output), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(g)
    grads = [a.grad.numpy() for a in (xt, wt)] + [None if bt is None else bt.grad.numpy()]
    return (loss.detach().numpy(), lse.detach().numpy(), *grads)


def _run(x, w2, bias, target, weight, *, reduction, eps=0.0, z_loss=0.0, softcap=0.0,
         chunks=(None, None), ignore_index=IGNORE, want_grad=True, want_lse=True,
         grad_output=None):
    return linear_cross_entropy(
        x, w2, bias, target, weight, ignore_index=ignore_index, label_smoothing=eps,
        reduction=reduction, z_loss=z_loss, softcap=softcap, want_grad=want_grad,
        grad_output=grad_output if want_grad else None, want_lse=want_lse,
        chunk_rows=chunks[0], chunk_classes=chunks[1])


def _check(ours, ref, dtype) -> None:
    loss, lse, grads = ours
    r_loss, r_lse, *r_grads = ref
    assert_close(loss, r_loss, dtype, "loss")
    assert_close(lse, r_lse, dtype, "lse")
    for name, a, e in zip(("grad_x", "grad_w", "grad_bias"), grads, r_grads):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, dtype, name, kind="grad")


@pytest.mark.parametrize("chunks", CHUNKS, ids=lambda c: f"chunks{c[0]}x{c[1]}")
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_with_torch(dtype, probs, reduction, opts, chunks):
    x, w2, bias, target, weight = _data(dtype, probs, opts)
    _, _, eps, z_loss, softcap = OPTIONS[opts]
    go = _grad_output(reduction, dtype)
    ours = _run(x, w2, bias, target, weight, reduction=reduction, eps=eps, z_loss=z_loss,
                softcap=softcap, chunks=chunks, grad_output=go)
    ref = torch_reference(x, w2, bias, target, weight, ignore_index=IGNORE, label_smoothing=eps,
                          reduction=reduction, z_loss=z_loss, softcap=softcap, grad_output=go,
                          dtype=dtype)
    _check(ours, ref, dtype)
    loss = ours[0]
    assert loss.dtype == np.dtype(dtype) and loss.shape == (() if reduction != "none" else (N,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    """No kept row: ``mean`` is NaN (0/0) and every gradient is zero, as torch's
    ``F.linear_cross_entropy`` (its chunked path and the z-loss composite give NaN gradients:
    ignored rows have no gradient here whatever the options)."""
    x, w2, bias, _, weight = _data("float64", False, "all")
    target = np.full(N, IGNORE)
    go = _grad_output(reduction, "float64")
    ours = _run(x, w2, bias, target, weight, reduction=reduction, eps=0.1, chunks=(5, 7),
                grad_output=go)
    ref = torch_reference(x, w2, bias, target, weight, ignore_index=IGNORE, label_smoothing=0.1,
                          reduction=reduction, z_loss=0.0, softcap=0.0, grad_output=go,
                          dtype="float64")
    _check(ours, ref, "float64")
    assert (np.isnan(ours[0]) if reduction == "mean" else not np.any(ours[0]))
    z_loss = _run(x, w2, bias, target, weight, reduction=reduction, z_loss=1e-2, softcap=3.0,
                  grad_output=go)
    assert not any(np.any(g) for g in ours[2] + z_loss[2])


@pytest.mark.parametrize("ignore_index", [2, -1])
def test_other_ignore_index(ignore_index):
    """An ``ignore_index`` inside the class range ignores that class's rows."""
    x, w2, bias, target, weight = _data("float64", False, "weight-smoothing", seed=3,
                                        ignore=ignore_index)
    target[1::7] = 2
    ours = _run(x, w2, bias, target, weight, reduction="mean", eps=0.15, chunks=(6, 9),
                ignore_index=ignore_index, grad_output=1.0)
    ref = torch_reference(x, w2, bias, target, weight, ignore_index=ignore_index,
                          label_smoothing=0.15, reduction="mean", z_loss=0.0, softcap=0.0,
                          grad_output=1.0, dtype="float64")
    _check(ours, ref, "float64")


@pytest.mark.parametrize("chunks", [(None, None), (5, 7)])
def test_without_gradient_or_lse(chunks):
    x, w2, bias, target, weight = _data("float32", False, "all")
    loss, lse, grads = _run(x, w2, bias, target, weight, reduction="sum", eps=0.1, z_loss=1e-2,
                            softcap=4.0, chunks=chunks, want_grad=False, want_lse=False)
    full = _run(x, w2, bias, target, weight, reduction="sum", eps=0.1, z_loss=1e-2, softcap=4.0,
                chunks=chunks, grad_output=1.0)
    assert lse is None and grads is None
    np.testing.assert_allclose(loss, full[0], rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    """N = 0: mean is NaN (0/0), sum 0, gradients of the right shapes, all zeros."""
    go = np.zeros(0) if reduction == "none" else 1.0
    loss, lse, (gx, gw, gb) = _run(np.zeros((0, D)), np.ones((V, D)), np.ones(V),
                                   np.zeros(0, np.int64), None, reduction=reduction, eps=0.1,
                                   grad_output=go)
    assert np.isnan(loss) if reduction == "mean" else not np.any(loss)
    assert lse.shape == (0,) and gx.shape == (0, D) and gw.shape == (V, D) and gb.shape == (V,)
    assert not (np.any(gw) or np.any(gb))


def test_no_features():
    """d = 0: the logits are the bias alone (torch agrees)."""
    x, w2 = np.zeros((N, 0)), np.zeros((V, 0))
    bias = rng(2).standard_normal(V)
    target = rng(3).integers(0, V, N)
    go = _grad_output("none", "float64")
    ours = _run(x, w2, bias, target, None, reduction="none", eps=0.1, grad_output=go)
    ref = torch_reference(x, w2, bias, target, None, ignore_index=IGNORE, label_smoothing=0.1,
                          reduction="none", z_loss=0.0, softcap=0.0, grad_output=go,
                          dtype="float64")
    _check(ours, ref, "float64")


def test_numpy_gemm_fallback(monkeypatch):
    """Where NumPy's BLAS is not reachable by ctypes, results are the same."""
    x, w2, bias, target, weight = _data("float64", False, "all")
    expected = _run(x, w2, bias, target, weight, reduction="mean", eps=0.1, z_loss=1e-2,
                    softcap=4.0, chunks=(5, 7), grad_output=1.0)
    monkeypatch.setattr(linear_ce_blas, "_cblas_gemm", lambda dtype: None)
    monkeypatch.setattr(linear_ce_blas, "_FALLBACK_ROWS", 4)
    got = _run(x, w2, bias, target, weight, reduction="mean", eps=0.1, z_loss=1e-2,
               softcap=4.0, chunks=(5, 7), grad_output=1.0)
    for a, e in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]]):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposes", [(False, False), (True, False), (False, True),
                                        (True, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm(dtype, transposes, beta):
    r = rng(5)
    a = r.standard_normal((7, 9)).astype(dtype)
    b = r.standard_normal((9, 4)).astype(dtype)
    a = np.ascontiguousarray(a.T).T if transposes[0] else a
    b = np.ascontiguousarray(b.T).T if transposes[1] else b
    big = r.standard_normal((7, 10)).astype(dtype)
    c = big[:, 3:7]  # rows strided: leading dimension 10
    expected = a @ b + beta * c
    linear_ce_blas.gemm(a, b, c, beta)
    rtol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(c, expected, rtol=rtol, atol=rtol)


def test_gemm_uses_numpys_blas():
    """The wheels' OpenBLAS is found (else the slower fallback would run silently)."""
    assert linear_ce_blas.has_cblas(np.float32) and linear_ce_blas.has_cblas(np.float64)


@pytest.mark.parametrize(("n", "v", "d"), [(4096, 32000, 1024), (1024, 128256, 1024),
                                           (10, 20, 3), (64, 4_000_000, 16),
                                           (8192, 256_000, 8192), (1, 10, 4)])
def test_plan_respects_budget(n, v, d):
    plan = H.plan_chunks(n, v, d)
    budget = max(H.MIN_BLOCK, min(H.BUDGET_FRACTION * n * v, H.MAX_BLOCK))
    assert 1 <= plan.rows <= n and 1 <= plan.cols <= v
    assert plan.rows * (plan.cols + d) <= budget or plan.rows == 1
    assert plan.split == (plan.cols < v)
    # one product per logit whenever enough rows of the whole vocabulary fit
    assert plan.split == (budget // (v + d) < min(n, H.SPLIT_BELOW_ROWS))
    if plan.split:
        assert plan.rows == min(n, H.SPLIT_ROWS) or plan.cols >= H.MIN_SPLIT_COLS


@pytest.mark.parametrize(("n", "v", "d", "rows"), [(2048, 32000, 256, 512),
                                                   (1024, 128256, 1024, 7), (10, 20, 3, 50)])
def test_row_chunk_alone_takes_the_whole_vocabulary(n, v, d, rows):
    """An explicit row block (torch's ``batch_chunk_size``) is that many rows of the whole
    vocabulary, whatever the default budget would split; a column block still splits."""
    assert H.plan_chunks(n, v, d, chunk_rows=rows) == H.Plan(min(n, rows), v, False)
    assert H.plan_chunks(n, v, d, chunk_rows=rows, chunk_classes=v // 2 or 1).split == (v > 1)


# ----------------------------------------------------------------------------- memory
MEM_N, MEM_D, MEM_V = 1024, 32, 6000


@pytest.mark.parametrize("chunk_classes", [None, MEM_V], ids=["auto-split", "whole-vocab"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_extra_memory_under_five_percent_of_logits(probs, chunk_classes):
    """Peak traced allocation minus the returned arrays <= 5% of the N x V float32 logits
    (at this shape the plan splits the vocabulary; forcing whole-vocabulary blocks too)."""
    r = rng(7)
    x = r.standard_normal((MEM_N, MEM_D), dtype=np.float32)
    w2 = r.standard_normal((MEM_V, MEM_D), dtype=np.float32) * 0.1
    bias = r.standard_normal(MEM_V, dtype=np.float32)
    if probs:
        target = r.random((MEM_N, MEM_V), dtype=np.float32)
        target /= target.sum(1, keepdims=True)
    else:
        target = r.integers(0, MEM_V, MEM_N)

    def call():
        return linear_cross_entropy(x, w2, bias, target, None, ignore_index=IGNORE,
                                    label_smoothing=0.1, reduction="none", z_loss=1e-3,
                                    softcap=0.0, want_grad=True,
                                    grad_output=np.ones(MEM_N, np.float32), want_lse=True,
                                    chunk_classes=chunk_classes)

    call()  # compile outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss, lse, grads = call()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    returned = loss.nbytes + lse.nbytes + sum(g.nbytes for g in grads)
    limit = 0.05 * MEM_N * MEM_V * 4
    extra = peak - returned
    assert extra <= limit, f"extra {extra / 2**20:.2f} MiB > {limit / 2**20:.2f} MiB"
    assert peak >= returned  # the measurement sees NumPy's allocations


# ----------------------------------------------------------------------------- CUDA (no device)
@pytest.mark.parametrize("ctype", ["float", "double"])
def test_cuda_source_compiles(ctype):
    """NVRTC compiles every instantiation the CUDA host side asks for (no GPU needed)."""
    pytest.importorskip("cupy")
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    try:
        nvrtc.getVersion()
    except Exception as exc:  # libnvrtc not installed
        pytest.skip(f"NVRTC is not available: {exc}")
    from nblosses.backends.cuda import linear_ce as cu

    names = cu.instantiations(ctype)
    prog = nvrtc.createProgram(cu.source(), cu.SOURCE, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90", "--std=c++17",
                                        "-ftz=true"])
        except Exception as exc:
            raise AssertionError(nvrtc.getProgramLog(prog)) from exc
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)
    assert all(lowered.values())
