"""Every op against its torch reference, generated from the op specs (:mod:`nblosses.ops`).

For each spec, each of its samples (``spec.samples``) and float32 / float64:

- the call's result equals ``spec.reference`` run by torch on float64 tensors of the same
  (rounded) values, within the tolerance table of :mod:`helpers`;
- for samples with ``grad=True``: ``return_grad=True`` adds a gradient equal to torch autograd
  of the reference's output, with the default upstream gradient and with a random one; the
  other results are unchanged by asking for it;
- the call writes to none of its inputs.

An op added to the specs is tested here without a line written in this file; the meta-test
(``tests/tooling/test_meta.py``) fails when its spec lacks a reference or samples.

Conventions read from the specs (see :func:`helpers.result_parts`):

- each flag of ``spec.results`` set in a call adds one result, in the order of
  ``spec.results``;
- the gradient is taken with respect to ``input`` (a fused loss) or, when it is a tuple (the
  LM heads), to :data:`TUPLE_GRAD_ARGS` in order (``None`` for an argument not passed);
- the differentiated objective is ``sum(grad_output * out)`` plus, for each result flag
  ``return_X`` set in the call whose op has a ``grad_X`` parameter, ``sum(grad_X * X)``
  (``token_logprobs``' entropy with ``grad_entropy``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    assert_close,
    assert_unwritten,
    cast_float,
    map_call,
    result_parts,
    sample_params,
    to_torch_ref,
)

from nblosses import functional as F
from nblosses.ops import SPECS

#: The arguments a tuple of gradients is with respect to, in order (the LM heads'
#: ``(grad_input, grad_linear_weight, grad_linear_bias)``).
TUPLE_GRAD_ARGS = ("input", "linear_weight", "linear_bias")

DTYPES = ["float32", "float64"]


def _reference(spec: Any, args: tuple, kwargs: dict, requires_grad: tuple[str, ...] = ()
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``spec.reference`` on float64 torch tensors of the (cast) arrays: its result by part
    (as :func:`helpers.result_parts` names them) and the leaf tensors of the arguments named in
    ``requires_grad``, which require a gradient."""
    t_args, t_kwargs = map_call(args, kwargs, to_torch_ref)
    bound = spec.signature().bind_partial(*t_args, **t_kwargs).arguments
    leaves = {}
    for name in requires_grad:
        if bound.get(name) is not None:
            leaves[name] = bound[name].requires_grad_(True)
    result = spec.reference(torch, *t_args, **t_kwargs)
    return result_parts(spec, result, kwargs), leaves


def _call(spec: Any, args: tuple, kwargs: dict) -> Any:
    return getattr(F, spec.name)(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "sample"), sample_params(SPECS, fast_samples=2))
def test_matches_the_torch_reference(spec, sample, dtype):
    args, kwargs = map_call(sample.args, sample.kwargs, cast_float(dtype))
    before = map_call(args, kwargs, np.copy)
    got = result_parts(spec, _call(spec, args, kwargs), kwargs)
    want, _ = _reference(spec, args, kwargs)
    for part, expected in want.items():
        assert_close(got[part], expected.detach(), dtype, f"{spec.name} {part}")
    assert_unwritten((args, kwargs), before, spec.name)


def _upstream(rng: np.random.Generator, like: torch.Tensor, dtype: str) -> np.ndarray:
    """A random upstream gradient shaped as ``like``, in ``dtype`` (0-d for a reduced loss)."""
    return np.asarray(rng.standard_normal(tuple(like.shape)), dtype=dtype)


@pytest.mark.parametrize("upstream", ["default", "random"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("spec", "sample"),
                         sample_params(SPECS, lambda s, x: x.grad, fast_samples=1))
def test_gradient_matches_torch_autograd(spec, sample, dtype, upstream):
    assert "return_grad" in spec.results, f"{spec.name}: a grad sample, but no return_grad"
    args, kwargs = map_call(sample.args, sample.kwargs, cast_float(dtype))
    before = map_call(args, kwargs, np.copy)
    rng = np.random.default_rng(7)
    want, wrt = _reference(spec, args, kwargs, TUPLE_GRAD_ARGS)
    # The objective: sum(g * part) over the differentiated parts (see the module docstring).
    upstream_params = {"out": "grad_output"}
    upstream_params.update({part: f"grad_{part.removeprefix('return_')}" for part in want
                            if part != "out"
                            and f"grad_{part.removeprefix('return_')}" in spec.signature(
                            ).parameters})
    objective = torch.zeros((), dtype=torch.float64)
    grad_kwargs = {}
    for part, param in upstream_params.items():
        if part == "out" and upstream == "default":
            g = torch.ones_like(want[part])
        else:
            g_np = _upstream(rng, want[part], dtype)
            grad_kwargs[param] = g_np
            g = torch.from_numpy(g_np.astype(np.float64))
        objective = objective + (g * want[part]).sum()

    got = result_parts(spec, _call(spec, args, {**kwargs, **grad_kwargs, "return_grad": True}),
                       {**kwargs, "return_grad": True})
    for part, expected in want.items():  # asking for the gradient changes no other result
        assert_close(got[part], expected.detach(), dtype, f"{spec.name} {part}")

    grad = got["return_grad"]
    names = TUPLE_GRAD_ARGS if isinstance(grad, tuple) else ("input",)
    grads = grad if isinstance(grad, tuple) else (grad,)
    assert len(grads) == len(names), (
        f"{spec.name}: {len(grads)} gradients; the tests take them as those of {names} "
        f"(extend TUPLE_GRAD_ARGS for a new convention)")
    expected = dict(zip(wrt, torch.autograd.grad(objective, tuple(wrt.values()))))
    for name, g in zip(names, grads):
        if name not in expected:
            assert g is None, f"{spec.name}: a gradient for {name}, which was not passed"
            continue
        assert_close(g, expected[name], dtype, f"{spec.name} grad of {name}", kind="grad")
    assert_unwritten((args, kwargs), before, spec.name)
