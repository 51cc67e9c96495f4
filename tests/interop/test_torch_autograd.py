"""nblosses.torch inside torch autograd: gradcheck in float64, parity with
torch.nn.functional (losses and gradients), upstream scaling, retain_graph, in-place gradient,
registration checks (torch.library.opcheck), torch.compile(fullgraph=True), half-precision CPU
tensors, the ``process_group`` delegation; and, derived from the op specs, every generated
function against its spec's reference on the spec's samples."""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest

from nblosses import _frontends
from nblosses import functional as F
from nblosses._spec import Autograd
from nblosses.ops import SPECS

torch = pytest.importorskip("torch")
TF = torch.nn.functional
nbt = pytest.importorskip("nblosses.torch")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype).requires_grad_(True)


def _indices(shape, classes, ignore=None, seed=1):
    t = torch.randint(0, classes, shape, generator=_gen(seed))
    if ignore is not None:
        t[..., 0] = ignore
    return t


def _probs(shape, seed=2):
    return torch.rand(shape, generator=_gen(seed), dtype=torch.float64).softmax(1)


# name -> (call of f = nblosses.torch or torch.nn.functional on x, the shape of x); the
# float constants follow x's dtype, as torch requires
_W = torch.rand(5, generator=_gen(3), dtype=torch.float64) + 0.5
_T2 = _indices((4,), 5, ignore=-100)
_T3 = _indices((2, 3), 5, ignore=3)
_P = torch.rand(4, 5, generator=_gen(4), dtype=torch.float64)
CASES = {
    "ce_mean_weight_ignore": (lambda f, x: f.cross_entropy(x, _T2, _W.to(x.dtype)), (4, 5)),
    "ce_sum_smoothing": (lambda f, x: f.cross_entropy(x, _T2, reduction="sum",
                                                      label_smoothing=0.2), (4, 5)),
    "ce_none_3d_ignore": (lambda f, x: f.cross_entropy(x, _T3, ignore_index=3,
                                                       reduction="none"), (2, 5, 3)),
    "ce_probs": (lambda f, x: f.cross_entropy(x, _probs((4, 5)).to(x.dtype), _W.to(x.dtype),
                                              label_smoothing=0.1), (4, 5)),
    "ce_1d": (lambda f, x: f.cross_entropy(x, torch.tensor(2)), (5,)),
    "nll_weight": (lambda f, x: f.nll_loss(x, _T2, _W.to(x.dtype)), (4, 5)),
    "nll_none_3d": (lambda f, x: f.nll_loss(x, _T3, reduction="none", ignore_index=3),
                    (2, 5, 3)),
    "bce": (lambda f, x: f.binary_cross_entropy(torch.sigmoid(x), _P.to(x.dtype),
                                                _P.to(x.dtype) + 0.5), (4, 5)),
    "bce_none": (lambda f, x: f.binary_cross_entropy(torch.sigmoid(x), _P.to(x.dtype),
                                                     reduction="none"), (4, 5)),
    "bce_logits_pos_weight": (lambda f, x: f.binary_cross_entropy_with_logits(
        x, _P.to(x.dtype), _P.to(x.dtype) + 0.5, pos_weight=_W.to(x.dtype)), (4, 5)),
    "bce_logits_sum": (lambda f, x: f.binary_cross_entropy_with_logits(
        x, _P.to(x.dtype), reduction="sum"), (4, 5)),
    "softmax": (lambda f, x: f.softmax(x, dim=1), (3, 4, 2)),
    "softmax_last": (lambda f, x: f.softmax(x, dim=-1), (3, 4)),
    "log_softmax": (lambda f, x: f.log_softmax(x, dim=0), (3, 4)),
    "log_softmax_dtype": (lambda f, x: f.log_softmax(x, 1, dtype=torch.float64),
                          (3, 4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_float64(name):
    fn, shape = CASES[name]
    x = _logits(shape)
    assert torch.autograd.gradcheck(lambda x: fn(nbt, x), (x,), eps=1e-6, atol=1e-6)


def _loss_and_grad(f, fn, x, seed=5):
    """The output and the gradient of ``sum(v * out)`` for a random upstream ``v``."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(f, x)
    v = torch.rand(out.shape, generator=_gen(seed), dtype=out.dtype) + 0.5
    (out * v).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_torch(name, dtype):
    fn, shape = CASES[name]
    x = _logits(shape, dtype)
    got, got_grad = _loss_and_grad(nbt, fn, x)
    want, want_grad = _loss_and_grad(TF, fn, x)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                       "atol": 1e-12}
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)


def _kernels_take(**options) -> bool:
    from nblosses import functional as F

    try:
        F.cross_entropy(np.zeros((1, 2)), np.array([0]), return_grad=True, **options)
    except TypeError as exc:
        if any(k in str(exc) for k in options):
            return False
        raise
    return True


@pytest.mark.parametrize("z_loss, softcap", [(1e-3, None), (0.0, 2.0), (0.05, 1.5)])
def test_z_loss_and_softcap_against_composite(z_loss, softcap):
    if not _kernels_take(z_loss=1e-3, softcap=2.0):
        pytest.skip("the CPU cross_entropy kernel does not take z_loss/softcap yet")
    x = _logits((4, 5, 2))
    t = _indices((4, 2), 5, ignore=-100)

    def composite(f, x):
        xc = softcap * torch.tanh(x / softcap) if softcap else x
        valid = t != -100
        loss = TF.cross_entropy(xc, t, _W, reduction="none") + z_loss * xc.logsumexp(1) ** 2 * valid
        return loss.sum() / _W[t.clamp(min=0)][valid].sum()

    def ours(f, x):
        return nbt.cross_entropy(x, t, _W, z_loss=z_loss, softcap=softcap)

    got, got_grad = _loss_and_grad(nbt, ours, x)
    want, want_grad = _loss_and_grad(TF, composite, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("scale", [1.0, 3.0, -0.5])
@pytest.mark.parametrize("inplace", [False, True])
def test_upstream_scaling_and_inplace_gradient(scale, inplace):
    x = _logits((6, 7), torch.float32)
    t = _indices((6,), 7, ignore=-100)
    ref = x.detach().clone().requires_grad_(True)
    (TF.cross_entropy(ref, t, label_smoothing=0.1) * scale).backward()
    z = x * 1.0  # a non-leaf: the in-place variant overwrites it with the gradient
    loss = nbt.cross_entropy(z, t, label_smoothing=0.1, inplace_grad=inplace)
    (loss * scale).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    if inplace:
        torch.testing.assert_close(z.detach(), ref.grad)


def test_retain_graph_backward_twice_gives_the_same_gradient():
    x = _logits((5, 4))
    t = _indices((5,), 4)
    loss = nbt.cross_entropy(x, t, reduction="none")
    v = torch.rand(5, generator=_gen(9), dtype=torch.float64)
    (first,) = torch.autograd.grad(loss, x, v, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, v)
    torch.testing.assert_close(first, second)


def _spy_on_cross_entropy(monkeypatch):
    """The ``return_grad`` / ``grad_output`` of each call nblosses.torch makes to
    ``nblosses.functional.cross_entropy``."""
    asked = []
    real = F.cross_entropy

    def spy(*args, **kw):
        asked.append((kw.get("return_grad", False), kw.get("grad_output") is not None))
        return real(*args, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    return asked


def test_no_gradient_is_computed_without_autograd(monkeypatch):
    asked = _spy_on_cross_entropy(monkeypatch)
    x = _logits((3, 4))
    t = _indices((3,), 4)
    with torch.no_grad():
        nbt.cross_entropy(x, t)
    nbt.cross_entropy(x.detach(), t)
    nbt.cross_entropy(x, t)
    assert asked == [(False, False), (False, False), (True, False)]


@pytest.mark.parametrize("inplace", [False, True])
def test_unreduced_loss_gets_its_gradient_in_backward(monkeypatch, inplace):
    """``reduction="none"``: the forward pass computes the loss alone, backward one fused
    loss+gradient call with the upstream gradient (the gradient is exact, never scaled)."""
    asked = _spy_on_cross_entropy(monkeypatch)
    x = _logits((5, 4), torch.float32)
    t = _indices((5,), 4, ignore=-100)
    v = torch.rand(5, generator=_gen(8)) + 0.5
    z = x * 1.0
    (nbt.cross_entropy(z, t, reduction="none", inplace_grad=inplace) * v).sum().backward()
    assert asked == [(False, False), (True, True)]
    ref = x.detach().clone().requires_grad_(True)
    (TF.cross_entropy(ref, t, reduction="none") * v).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_target_gradients_are_refused():
    with pytest.raises(NotImplementedError, match="target"):
        nbt.cross_entropy(_logits((2, 3)), _probs((2, 3)).requires_grad_(True))
    with pytest.raises(NotImplementedError, match="pos_weight"):
        nbt.binary_cross_entropy_with_logits(_logits((2, 3)), _P[:2, :3],
                                             pos_weight=_W[:3].clone().requires_grad_(True))


def test_legacy_reduction_arguments():
    x, t = _logits((3, 4)), _indices((3,), 4)
    with pytest.warns(UserWarning):
        want = TF.nll_loss(x, t, size_average=False)
    with pytest.warns(UserWarning):
        got = nbt.nll_loss(x, t, size_average=False)
    torch.testing.assert_close(got, want)


_OPCHECKS = {
    "cross_entropy": lambda x: (x, _T2, _W, None, -100, None, "mean", 0.1, 0.0, None, True,
                                None),
    "nll_loss": lambda x: (x, _T2, None, None, -100, None, "none", True, None),
    "binary_cross_entropy": lambda x: (torch.sigmoid(x.detach()).requires_grad_(True), _P,
                                       None, None, None, "sum", True, None),
    "binary_cross_entropy_with_logits": lambda x: (x, _P, None, None, None, "none", _W, False,
                                                   _P),
    "log_softmax": lambda x: (x, 1),
    "softmax_backward": lambda x: (x, torch.softmax(x.detach(), 1), 1),
}


@pytest.mark.parametrize("name", sorted(_OPCHECKS))
def test_opcheck_schema_fake_and_autograd_registration(name):
    args = _OPCHECKS[name](_logits((4, 5)))
    _opcheck(name, args)


def _opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.nblosses, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_torch_compile_fullgraph_tiny_model():
    # aot_eager runs dynamo and AOTAutograd (the fake kernels, the registered backward) without
    # inductor's C++ build, which takes close to a minute on this class of machine.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, t = torch.randn(6, 8), _indices((6,), 5, ignore=-100)

    def step(f, **extra):
        z = model(x)
        return f.cross_entropy(z, t, label_smoothing=0.1, **extra) + f.log_softmax(z, 1).mean()

    # inplace_grad is ignored under compile (the regular op is traced instead)
    _compiled_step_matches_eager(model, lambda: step(nbt, inplace_grad=True), lambda: step(TF))


def _compiled_step_matches_eager(model, nbt_step, torch_step):
    """``torch.compile(nbt_step, fullgraph=True)``'s loss and parameter gradients equal the
    eager pure-torch step's."""
    got = torch.compile(nbt_step, fullgraph=True, backend="aot_eager")()
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = torch_step()
    want.backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_two_layer_training_step_matches_pure_torch():
    """One SGD step of a two-layer classifier: nblosses.torch's loss inside autograd gives the
    pure-torch step's losses and parameter gradients."""
    g = _gen(7)
    x = torch.randn(32, 16, generator=g, dtype=torch.float64)
    t = torch.randint(0, 10, (32,), generator=g)

    def make():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(),
                                   torch.nn.Linear(24, 10)).double()

    results = []
    for loss_fn in (lambda z: TF.cross_entropy(z, t, label_smoothing=0.1),
                    lambda z: nbt.cross_entropy(z, t, label_smoothing=0.1)):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = loss_fn(model(x))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, [p.grad.clone() for p in model.parameters()]))
    (ref_losses, ref_grads), (losses, grads) = results
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- linear + CE
def _linear_case(reduction, bias, probs, weighted, dtype=torch.float64, seed=11):
    g = _gen(seed)
    n, d, v = 6, 4, 7
    x = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    if probs:
        t, ignore = torch.rand(n, v, generator=g, dtype=dtype).softmax(1), None
    else:
        t, ignore = torch.randint(0, v, (n,), generator=g), -100
        t[1] = -100
    cw = (torch.rand(v, generator=g, dtype=dtype) + 0.5) if weighted else None
    kwargs = dict(linear_bias=b, weight=cw, reduction=reduction, ignore_index=ignore,
                  label_smoothing=0.1)
    return (x, w, t), kwargs, [p for p in (x, w, b) if p is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_parity_with_torch(reduction, bias, probs, weighted, dtype):
    args, kwargs, params = _linear_case(reduction, bias, probs, weighted, dtype)
    got = nbt.linear_cross_entropy(*args, **kwargs)
    want = TF.linear_cross_entropy(*args, **kwargs)
    torch.testing.assert_close(got, want)
    upstream = torch.randn(got.shape, generator=_gen(12), dtype=dtype)
    for a, b in zip(torch.autograd.grad(got, params, upstream),
                    torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_gradcheck_float64(reduction):
    args, kwargs, params = _linear_case(reduction, True, False, True)
    t = args[2]
    assert torch.autograd.gradcheck(
        lambda x, w, b: nbt.linear_cross_entropy(x, w, t, **dict(kwargs, linear_bias=b)),
        tuple(params))


def test_linear_cross_entropy_frozen_weight_and_no_grad():
    (x, w, t), kwargs, _ = _linear_case("mean", True, False, False)
    w = w.detach()
    loss = nbt.linear_cross_entropy(x, w, t, **kwargs)
    loss.backward()
    torch.testing.assert_close(
        x.grad, torch.autograd.grad(TF.linear_cross_entropy(x, w, t, **kwargs), x)[0])
    assert w.grad is None and kwargs["linear_bias"].grad is not None
    with torch.no_grad():
        torch.testing.assert_close(nbt.linear_cross_entropy(x, w, t, **kwargs),
                                   TF.linear_cross_entropy(x, w, t, **kwargs))


def test_linear_cross_entropy_honours_the_row_block(monkeypatch):
    """torch's ``options.batch_chunk_size`` reaches the chunk planner through the custom op
    (forward and the ``reduction="none"`` backward); the results do not change."""
    from nblosses.backends import _linear_ce

    rows = []
    plan = _linear_ce.plan_chunks
    monkeypatch.setattr(_linear_ce, "plan_chunks",
                        lambda n, v, d, chunk_rows=None, *a: rows.append(chunk_rows) or plan(
                            n, v, d, chunk_rows, *a))
    (x, w, t), kwargs, _ = _linear_case("none", True, False, False)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    for options in (opts, None):
        x.grad = w.grad = None
        loss = nbt.linear_cross_entropy(x, w, t, options=options, **kwargs)
        loss.sum().backward()
        if options is opts:
            want = (loss.detach(), x.grad.clone(), w.grad.clone())
    torch.testing.assert_close((loss.detach(), x.grad, w.grad), want)
    assert rows == [3, 3, None, None]


def test_linear_cross_entropy_opcheck():
    (x, w, t), _, _ = _linear_case("mean", True, False, False)
    b = torch.randn(w.shape[0], dtype=w.dtype, requires_grad=True)
    for args in ((x, w, t, b, None, -100, "mean", 0.1, 0.0, 0.0, None, True),
                 (x, w, t, None, None, -100, "none", 0.0, 1e-3, 2.0, 2, False)):
        torch.library.opcheck(torch.ops.nblosses.linear_cross_entropy.default, args,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


def test_linear_cross_entropy_torch_compile_fullgraph():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11)
    x, t = torch.randn(5, 8), _indices((5,), 11, ignore=-100)

    def step(f):
        return f.linear_cross_entropy(x, head.weight, t, linear_bias=head.bias)

    _compiled_step_matches_eager(head, lambda: step(nbt), lambda: step(TF))


def test_linear_cross_entropy_delegates_to_the_distributed_head(monkeypatch):
    calls = _fake_distributed(monkeypatch)
    (x, w, t), kwargs, _ = _linear_case("mean", True, False, False)
    group = object()
    assert nbt.linear_cross_entropy(x, w, t, **kwargs, process_group=group) == "sharded"
    (name, args, kw), = calls
    assert name == "linear_cross_entropy" and args == (x, w, t)
    assert list(kw)[-1] == "process_group" and kw["process_group"] is group
    assert kw["linear_bias"] is kwargs["linear_bias"] and kw["label_smoothing"] == 0.1


# ----------------------------------------------------------------------------- front end
def _fake_distributed(monkeypatch):
    """A stand-in ``nblosses.torch.distributed`` recording its calls."""
    calls = []
    fake = types.ModuleType("nblosses.torch.distributed")
    for name in ("cross_entropy", "linear_cross_entropy"):
        def record(*args, _name=name, **kw):
            calls.append((_name, args, kw))
            return "sharded"

        setattr(fake, name, record)
    monkeypatch.setitem(sys.modules, "nblosses.torch.distributed", fake)
    return calls


def test_cross_entropy_delegates_to_the_distributed_loss(monkeypatch):
    calls = _fake_distributed(monkeypatch)
    x, t = _logits((4, 5)), _T2
    group = object()
    got = nbt.cross_entropy(x, t, _W, reduction="sum", label_smoothing=0.1, z_loss=1e-3,
                            process_group=group)
    assert got == "sharded"
    (name, args, kw), = calls
    assert name == "cross_entropy"
    assert args[:3] == (x, t, _W) and args[3:] == (None, -100, None, "sum", 0.1)
    assert kw == {"z_loss": 1e-3, "softcap": None, "inplace_grad": False,
                  "process_group": group}
    assert list(kw)[-1] == "process_group"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ce_mean_weight_ignore", "ce_none_3d_ignore", "nll_weight",
                                  "bce_logits_pos_weight", "softmax", "log_softmax"])
def test_half_precision_cpu_tensors(name, dtype):
    """bfloat16 / float16 CPU tensors: computed in float32, results and gradients in the
    input's dtype, within one rounding of torch's float32 computation."""
    fn, shape = CASES[name]
    x = _logits(shape, torch.float32)
    got, got_grad = _loss_and_grad(nbt, fn, x.to(dtype))
    want, want_grad = _loss_and_grad(TF, fn, x)
    assert got.dtype == dtype and got_grad.dtype == dtype
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3,
                                                                           "atol": 1e-3}
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(got_grad.float(), want_grad, **tol)


def test_no_graph_breaks_in_a_step_using_every_derived_function():
    """One compiled function calling every generated function: dynamo traces it whole."""
    x = _logits((4, 5), torch.float32)
    p = torch.rand(4, 5, generator=_gen(2))

    def step(x):
        lp = nbt.log_softmax(x, 1)
        return (nbt.cross_entropy(x, _T2, reduction="none").sum() + nbt.nll_loss(lp, _T2)
                + nbt.binary_cross_entropy_with_logits(x, p)
                + nbt.binary_cross_entropy(nbt.softmax(x, 1), p) + (lp * 0.5).sum())

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------- derived
#: The ops nblosses.torch derives from their specs.
DERIVED = [s for s in SPECS.values() if _frontends.derived(s)]


def _tensor(value, dtype=torch.float64):
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(value)
        return t.to(dtype) if t.is_floating_point() else t
    if isinstance(value, tuple):
        return tuple(_tensor(v, dtype) for v in value)
    return value


def _sample_calls(spec):
    """``(label, args, kwargs)`` of each sample as tensors, keywords the front end lacks
    (``return_lse``) left out."""
    accepted = inspect.signature(getattr(nbt, spec.name)).parameters
    out = []
    for sample in spec.samples(np.random.default_rng(0)):
        kwargs = {k: _tensor(v) for k, v in sample.kwargs.items() if k in accepted}
        out.append((sample.label, tuple(_tensor(a) for a in sample.args), kwargs))
    return out


SAMPLES = [pytest.param(spec, args, kwargs, id=f"{spec.name}-{label}")
           for spec in DERIVED for label, args, kwargs in _sample_calls(spec)]


def test_every_derived_spec_has_its_function_with_torchs_signature():
    for spec in DERIVED:
        fn = getattr(nbt, spec.name)
        params = inspect.signature(fn).parameters
        assert list(params) == [p.name for p in _frontends.autograd_params(spec, True)]
        torch_fn = getattr(TF, spec.name, None)
        if torch_fn is not None:  # torch's own parameters, in torch's order and kinds
            theirs = inspect.signature(torch_fn).parameters
            ours = [(n, p.kind) for n, p in params.items() if n in theirs]
            assert ours == [(n, p.kind) for n, p in theirs.items()], spec.name
        assert fn.__code__.co_filename == nbt._generated.__file__  # real source, not exec


def test_every_custom_spec_has_its_hand_written_function():
    custom = {s.name for s in SPECS.values() if s.autograd is Autograd.CUSTOM}
    assert custom <= set(nbt.__all__), "CUSTOM ops are written by hand in nblosses.torch"
    assert {s.name for s in DERIVED} <= set(nbt.__all__)


def _loss_values(spec, args, kwargs):
    """Every argument of the front-end call by name (defaults filled in)."""
    bound = inspect.signature(getattr(nbt, spec.name)).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.mark.parametrize("spec, args, kwargs", [p for p in SAMPLES
                                                if p.values[0].autograd is Autograd.FUSED_LOSS])
def test_loss_shape_is_the_ops(spec, args, kwargs):
    """``OpSpec.result_shape`` (the fake tensors' and JAX's result shape) is the shape the op
    returns: an op whose loss is not element-wise needs its ``loss_shape``."""
    with torch.no_grad():
        loss = getattr(nbt, spec.name)(*args, **kwargs)
    declared = spec.result_shape(_loss_values(spec, args, kwargs))
    assert declared == tuple(loss.shape), (
        f"{spec.name}: OpSpec.result_shape says {declared}, the op returns "
        f"{tuple(loss.shape)}: give the spec its loss_shape")


def _ours_and_reference(spec, args, kwargs, dtype=torch.float64):
    """Output and input gradient of ``sum(v * out)`` for a random ``v``, by nblosses.torch and
    by the spec's torch reference (autograd of the composite)."""
    results = []
    for call in (getattr(nbt, spec.name), lambda *a, **k: spec.reference(torch, *a, **k)):
        x = args[0].detach().to(dtype).requires_grad_(True)
        rest = tuple(_tensor(a.numpy(), dtype) if isinstance(a, torch.Tensor) else a
                     for a in args[1:])
        out = call(x, *rest, **kwargs)
        v = torch.rand(out.shape, generator=_gen(5), dtype=out.dtype) + 0.5
        (grad,) = torch.autograd.grad((out * v).sum(), x)
        results.append((out.detach(), grad))
    return results


@pytest.mark.parametrize("spec, args, kwargs", SAMPLES)
def test_derived_function_matches_the_reference(spec, args, kwargs):
    (got, got_grad), (want, want_grad) = _ours_and_reference(spec, args, kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec, args, kwargs", SAMPLES)
def test_derived_function_gradcheck(spec, args, kwargs):
    fn = getattr(nbt, spec.name)
    x = args[0].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, *args[1:], **kwargs), (x,), eps=1e-6,
                                    atol=1e-6)


def _op_arguments(spec, args, kwargs, want_grad, grad_output):
    """The custom op's arguments for a front-end call (legacy and front-end-only parameters
    resolved as the generated function resolves them)."""
    values = _loss_values(spec, args, kwargs)
    values["input"] = values["input"].detach().requires_grad_(True)
    if spec.autograd is Autograd.SOFTMAX:
        return [values["input"], values["dim"] % values["input"].dim()]
    schema = getattr(torch.ops.nblosses, spec.name).default._schema
    values.update(want_grad=want_grad, grad_output=grad_output)
    return [_as_list(values[a.name]) if str(a.type) == "List[Tensor]" else values[a.name]
            for a in schema.arguments]


def _as_list(value):
    """An array argument that may be a tuple, as its op's tensor list."""
    return list(value) if isinstance(value, tuple) else [value]


@pytest.mark.parametrize("spec, args, kwargs", SAMPLES)
def test_derived_op_registration(spec, args, kwargs):
    """Schema, fake (its shapes are the op's), autograd registration: for the forward
    gradient, and for backward's call with an upstream gradient."""
    _opcheck(spec.name, _op_arguments(spec, args, kwargs, True, None))
    if spec.autograd is Autograd.FUSED_LOSS:
        with torch.no_grad():
            loss = getattr(nbt, spec.name)(*args, **kwargs)
        g = torch.rand(loss.shape, generator=_gen(6), dtype=loss.dtype) + 0.5
        _opcheck(spec.name, _op_arguments(spec, args, kwargs, False, g))


def _compile_cases():
    """Per derived op, its first sample and its first unreduced one."""
    cases = {}
    for p in SAMPLES:
        spec, _, kwargs = p.values
        kind = "none" if kwargs.get("reduction") == "none" else "reduced"
        cases.setdefault((spec.name, kind), p)
    return list(cases.values())


@pytest.mark.parametrize("spec, args, kwargs", _compile_cases())
def test_derived_function_under_torch_compile_fullgraph(spec, args, kwargs):
    """Forward and backward traced (aot_eager: dynamo, the fakes, AOTAutograd's trace of the
    registered backward) equal eager."""
    torch._dynamo.reset()  # one objective per case: no recompile limit across the cases
    fn = getattr(nbt, spec.name)
    v = None

    def objective(x):
        out = fn(x, *args[1:], **kwargs)
        return (out * v).sum()

    x = args[0].detach().clone().requires_grad_(True)
    with torch.no_grad():
        v = torch.rand(fn(x, *args[1:], **kwargs).shape, generator=_gen(4),
                       dtype=torch.float64) + 0.5
    want = objective(x)
    (want_grad,) = torch.autograd.grad(want, x)
    got = torch.compile(objective, fullgraph=True, backend="aot_eager", dynamic=False)(x)
    (got_grad,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
