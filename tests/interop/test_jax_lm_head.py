"""nblosses.jax's language-model heads (linear_cross_entropy, linear_distillation_loss,
linear_token_logprobs): under jax.jit + jax.value_and_grad the values and the gradients of
input, linear_weight and linear_bias equal the NumPy call's given the same upstream gradients
(float32: the same kernels on the same values); the FFI calls each pass makes (a reduced loss's
value and gradients in one call, jax.grad alone included); zero cotangents for targets, class
weights and the frozen teacher; no logits-sized array in the program; vmap; the chunking
options; the signatures against the specs; bad input."""

from __future__ import annotations

import doctest
import inspect
import types

import numpy as np
import pytest

from nblosses import functional as F
from nblosses.ops import SPECS

jax = pytest.importorskip("jax")
jnp = jax.numpy
nbj = pytest.importorskip("nblosses.jax")

RTOL, ATOL = 2e-5, 2e-6
#: Rows, features, vocabulary, teacher features: no other array of a call has N * V elements.
N, D, V, D_TEACHER = 7, 5, 11, 4
CE, DISTILL, TLP = "linear_cross_entropy", "linear_distillation_loss", "linear_token_logprobs"
OPS = (CE, DISTILL, TLP)
#: Keywords whose case value names an array of :func:`_data`.
ARRAY_KEYWORDS = frozenset({"weight", "teacher_bias"})


def _data(lead=(N,), ignore=-100, seed=0):
    """One call's float32 arrays (both heads, class weights) and its integer targets, one
    position ``ignore``-d."""
    rng = np.random.default_rng(seed)

    def f(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = rng.integers(0, V, lead)
    if t.ndim:
        t.reshape(-1)[1] = ignore
    return {"x": f(*lead, D), "w": f(V, D, scale=0.7), "b": f(V), "tx": f(*lead, D_TEACHER),
            "tw": f(V, D_TEACHER, scale=0.7), "tb": f(V), "t": t,
            "cw": rng.uniform(0.5, 1.5, V).astype(np.float32)}


def _call(op, d, x, w, b, kw, module):
    """``module``'s ``op`` (nblosses.jax or nblosses.functional) on ``d`` with the student's
    arrays ``x``, ``w``, ``b`` (``None``: no bias) and the case's keywords."""
    kw = {k: d[v] if k in ARRAY_KEYWORDS else v for k, v in kw.items()}
    if b is not None:
        kw["linear_bias"] = b
    args = (x, w, d["tx"], d["tw"], d["t"]) if op == DISTILL else (x, w, d["t"])
    return getattr(module, op)(*args, **kw)


def _parts(out):
    return out if isinstance(out, tuple) else (out,)


def _student(d, bias):
    return (d["x"], d["w"], d["b"]) if bias else (d["x"], d["w"])


def _upstream(op, d, bias, kw, seed=7):
    """One upstream gradient per output: 1.3 for a reduced loss, else values of both signs."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda x, w, b=None: _parts(_call(op, d, x, w, b, kw, nbj)),
                            *_student(d, bias))
    return tuple(np.float32(1.3) if not s.shape else (rng.random(s.shape) - 0.3).astype(
        np.float32) for s in shapes)


def _objective(op, d, kw, ups):
    """``sum(u * out)`` over the outputs, and the outputs (``has_aux``), of the student's
    arrays (``x, w`` or ``x, w, b``)."""

    def f(x, w, b=None):
        outs = _parts(_call(op, d, x, w, b, kw, nbj))
        return sum((u * o).sum() for u, o in zip(ups, outs)), outs

    return f


def _numpy(op, d, bias, kw, ups):
    """The NumPy call with the same upstream gradients: its outputs and the gradients of the
    student's arrays."""
    upstream = {"grad_output": ups[0]} | ({"grad_entropy": ups[1]} if len(ups) > 1 else {})
    b = d["b"] if bias else None
    *values, grads = _call(op, d, d["x"], d["w"], b, {**kw, "return_grad": True, **upstream}, F)
    return values, [g for g in grads if g is not None]


def _ignored_row(d):
    """The flat index of the ignored position, or None (one ``(d,)`` row)."""
    return 1 if d["t"].ndim else None


# ----------------------------------------------------------------------------- parity
CASES = [
    pytest.param(CE, True, {}, (N,), id="ce-mean-bias"),
    pytest.param(CE, False, {"reduction": "sum", "label_smoothing": 0.1, "softcap": 4.0,
                             "z_loss": 1e-3}, (N,), id="ce-sum-smoothing-softcap"),
    pytest.param(CE, True, {"reduction": "none", "ignore_index": 3}, (N,),
                 id="ce-none-ignore3-bias"),
    pytest.param(CE, False, {"weight": "cw", "label_smoothing": 0.2}, (N,),
                 id="ce-class-weights", marks=pytest.mark.slow),
    pytest.param(CE, True, {"reduction": "none", "softcap": 2.0}, (), id="ce-one-row",
                 marks=pytest.mark.slow),
    pytest.param(DISTILL, True, {"temperature": 2.0, "teacher_bias": "tb"}, (N,),
                 id="distill-forward-kl-T2-bias"),
    pytest.param(DISTILL, False, {"beta": 0.5, "hard_weight": 0.3, "temperature": 0.7,
                                  "reduction": "sum"}, (N,), id="distill-jsd-hard"),
    pytest.param(DISTILL, True, {"beta": 0.5, "softcap": 3.0, "reduction": "none"}, (2, 4),
                 id="distill-none-3d-softcap-bias"),
    pytest.param(DISTILL, False, {"beta": 1.0, "ignore_index": 0}, (N,),
                 id="distill-reverse-kl-ignore0", marks=pytest.mark.slow),
    pytest.param(TLP, True, {"return_entropy": True, "temperature": 0.8}, (N,),
                 id="tlp-entropy-T-bias"),
    pytest.param(TLP, False, {"softcap": 3.0}, (N,), id="tlp-logp-softcap"),
    pytest.param(TLP, True, {"return_entropy": True, "temperature": 1.5, "softcap": 4.0}, (),
                 id="tlp-one-row", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("op, bias, kw, lead", CASES)
def test_values_and_gradients_match_the_numpy_call(op, bias, kw, lead):
    ignore = kw.get("ignore_index")
    d = _data(lead, -100 if ignore is None else ignore)
    ups = _upstream(op, d, bias, kw)
    argnums = (0, 1, 2) if bias else (0, 1)
    step = jax.jit(jax.value_and_grad(_objective(op, d, kw, ups), argnums, has_aux=True))
    (value, outs), grads = step(*_student(d, bias))
    want_values, want_grads = _numpy(op, d, bias, kw, ups)

    assert len(outs) == len(want_values)
    for got, want in zip(outs, want_values):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    want_value = sum((u * w).sum() for u, w in zip(ups, want_values))
    np.testing.assert_allclose(value, want_value, rtol=RTOL, atol=ATOL)
    assert len(grads) == len(want_grads) == len(argnums)
    for got, want, primal in zip(grads, want_grads, _student(d, bias)):
        assert got.shape == primal.shape and got.dtype == primal.dtype
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    row = _ignored_row(d)
    if row is not None:  # the ignored position: no loss, no gradient
        assert not np.asarray(grads[0]).reshape(-1, D)[row].any()
        if outs[0].ndim:
            assert outs[0].reshape(-1)[row] == 0


# ----------------------------------------------------------------------------- the passes
def _kind(kw):
    if "grad_output" in kw and kw["grad_output"] is not None:
        return "backward"
    return "fused" if kw.get("return_grad") else "forward"


CALLS = [
    # op, keywords, the calls of value_and_grad, the calls of grad alone
    pytest.param(CE, {}, ["fused"], ["fused"], id="ce-mean"),
    pytest.param(CE, {"reduction": "none"}, ["forward", "backward"], ["backward"],
                 id="ce-none"),
    pytest.param(DISTILL, {"beta": 0.5}, ["fused"], ["fused"], id="distill-mean"),
    pytest.param(TLP, {"return_entropy": True,
                       "options": types.SimpleNamespace(batch_chunk_size=3)},
                 ["forward", "backward"], ["backward"], id="tlp-entropy-chunked"),
]


@pytest.mark.parametrize("op, kw, with_value, grad_alone", CALLS)
def test_calls_per_pass(monkeypatch, op, kw, with_value, grad_alone):
    """A reduced loss: value and the three gradients in one call (jax.grad alone too); an
    unreduced loss and the token statistics: backward's own call with the cotangents
    (jax.grad alone: only that one, XLA drops the unused forward). The chunking options
    reach every call."""
    d = _data(seed=3)  # shapes and options no other test compiled: the calls are counted
    ups = _upstream(op, d, True, kw)
    objective = _objective(op, d, kw, ups)
    calls = []
    real = getattr(F, op)

    def spy(*args, **call_kw):
        calls.append(call_kw)
        return real(*args, **call_kw)

    monkeypatch.setattr(F, op, spy)
    (_, _), grads = jax.jit(jax.value_and_grad(objective, (0, 1, 2), has_aux=True))(
        *_student(d, True))
    assert [_kind(c) for c in calls] == with_value
    chunks = [c["options"].batch_chunk_size if c["options"] is not None else None
              for c in calls]
    assert chunks == [getattr(kw.get("options"), "batch_chunk_size", None)] * len(calls)
    calls.clear()
    alone = jax.jit(jax.grad(lambda *a: objective(*a)[0], (0, 1, 2)))(*_student(d, True))
    assert [_kind(c) for c in calls] == grad_alone
    monkeypatch.undo()
    _, want = _numpy(op, d, True, kw, ups)
    for got, g, w in zip(grads, alone, want):
        np.testing.assert_allclose(got, w, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_frozen_arrays_get_zero_cotangents():
    """The teacher's head, class weights and probability targets: zeros, whatever is
    differentiated with them (the student's gradients unchanged)."""
    d = _data(seed=4)
    x, w, t = d["x"], d["w"], d["t"]

    def distill(x, tx, tw, tb):
        return nbj.linear_distillation_loss(x, w, tx, tw, t, teacher_bias=tb, beta=0.5)

    loss, (gx, *teacher) = jax.value_and_grad(distill, (0, 1, 2, 3))(x, d["tx"], d["tw"],
                                                                      d["tb"])
    want, (want_gx, _, _) = F.linear_distillation_loss(
        x, w, d["tx"], d["tw"], t, teacher_bias=d["tb"], beta=0.5, return_grad=True)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(gx, want_gx, rtol=RTOL, atol=ATOL)
    for g, a in zip(teacher, (d["tx"], d["tw"], d["tb"])):
        assert g.shape == a.shape and not np.asarray(g).any()

    probs = np.asarray(jax.nn.softmax(d["tx"] @ d["tw"].T, axis=1))

    def ce(x, weight, target):
        return nbj.linear_cross_entropy(x, w, target, weight=weight)

    loss, (gx, g_weight, g_target) = jax.value_and_grad(ce, (0, 1, 2))(x, d["cw"], probs)
    want, (want_gx, _, _) = F.linear_cross_entropy(x, w, probs, weight=d["cw"],
                                                   return_grad=True)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(gx, want_gx, rtol=RTOL, atol=ATOL)
    assert not np.asarray(g_weight).any() and not np.asarray(g_target).any()


@pytest.mark.parametrize("op", OPS)
def test_no_logits_sized_array_in_the_program(op):
    """value_and_grad's whole program, lowered (not compiled): no (N, V) array anywhere,
    reduced or not; the composite the check is shown failing on has one."""
    d = _data()
    for kw in ({"return_entropy": True},) if op == TLP else ({}, {"reduction": "none"}):
        ups = _upstream(op, d, True, kw)
        text = jax.jit(jax.value_and_grad(_objective(op, d, kw, ups), (0, 1, 2),
                                          has_aux=True)).lower(*_student(d, True)).as_text()
        assert f"{N}x{V}x" not in text and f"{V}x{N}x" not in text, kw
    composite = jax.jit(jax.grad(lambda x, w: jax.nn.logsumexp(x @ w.T, axis=1).sum()))
    assert f"{N}x{V}x" in composite.lower(d["x"], d["w"]).as_text()


# ----------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("op", [CE, TLP, pytest.param(DISTILL, marks=pytest.mark.slow)])
def test_vmap_over_a_batch_of_sequences(op):
    """Two sequences (features, targets, teacher features) under one shared head: the
    per-sequence values and gradients, the head's gradient per sequence."""
    kw = {"return_entropy": True, "temperature": 0.9} if op == TLP else {"reduction": "sum"}
    ds = [_data(seed=5), _data(seed=6)]
    shared = ds[0]  # the head: its weight and bias (and the teacher's head)
    ups = _upstream(op, shared, True, kw)

    def per_sequence(x, t, tx, w, b):
        d = {**shared, "t": t, "tx": tx}
        return _objective(op, d, kw, ups)(x, w, b)

    step = jax.jit(jax.vmap(jax.value_and_grad(per_sequence, (0, 3, 4), has_aux=True),
                            in_axes=(0, 0, 0, None, None)))
    stacked = [np.stack([d[k] for d in ds]) for k in ("x", "t", "tx")]
    (_, outs), grads = step(*stacked, shared["w"], shared["b"])
    for i, d in enumerate(ds):
        d = {**shared, "x": d["x"], "t": d["t"], "tx": d["tx"]}
        want_values, want_grads = _numpy(op, d, True, kw, ups)
        for got, want in zip(outs, want_values):
            np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=ATOL)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- the API
#: The functional API's arguments that mean nothing under JAX's autodiff.
FUNCTIONAL_ONLY = frozenset({"return_grad", "grad_output", "grad_entropy", "return_lse",
                             "validate", "backend"})


@pytest.mark.parametrize("op", OPS)
def test_signature_is_the_functional_one_less_its_gradient_arguments(op):
    got = [(p.name, p.default, p.kind is inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(getattr(nbj, op)).parameters.values()]
    want = [(p.name, None if p.default is inspect.Parameter.empty else p.default,
             p.keyword_only) for p in SPECS[op].params if p.name not in FUNCTIONAL_ONLY]
    got = [(n, None if d is inspect.Parameter.empty else d, k) for n, d, k in got]
    assert got == want
    assert op in nbj.__all__


def _bad(op, **changes):
    """A call of ``op`` on :func:`_data`'s arrays with ``changes`` (arrays by key, or
    keywords)."""

    def run():
        d = _data()
        arrays = {k: v for k, v in changes.items() if k in d}
        kw = {k: v for k, v in changes.items() if k not in d}
        return _call(op, {**d, **arrays}, arrays.get("x", d["x"]), arrays.get("w", d["w"]),
                     None, kw, nbj)

    return run


BAD = [
    pytest.param(_bad(CE, w=np.zeros((V, D + 1), np.float32)), ValueError, "last dimensions",
                 id="ce-features"),
    pytest.param(_bad(CE, t=np.zeros(3, np.int64)), ValueError, "batch_size", id="ce-target"),
    pytest.param(_bad(CE, x=np.zeros((N, D), np.int32)), TypeError, "floating-point",
                 id="ce-int-input"),
    pytest.param(_bad(CE, linear_bias=np.zeros(V + 1, np.float32)), ValueError,
                 "linear_bias shape", id="ce-bias"),
    pytest.param(_bad(CE, label_smoothing=2.0), ValueError, "label_smoothing",
                 id="ce-smoothing"),
    pytest.param(_bad(CE, reduction="avg"), ValueError, "reduction", id="ce-reduction"),
    pytest.param(_bad(CE, options=types.SimpleNamespace(batch_chunk_size=0)), ValueError,
                 "batch_chunk_size", id="ce-chunking"),
    pytest.param(_bad(DISTILL, tw=np.zeros((V + 1, D_TEACHER), np.float32)), ValueError,
                 "vocabulary", id="distill-teacher-vocabulary"),
    pytest.param(_bad(DISTILL, tx=np.zeros((N, D_TEACHER), np.float16)), TypeError, "dtype",
                 id="distill-teacher-dtype"),
    pytest.param(_bad(DISTILL, beta=1.5), ValueError, "beta", id="distill-beta"),
    pytest.param(_bad(DISTILL, temperature=0.0), ValueError, "temperature",
                 id="distill-temperature"),
    pytest.param(lambda: nbj.linear_distillation_loss(*(_data()[k] for k in
                                                        ("x", "w", "tx", "tw")),
                                                      hard_weight=0.5),
                 ValueError, "needs a target", id="distill-hard-without-target"),
    pytest.param(_bad(TLP, w=np.zeros((V, 2, D), np.float32)), ValueError, r"\(V, d\)",
                 id="tlp-weight"),
    pytest.param(_bad(TLP, t=np.zeros(N, np.float32)), TypeError, "integer target",
                 id="tlp-float-target"),
    pytest.param(_bad(TLP, return_entropy="yes"), TypeError, "return_entropy",
                 id="tlp-return-entropy"),
    pytest.param(_bad(TLP, ignore_index=1.5), TypeError, "ignore_index", id="tlp-ignore"),
    pytest.param(lambda: jax.jit(lambda x, T: nbj.linear_token_logprobs(
        x, _data()["w"], _data()["t"], temperature=T))(_data()["x"], 1.0), TypeError, "static",
        id="tlp-traced-option"),
]


@pytest.mark.parametrize("run, error, match", BAD)
def test_bad_input_raises_when_traced(run, error, match):
    with pytest.raises(error, match=match):
        run()


def test_bad_target_value_raises_when_the_call_runs():
    d = _data()
    t = np.array([0, 1, 2, 3, 4, 5, V])
    with pytest.raises(jax.errors.JaxRuntimeError, match="IndexError"):
        jax.block_until_ready(nbj.linear_cross_entropy(d["x"], d["w"], t))


def test_docstring_examples():
    from nblosses.jax import _lm_heads

    result = doctest.testmod(_lm_heads, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0
