"""``linear_token_logprobs``: the LM-head form of ``token_logprobs``, against float64 torch.

References, in float64 from the very values tested: ``F.linear`` (with autograd on the input,
the weight and the bias), ``log_softmax(cap(z) / T)``, ``gather`` at the targets, the entropy,
then ``torch.autograd.grad`` of both with their upstream gradients. Small shapes, with chunk
sizes that divide neither N nor V (several row blocks; rows and vocabulary in blocks: the
logits recomputed for the gradient), ignored rows, soft cap on and off, bias on and off.

Also here: bad inputs, the bounds ``logp <= 0`` and ``0 <= H <= log V``, and
``nblosses.torch.linear_token_logprobs`` (gradcheck, parity of its gradients).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import rng

import nblosses.torch as nbt
from nblosses import functional as F
from nblosses.backends.cpu.linear_token_logprobs import linear_token_logprobs as kernel

N, D, V = 23, 7, 37
IGNORE = -100
#: (chunk_rows, chunk_classes): automatic; several row blocks; rows and vocabulary in blocks.
CHUNKS = [(None, None), (6, None), (5, 8)]


def _data(seed: int = 0, dtype=np.float64, bias: bool = True):
    r = rng(seed)
    x = (r.standard_normal((N, D)) * 1.5).astype(dtype)
    w = r.standard_normal((V, D)).astype(dtype)
    b = r.standard_normal(V).astype(dtype) if bias else None
    t = r.integers(0, V, N)
    t[[2, 9, 17]] = IGNORE
    go, ge = r.standard_normal(N), r.standard_normal(N)
    return x, w, b, t, go, ge


def _reference(x, w, b, t, go, ge, temperature, softcap):
    """``(logp, entropy, (grad_x, grad_w, grad_b))`` in float64 by torch autograd."""
    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    W = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    B = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
    z = torch.nn.functional.linear(X, W, B)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, dim=1)
    tt = torch.tensor(t)
    keep = tt != IGNORE
    logp = torch.where(keep, lp.gather(1, tt.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(lp.exp() * lp).sum(1), 0.0)
    leaves = (X, W) if B is None else (X, W, B)
    grads = torch.autograd.grad((logp, ent), leaves, (torch.tensor(go), torch.tensor(ge)))
    grads = [g.numpy() for g in grads] + ([None] if B is None else [])
    return logp.detach().numpy(), ent.detach().numpy(), grads


def _check(got, want, tol):
    logp, ent, grads = got
    wl, we, wg = want
    np.testing.assert_allclose(logp, wl, rtol=tol, atol=tol)
    np.testing.assert_allclose(ent, we, rtol=tol, atol=tol)
    for g, w in zip(grads, wg):
        if w is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("chunks", CHUNKS, ids=["auto", "rows", "rows-vocab"])
@pytest.mark.parametrize("bias,temperature,softcap",
                         [(True, 0.7, 3.0), (False, 1.0, None)], ids=["bias-T-cap", "plain"])
def test_kernel_parity_with_chunks(chunks, bias, temperature, softcap):
    x, w, b, t, go, ge = _data(1, bias=bias)
    got = kernel(x, w, b, t, ignore_index=IGNORE, temperature=temperature,
                 softcap=softcap or 0.0, want_entropy=True, want_grad=True, grad_output=go,
                 grad_entropy=ge, chunk_rows=chunks[0], chunk_classes=chunks[1])
    _check(got, _reference(x, w, b, t, go, ge, temperature, softcap), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("chunks", CHUNKS + [(1, 1), (N, V), (4, 36)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.6, 2.5), (1.8, None)])
def test_kernel_parity_sweep(dtype, tol, chunks, bias, temperature, softcap):
    x, w, b, t, go, ge = _data(2, dtype, bias)
    got = kernel(x, w, b, t, ignore_index=IGNORE, temperature=temperature,
                 softcap=softcap or 0.0, want_entropy=True, want_grad=True,
                 grad_output=go.astype(dtype), grad_entropy=ge.astype(dtype),
                 chunk_rows=chunks[0], chunk_classes=chunks[1])
    _check(got, _reference(x, w, b, t, go, ge, temperature, softcap), tol)


def test_functional_parity_and_result_order():
    x, w, b, t, go, ge = _data(3)
    want = _reference(x, w, b, t, go, ge, 0.7, 3.0)
    logp, ent, grads = F.linear_token_logprobs(
        x, w, t, linear_bias=b, temperature=0.7, softcap=3.0, return_entropy=True,
        return_grad=True, grad_output=go, grad_entropy=ge)
    _check((logp, ent, grads), want, 1e-10)
    only = F.linear_token_logprobs(x, w, t, linear_bias=b, temperature=0.7, softcap=3.0)
    np.testing.assert_allclose(only, want[0], atol=1e-12)
    # Equal to token_logprobs of the materialised logits.
    np.testing.assert_allclose(only, F.token_logprobs(x @ w.T + b, t, temperature=0.7,
                                                      softcap=3.0), atol=1e-12)
    # Default upstream gradients: ones for logp, zeros for the entropy.
    _, g1 = F.linear_token_logprobs(x, w, t, return_grad=True)
    ref = _reference(x, w, None, t, np.ones(N), np.zeros(N), 1.0, None)
    for a, r in zip(g1[:2], ref[2][:2]):
        np.testing.assert_allclose(a, r, atol=1e-10)
    assert g1[2] is None


def test_one_row_and_scalar_upstream():
    x, w, b, t, _, _ = _data(4)
    logp, ent, (gx, gw, gb) = F.linear_token_logprobs(
        x[0], w, np.array(t[0]), linear_bias=b, return_entropy=True, return_grad=True,
        grad_output=2.0, grad_entropy=-0.5)
    assert logp.shape == ent.shape == () and gx.shape == (D,) and gw.shape == (V, D)
    want = _reference(x[:1], w, b, t[:1], np.array([2.0]), np.array([-0.5]), 1.0, None)
    np.testing.assert_allclose(logp, want[0][0], atol=1e-12)
    np.testing.assert_allclose(gx, want[2][0][0], atol=1e-10)
    np.testing.assert_allclose(gw, want[2][1], atol=1e-10)
    np.testing.assert_allclose(gb, want[2][2], atol=1e-10)


def test_bounds_and_float32_results():
    r = rng(5)
    x = (r.standard_normal((40, 6)) * 4).astype(np.float32)
    w = r.standard_normal((300, 6)).astype(np.float32)
    t = r.integers(0, 300, 40)
    logp, ent = F.linear_token_logprobs(x, w, t, temperature=0.3, return_entropy=True)
    assert logp.dtype == ent.dtype == np.float32
    assert (logp <= 0).all() and (ent >= 0).all() and (ent <= math.log(300) + 1e-6).all()
    # A flat distribution: H = log V exactly (up to rounding), logp = -log V.
    lz, hz = F.linear_token_logprobs(np.zeros((2, 3)), np.ones((11, 3)), np.array([0, 10]),
                                     return_entropy=True)
    np.testing.assert_allclose(lz, -math.log(11)), np.testing.assert_allclose(hz, math.log(11))


def test_bad_inputs():
    x, w, b, t, go, _ = _data(6)
    with pytest.raises(IndexError):
        F.linear_token_logprobs(x, w, np.where(t == IGNORE, V, t))
    with pytest.raises(IndexError):
        F.linear_token_logprobs(x, w, np.full(N, -1))
    for temperature in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            F.linear_token_logprobs(x, w, t, temperature=temperature)
    with pytest.raises(ValueError, match="grad_output"):
        F.linear_token_logprobs(x, w, t, return_grad=True, grad_output=go[:-1])
    with pytest.raises(ValueError, match="grad_entropy"):
        F.linear_token_logprobs(x, w, t, return_grad=True, grad_entropy=np.ones((N, 2)))
    with pytest.raises(ValueError, match="linear_weight"):
        F.linear_token_logprobs(x, w[:, :-1], t)
    with pytest.raises(ValueError, match="linear_weight"):
        F.linear_token_logprobs(x, w[None], t)
    with pytest.raises(ValueError, match="linear_bias"):
        F.linear_token_logprobs(x, w, t, linear_bias=b[:-1])
    with pytest.raises(ValueError):
        F.linear_token_logprobs(x, w, t[:-1])
    with pytest.raises(TypeError):
        F.linear_token_logprobs(x, w, t.astype(np.float64))
    with pytest.raises(TypeError):
        F.linear_token_logprobs(x.astype(np.int64), w, t)


def test_torch_gradcheck_and_parity():
    x, w, b, t, go, ge = _data(7)
    X, W, B = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tt = torch.tensor(t)
    assert torch.autograd.gradcheck(
        lambda X, W, B: nbt.linear_token_logprobs(X, W, tt[:6], linear_bias=B,
                                                  temperature=0.7, softcap=3.0,
                                                  return_entropy=True),
        (X[:6].detach().requires_grad_(), W, B))
    logp, ent = nbt.linear_token_logprobs(X, W, tt, linear_bias=B, temperature=0.7,
                                          softcap=3.0, return_entropy=True)
    torch.autograd.backward((logp, ent), (torch.tensor(go), torch.tensor(ge)))
    want = _reference(x, w, b, t, go, ge, 0.7, 3.0)
    np.testing.assert_allclose(logp.detach().numpy(), want[0], atol=1e-10)
    for leaf, g in zip((X, W, B), want[2]):
        np.testing.assert_allclose(leaf.grad.numpy(), g, atol=1e-10)
    # Only the entropy reaches the loss; no gradient wanted for the weight.
    X2 = torch.tensor(x, requires_grad=True)
    _, e2 = nbt.linear_token_logprobs(X2, torch.tensor(w), tt, return_entropy=True)
    e2.sum().backward()
    ref = _reference(x, w, None, t, np.zeros(N), np.ones(N), 1.0, None)
    np.testing.assert_allclose(X2.grad.numpy(), ref[2][0], atol=1e-10)
