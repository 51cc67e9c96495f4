"""nblosses.torch inside torch autograd: gradcheck in float64, parity with
torch.nn.functional (losses and gradients), upstream scaling, retain_graph, in-place gradient,
registration checks (torch.library.opcheck) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_no_gradient_is_computed_without_autograd(monkeypatch):
    asked = []
    real = nbt._F.cross_entropy

    def spy(*args, **kw):
        asked.append(kw["return_grad"])
        return real(*args, **kw)

    monkeypatch.setattr(nbt._F, "cross_entropy", spy)
    x = _logits((3, 4))
    t = _indices((3,), 4)
    with torch.no_grad():
        nbt.cross_entropy(x, t)
    nbt.cross_entropy(x.detach(), t)
    nbt.cross_entropy(x, t)
    assert asked == [False, False, True]


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
    "cross_entropy": lambda x: (x, _T2, _W, -100, "mean", 0.1, 0.0, 0.0, True),
    "nll_loss": lambda x: (x, _T2, None, -100, "none", True),
    "binary_cross_entropy": lambda x: (torch.sigmoid(x.detach()).requires_grad_(True), _P,
                                       None, "sum", True),
    "binary_cross_entropy_with_logits": lambda x: (x, _P, None, _W, "none", True),
    "softmax": lambda x: (x, 1, True),
}


@pytest.mark.parametrize("name", sorted(_OPCHECKS))
def test_opcheck_schema_fake_and_autograd_registration(name):
    args = _OPCHECKS[name](_logits((4, 5)))
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


def test_linear_cross_entropy_opcheck():
    (x, w, t), _, _ = _linear_case("mean", True, False, False)
    b = torch.randn(w.shape[0], dtype=w.dtype, requires_grad=True)
    for args in ((x, w, t, b, None, -100, "mean", 0.1, 0.0, 0.0, True),
                 (x, w, t, None, None, -100, "none", 0.0, 1e-3, 2.0, False)):
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
