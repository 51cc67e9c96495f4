"""``linear_distillation_loss``: the LM-head form of ``distillation_loss``, against float64 torch
composites.

References, in float64 from the very values tested: each head's logits by ``F.linear`` (the
student's with autograd), then ``distillation_loss``'s torch composite
(:func:`nblosses.ops.distillation._ref_distillation`: two ``log_softmax``, ``kl_div`` / the
JSD's mixture, the hard ``cross_entropy``), ``backward`` with the upstream gradient: the loss
and the student's three gradients (input, weight, bias). Small shapes, with chunk sizes that
divide neither N nor V (several row blocks, and the vocabulary in blocks: the logits recomputed
per pass), student and teacher of different feature sizes.

Also here: the block kernels against ``distillation_loss``'s own CPU kernel on materialised
logits; bad inputs; the nn module; ``nblosses.torch`` (gradcheck, opcheck,
``torch.compile(fullgraph=True)``); extra peak memory; the Dask plan's use of the block
kernels; and the packed (AVX2 / AVX-512) loops of the CPU kernels.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, rng, run_asm_probes, tt

import nblosses.torch as nbt
from nblosses import functional as F
from nblosses import nn
from nblosses.backends import _linear_distillation as LD
from nblosses.backends._lm_head import plan_chunks
from nblosses.backends.cpu import linear_distillation as K
from nblosses.backends.cpu.distillation import distillation
from nblosses.ops.distillation import _ref_distillation

N, D, DT, V = 23, 7, 5, 37
IGNORE = -100
#: (chunk_rows, chunk_classes): automatic (the whole vocabulary per block at this size);
#: several row blocks; rows and vocabulary in blocks.
CHUNKS = [(None, None), (6, None), (5, 8)]
#: name -> options (beta, temperature, hard_weight, softcap, student bias, teacher bias)
OPTIONS = {
    "forward": (0.0, 1.0, 0.0, None, False, False),
    "forward-hard-biases": (0.0, 1.0, 0.4, None, True, True),
    "reverse-T2-hard": (1.0, 2.0, 0.3, None, False, True),
    "jsd-softcap": (0.4, 1.0, 0.0, 3.0, True, False),
    "jsd-T0.7-hard-softcap": (0.7, 0.7, 0.5, 4.0, True, True),
}


#: The options of the fast tests that are not about options (the JSD, its own hard softmax,
#: the soft cap): the kernels compile per option set, and jsd-T0.7-hard-softcap's parity case
#: compiles these.
SHARED_OPTIONS = dict(beta=0.5, temperature=0.7, hard_weight=0.2, softcap=4.0)


def _data(dtype, seed: int = 0, *, bias_s: bool = True, bias_t: bool = True):
    r = rng(seed)
    x = r.standard_normal((N, D)).astype(dtype)
    w = (r.standard_normal((V, D)) * 0.8).astype(dtype)
    tx = r.standard_normal((N, DT)).astype(dtype)
    tw = (r.standard_normal((V, DT)) * 1.1).astype(dtype)
    b = r.standard_normal(V).astype(dtype) if bias_s else None
    tb = r.standard_normal(V).astype(dtype) if bias_t else None
    t = r.integers(0, V, N)
    t[::5] = IGNORE
    return x, w, b, tx, tw, tb, t


def torch_reference(x, w, b, tx, tw, tb, t, *, reduction, grad_output, dtype, **options):
    """``(loss, grad_input, grad_weight, grad_bias)`` by torch, float64."""
    xt, wt, bt = (tt(a, dtype, requires_grad=True) for a in (x, w, b))
    s = TF.linear(xt, wt, bt)
    with torch.no_grad():
        teacher = TF.linear(tt(tx, dtype), tt(tw, dtype), tt(tb, dtype))
    target = None if t is None else tt(t)
    loss = _ref_distillation(torch, s, teacher, target, reduction=reduction, **options)
    g = torch.as_tensor(np.asarray(grad_output), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(g)
    return (loss.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


def _kernel(x, w, b, tx, tw, tb, t, *, reduction, grad_output, chunks=(None, None),
            want_grad=True, beta=0.0, temperature=1.0, hard_weight=0.0, softcap=None,
            ignore_index=IGNORE):
    """The CPU kernel (canonical arguments), blocks of ``chunks``."""
    return K.linear_distillation_loss(
        x, w, b, tx, tw, tb, t, beta=beta, temperature=temperature, ignore_index=ignore_index,
        hard_weight=hard_weight, softcap=softcap or 0.0, reduction=reduction,
        want_grad=want_grad, grad_output=grad_output if want_grad else None,
        chunk_rows=chunks[0], chunk_classes=chunks[1])


def _options(name: str) -> dict:
    beta, temperature, hard, cap, _, _ = OPTIONS[name]
    return dict(beta=beta, temperature=temperature, hard_weight=hard, softcap=cap)


def _upstream(reduction: str, dtype, seed: int = 1):
    return rng(seed).standard_normal(N).astype(dtype) if reduction == "none" else 0.75


def _check(ours, ref, dtype) -> None:
    loss, grads = ours
    assert_close(loss, ref[0], dtype, "loss")
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref[1:]):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, dtype, name, kind="grad")


# ----------------------------------------------------------------------------- parity
DTYPES, REDUCTIONS = ("float64", "float32"), ("mean", "sum", "none")


#: The parity cases of the fast tier: each option set once, every dtype, reduction and
#: chunking among them; the dtypes chosen so that the kernels they compile (per dtype, option
#: set and bias / target presence) are mostly those the other fast tests compile too.
FAST_PARITY = {("float64", "mean", "forward", CHUNKS[1]),
               ("float64", "none", "forward-hard-biases", CHUNKS[2]),
               ("float64", "sum", "reverse-T2-hard", CHUNKS[0]),
               ("float32", "none", "jsd-softcap", CHUNKS[1]),
               ("float64", "mean", "jsd-T0.7-hard-softcap", CHUNKS[2])}


def _parity_cases() -> list:
    """dtype x reduction x option set x chunks: :data:`FAST_PARITY` in the fast tier, the
    rest in the slow tier (each new option set and dtype compiles its own kernels: ~1.5-4 s
    each with a cold cache)."""
    cases = []
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            for opts in OPTIONS:
                for chunks in CHUNKS:
                    fast = (dtype, reduction, opts, chunks) in FAST_PARITY
                    cases.append(pytest.param(
                        dtype, reduction, opts, chunks,
                        id=f"{dtype}-{reduction}-{opts}-chunks{chunks[0]}x{chunks[1]}",
                        marks=() if fast else pytest.mark.slow))
    return cases


@pytest.mark.parametrize(("dtype", "reduction", "opts", "chunks"), _parity_cases())
def test_parity_with_torch(dtype, reduction, opts, chunks):
    *_, use_b, use_tb = OPTIONS[opts]
    x, w, b, tx, tw, tb, t = _data(dtype, bias_s=use_b, bias_t=use_tb)
    go = _upstream(reduction, dtype)
    ours = _kernel(x, w, b, tx, tw, tb, t, reduction=reduction, grad_output=go, chunks=chunks,
                   **_options(opts))
    ref = torch_reference(x, w, b, tx, tw, tb, t, reduction=reduction, grad_output=go,
                          dtype=dtype, **_options(opts))
    _check(ours, ref, dtype)
    assert ours[0].dtype == np.dtype(dtype)
    assert ours[0].shape == (() if reduction != "none" else (N,))


@pytest.mark.parametrize("beta", [pytest.param(0.0, marks=pytest.mark.slow),
                                  pytest.param(1.0, marks=pytest.mark.slow), 0.5])
def test_without_target_every_row_counts(beta):
    x, w, b, tx, tw, tb, _ = _data("float64", seed=2)
    ours = _kernel(x, w, b, tx, tw, tb, None, reduction="mean", grad_output=1.0, chunks=(4, 9),
                   beta=beta, temperature=1.5, softcap=5.0)
    ref = torch_reference(x, w, b, tx, tw, tb, None, reduction="mean", grad_output=1.0,
                          dtype="float64", beta=beta, temperature=1.5, softcap=5.0)
    _check(ours, ref, "float64")


@pytest.mark.parametrize("ignore_index", [3, -1])
def test_other_ignore_index(ignore_index):
    x, w, b, tx, tw, tb, t = _data("float64", seed=3)
    t[t == IGNORE] = ignore_index
    t[1::7] = 3
    ours = _kernel(x, w, b, tx, tw, tb, t, reduction="mean", grad_output=1.0, chunks=(6, 9),
                   hard_weight=0.3, ignore_index=ignore_index)
    ref = torch_reference(x, w, b, tx, tw, tb, t, reduction="mean", grad_output=1.0,
                          dtype="float64", hard_weight=0.3, ignore_index=ignore_index)
    _check(ours, ref, "float64")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    """No kept row: ``mean`` is NaN (0/0), the loss otherwise 0, every gradient zero."""
    x, w, b, tx, tw, tb, _ = _data("float64", seed=4)
    t = np.full(N, IGNORE)
    loss, grads = _kernel(x, w, b, tx, tw, tb, t, reduction=reduction,
                          grad_output=_upstream(reduction, "float64"), chunks=(5, 8),
                          **SHARED_OPTIONS)
    assert np.isnan(loss) if reduction == "mean" else not np.any(loss)
    assert not any(np.any(g) for g in grads)


@pytest.mark.parametrize("chunks", [(None, None), (5, 8)])
def test_without_gradient(chunks):
    x, w, b, tx, tw, tb, t = _data("float32", bias_t=False)  # jsd-softcap's float32 kernels
    kw = dict(reduction="sum", chunks=chunks, beta=0.3, hard_weight=0.2, softcap=4.0)
    loss, grads = _kernel(x, w, b, tx, tw, tb, t, grad_output=None, want_grad=False, **kw)
    full = _kernel(x, w, b, tx, tw, tb, t, grad_output=1.0, **kw)
    assert grads is None
    np.testing.assert_allclose(loss, full[0], rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    """N = 0: ``mean`` is NaN (0/0), ``sum`` 0; gradients of the right shapes, zeros."""
    go = np.zeros(0) if reduction == "none" else 1.0
    loss, (gx, gw, gb) = _kernel(np.zeros((0, D)), np.ones((V, D)), np.ones(V),
                                 np.zeros((0, DT)), np.ones((V, DT)), None,
                                 np.zeros(0, np.int64), reduction=reduction, grad_output=go)
    assert np.isnan(loss) if reduction == "mean" else not np.any(loss)
    assert gx.shape == (0, D) and gw.shape == (V, D) and gb.shape == (V,)
    assert not (np.any(gw) or np.any(gb))


@pytest.mark.parametrize(("beta", "temperature", "hard", "cap"), [
    (0.0, 1.0, 0.0, 0.0),
    pytest.param(1.0, 0.7, 0.3, 3.0, marks=pytest.mark.slow),
    pytest.param(0.4, 1.0, 0.3, 0.0, marks=pytest.mark.slow),
    pytest.param(0.4, 2.0, 0.0, 3.0, marks=pytest.mark.slow)])
def test_block_kernels_match_distillation_kernel(beta, temperature, hard, cap):
    """The block kernels, chained by hand over vocabulary blocks (statistics merged, the
    JSD's sums, the per-row finish, the block gradient), give ``distillation_loss``'s CPU
    kernel's per-row losses and logits gradient, on materialised logits, for every
    divergence, temperature, hard loss and soft cap (both kernels compile per option set:
    the fast tier keeps the forward KL, whose block kernels its parity case compiles)."""
    r = rng(5)
    s, tl = r.standard_normal((6, 23)) * 2, r.standard_normal((6, 23)) * 2
    tgt = r.integers(0, 23, 6)
    tgt[2] = IGNORE
    go = r.standard_normal(6)
    opts = LD.DistillOptions(beta, temperature, hard, cap, IGNORE)
    for cols in (23, 5):
        blocks = [(c0, slice(c0, c0 + cols)) for c0 in range(0, 23, cols)]
        acc = LD.new_stats(np, 6)
        for c0, sl in blocks:
            LD.merge(np, acc, K.block_stats(s[:, sl].copy(), tl[:, sl].copy(), None, None,
                                            tgt, opts, c0=c0, n_classes=23), opts)
        sums = None
        if opts.mode == LD.JSD:
            lse, sums = np.stack(LD.log_sums(np, acc, opts), 1), np.zeros((6, 2))
            for _, sl in blocks:
                K.block_jsd(s[:, sl].copy(), tl[:, sl].copy(), None, None, lse, sums, opts,
                            raw=True)
        loss, coefs = LD.finish(np, acc, sums, tgt, 23, opts, go, True)
        grad = np.empty_like(s)
        for c0, sl in blocks:
            z = s[:, sl].copy()
            K.block_grad(z, tl[:, sl].copy(), None, None, tgt, coefs, opts, c0=c0, raw=True)
            grad[:, sl] = z
        want_loss, want_grad = distillation(
            s[:, :, None], tl[:, :, None], tgt[:, None], beta=beta, temperature=temperature,
            ignore_index=IGNORE, hard_weight=hard, softcap=cap, reduction="none",
            want_grad=True, grad_output=go[:, None], grad_buffer=None)
        np.testing.assert_allclose(loss, want_loss[:, 0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(grad, want_grad[:, :, 0], rtol=1e-11, atol=1e-14)


def test_plan_keeps_both_blocks_within_the_budget():
    """At the issue's shape (N=2048, d=256, V=32000) the two logits blocks and the transposed
    input gradient fit 5% of one N x V float32 logits array, and the plan splits the
    vocabulary (few rows of it would fit: every row block would stream both weights)."""
    plan = plan_chunks(2048, 32000, 256, heads=2)
    assert (2 * plan.rows * plan.cols + plan.rows * 256) * 4 <= 0.05 * 2048 * 32000 * 4
    assert plan.split and plan.rows == 1024


# ----------------------------------------------------------------------------- public API
def test_leading_dimensions_and_module():
    """``(B, T, d)`` features give ``(B, T)`` losses and a gradient of their shape; the module
    holds the student's head and stores its gradients."""
    x, w, b, tx, tw, tb, t = _data("float64", seed=6)
    x3, tx3, t2 = x[:20].reshape(4, 5, D), tx[:20].reshape(4, 5, DT), t[:20].reshape(4, 5)
    loss, (gx, gw, gb) = F.linear_distillation_loss(
        x3, w, tx3, tw, t2, linear_bias=b, teacher_bias=tb, hard_weight=0.2,
        reduction="none", return_grad=True)
    flat, (gx2, gw2, _) = F.linear_distillation_loss(
        x[:20], w, tx[:20], tw, t[:20], linear_bias=b, teacher_bias=tb, hard_weight=0.2,
        reduction="none", return_grad=True)
    assert loss.shape == (4, 5) and gx.shape == (4, 5, D) and gb.shape == (V,)
    np.testing.assert_allclose(loss.reshape(-1), flat, rtol=1e-13)
    np.testing.assert_allclose(gx.reshape(20, D), gx2, rtol=1e-13)
    np.testing.assert_allclose(gw, gw2, rtol=1e-13)
    head = nn.LinearDistillationLoss(D, V, bias=True, dtype=np.float64, hard_weight=0.2,
                                     reduction="sum")
    head.linear_weight[...], head.linear_bias[...] = w, b
    value = head(x, tx, tw, t, tb)
    grad = head.backward()
    want, (wgx, wgw, wgb) = F.linear_distillation_loss(
        x, w, tx, tw, t, linear_bias=b, teacher_bias=tb, hard_weight=0.2, reduction="sum",
        return_grad=True)
    np.testing.assert_allclose(value, want, rtol=1e-13)
    for a, e in ((grad, wgx), (head.linear_weight_grad, wgw), (head.linear_bias_grad, wgb)):
        np.testing.assert_allclose(a, e, rtol=1e-13)
    assert "hard_weight=0.2" in repr(head)


def test_batch_chunk_size_is_the_row_block():
    """``options.batch_chunk_size`` (torch's chunking options) sets the row blocks: the
    result is the same."""
    x, w, b, tx, tw, tb, t = _data("float64", seed=7)
    kw = dict(linear_bias=b, teacher_bias=tb, return_grad=True, **SHARED_OPTIONS)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)
    got = F.linear_distillation_loss(x, w, tx, tw, t, options=options, **kw)
    want = F.linear_distillation_loss(x, w, tx, tw, t, **kw)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
    for a, e in zip(got[1], want[1]):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)


def _bad_calls():
    x, w, b, tx, tw, tb, t = _data("float32", seed=8)
    f = F.linear_distillation_loss
    i32 = np.float64
    return {
        "teacher rows": (ValueError, "leading dimensions",
                         lambda: f(x, w, tx[:-1], tw)),
        "teacher vocabulary": (ValueError, "teacher's vocabulary",
                               lambda: f(x, w, tx, tw[:-1])),
        "teacher features": (ValueError, "teacher_input and teacher_weight",
                             lambda: f(x, w, tx, tw[:, :-1])),
        "student features": (ValueError, "input and linear_weight", lambda: f(x, w[:, 1:], tx, tw)),
        "teacher dtype": (TypeError, "teacher_input must have the input's dtype",
                          lambda: f(x, w, tx.astype(i32), tw.astype(i32))),
        "teacher weight dtype": (TypeError, "teacher_weight must have the input's dtype",
                                 lambda: f(x, w, tx, tw.astype(i32))),
        "weight dtype": (TypeError, "linear_weight must have",
                         lambda: f(x, w.astype(i32), tx, tw)),
        "integer input": (TypeError, "input must be a floating-point",
                          lambda: f(x.astype(np.int64), w, tx, tw)),
        "weight 3-d": (ValueError, "linear_weight of shape", lambda: f(x, w[None], tx, tw)),
        "bias shape": (ValueError, "linear_bias shape", lambda: f(x, w, tx, tw, linear_bias=b[1:])),
        "teacher bias shape": (ValueError, "teacher_bias shape",
                               lambda: f(x, w, tx, tw, teacher_bias=tb[:, None])),
        "target shape": (ValueError, "batch_size", lambda: f(x, w, tx, tw, t[1:])),
        "target dtype": (TypeError, "integer target", lambda: f(x, w, tx, tw, t * 1.0)),
        "target range": (IndexError, "out of bounds",
                         lambda: f(x, w, tx, tw, np.where(t == 0, V, t))),
        "beta": (ValueError, "beta must be in", lambda: f(x, w, tx, tw, beta=1.5)),
        "temperature": (ValueError, "temperature", lambda: f(x, w, tx, tw, temperature=0.0)),
        "hard_weight": (ValueError, "hard_weight must be in",
                        lambda: f(x, w, tx, tw, t, hard_weight=-0.1)),
        "hard without target": (ValueError, "needs a target",
                                lambda: f(x, w, tx, tw, hard_weight=0.5)),
        "softcap": (ValueError, "softcap", lambda: f(x, w, tx, tw, softcap=-1.0)),
        "reduction": (ValueError, "reduction", lambda: f(x, w, tx, tw, reduction="batchmean")),
        "grad_output shape": (ValueError, "grad_output",
                              lambda: f(x, w, tx, tw, reduction="none", return_grad=True,
                                        grad_output=np.ones(N + 1, np.float32))),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs(case):
    error, message, call = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- torch
def _torch_args(dtype=torch.float64, bias=True, seed=9):
    x, w, b, tx, tw, tb, t = _data("float64", seed=seed, bias_s=bias)
    leaf = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, w)]
    bt = None if b is None else torch.tensor(b, dtype=dtype, requires_grad=True)
    frozen = [torch.tensor(a, dtype=dtype) for a in (tx, tw, tb)]
    return leaf, bt, frozen, torch.from_numpy(t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_autograd_matches_composite(reduction):
    (x, w), b, (tx, tw, tb), t = _torch_args()
    kw = dict(beta=0.4, temperature=1.5, hard_weight=0.3, softcap=6.0, reduction=reduction)
    ours = nbt.linear_distillation_loss(x, w, tx, tw, t, linear_bias=b, teacher_bias=tb, **kw)
    g = torch.rand(ours.shape, dtype=torch.float64)
    got = torch.autograd.grad(ours, (x, w, b), g)
    want_loss = _ref_distillation(torch, TF.linear(x, w, b), TF.linear(tx, tw, tb), t, **kw)
    want = torch.autograd.grad(want_loss, (x, w, b), g)
    torch.testing.assert_close(ours, want_loss)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_torch_gradcheck():
    (x, w), b, (tx, tw, tb), t = _torch_args()
    for reduction in ("mean", "none"):
        torch.autograd.gradcheck(
            lambda x_, w_, b_, red=reduction: nbt.linear_distillation_loss(
                x_, w_, tx, tw, t, linear_bias=b_, teacher_bias=tb, reduction=red,
                **SHARED_OPTIONS), (x, w, b))


def test_torch_teacher_is_frozen():
    (x, w), _, (tx, tw, _), t = _torch_args(bias=False)
    with pytest.raises(NotImplementedError, match="teacher_input"):
        nbt.linear_distillation_loss(x, w, tx.requires_grad_(True), tw, t)
    loss = nbt.linear_distillation_loss(x.detach(), w, tx.detach(), tw, t)
    (gw,) = torch.autograd.grad(loss, (w,))
    assert gw.shape == w.shape


def test_torch_opcheck():
    (x, w), b, (tx, tw, _), t = _torch_args(dtype=torch.float32)
    for want_grad, reduction in ((True, "mean"), (False, "none")):
        args = (x, w, tx, tw, t, b, None, 0.5, 1.0, IGNORE, 0.1, 3.0, reduction, want_grad)
        torch.library.opcheck(torch.ops.nblosses.linear_distillation_loss.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))


def test_torch_compile_fullgraph():
    (x, w), b, (tx, tw, _), t = _torch_args(dtype=torch.float32)

    def step(x_, w_, b_):
        return nbt.linear_distillation_loss(x_, w_, tx, tw, t, linear_bias=b_, beta=0.2,
                                            softcap=3.0)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(step(x, w, b), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- memory
MEM_N, MEM_D, MEM_V = 1024, 32, 6000


@pytest.mark.slow  # peak-memory measurement of an LM head, as linear_cross_entropy's (~9 s)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("chunk_classes", [None, MEM_V], ids=["auto", "whole-vocab"])
def test_extra_memory_under_five_percent_of_logits(chunk_classes, beta):
    """Peak traced allocation minus the returned arrays <= 5% of one N x V float32 logits
    array (the planner's blocks, and whole-vocabulary blocks forced)."""
    r = rng(10)
    x, tx = (r.standard_normal((MEM_N, MEM_D), dtype=np.float32) for _ in range(2))
    w, tw = (r.standard_normal((MEM_V, MEM_D), dtype=np.float32) * 0.1 for _ in range(2))
    b = r.standard_normal(MEM_V, dtype=np.float32)
    t = r.integers(0, MEM_V, MEM_N)

    def call():
        return K.linear_distillation_loss(
            x, w, b, tx, tw, None, t, beta=beta, temperature=1.0, ignore_index=IGNORE,
            hard_weight=0.1, softcap=0.0, reduction="none", want_grad=True,
            grad_output=np.ones(MEM_N, np.float32),
            chunk_classes=chunk_classes)

    call()  # compile outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss, grads = call()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    returned = loss.nbytes + sum(g.nbytes for g in grads if g is not None)
    limit = 0.05 * MEM_N * MEM_V * 4
    assert peak - returned <= limit, f"extra {(peak - returned) / 2**20:.2f} MiB"
    assert peak >= returned  # the measurement sees NumPy's allocations


# ----------------------------------------------------------------------------- Dask
def test_dask_runs_the_block_kernels_only(monkeypatch):
    """The Dask plan reaches the backend through the block operations, never the whole head,
    and equals the eager call."""
    da = pytest.importorskip("dask.array")
    import nblosses

    x, w, b, tx, tw, tb, t = _data("float64", seed=11)
    kernel = nblosses.backends.cpu.KERNELS["linear_distillation_loss"]
    calls = []
    for name in ("block_stats", "block_jsd", "block_grad"):
        op = getattr(kernel, name)
        monkeypatch.setattr(kernel, name,
                            lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    lazy = F.linear_distillation_loss(
        da.from_array(x, (8, D)), da.from_array(w, (10, D)), da.from_array(tx, (8, DT)),
        da.from_array(tw, (15, DT)), t, linear_bias=b, teacher_bias=tb, return_grad=True,
        **SHARED_OPTIONS)
    got = [lazy[0].compute(), *(g.compute() for g in lazy[1][:3])]
    want = F.linear_distillation_loss(x, w, tx, tw, t, linear_bias=b, teacher_bias=tb,
                                      return_grad=True, **SHARED_OPTIONS)
    for a, e in zip(got, [want[0], *want[1]]):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-15)
    assert set(calls) == {"block_stats", "block_jsd", "block_grad"}


# ----------------------------------------------------------------------------- assembly
TESTS = Path(__file__).resolve().parents[1]
#: kernel -> the packed instruction kinds its loops must hold (see tests/kernels/
#: test_vectorise.py: a max-reduction, the exponentials' FMAs).
PACKED = {"_stats_rows": ("max", "fma"), "_jsd_rows": ("fma",), "_grad_rows": ("fma",)}


def _probe() -> dict:
    """Compile the kernels (this process's CPU settings) and count their instructions."""
    import numba
    from test_vectorise import _count

    from nblosses.backends.cpu.distillation import FORWARD, JSD, SEPARATE, SHARED

    out: dict = {}
    for dtype in ("float32", "float64"):
        z, v, t = np.ones((4, 64), dtype), np.ones(64, dtype), np.zeros(4, np.int64)
        lse = np.ones((4, 2))
        args = {"_stats_rows": (z, z.copy(), v, v.copy(), 5.0, 1.0, t, 0, FORWARD, SEPARATE,
                                np.ones((4, 7))),
                "_jsd_rows": (z, z.copy(), True, v, v.copy(), 5.0, 1.0, 0.5, lse, lse.copy()),
                "_grad_rows": (z, z.copy(), True, v, v.copy(), 5.0, 1.0, 0.5, t, 0, IGNORE,
                               np.ones((4, 11)), JSD, SHARED)}
        for name, a in args.items():
            fn = getattr(K, name).serial
            sig = tuple(numba.typeof(x) for x in a)
            fn.compile(sig)
            out.setdefault(name, {})[dtype] = _count(fn.inspect_asm(sig))
    return out


@pytest.mark.slow
def test_kernel_loops_are_packed(tmp_path):
    """Compiled for each CPU (a subprocess each: ``NUMBA_CPU_NAME``, a fresh cache), every
    kernel holds the packed forms of its loops' operations (its helpers inlined)."""
    for cpu, counts in run_asm_probes(__file__, tmp_path).items():
        for name, kinds in PACKED.items():
            for dtype, c in counts[name].items():
                assert all(c[k] > 0 for k in kinds), (cpu, name, dtype, c)
        # The probe targets the named CPU: no zmm register for Haswell, zmm for Zen 4 (LLVM
        # keeps some loops at 256 bits on Skylake-AVX512, whose tuning prefers them: as
        # tests/api/test_token_logprobs.py's probe).
        zmm = sum(c["zmm"] for per in counts.values() for c in per.values())
        assert {"haswell": zmm == 0, "znver4": zmm > 0}.get(cpu, True), (cpu, zmm)


if __name__ == "__main__":  # the probe's subprocess
    print(json.dumps(_probe()))
