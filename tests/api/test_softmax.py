"""softmax / log_softmax / sigmoid and their backwards against torch.

Two kernel layouts exist (contiguous rows when the reduced axis is last, blocks of inner
positions otherwise), so every special-value case runs along the last axis and along a middle
axis.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, is_backend_array, rng, to_backend, tt

from nblosses import functional as F

OPS = ["softmax", "log_softmax"]
DTYPES = ["float32", "float64", "float16"]
SHAPES = [(), (7,), (4, 9), (3, 5, 6), (2, 3, 4, 5)]
SHAPE_DIMS = [(s, d) for s in SHAPES for d in range(-max(len(s), 1), max(len(s), 1))]
# (shape, dim) pairs covering both layouts: reduced axis last (rows) and in the middle (blocks).
LAYOUTS = [((4, 6), -1), ((3, 6, 5), 1), ((6, 300), 0)]


def _data(shape, dtype, seed=0, scale=3.0):
    return np.asarray(rng(seed).standard_normal(shape) * scale).astype(dtype)


def _expected(ref: torch.Tensor, dtype) -> np.ndarray:
    """torch's reference (computed in float64 from the same values) rounded to ``dtype``."""
    return ref.detach().numpy().astype(dtype)


def _torch_op(op, x, dim, dtype, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(TF, op)(tt(x, dtype), dim=dim, **kw)


# ----------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("shape,dim", SHAPE_DIMS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_torch(backend, op, dtype, shape, dim):
    x = _data(shape, dtype, seed=len(shape) * 10 + dim % 10)
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    assert is_backend_array(out, backend)
    assert_close(out, _expected(_torch_op(op, x, dim, dtype), dtype), dtype,
                 f"{op} shape {shape} dim {dim}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_implicit_dim_warns_and_matches_torch(backend, op, shape):
    x = _data(shape, "float64", seed=3)
    with pytest.warns(UserWarning, match="Implicit dimension choice") as rec:
        out = getattr(F, op)(to_backend(x, backend), backend=backend)
    with pytest.warns(UserWarning) as torch_rec:
        getattr(TF, op)(tt(x))
    assert str(rec[0].message) == str(torch_rec[0].message)  # torch's text, word for word
    assert rec[0].filename == __file__, "the warning should point at the caller's line"
    assert_close(out, _expected(_torch_op(op, x, None, "float64"), "float64"), "float64",
                 f"{op} dim=None shape {shape}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("in_dtype,out_dtype", [("float32", "float64"), ("float64", "float32"),
                                                ("float32", "float16"), ("int64", "float32"),
                                                ("int32", "float64")])
def test_dtype_argument_casts_first(backend, op, in_dtype, out_dtype):
    r = rng(5)
    if in_dtype.startswith("int"):
        x = r.integers(-5, 6, size=(4, 7)).astype(in_dtype)
    else:
        x = _data((4, 7), in_dtype, seed=5)
    out = getattr(F, op)(to_backend(x, backend), dim=1, dtype=np.dtype(out_dtype),
                         backend=backend)
    ref = getattr(TF, op)(torch.from_numpy(x), dim=1, dtype=getattr(torch, out_dtype))
    assert_close(out, ref.numpy(), out_dtype, f"{op} {in_dtype} -> dtype={out_dtype}")


@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_masked_logits(backend, op, dtype, shape, dim):
    """-inf entries (masked logits) get probability 0 / log-probability -inf."""
    x = _data(shape, dtype, seed=7)
    mask = rng(8).random(shape) < 0.4
    # keep at least one finite entry per slice
    first = [slice(None)] * len(shape)
    first[dim] = 0
    mask[tuple(first)] = False
    x[mask] = -np.inf
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    ref = _expected(_torch_op(op, x, dim, dtype), dtype)
    assert_close(out, ref, dtype, f"{op} masked shape {shape} dim {dim}")


@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=str)
@pytest.mark.parametrize("special", ["all_neg_inf", "nan", "pos_inf"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_special_values_make_their_slice_nan(backend, op, dtype, special, shape, dim):
    x = _data(shape, dtype, seed=9)
    sl = [slice(None)] * len(shape)
    sl[dim] = slice(None) if special == "all_neg_inf" else 2
    # one slice along `dim` (index 1 on every other axis) gets the special value(s)
    for ax in range(len(shape)):
        if ax != dim % len(shape):
            sl[ax] = 1
    x[tuple(sl)] = {"all_neg_inf": -np.inf, "nan": np.nan, "pos_inf": np.inf}[special]
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    ref = _expected(_torch_op(op, x, dim, dtype), dtype)
    assert np.isnan(ref).any() and not np.isnan(ref).all()  # the case is what we meant
    assert_close(out, ref, dtype, f"{op} {special} shape {shape} dim {dim}")


@pytest.mark.parametrize("shape,dim", [((0, 5), 1), ((5, 0), 1), ((2, 0, 3), 1), ((2, 0, 3), 0),
                                       ((0,), 0)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_empty_input_gives_empty_output(backend, op, shape, dim):
    x = np.zeros(shape, np.float32)
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    assert out.shape == shape and out.dtype == np.float32
    assert_close(out, _torch_op(op, x, dim, "float32").numpy(), "float32", f"{op} empty")


@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=str)
@pytest.mark.parametrize("kind", ["spread", "offset_pos", "offset_neg"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_large_magnitudes(backend, op, dtype, kind, shape, dim):
    """|x| ~ 1e4: no overflow; log_softmax's absolute error scales with |x| (ulp of 1e4)."""
    base = rng(11).standard_normal(shape)
    x = {"spread": base * 1e4, "offset_pos": base * 3 + 1e4,
         "offset_neg": base * 3 - 1e4}[kind].astype(dtype)
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    ref = _expected(_torch_op(op, x, dim, dtype), dtype)
    assert np.isfinite(ref).all()
    assert_close(out, ref, dtype, f"{op} {kind}", scale=1e4 if op == "log_softmax" else 1.0)


@pytest.mark.parametrize("shape,dim", [((3, 100_000), -1), ((1, 50_000, 3), 1)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS)
def test_long_rows(backend, op, dtype, shape, dim):
    x = _data(shape, dtype, seed=12)
    out = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    ref = _expected(_torch_op(op, x, dim, dtype), dtype)
    # A float32 sum of 50000 terms along a middle axis: torch's own float32 softmax is off by
    # 5.4e-5 relative here (measured against float64), so allow 4x the table's rtol.
    assert_close(out, ref, dtype, f"{op} long rows {shape} dim {dim}",
                 rscale=4.0 if shape[-1] != 1 and dim == 1 else 1.0)


def test_softmax_rows_sum_to_one_and_log_softmax_is_log_of_softmax(backend):
    x = _data((6, 4, 5), "float64", seed=13)
    for dim in range(3):
        p = F.softmax(to_backend(x, backend), dim=dim, backend=backend)
        lp = F.log_softmax(to_backend(x, backend), dim=dim, backend=backend)
        assert_close(p.sum(axis=dim), np.ones(np.delete(x.shape, dim)), "float64",
                     f"softmax sums dim {dim}")
        assert_close(lp, np.log(p), "float64", f"log_softmax vs log(softmax) dim {dim}")


# ----------------------------------------------------------------------------- sigmoid
SIG_SPECIAL = np.array([0.0, 1.0, -1.0, 20.0, -20.0, 100.0, -100.0, 1e4, -1e4, np.inf, -np.inf,
                        np.nan, 88.0, -88.0, 1e-8, -1e-8])


@pytest.mark.parametrize("shape", [(), (7,), (4, 9), (2, 3, 4, 5), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_matches_torch(backend, dtype, shape):
    x = _data(shape, dtype, seed=14, scale=5.0)
    out = F.sigmoid(to_backend(x, backend), backend=backend)
    assert is_backend_array(out, backend)
    assert_close(out, _expected(torch.sigmoid(tt(x, dtype)), dtype), dtype, f"sigmoid {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_special_values(backend, dtype):
    x = SIG_SPECIAL.astype(dtype)
    out = F.sigmoid(to_backend(x, backend), backend=backend)
    assert_close(out, _expected(torch.sigmoid(tt(x, dtype)), dtype), dtype, "sigmoid special")


def test_sigmoid_long_array(backend):
    """Longer than one parallel chunk, with a ragged tail."""
    x = _data((40_000 + 17,), "float32", seed=15, scale=6.0)
    out = F.sigmoid(to_backend(x, backend), backend=backend)
    assert_close(out, torch.sigmoid(tt(x)).numpy(), "float32", "sigmoid long")


# ----------------------------------------------------------------------------- backwards
def _torch_backward(op, g, y, dim, dtype):
    """torch's own backward formulas (what autograd runs), applied to the given ``y``."""
    gt, yt = tt(g, dtype), tt(y, dtype)
    if op == "softmax":
        return torch.ops.aten._softmax_backward_data(gt, yt, dim, yt.dtype)
    if op == "log_softmax":
        return torch.ops.aten._log_softmax_backward_data(gt, yt, dim, yt.dtype)
    return torch.ops.aten.sigmoid_backward(gt, yt)


BACKWARD_CASES = [((7,), 0), ((4, 9), 1), ((4, 9), 0), ((3, 5, 6), 1), ((3, 5, 6), -1),
                  ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 0), ((), 0), ((0, 4), 1)]


@pytest.mark.parametrize("shape,dim", BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_softmax_backward_matches_torch(backend, op, dtype, shape, dim):
    x = _data(shape, "float64", seed=16)
    y = _torch_op(op, x, dim, "float64").numpy().astype(dtype)
    g = _data(shape, dtype, seed=17, scale=1.0)
    fn = getattr(F, f"{op}_backward")
    out = fn(to_backend(g, backend), to_backend(y, backend), dim, backend=backend)
    ref = _torch_backward(op, g, y, dim % max(len(shape), 1), dtype)
    assert_close(out, _expected(ref, dtype), dtype, f"{op}_backward {shape} dim {dim}",
                 kind="grad")


@pytest.mark.parametrize("shape,dim", [((4, 9), 1), ((3, 5, 6), 1), ((2, 3, 4, 5), -2)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_softmax_backward_equals_autograd(backend, op, shape, dim):
    """Full chain: forward with nblosses, backward with nblosses, against torch autograd."""
    x = _data(shape, "float64", seed=18)
    g = _data(shape, "float64", seed=19, scale=1.0)
    xt = tt(x, requires_grad=True)
    getattr(TF, op)(xt, dim=dim).backward(tt(g))
    y = getattr(F, op)(to_backend(x, backend), dim=dim, backend=backend)
    out = getattr(F, f"{op}_backward")(to_backend(g, backend), y, dim, backend=backend)
    assert_close(out, xt.grad.numpy(), "float64", f"{op} chain", kind="grad")


@pytest.mark.parametrize("shape", [(), (7,), (4, 9), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_backward_matches_torch(backend, dtype, shape):
    x = _data(shape, "float64", seed=20, scale=4.0)
    y = (1 / (1 + np.exp(-x))).astype(dtype)
    g = _data(shape, dtype, seed=21, scale=1.0)
    out = F.sigmoid_backward(to_backend(g, backend), to_backend(y, backend), backend=backend)
    assert_close(out, _expected(_torch_backward("sigmoid", g, y, 0, dtype), dtype), dtype,
                 f"sigmoid_backward {shape}", kind="grad")


def test_sigmoid_backward_equals_autograd(backend):
    x = np.concatenate([_data((20,), "float64", seed=22, scale=5.0), [50.0, -50.0]])
    g = _data(x.shape, "float64", seed=23)
    xt = tt(x, requires_grad=True)
    torch.sigmoid(xt).backward(tt(g))
    y = F.sigmoid(to_backend(x, backend), backend=backend)
    out = F.sigmoid_backward(to_backend(g, backend), y, backend=backend)
    assert_close(out, xt.grad.numpy(), "float64", "sigmoid chain", kind="grad")
