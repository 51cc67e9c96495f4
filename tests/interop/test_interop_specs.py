"""Every op with torch tensors and JAX arrays in, generated from the op specs.

For each spec and each of its samples (``return_grad=True`` for samples with ``grad=True``):
torch tensors in (float32 and float64) and JAX arrays in (float32, integers as JAX holds them:
int32 while x64 is off) give results of the same kind (``None`` entries kept), in the input's
dtype, equal to the NumPy call on the same values, and the inputs are unchanged. The
hand-written interop tests (zero copy, grad_buffer, streams, devices) are in
``test_interop.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import assert_close, assert_unwritten, cast_float, leaves, map_call, sample_params

from nblosses import functional as F
from nblosses.ops import SPECS

torch = pytest.importorskip("torch")

PARAMS = sample_params(SPECS, fast_samples=2)


def _flags(sample: Any) -> dict[str, bool]:
    return {"return_grad": True} if sample.grad else {}


def _check_same(spec: Any, got: Any, want: Any, is_kind: Any, dtype: str) -> None:
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want), f"{spec.name}: {len(got)} results, NumPy gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{spec.name}: result {i} should be None"
            continue
        assert is_kind(g), f"{spec.name}: result {i} is a {type(g).__module__}.{type(g).__name__}"
        # The same kernels on the same values: 1/20 of the table's tolerance (float32: rtol
        # 1e-6, atol 5e-8), which leaves room only for a different summation order.
        assert_close(np.asarray(g), w, dtype, f"{spec.name} result {i}", scale=0.05,
                     rscale=0.05)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("spec", "sample"), PARAMS)
def test_torch_in_torch_out(spec, sample, dtype):
    args, kwargs = map_call(sample.args, sample.kwargs, cast_float(dtype))
    want = getattr(F, spec.name)(*args, **kwargs, **_flags(sample))
    before = map_call(args, kwargs, np.copy)
    t_args, t_kwargs = map_call(args, kwargs, torch.from_numpy)
    got = getattr(F, spec.name)(*t_args, **t_kwargs, **_flags(sample))
    _check_same(spec, got, want,
                lambda g: isinstance(g, torch.Tensor) and g.device.type == "cpu", dtype)
    assert_unwritten((t_args, t_kwargs), before, spec.name)


# JAX compiles per call signature (~2-5 s per sample): each op's first sample is fast.
@pytest.mark.parametrize(("spec", "sample"), sample_params(SPECS, fast_samples=1))
def test_jax_in_jax_out(spec, sample):
    jnp = pytest.importorskip("jax.numpy")
    t_args, t_kwargs = map_call(sample.args, sample.kwargs, jnp.asarray)
    # The NumPy call on the very values JAX holds (float32, and int32 while x64 is off).
    args, kwargs = map_call(t_args, t_kwargs, np.asarray)
    want = getattr(F, spec.name)(*args, **kwargs, **_flags(sample))
    got = getattr(F, spec.name)(*t_args, **t_kwargs, **_flags(sample))
    _check_same(spec, got, want, lambda g: type(g).__module__.startswith("jax"), "float32")
    assert_unwritten((t_args, t_kwargs), (args, kwargs), spec.name)
