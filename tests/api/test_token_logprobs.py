"""token_logprobs: parity with float64 torch composites (values and gradients, every option and
layout, in place too), the bounds ``logp <= 0`` and ``0 <= entropy <= log C`` for any finite
input, masked (-inf) logits, half-precision input, bad inputs, the ``nblosses.torch`` custom op
(gradcheck, ``opcheck``, ``torch.compile(fullgraph=True)``, bfloat16), and packed SIMD code for
the CPU kernels' loops on AVX2 and AVX-512 CPUs.

Run as a script with ``NUMBA_CPU_NAME`` set, this file prints the instruction counts of the CPU
kernels compiled for that CPU (the vectorisation test's probe).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

if __name__ == "__main__":  # the vectorisation probe's subprocess: helpers live in tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from helpers import PROBE_CPUS, assert_close, rng, run_asm_probes, to_backend, to_numpy

from nblosses import functional as F
from nblosses.ops.token_logprobs import _reference

#: (C,) with a 0-d target; short rows; long rows; a middle class axis (blocks, one ragged).
SHAPES = [(7,), (6, 5), (5, 300), (3, 40, 4), (2, 30, 300)]
OPTIONS = [dict(), dict(temperature=0.3), dict(temperature=2.0, softcap=5.0),
           dict(temperature=0.7, softcap=2.0, ignore_index=3)]


def _targets(r, shape, ignore_index=-100):
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    t = np.asarray(r.integers(0, n_classes, () if len(shape) == 1 else
                              (shape[0], *shape[2:])))
    if t.ndim:
        t.reshape(-1)[::4] = ignore_index
    return t


def _torch_composite(x, t, options, go=None, ge=None):
    """``(logp, entropy, grad)``: the reference in float64 on ``x``'s values, and autograd's
    gradient of ``sum(go logp + ge entropy)`` (``go`` ones, ``ge`` zeros by default)."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    logp, ent = _reference(torch, xt, torch.from_numpy(np.asarray(t, np.int64)),
                           return_entropy=True, **options)
    g_logp = torch.ones_like(logp) if go is None else torch.as_tensor(go, dtype=torch.float64)
    objective = (g_logp * logp).sum()
    if ge is not None:
        objective = objective + (torch.as_tensor(ge, dtype=torch.float64) * ent).sum()
    (grad,) = torch.autograd.grad(objective, xt)
    return logp.detach().numpy(), ent.detach().numpy(), grad.numpy()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                     o.items()) or "default")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_torch_composite(backend, dtype, shape, options):
    r = rng(len(shape) + shape[0])
    x = (r.standard_normal(shape) * 3).astype(dtype)
    t = _targets(r, shape, options.get("ignore_index", -100))
    go = r.standard_normal(t.shape).astype(dtype)
    ge = r.standard_normal(t.shape).astype(dtype)
    logp, ent, grad = _torch_composite(x, t, options, go, ge)
    xb, tb = to_backend(x, backend), to_backend(t, backend)
    # The statistics alone, then with the gradient: the same values.
    got = F.token_logprobs(xb, tb, return_entropy=True, **options)
    out = F.token_logprobs(xb, tb, return_entropy=True, return_grad=True,
                           grad_output=to_backend(go, backend),
                           grad_entropy=to_backend(ge, backend), **options)
    for res in (got, out):
        assert_close(res[0], logp, dtype, "logp")
        assert_close(res[1], ent, dtype, "entropy")
    assert_close(out[2], grad, dtype, "grad", kind="grad")
    assert np.array_equal(to_numpy(xb), x), "the input was written to"
    # In place: the gradient overwrites the logits.
    buf = to_backend(x.copy(), backend)
    res = F.token_logprobs(buf, tb, return_grad=True, grad_output=to_backend(go, backend),
                           grad_entropy=to_backend(ge, backend), grad_buffer=buf, **options)
    assert res[1] is buf
    assert_close(res[0], logp, dtype, "logp in place")
    assert_close(buf, grad, dtype, "grad in place", kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_upstream_gradients_and_scalars(backend, dtype):
    """``grad_output`` defaults to ones and ``grad_entropy`` to zeros (the gradient of
    ``sum(logp)``); a scalar applies to every position."""
    r = rng(3)
    x = (r.standard_normal((6, 50)) * 2).astype(dtype)
    t = _targets(r, x.shape)
    xb, tb = to_backend(x, backend), to_backend(t, backend)
    _, grad = F.token_logprobs(xb, tb, return_grad=True)
    assert_close(grad, _torch_composite(x, t, {})[2], dtype, "default", kind="grad")
    _, grad = F.token_logprobs(xb, tb, return_grad=True, grad_output=0.5, grad_entropy=-0.1)
    want = _torch_composite(x, t, {}, np.full(6, 0.5), np.full(6, -0.1))[2]
    assert_close(grad, want, dtype, "scalars", kind="grad")
    _, grad = F.token_logprobs(xb, tb, return_grad=True, grad_output=0.0, grad_entropy=1.0)
    want = _torch_composite(x, t, {}, np.zeros(6), np.ones(6))[2]
    assert_close(grad, want, dtype, "entropy only", kind="grad")


def test_result_order_shapes_and_dtypes():
    r = rng(4)
    x = r.standard_normal((3, 10, 2)).astype(np.float16)
    t = r.integers(0, 10, (3, 2))
    assert F.token_logprobs(x, t).shape == (3, 2)
    logp, ent = F.token_logprobs(x, t, return_entropy=True)
    logp, grad = F.token_logprobs(x, t, return_grad=True)
    logp, ent, grad = F.token_logprobs(x, t, return_entropy=True, return_grad=True)
    # float32 statistics for half-precision logits (accumulated in float32), the gradient in
    # the logits' dtype
    assert logp.dtype == ent.dtype == np.float32 and grad.dtype == np.float16
    assert ent.shape == (3, 2) and grad.shape == x.shape
    want = _torch_composite(x, t, {})
    assert_close(logp, want[0], "float32", "logp of float16 input")
    assert_close(grad, want[2], "float16", "grad", kind="grad")
    logp, ent = F.token_logprobs(np.zeros(4), np.asarray(1), return_entropy=True)
    assert logp.shape == ent.shape == () and np.isclose(ent, np.log(4))


def test_ignored_positions_give_exact_zeros():
    x = rng(5).standard_normal((4, 30))
    t = np.array([-100, 2, -100, 7])
    logp, ent, grad = F.token_logprobs(x, t, return_entropy=True, return_grad=True,
                                       grad_entropy=np.ones(4))
    assert logp[0] == logp[2] == ent[0] == ent[2] == 0
    assert not grad[0].any() and not grad[2].any() and grad[1].any()


def test_empty_inputs():
    logp, ent, grad = F.token_logprobs(np.zeros((0, 5)), np.zeros(0, np.int64),
                                       return_entropy=True, return_grad=True)
    assert logp.shape == ent.shape == (0,) and grad.shape == (0, 5)
    logp, grad = F.token_logprobs(np.zeros((2, 0)), np.array([-100, -100]), return_grad=True)
    assert logp.tolist() == [0.0, 0.0] and grad.shape == (2, 0)


# ----------------------------------------------------------------------------- bounds
BOUND_CASES = [
    ("normal", lambda r, s: r.standard_normal(s) * 3),
    ("uniform row", lambda r, s: np.full(s, 7.5)),
    ("one dominant", lambda r, s: np.where(np.arange(s[1]).reshape(-1, *[1] * (len(s) - 2))
                                           == 3, 1e4, -1e4) * np.ones(s)),
    ("+-1e4", lambda r, s: r.choice([-1e4, 1e4, 0.0, 9999.5], size=s)),
    ("wide", lambda r, s: r.uniform(-1e4, 1e4, s)),
    ("near ties", lambda r, s: 1e4 - r.integers(0, 3, s) * 1e-3),
]


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
@pytest.mark.parametrize("case", BOUND_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bounds_for_finite_logits(dtype, case, temperature, softcap):
    """``logp <= 0`` and ``0 <= entropy <= log C`` (``log C`` rounded to the results' dtype)
    exactly, whatever the finite logits; and the values match the float64 composite within the
    usual tolerance even for float32 logits of 1e4 at T = 0.3 (``d = (y - M) / T`` from the
    exact ``y - M``: a float32 ``y / T`` alone would be off by ~2e-3)."""
    r = rng(6)
    for shape in ((4, 1000), (3, 40, 2)):
        x = case[1](r, shape).astype(dtype)
        t = _targets(r, shape)
        logp, ent = F.token_logprobs(x, t, temperature=temperature, softcap=softcap,
                                     return_entropy=True)
        log_c = np.asarray(np.log(shape[1]), dtype)
        assert (logp <= 0).all() and (ent >= 0).all() and (ent <= log_c).all(), case[0]
        want = _torch_composite(x, t, dict(temperature=temperature, softcap=softcap))
        assert_close(logp, want[0], dtype, f"{case[0]} logp")
        assert_close(ent, want[1], dtype, f"{case[0]} entropy")


def test_bounds_random_finite_inputs():
    """The bounds on random finite logits of every scale (hypothesis)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from hypothesis.extra import numpy as hnp

    @hypothesis.given(
        x=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 40)),
                     elements=st.floats(-1e4, 1e4, width=32)),
        temperature=st.floats(0.3, 2.0), softcap=st.sampled_from([None, 1.0, 50.0]))
    def check(x, temperature, softcap):
        t = np.arange(x.shape[0]) % x.shape[1]
        logp, ent, grad = F.token_logprobs(x, t, temperature=temperature, softcap=softcap,
                                           return_entropy=True, return_grad=True,
                                           grad_entropy=np.ones(x.shape[0], np.float32))
        assert (logp <= 0).all() and (ent >= 0).all()
        assert (ent <= np.float32(np.log(x.shape[1]))).all() and np.isfinite(grad).all()

    check()


def test_masked_logits_add_nothing():
    """A logit of -inf (a masked token) has probability 0 and adds 0 log 0 = 0 to the entropy
    (torch's composite gives NaN there); its gradient is 0."""
    r = rng(7)
    x = r.standard_normal((3, 40))
    masked = x.copy()
    masked[:, 10:20] = -np.inf
    t = np.array([1, 25, 39])
    logp, ent, grad = F.token_logprobs(masked, t, temperature=0.8, return_entropy=True,
                                       return_grad=True, grad_entropy=np.ones(3))
    keep = np.r_[0:10, 20:40]
    want = _torch_composite(x[:, keep], np.searchsorted(keep, t), dict(temperature=0.8),
                            ge=np.ones(3))
    assert_close(logp, want[0], "float64", "logp")
    assert_close(ent, want[1], "float64", "entropy")
    assert_close(grad[:, keep], want[2], "float64", "grad", kind="grad")
    assert not grad[:, 10:20].any()


def test_nan_and_inf_logits_propagate_as_in_torch(backend):
    """A NaN or +inf logit makes its row's statistics and gradient NaN, as torch's composite
    (the clamps of the bounds let NaN through)."""
    x = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0], [np.inf, 0.0, 1.0]])
    t = np.array([0, 1, 1])
    logp, ent, grad = F.token_logprobs(to_backend(x, backend), to_backend(t, backend),
                                       return_entropy=True, return_grad=True,
                                       grad_entropy=to_backend(np.ones(3), backend))
    want = _torch_composite(x, t, {}, ge=np.ones(3))
    assert_close(logp, want[0], "float64", "logp")
    assert_close(ent, want[1], "float64", "entropy")
    assert np.isnan(to_numpy(grad)[[0, 2]]).all() and np.isfinite(to_numpy(grad)[1]).all()


def test_half_precision_accumulates_in_float32():
    """float16 logits (computed in float32): the statistics within 1e-3 of the float64
    composite on the same values."""
    x = (rng(8).standard_normal((64, 5000)) * 4).astype(np.float16)
    t = rng(8).integers(0, 5000, 64)
    logp, ent = F.token_logprobs(x, t, temperature=0.7, return_entropy=True)
    want = _torch_composite(x, t, dict(temperature=0.7))
    assert np.abs(logp - want[0]).max() < 1e-3 and np.abs(ent - want[1]).max() < 1e-3


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("target, error", [
    (np.array([0, 5, 1]), "Target 5 is out of bounds"),
    (np.array([0, -2, 1]), "Target -2 is out of bounds")])
def test_target_out_of_range(backend, target, error):
    x = to_backend(np.zeros((3, 5)), backend)
    with pytest.raises(IndexError, match=error):
        F.token_logprobs(x, to_backend(target, backend), validate="sync")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature must be a real number"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    (dict(return_grad=True, grad_output=np.ones(4)), ValueError,
     r"grad_output shape \(4,\) does not match the positions' shape \(3,\)"),
    (dict(return_grad=True, grad_entropy=np.ones((3, 1))), ValueError,
     r"grad_entropy shape \(3, 1\) does not match"),
    (dict(return_grad=True, grad_entropy=np.ones(3, np.int64)), TypeError,
     "grad_entropy must be floating point"),
    (dict(return_grad=True, grad_buffer=np.zeros((3, 4))), ValueError, "grad_buffer shape"),
    (dict(return_grad=True, grad_buffer=np.zeros((3, 5), np.float32)), TypeError,
     "grad_buffer dtype float32 must be float64"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.token_logprobs(np.zeros((3, 5)), np.array([0, 1, 2]), **kwargs)


def test_bad_arrays():
    x = np.zeros((3, 5))
    with pytest.raises(TypeError, match="input must be a floating-point array"):
        F.token_logprobs(np.zeros((3, 5), np.int64), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="expected an integer target"):
        F.token_logprobs(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="to match target batch_size"):
        F.token_logprobs(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="expected target shape"):
        F.token_logprobs(np.zeros((3, 5, 2)), np.zeros((3, 5), np.int64))


# ----------------------------------------------------------------------------- nblosses.torch
@pytest.fixture(scope="module")
def nbt():
    """The module of ``nblosses.torch.token_logprobs`` (its custom ops are private names)."""
    public = pytest.importorskip("nblosses.torch")
    from nblosses.torch import _token_logprobs

    assert public.token_logprobs is _token_logprobs.token_logprobs
    return _token_logprobs


def test_torch_gradcheck_both_outputs(nbt):
    r = rng(9)
    x = torch.tensor(r.standard_normal((5, 8)) * 2, requires_grad=True)
    t = torch.tensor([0, 3, -100, 7, 2])
    for options in (dict(), dict(temperature=0.6, softcap=3.0)):
        assert torch.autograd.gradcheck(
            lambda x, o=options: nbt.token_logprobs(x, t, return_entropy=True, **o), (x,))
    # only one output reaches the loss: the other's cotangent is absent
    ent = nbt.token_logprobs(x, t, return_entropy=True)[1]
    (g,) = torch.autograd.grad(ent.sum(), x)
    want = _torch_composite(x.detach().numpy(), t.numpy(), {}, np.zeros(5), np.ones(5))[2]
    assert_close(g, want, "float64", "entropy-only gradient", kind="grad")


def test_torch_opcheck(nbt):
    x = torch.tensor(rng(10).standard_normal((4, 6)), requires_grad=True)
    t = torch.tensor([0, 5, -100, 2])
    g = torch.ones(4, dtype=torch.float64)
    for op, args in ((nbt._token_logprobs, (x, t, 0.8, 2.0, -100)),
                     (nbt._token_logprobs_backward, (x.detach(), t, g, g, 0.8, 2.0, -100)),
                     (nbt._token_logprobs_backward, (x.detach(), t, g, None, 1.0, 0.0, -100))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_fullgraph(nbt):
    def loss(x, t):
        logp, ent = nbt.token_logprobs(x, t, temperature=0.7, return_entropy=True)
        return -(logp * 2.0).mean() - 0.01 * ent.mean()

    r = rng(11)
    x = torch.tensor(r.standard_normal((6, 33)), dtype=torch.float32)
    t = torch.tensor(r.integers(0, 33, 6))
    eager, compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = loss(eager, t)
    want.backward()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled, t)
    got.backward()
    assert torch.allclose(got, want) and torch.allclose(compiled.grad, eager.grad)


def test_torch_bfloat16_within_1e3_of_float64(nbt):
    """bfloat16 logits: float32 statistics (accumulated in float32) within 1e-3 of float64 on
    the same values; the gradient comes back in bfloat16."""
    r = rng(12)
    x = torch.tensor(r.standard_normal((32, 4000)) * 4).to(torch.bfloat16).requires_grad_()
    t = torch.tensor(r.integers(0, 4000, 32))
    logp, ent = nbt.token_logprobs(x, t, temperature=0.9, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32
    want = _torch_composite(x.detach().float().numpy(), t.numpy(), dict(temperature=0.9))
    assert np.abs(logp.detach().numpy() - want[0]).max() < 1e-3
    assert np.abs(ent.detach().numpy() - want[1]).max() < 1e-3
    logp.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert np.abs(x.grad.float().numpy() - want[2]).max() < 1e-2


def test_torch_rejects_bad_temperature(nbt):
    with pytest.raises(ValueError, match="temperature"):
        nbt.token_logprobs(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=0)


# ----------------------------------------------------------------------------- vectorisation
CPUS = PROBE_CPUS
#: kernel or loop helper -> the packed instruction kinds its loops must hold (exp: FMAs).
EXPECT = {
    "_exp_sums": ("max", "fma", "add"),
    "_grad_row": ("fma", "mul"),
    "_vexp_sums": ("fma", "add"),
    "_vgrad": ("fma", "mul"),
    "_tlp_rows": ("max", "fma", "mul"),
    "_tlp_blocks": ("max", "fma"),
}


def probe() -> dict:
    """Compile :data:`EXPECT`'s functions for float32 and float64 (this process's CPU) and
    count their packed instructions; nothing runs."""
    import numba

    from nblosses.backends.cpu import token_logprobs as K

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels"))
    from test_vectorise import _count

    out: dict = {}
    for dtype in ("float32", "float64"):
        f = np.dtype(dtype).type
        v, x2, x3 = np.ones(64, dtype), np.ones((4, 40), dtype), np.ones((2, 21, 64), dtype)
        t1, t2 = np.zeros(4, np.int64), np.zeros((2, 64), np.int64)
        o1, ob = np.ones(4, dtype), np.ones((2, 64), dtype)
        examples = {  # every optional array present: no loop pruned away
            "_exp_sums": (v, f(0), 1.0, v.copy()),
            "_grad_row": (v, v.copy(), f(0), 1.0, 0.5, 0.25, True),
            "_vexp_sums": (v, v.copy(), v.copy(), v.copy(), 1.0, v.copy()),
            "_vgrad": (v, v.copy(), v.copy(), 1.0, v.copy(), v.copy(), True),
            "_tlp_rows": (x2, t1, -100, 1.0, None, 1.0, o1, o1.copy(), o1.copy(), o1.copy(),
                          x2.copy()),
            "_tlp_blocks": (x3, t2, -100, 1.0, None, 1.0, ob, ob.copy(), ob.copy(), ob.copy(),
                            x3.copy(), 64),
        }
        for name, args in examples.items():
            fn = getattr(K, name)
            fn = getattr(fn, "serial", fn)  # a ParallelKernel: its serial build, same loops
            sig = tuple(numba.typeof(a) for a in args)
            fn.compile(sig)
            out.setdefault(name, {})[dtype] = _count(fn.inspect_asm(sig))
    return out


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """``{cpu: counts}``: one subprocess per CPU name (a fresh Numba cache each), all at once."""
    return run_asm_probes(__file__, tmp_path_factory.mktemp("probes"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cpu", CPUS)
def test_kernel_loops_are_packed(probes, cpu, dtype):
    # The probe targets the named CPU: no zmm register for Haswell, zmm for Zen 4 (LLVM keeps
    # these loops at 256 bits on Skylake-AVX512, whose tuning prefers them).
    zmm = sum(c["zmm"] for per in probes[cpu].values() for c in per.values())
    assert {"haswell": zmm == 0, "znver4": zmm > 0}.get(cpu, True), f"{cpu}: {zmm} zmm uses"
    missing = {name: [k for k in kinds if probes[cpu][name][dtype][k] == 0]
               for name, kinds in EXPECT.items()}
    assert not any(missing.values()), f"{cpu} {dtype}: no packed {missing}"


if __name__ == "__main__":
    print(json.dumps(probe()))
