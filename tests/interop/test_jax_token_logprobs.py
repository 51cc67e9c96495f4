"""nblosses.jax.token_logprobs: values and gradients of both outputs under jit, against the
NumPy call with both upstream gradients and against JAX's own composite; ignored positions;
3-d input; vmap; temperature and soft cap; one FFI call per pass; bad input."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from nblosses import functional as F

jax = pytest.importorskip("jax")
jnp = jax.numpy
nbj = pytest.importorskip("nblosses.jax")

RTOL, ATOL = 2e-5, 2e-6


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    t = rng.integers(0, shape[1] if len(shape) > 1 else shape[0],
                     (shape[0], *shape[2:]) if len(shape) > 1 else ())
    if t.ndim:
        t.reshape(-1)[1] = -100  # one ignored position
    a = rng.random(t.shape).astype(np.float32) + 0.5
    b = (rng.random(t.shape) - 0.5).astype(np.float32)
    return x, t, a, b


def _composite(x, t, temperature=1.0, softcap=None, ignore_index=-100):
    """``(logp, entropy)`` with jax.numpy (class axis 1, or 0 for a ``(C,)`` input)."""
    axis = 1 if x.ndim > 1 else 0
    y = softcap * jnp.tanh(x / softcap) if softcap else x
    lp = jax.nn.log_softmax(y / temperature, axis=axis)
    keep = t != ignore_index
    picked = jnp.take_along_axis(lp, jnp.expand_dims(jnp.where(keep, t, 0), axis),
                                 axis=axis).squeeze(axis)
    ent = -(jnp.exp(lp) * lp).sum(axis)
    return jnp.where(keep, picked, 0.0), jnp.where(keep, ent, 0.0)


def _objective(fn, t, a, b, **kw):
    """``sum(a * logp + b * entropy)`` and the statistics, for value_and_grad(has_aux)."""

    def f(x):
        logp, ent = fn(x, t, **kw)
        return (a * logp + b * ent).sum(), (logp, ent)

    return f


def _ours(x, t, **kw):
    return nbj.token_logprobs(x, t, return_entropy=True, **kw)


# The (N, C, d) layout is its own pair of Numba kernels (~8 s to compile cold): slow tier.
CASES = [pytest.param((7, 11), {}, id="2d"),
         pytest.param((7, 11), {"temperature": 0.7}, id="2d-temperature"),
         pytest.param((7, 11), {"temperature": 1.5, "softcap": 3.0}, id="2d-temperature-softcap"),
         pytest.param((3, 6, 4), {"temperature": 0.8}, id="3d-temperature",
                      marks=pytest.mark.slow),
         pytest.param((9,), {"softcap": 2.0}, id="1d-softcap")]


@pytest.mark.parametrize("shape, kw", CASES)
def test_values_and_gradients_under_jit(shape, kw):
    x, t, a, b = _data(shape)
    step = jax.jit(jax.value_and_grad(_objective(_ours, t, a, b, **kw), has_aux=True))
    (_, (logp, ent)), grad = step(jnp.asarray(x))
    assert logp.shape == ent.shape == t.shape and logp.dtype == ent.dtype == jnp.float32
    assert grad.shape == x.shape and grad.dtype == jnp.float32

    # The NumPy call with both upstream gradients.
    want_logp, want_ent, want_grad = F.token_logprobs(
        x, t, return_entropy=True, return_grad=True, grad_output=a, grad_entropy=b, **kw)
    np.testing.assert_allclose(logp, want_logp, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ent, want_ent, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=ATOL)

    # JAX's own composite.
    (_, (c_logp, c_ent)), c_grad = jax.jit(jax.value_and_grad(
        _objective(_composite, t, a, b, **kw), has_aux=True))(jnp.asarray(x))
    np.testing.assert_allclose(logp, c_logp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ent, c_ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad, c_grad, rtol=1e-4, atol=1e-5)

    if t.ndim:  # the ignored position: 0, and no gradient
        ignored = (0, slice(None), 1) if x.ndim > 2 else (1, slice(None))
        assert logp.reshape(-1)[1] == 0 and ent.reshape(-1)[1] == 0
        assert not np.asarray(grad[ignored]).any()


def test_logp_only_backward_passes_no_entropy_cotangent(monkeypatch):
    """Without return_entropy: one statistics call forward, one fused call backward with
    grad_output only (the kernel's zeros for the entropy), the gradient into XLA's buffer."""
    x, t, a, _ = _data((5, 8), seed=3)
    calls = []
    real = F.token_logprobs

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(F, "token_logprobs", spy)
    objective = jax.jit(jax.value_and_grad(lambda x: (a * nbj.token_logprobs(x, t)).sum()))
    _, grad = objective(jnp.asarray(x))
    forward, backward = calls
    assert not forward["return_entropy"] and "return_grad" not in forward
    assert backward["return_grad"] and backward["grad_entropy"] is None
    assert backward["grad_buffer"].shape == x.shape
    calls.clear()  # grad alone: XLA drops the unused forward call
    jax.block_until_ready(jax.jit(jax.grad(lambda x: (a * nbj.token_logprobs(x, t)).sum()))(x))
    assert [kw["return_grad"] for kw in calls] == [True]
    monkeypatch.undo()
    _, want = F.token_logprobs(x, t, return_grad=True, grad_output=a)
    np.testing.assert_allclose(grad, want, rtol=RTOL, atol=ATOL)


def test_entropy_only_objective():
    """Only the entropy reaches the loss: logp's cotangent is JAX's zeros."""
    x, t, _, b = _data((6, 5), seed=4)
    grad = jax.jit(jax.grad(lambda x: (b * _ours(x, t)[1]).sum()))(jnp.asarray(x))
    _, want = F.token_logprobs(x, t, return_grad=True, grad_output=0.0, grad_entropy=b)
    np.testing.assert_allclose(grad, want, rtol=RTOL, atol=ATOL)


def test_vmap_over_a_leading_batch_axis():
    """A batch of two (4, 6) logits with their own targets and upstream gradients."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 4, 6)) * 2).astype(np.float32)
    t = rng.integers(0, 6, (2, 4)).astype(np.int32)
    t[1, 2] = -100
    a = rng.random((2, 4)).astype(np.float32) + 0.5
    b = (rng.random((2, 4)) - 0.5).astype(np.float32)

    def per_example(x, t, a, b):
        logp, ent = _ours(x, t, temperature=0.9)
        return (a * logp + b * ent).sum(), (logp, ent)

    step = jax.jit(jax.vmap(jax.value_and_grad(per_example, has_aux=True)))
    (_, (logp, ent)), grad = step(jnp.asarray(x), jnp.asarray(t), a, b)
    for i in range(2):
        wl, we, wg = F.token_logprobs(x[i], t[i], temperature=0.9, return_entropy=True,
                                      return_grad=True, grad_output=a[i], grad_entropy=b[i])
        np.testing.assert_allclose(logp[i], wl, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ent[i], we, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(grad[i], wg, rtol=RTOL, atol=ATOL)
    assert not np.asarray(grad[1, 2]).any()


@pytest.mark.slow  # the bfloat16 path compiles its own kernels (~2 s cold)
def test_half_precision_gives_float32_statistics():
    x, t, a, b = _data((4, 7), seed=6)
    xh = jnp.asarray(x).astype(jnp.bfloat16)
    (_, (logp, ent)), grad = jax.value_and_grad(_objective(_ours, t, a, b), has_aux=True)(xh)
    assert logp.dtype == ent.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    want_logp, want_ent, want_grad = F.token_logprobs(
        np.asarray(xh, np.float32), t, return_entropy=True, return_grad=True, grad_output=a,
        grad_entropy=b)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=1e-2, atol=1e-2)


def test_bad_input_raises():
    x = jnp.zeros((3, 4))
    t = jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match="temperature"):
        nbj.token_logprobs(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        nbj.token_logprobs(x, t, softcap=-1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        nbj.token_logprobs(x, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda x, T: nbj.token_logprobs(x, t, temperature=T))(x, 1.0)
    with pytest.raises(ValueError, match="shape"):
        nbj.token_logprobs(x, jnp.array([0, 1]))
    with pytest.raises(TypeError, match="integer target"):
        nbj.token_logprobs(x, t.astype(jnp.float32))
    with pytest.raises(TypeError, match="floating-point"):
        nbj.token_logprobs(t, t)
    with pytest.raises(ValueError, match="dimensions"):
        nbj.token_logprobs(jnp.zeros(()), jnp.array(0))
    with pytest.raises(jax.errors.JaxRuntimeError, match="IndexError"):
        jax.block_until_ready(nbj.token_logprobs(x, jnp.array([0, 4, 1])))


def test_docstring_example():
    from nblosses.jax import _token_logprobs

    result = doctest.testmod(_token_logprobs, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0
