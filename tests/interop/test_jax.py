"""nblosses.jax: cross_entropy, softmax and log_softmax under jax.jit and jax.grad, against
JAX's own composites (values and gradients, float32)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
nbj = pytest.importorskip("nblosses.jax")

RTOL, ATOL = 2e-5, 1e-6


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _t(shape, classes, seed=1):
    t = np.random.default_rng(seed).integers(0, classes, shape)
    t.reshape(-1)[0] = -100  # one ignored position
    return jnp.asarray(t)


def _reference(x, t, weight, reduction, smoothing):
    """torch's cross-entropy on class indices, written with jax.numpy (class axis 1)."""
    c = x.shape[1]
    w = jnp.ones(c, x.dtype) if weight is None else weight
    valid = t != -100
    safe = jnp.where(valid, t, 0)
    lp = jax.nn.log_softmax(x, axis=1)
    picked = jnp.take_along_axis(lp, jnp.expand_dims(safe, 1), axis=1).squeeze(1)
    wt = jnp.where(valid, w[safe], 0.0)
    wshape = (1, c) + (1,) * (x.ndim - 2)
    smooth = -(lp * w.reshape(wshape)).sum(1) * valid
    loss = (1 - smoothing) * -wt * picked + smoothing / c * smooth
    if reduction == "none":
        return loss
    return loss.sum() / (wt.sum() if reduction == "mean" else 1.0)


def _upstream(shape):
    return jnp.asarray(np.random.default_rng(7).random(shape).astype(np.float32) + 0.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted, smoothing", [(False, 0.0), (True, 0.2)])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2)])
def test_cross_entropy_value_and_grad_under_jit(shape, reduction, weighted, smoothing):
    x = _x(shape)
    t = _t((shape[0], *shape[2:]), shape[1])
    weight = jnp.linspace(0.5, 1.5, shape[1], dtype=jnp.float32) if weighted else None
    v = _upstream(() if reduction != "none" else t.shape)

    def ours(x):
        return (nbj.cross_entropy(x, t, weight, reduction=reduction,
                                  label_smoothing=smoothing) * v).sum()

    def ref(x):
        return (_reference(x, t, weight, reduction, smoothing) * v).sum()

    got, got_grad = jax.jit(jax.value_and_grad(ours))(x)
    want, want_grad = jax.value_and_grad(ref)(x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)


def test_cross_entropy_probability_targets():
    x = _x((4, 6))
    p = jax.nn.softmax(_x((4, 6), seed=3), axis=1)
    got = jax.grad(lambda x: nbj.cross_entropy(x, p))(x)
    want = jax.grad(lambda x: -(p * jax.nn.log_softmax(x, axis=1)).sum(1).mean())(x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_cross_entropy_1d_input_and_loss_shape():
    x = _x((5,))
    loss = nbj.cross_entropy(x, jnp.asarray(3), reduction="none")
    assert loss.shape == ()
    np.testing.assert_allclose(loss, -jax.nn.log_softmax(x)[3], rtol=RTOL)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_family_value_and_grad(log, dim):
    x = _x((3, 4, 5))
    v = _upstream(x.shape)
    ours_fn = nbj.log_softmax if log else nbj.softmax
    ref_fn = jax.nn.log_softmax if log else jax.nn.softmax
    got, got_grad = jax.jit(jax.value_and_grad(lambda x: (ours_fn(x, dim) * v).sum()))(x)
    want, want_grad = jax.value_and_grad(lambda x: (ref_fn(x, axis=dim) * v).sum())(x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_vmap_runs_the_callback_per_batch_element():
    x = _x((3, 4, 5))
    t = jnp.asarray(np.random.default_rng(4).integers(0, 5, (3, 4)))
    got = jax.vmap(nbj.cross_entropy)(x, t)
    want = jnp.stack([nbj.cross_entropy(x[i], t[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=RTOL)
    sm = jax.vmap(lambda a: nbj.softmax(a, 1))(x)
    np.testing.assert_allclose(sm, jax.nn.softmax(x, axis=2), rtol=RTOL, atol=ATOL)
