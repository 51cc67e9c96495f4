"""The error table of ``docs/errors.rst``, row by row: the exception type and a message naming
the offending value or shapes. Plus: inputs are never written to, and backend-name errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from helpers import rng, to_backend, to_numpy

import nblosses
from nblosses import functional as F
from nblosses import nn

C = 5


def _b(backend, *arrays):
    return [to_backend(a, backend) for a in arrays]


def _x(shape=(4, C), dtype=np.float64, seed=0):
    return rng(seed).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------- target range
@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("shape,bad,where", [
    ((4, C), 7, 2), ((4, C), C, 0), ((4, C), -1, 3), ((4, C), -7, 1), ((4, C), 2**40, 1),
    ((C,), 7, None), ((2, C, 3), 7, (1, 2)), ((2, C, 3, 2), -2, (0, 1, 1)),
    ((40_000, C), C, 39_999),  # past the parallel grain: the CPU range check's parallel build
], ids=str)
@pytest.mark.parametrize("return_grad", [False, True])
def test_target_out_of_range(backend, op, shape, bad, where, return_grad):
    x = _x(shape)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = np.zeros(tshape, np.int64)
    if where is None:
        t[()] = bad
    else:
        t[where] = bad
    with pytest.raises(IndexError, match=rf"(?<![\d-]){re.escape(str(bad))}(?!\d)"):
        getattr(F, op)(*_b(backend, x, t), return_grad=return_grad, backend=backend)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
def test_negative_target_allowed_only_as_ignore_index(backend, op):
    x = _x()
    t = np.array([0, -3, 1, 2])
    getattr(F, op)(*_b(backend, x, t), ignore_index=-3, backend=backend)  # fine
    with pytest.raises(IndexError, match="-3"):
        getattr(F, op)(*_b(backend, x, t), ignore_index=-100, backend=backend)
    t2 = np.array([0, 7, 1, 2])
    getattr(F, op)(*_b(backend, x, t2), ignore_index=7, backend=backend)  # ignored: fine
    with pytest.raises(IndexError, match="7"):
        getattr(F, op)(*_b(backend, x, t2), ignore_index=-100, backend=backend)


# ----------------------------------------------------------------------------- shapes
def _shapes_named(*shapes):
    return ".*".join(re.escape(str(tuple(s))) for s in shapes)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("xshape,tshape", [
    ((4, C), (3,)), ((4, C), (4, 1)), ((2, C, 3, 4), (2, 3, 5)), ((2, C, 3), (3, 3)),
    ((2, C, 3), (2,)), ((C,), (1,)),
], ids=str)
def test_class_loss_shape_mismatch(backend, op, xshape, tshape):
    x = _x(xshape)
    t = np.zeros(tshape, np.int64)
    with pytest.raises(ValueError) as info:
        getattr(F, op)(*_b(backend, x, t), backend=backend)
    msg = str(info.value)
    assert str(tuple(xshape)) in msg and str(tuple(tshape)) in msg, msg


@pytest.mark.parametrize("op", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("xshape,yshape", [((4, C), (4,)), ((4, C), (C, 4)), ((3,), (3, 1)),
                                           ((2, 3), ())], ids=str)
def test_binary_shape_mismatch(backend, op, xshape, yshape):
    x = np.full(xshape, 0.5)
    y = np.full(yshape, 1.0)
    with pytest.raises(ValueError) as info:
        getattr(F, op)(*_b(backend, x, y), backend=backend)
    msg = str(info.value)
    assert str(tuple(xshape)) in msg and str(tuple(yshape)) in msg, msg


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("wshape", [(4,), (6,), (1, C), (C, 1), ()], ids=str)
def test_weight_wrong_length(backend, op, wshape):
    x = _x()
    t = np.array([0, 1, 2, 3])
    w = np.ones(wshape)
    with pytest.raises(ValueError) as info:
        getattr(F, op)(*_b(backend, x, t), weight=to_backend(w, backend), backend=backend)
    msg = str(info.value)
    assert str(tuple(wshape)) in msg and str(C) in msg, msg


def test_weight_wrong_length_probability_targets(backend):
    x = _x()
    p = np.full((4, C), 1.0 / C)
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        F.cross_entropy(*_b(backend, x, p), weight=to_backend(np.ones(3), backend),
                        backend=backend)


@pytest.mark.parametrize("op,arg", [("binary_cross_entropy", "weight"),
                                    ("binary_cross_entropy_with_logits", "weight"),
                                    ("binary_cross_entropy_with_logits", "pos_weight")])
@pytest.mark.parametrize("wshape", [(3,), (4, 2), (2, 4, C)], ids=str)
def test_binary_weight_not_broadcastable(backend, op, arg, wshape):
    x = np.full((4, C), 0.5)
    y = np.ones((4, C))
    with pytest.raises(ValueError) as info:
        getattr(F, op)(*_b(backend, x, y), backend=backend,
                       **{arg: to_backend(np.ones(wshape), backend)})
    msg = str(info.value)
    assert str(tuple(wshape)) in msg and str((4, C)) in msg and arg in msg, msg


# ----------------------------------------------------------------------------- dtypes
INT_INPUT_CALLS = {
    "softmax": lambda x, b: F.softmax(x, dim=1, backend=b),
    "log_softmax": lambda x, b: F.log_softmax(x, dim=1, backend=b),
    "sigmoid": lambda x, b: F.sigmoid(x, backend=b),
    "nll_loss": lambda x, b: F.nll_loss(x, to_backend(np.array([0, 1, 2]), b), backend=b),
    "cross_entropy": lambda x, b: F.cross_entropy(x, to_backend(np.array([0, 1, 2]), b),
                                                  backend=b),
    "binary_cross_entropy": lambda x, b: F.binary_cross_entropy(x, x.astype(float), backend=b),
    "binary_cross_entropy_with_logits": lambda x, b: F.binary_cross_entropy_with_logits(
        x, x.astype(float), backend=b),
}


@pytest.mark.parametrize("op", list(INT_INPUT_CALLS))
@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_input_is_type_error(backend, op, dtype):
    x = to_backend(np.ones((3, C), dtype), backend)
    with pytest.raises(TypeError, match=dtype):
        INT_INPUT_CALLS[op](x, backend)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("tdtype", ["float64", "float32"])
def test_float_target_on_index_path(backend, op, tdtype):
    x = _x()
    t = np.array([0.0, 1.0, 2.0, 3.0], tdtype)
    with pytest.raises(TypeError, match=tdtype):
        getattr(F, op)(*_b(backend, x, t), backend=backend)


def test_nll_loss_has_no_probability_path(backend):
    x = _x()
    with pytest.raises(TypeError, match="float64"):
        F.nll_loss(*_b(backend, x, np.full((4, C), 0.2)), backend=backend)


@pytest.mark.parametrize("shape", [(4, C), (2, C, 3), (C,)], ids=str)
def test_int_target_with_input_shape(backend, shape):
    """Same shape as the input selects the probability path, which needs float targets."""
    x = _x(shape)
    t = np.zeros(shape, np.int64)
    with pytest.raises(TypeError, match="int64"):
        F.cross_entropy(*_b(backend, x, t), backend=backend)


# ----------------------------------------------------------------------------- options
LOSS_CALLS = {
    "nll_loss": lambda b, **kw: F.nll_loss(*_b(b, _x(), np.array([0, 1, 2, 3])), backend=b, **kw),
    "cross_entropy": lambda b, **kw: F.cross_entropy(*_b(b, _x(), np.array([0, 1, 2, 3])),
                                                     backend=b, **kw),
    "cross_entropy_probs": lambda b, **kw: F.cross_entropy(*_b(b, _x(), np.full((4, C), 0.2)),
                                                           backend=b, **kw),
    "binary_cross_entropy": lambda b, **kw: F.binary_cross_entropy(
        *_b(b, np.full((4, C), 0.5), np.ones((4, C))), backend=b, **kw),
    "binary_cross_entropy_with_logits": lambda b, **kw: F.binary_cross_entropy_with_logits(
        *_b(b, _x(), np.ones((4, C))), backend=b, **kw),
}


@pytest.mark.parametrize("op", list(LOSS_CALLS))
@pytest.mark.parametrize("reduction", ["avg", "Mean", "", "elementwise_mean"])
@pytest.mark.parametrize("return_grad", [False, True])
def test_bad_reduction(backend, op, reduction, return_grad):
    with pytest.raises(ValueError, match=re.escape(repr(reduction))):
        LOSS_CALLS[op](backend, reduction=reduction, return_grad=return_grad)


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_probs"])
@pytest.mark.parametrize("eps", [-0.1, 1.5, -1e-9, float("nan"), float("inf")])
def test_label_smoothing_outside_unit_interval(backend, op, eps):
    with pytest.raises(ValueError, match=re.escape(str(eps))):
        LOSS_CALLS[op](backend, label_smoothing=eps)


@pytest.mark.parametrize("ignore_index", [0, 3, 100])
def test_ignore_index_with_probability_targets(backend, ignore_index):
    with pytest.raises(ValueError, match=rf"ignore_index.*{ignore_index}"):
        LOSS_CALLS["cross_entropy_probs"](backend, ignore_index=ignore_index)
    LOSS_CALLS["cross_entropy_probs"](backend, ignore_index=-1)  # negative: accepted


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan"), float("inf")])
@pytest.mark.parametrize("return_grad", [False, True])
def test_bce_input_outside_unit_interval(backend, value, return_grad):
    x = np.full((3, 4), 0.5)
    x[1, 2] = value
    with pytest.raises(ValueError, match=re.escape(str(value))):
        F.binary_cross_entropy(*_b(backend, x, np.ones((3, 4))), return_grad=return_grad,
                               backend=backend)


@pytest.mark.parametrize("call", [
    lambda b: F.softmax(_x(), dim=1, axis=0, backend=b),
    lambda b: F.log_softmax(_x(), 1, keepdims=True, backend=b),
    lambda b: F.sigmoid(_x(), dim=1, backend=b),
    lambda b: LOSS_CALLS["nll_loss"](b, label_smoothing=0.1),
    lambda b: LOSS_CALLS["cross_entropy"](b, dim=1),
    lambda b: LOSS_CALLS["binary_cross_entropy"](b, pos_weight=np.ones(C)),
    lambda b: LOSS_CALLS["binary_cross_entropy_with_logits"](b, ignore_index=0),
    lambda b: F.softmax_backward(_x(), _x(), 1, out=None, backend=b),
], ids=["softmax", "log_softmax", "sigmoid", "nll", "ce", "bce", "bcel", "softmax_backward"])
def test_unknown_keyword(backend, call):
    with pytest.raises(TypeError, match="unexpected keyword"):
        call(backend)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((4, C), 2), ((4, C), -3), ((), 1), ((3,), 1)], ids=str)
def test_softmax_dim_out_of_range(backend, op, shape, dim):
    with pytest.raises(IndexError, match=re.escape(str(dim))):
        getattr(F, op)(to_backend(_x(shape), backend), dim=dim, backend=backend)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
def test_grad_output_shape_mismatch(backend, op):
    x, t = _x(), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        getattr(F, op)(*_b(backend, x, t), reduction="none", return_grad=True,
                       grad_output=to_backend(np.ones(3), backend), backend=backend)


# ----------------------------------------------------------------------------- inputs untouched
def _nc(a):
    """A non-contiguous view with the same values (Fortran-ordered copy)."""
    return np.asfortranarray(a)


def _untouched_cases():
    r = rng(20)
    x = r.standard_normal((6, C))
    x4 = r.standard_normal((2, C, 3, 2))
    t = r.integers(0, C, 6)
    t[1] = 2
    t4 = r.integers(0, C, (2, 3, 2))
    w = r.uniform(0.5, 2, C)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    pr = 1 / (1 + np.exp(-x))
    y = r.uniform(0, 1, (6, C))
    go = r.uniform(-1, 1, 6)
    cases = []
    for dtype in ("float64", "float32", "float16"):
        def d(a, dtype=dtype):
            return a.astype(dtype)
        cases += [
            ("softmax", F.softmax, (d(x),), dict(dim=1)),
            ("log_softmax", F.log_softmax, (d(x4),), dict(dim=1)),
            ("sigmoid", F.sigmoid, (d(x),), {}),
            ("softmax_backward", F.softmax_backward, (d(y), d(p), 1), {}),
            ("log_softmax_backward", F.log_softmax_backward, (d(y), d(np.log(p)), 1), {}),
            ("sigmoid_backward", F.sigmoid_backward, (d(y), d(pr)), {}),
            ("nll_loss", F.nll_loss, (d(np.log(p)), t),
             dict(weight=d(w), ignore_index=2, return_grad=True)),
            ("nll_loss_none", F.nll_loss, (d(np.log(p)), t),
             dict(weight=d(w), reduction="none", return_grad=True, grad_output=d(go))),
            ("cross_entropy", F.cross_entropy, (d(x), t),
             dict(weight=d(w), ignore_index=2, label_smoothing=0.1, return_grad=True)),
            ("cross_entropy_nd", F.cross_entropy, (d(x4), t4),
             dict(weight=d(w), label_smoothing=0.1, return_grad=True, reduction="none")),
            ("cross_entropy_fwd", F.cross_entropy, (d(x), t), dict(weight=d(w))),
            ("cross_entropy_probs", F.cross_entropy, (d(x), d(p)),
             dict(weight=d(w), label_smoothing=0.2, return_grad=True)),
            ("bce", F.binary_cross_entropy, (d(pr), d(y)),
             dict(weight=d(w), return_grad=True)),
            ("bce_none", F.binary_cross_entropy, (d(pr), d(y)),
             dict(reduction="none", return_grad=True, grad_output=d(y))),
            ("bce_logits", F.binary_cross_entropy_with_logits, (d(x), d(y)),
             dict(weight=d(w), pos_weight=d(w), return_grad=True)),
            ("bce_logits_none", F.binary_cross_entropy_with_logits, (d(x), d(y)),
             dict(pos_weight=d(w), reduction="none", return_grad=True, grad_output=d(y))),
        ]
    return cases


UNTOUCHED = _untouched_cases()


@pytest.mark.parametrize("layout", ["contiguous", "fortran"])
@pytest.mark.parametrize("name,fn,args,kwargs", UNTOUCHED,
                         ids=[f"{c[0]}-{c[2][0].dtype}" for c in UNTOUCHED])
def test_inputs_are_never_modified(backend, name, fn, args, kwargs, layout):
    conv = (lambda a: a) if layout == "contiguous" else _nc
    args = [to_backend(conv(a), backend) if isinstance(a, np.ndarray) else a for a in args]
    kwargs = {k: to_backend(conv(v), backend) if isinstance(v, np.ndarray) else v
              for k, v in kwargs.items()}
    before = [to_numpy(a).copy() for a in (*args, *kwargs.values()) if hasattr(a, "shape")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args, backend=backend, **kwargs)
    after = [to_numpy(a) for a in (*args, *kwargs.values()) if hasattr(a, "shape")]
    for i, (b, a) in enumerate(zip(before, after)):
        assert np.array_equal(a, b, equal_nan=True), f"{name}: argument {i} was modified"


def test_modules_do_not_modify_inputs(backend):
    r = rng(21)
    x = r.standard_normal((4, C))
    t = np.array([0, 1, 2, 3])
    xb, tb = to_backend(x.copy(), backend), to_backend(t.copy(), backend)
    m, crit = nn.LogSoftmax(dim=1, backend=backend), nn.NLLLoss(backend=backend)
    logp = crit(m(xb), tb)
    m.backward(crit.backward())
    ce = nn.CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    ce(xb, tb)
    ce.backward()
    assert np.array_equal(to_numpy(xb), x) and np.array_equal(to_numpy(tb), t)
    del logp


# ----------------------------------------------------------------------------- backend names
@pytest.mark.parametrize("call", [
    lambda: F.softmax(_x(), dim=1, backend="nope"),
    lambda: F.cross_entropy(_x(), np.array([0, 1, 2, 3]), backend="nope"),
    lambda: nn.Softmax(dim=1, backend="nope")(_x()),
    lambda: nblosses.set_backend("nope"),
    lambda: nblosses.use_backend("nope").__enter__(),
], ids=["softmax", "cross_entropy", "nn.Softmax", "set_backend", "use_backend"])
def test_unknown_backend(call):
    with pytest.raises(nblosses.UnknownBackendError) as info:
        call()
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "nope" in msg and "'cpu'" in msg and "'cuda'" in msg, msg
    assert nblosses.get_backend() == "auto"


def test_cuda_unavailable_is_runtime_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "cuda" in nblosses.available_backends():
            pytest.skip("a CUDA device is available: nothing to check")
    for call in (lambda: F.softmax(_x(), dim=1, backend="cuda"),
                 lambda: F.cross_entropy(_x(), np.array([0, 1, 2, 3]), backend="cuda"),
                 lambda: nn.CrossEntropyLoss(backend="cuda")(_x(), np.array([0, 1, 2, 3]))):
        with pytest.raises(nblosses.BackendUnavailableError) as info:
            call()
        assert isinstance(info.value, RuntimeError)
        assert "cuda" in str(info.value).lower()


# ----------------------------------------------------------------------------- grad_buffer checks
@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("bad,exc,words", [
    ("shape", ValueError, ["(4, 6)", "(4, 5)"]),
    ("dtype", TypeError, ["float32", "float64"]),
    ("fortran", ValueError, ["contiguous"]),
    ("readonly", ValueError, ["writeable"]),
    ("list", TypeError, ["grad_buffer"]),
])
def test_bad_grad_buffer(backend, op, bad, exc, words):
    x = _x()
    t = np.array([0, 1, 2, 3])
    buf = {"shape": lambda: np.zeros((4, 6)), "dtype": lambda: np.zeros((4, C), np.float32),
           "fortran": lambda: np.zeros((C, 4)).T, "readonly": lambda: np.zeros((4, C)),
           "list": lambda: np.zeros((4, C)).tolist()}[bad]()
    if bad == "readonly":
        if backend != "cpu":
            pytest.skip("CuPy arrays have no read-only flag")
        buf.flags.writeable = False
    elif bad != "list":
        buf = to_backend(buf, backend)
    xb = to_backend(x, backend)
    with pytest.raises(exc) as info:
        getattr(F, op)(xb, to_backend(t, backend), return_grad=True, grad_buffer=buf,
                       backend=backend)
    for w in words:
        assert w in str(info.value), str(info.value)
    assert np.array_equal(to_numpy(xb), x)


@pytest.mark.parametrize("op", ["nll_loss", "cross_entropy"])
def test_0d_input_is_rejected(backend, op):
    with pytest.raises(ValueError, match="dimension"):
        getattr(F, op)(to_backend(np.array(1.0), backend), to_backend(np.array(0), backend),
                       backend=backend)
