"""nblosses.jax: cross_entropy, softmax and log_softmax under jax.jit and jax.grad, against
JAX's own composites (values and gradients, float32); every function derived from the op specs
against its spec's torch reference on the spec's samples, under jit, grad and vmap; the FFI
bridge (errors, half precision, the gradient written into XLA's buffer, the pure_callback
fallback of non-CPU backends)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from nblosses import _frontends
from nblosses import functional as F
from nblosses._spec import Autograd
from nblosses.ops import SPECS

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


def test_unreduced_loss_under_vmap_and_grad():
    """The unreduced backward (a second fused call with the cotangents) per batch element."""
    x = _x((2, 4, 5))
    t = jnp.asarray(np.random.default_rng(4).integers(0, 5, (2, 4)))
    v = _upstream((2, 4))

    def objective(x, t, v):
        return (nbj.cross_entropy(x, t, reduction="none") * v).sum()

    got = jax.vmap(jax.grad(objective))(x, t, v)
    want = jax.vmap(jax.grad(lambda x, t, v: (_reference(x, t, None, "none", 0.0) * v).sum()))(
        x, t, v)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_vmap_runs_the_callback_per_batch_element():
    x = _x((3, 4, 5))
    t = jnp.asarray(np.random.default_rng(4).integers(0, 5, (3, 4)))
    got = jax.vmap(nbj.cross_entropy)(x, t)
    want = jnp.stack([nbj.cross_entropy(x[i], t[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=RTOL)
    sm = jax.vmap(lambda a: nbj.softmax(a, 1))(x)
    np.testing.assert_allclose(sm, jax.nn.softmax(x, axis=2), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- the bridge
def test_errors_come_back_as_jax_runtime_errors_naming_the_exception():
    x = _x((2, 3))
    with pytest.raises(jax.errors.JaxRuntimeError, match="IndexError: Target 7"):
        jax.block_until_ready(nbj.cross_entropy(x, jnp.array([0, 7])))
    with pytest.raises(ValueError, match="label_smoothing"):  # options: when traced
        nbj.cross_entropy(x, jnp.array([0, 1]), label_smoothing=2.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    x = _x((6, 5))
    t = _t((6,), 5)
    loss, grad = jax.value_and_grad(nbj.cross_entropy)(x.astype(dtype), t)
    want, want_grad = jax.value_and_grad(nbj.cross_entropy)(x, t)
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = 2e-3 if dtype == "float16" else 1.6e-2
    np.testing.assert_allclose(np.float32(loss), want, rtol=tol)
    np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=tol, atol=tol)


def test_the_gradient_is_written_into_xlas_buffer(monkeypatch):
    """value_and_grad of a reduced loss: one call, with the gradient's output buffer as the
    kernel's grad_buffer (no result copied back)."""
    calls = []
    real = F.cross_entropy

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    x, t = _x((8, 5), seed=11), _t((8,), 5)  # a shape no other test compiled
    jax.block_until_ready(jax.jit(jax.value_and_grad(nbj.cross_entropy))(x, t))
    (kw,) = calls
    assert kw["return_grad"] and kw["grad_buffer"].shape == x.shape
    # XLA's operand, read in place: a view of memory NumPy does not own, no copy
    assert not kw["input"].flags.owndata and kw["input"].base is not None


def test_the_host_callback_fallback_runs_the_same_request():
    """Non-CPU backends run the request through jax.pure_callback (forced here on the CPU)."""
    from nblosses.jax import _bridge

    x, t = _x((4, 5)), _t((4,), 5)
    request = _bridge.Request("cross_entropy", (("input", -1), ("target", -1)),
                              (("reduction", "none"),), return_grad=True)
    results = (jax.ShapeDtypeStruct((4,), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
    got = jax.jit(lambda x, t: _bridge._host_callback(request, (x, t), results))(x, t)
    want = _bridge.call(request, [x, t], results)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert _bridge.Request.parse(request.text.encode()) == request


# ----------------------------------------------------------------------------- derived
DERIVED = [s for s in SPECS.values() if _frontends.derived(s)]


def test_every_derived_spec_has_its_function():
    for spec in DERIVED:
        fn = getattr(nbj, spec.name)
        params = inspect.signature(fn).parameters
        assert list(params) == [p.name for p in _frontends.autograd_params(spec, False)]
        assert fn.__code__.co_filename == nbj._generated.__file__  # real source, not exec
    # and every CUSTOM one, written by hand (tests/interop/test_jax_token_logprobs.py,
    # test_jax_lm_head.py)
    custom = {s.name for s in SPECS.values() if s.autograd is Autograd.CUSTOM}
    assert custom, "no CUSTOM spec: this check checks nothing"
    assert set(nbj.__all__) == {s.name for s in DERIVED} | custom


def _jax_value(value):
    if isinstance(value, np.ndarray):
        return jnp.asarray(value.astype(np.float32) if value.dtype.kind == "f" else value)
    if isinstance(value, tuple):
        return tuple(_jax_value(v) for v in value)
    return value


def _samples():
    out = []
    for spec in DERIVED:
        accepted = inspect.signature(getattr(nbj, spec.name)).parameters
        for sample in spec.samples(np.random.default_rng(0)):
            kwargs = {k: v for k, v in sample.kwargs.items() if k in accepted}
            out.append(pytest.param(spec, sample.args, kwargs,
                                    id=f"{spec.name}-{sample.label}"))
    return out


SAMPLES = _samples()


def _torch_reference(spec, args, kwargs):
    """The spec's torch reference on the float32 data in float64: the output and the input
    gradient of ``sum(v * out)``, with ``v``."""
    torch = pytest.importorskip("torch")

    def tensor(a):
        if isinstance(a, tuple):
            return tuple(tensor(v) for v in a)
        if not isinstance(a, np.ndarray):
            return a
        t = torch.from_numpy(np.array(_jax_value(a)))
        return t.double() if t.is_floating_point() else t.long()

    x = tensor(args[0]).requires_grad_(True)
    out = spec.reference(torch, x, *(tensor(a) for a in args[1:]),
                         **{k: tensor(v) for k, v in kwargs.items()})
    v = torch.rand(out.shape, generator=torch.Generator().manual_seed(5),
                   dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad((out * v).sum(), x)
    return out.detach().numpy(), grad.numpy(), v.numpy().astype(np.float32)


@pytest.mark.parametrize("spec, args, kwargs", SAMPLES)
def test_derived_function_matches_the_reference_under_jit_and_grad(spec, args, kwargs):
    want, want_grad, v = _torch_reference(spec, args, kwargs)
    fn = getattr(nbj, spec.name)
    rest = tuple(_jax_value(a) for a in args[1:])
    kw = {k: _jax_value(v) for k, v in kwargs.items()}

    @jax.jit
    def value_and_vjp(x):  # one program: the output, and the input cotangent of v
        out, vjp = jax.vjp(lambda x: fn(x, *rest, **kw), x)
        return out, vjp(v)[0]

    x = _jax_value(args[0])
    got, got_grad = value_and_vjp(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=5e-5, atol=5e-6)


@pytest.mark.parametrize("spec, args, kwargs",
                         list({p.values[0].name: p for p in reversed(SAMPLES)}.values()))
def test_derived_function_under_vmap(spec, args, kwargs):
    """A batch of two inputs (the other arguments shared) gives the per-input results, and
    their gradients (each op's first sample)."""
    fn = getattr(nbj, spec.name)
    rest = tuple(_jax_value(a) for a in args[1:])
    kw = {k: _jax_value(v) for k, v in kwargs.items()}
    x = _jax_value(args[0])
    xs = jnp.stack([x, x * 0.5])

    def scalar(x):
        return fn(x, *rest, **kw).sum()

    got = jax.vmap(lambda x: fn(x, *rest, **kw))(xs)
    got_grad = jax.vmap(jax.grad(scalar))(xs)
    for i in range(2):
        np.testing.assert_allclose(got[i], fn(xs[i], *rest, **kw), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_grad[i], jax.grad(scalar)(xs[i]), rtol=1e-6, atol=1e-7)
