"""cross_entropy's options beyond torch (z_loss, softcap, return_lse) through the public API and
the module, against torch composites (the kernels alone: tests/test_ce_options_kernels.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, ce_options_composite, param_id, rng, to_backend_all

from nblosses import functional as F
from nblosses import nn

C = 7


def _case(shape, probs, seed=0):
    r = rng(seed)
    x = r.standard_normal(shape) * 3
    if probs:
        return x, np.moveaxis(r.dirichlet(np.ones(C), (shape[0], *shape[2:])), -1, 1)
    t = r.integers(0, C, (shape[0], *shape[2:]))
    t.reshape(-1)[::3] = -100
    return x, t


def _reference(x, t, weight, reduction, z, cap, eps):
    xt = torch.tensor(x, requires_grad=True)
    loss, lse = ce_options_composite(xt, torch.tensor(t),
                                     None if weight is None else torch.tensor(weight),
                                     label_smoothing=eps, reduction=reduction, z_loss=z,
                                     softcap=cap)
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy(), lse.detach().numpy()


@pytest.mark.parametrize("shape", [(6, C), (4, C, 3)], ids=param_id)
@pytest.mark.parametrize("probs", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z,cap,eps,weighted", [(1e-2, None, 0.0, False), (0.0, 2.5, 0.0, False),
                                                (1e-3, 1.5, 0.1, True)], ids=param_id)
def test_options_match_torch_composite(backend, shape, probs, reduction, z, cap, eps, weighted):
    x, t = _case(shape, probs)
    w = rng(3).uniform(0.5, 2, C) if weighted else None
    xb, tb, wb = to_backend_all(backend, x, t, w)
    loss, grad, lse = F.cross_entropy(xb, tb, wb, reduction=reduction, label_smoothing=eps,
                                      z_loss=z, softcap=cap, return_grad=True, return_lse=True,
                                      backend=backend)
    ref, ref_grad, ref_lse = _reference(x, t, w, reduction, z, cap or 0.0, eps)
    assert_close(loss, ref, "float64", "loss")
    assert_close(grad, ref_grad, "float64", "grad", kind="grad")
    assert_close(lse, ref_lse, "float64", "lse")


def test_module_holds_the_options():
    x, t = _case((6, C), False)
    m = nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    ref, ref_grad, _ = _reference(x, t, None, "mean", 1e-2, 3.0, 0.1)
    assert_close(m(x, t), ref, "float64", "module loss")
    assert_close(m.backward(), ref_grad, "float64", "module grad", kind="grad")
    loss, lse = nn.CrossEntropyLoss(return_lse=True)(x, t)
    assert lse.shape == (6,) and loss.shape == ()


@pytest.mark.parametrize("kwargs,match", [({"z_loss": -1.0}, "z_loss"),
                                          ({"z_loss": float("nan")}, "z_loss"),
                                          ({"softcap": 0.0}, "softcap"),
                                          ({"softcap": -2.0}, "softcap")], ids=param_id)
def test_bad_option_values(kwargs, match):
    x, t = _case((6, C), False)
    with pytest.raises(ValueError, match=match):
        F.cross_entropy(x, t, **kwargs)


def test_lse_of_half_input_is_float32():
    x, t = _case((6, C), False)
    _, lse = F.cross_entropy(x.astype(np.float16), t, return_lse=True)
    assert lse.dtype == np.float32
