"""Every op on Dask arrays equals the NumPy call, generated from the op specs.

For each spec with a Dask plan (``spec.dask``) and each of its samples: the sample's arrays
become Dask arrays (chunks from ``Sample.dask_chunks``, else two chunks along the first axis),
the call builds a graph without computing anything (a scheduler that refuses to run is
installed during the call) and returns Dask arrays, and the computed result equals the NumPy
call's, values and, for samples with ``grad=True``, gradients. The meta-test
(``tests/tooling/test_meta.py``) fails for a spec without a Dask plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import assert_close, leaves, map_arrays, sample_params, to_numpy

from nblosses import functional as F
from nblosses.ops import SPECS

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'dask[array]')")
import dask  # noqa: E402


def _two_chunks(a: np.ndarray) -> tuple[int, ...]:
    """Two chunks along the first axis (one when it has a single element), the rest whole."""
    return ((a.shape[0] + 1) // 2,) + a.shape[1:] if a.ndim else ()


def _to_dask(value: Any, chunks: Any) -> Any:
    """``value``'s arrays as Dask arrays: ``chunks`` given (a tuple of chunk specs, one per
    element, for a tuple-valued argument), or :func:`_two_chunks`."""
    if isinstance(value, tuple) and chunks is not None:
        return tuple(_to_dask(v, c) for v, c in zip(value, chunks))
    return map_arrays(value, lambda a: da.from_array(
        a, chunks=_two_chunks(a) if chunks is None else chunks))


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a Dask graph was computed during the call (it must stay lazy)")


def _params() -> list[Any]:
    return [pytest.param(*p.values, return_grad, id=f"{p.id}-{'grad' if return_grad else 'fwd'}")
            for p in sample_params({n: s for n, s in SPECS.items() if s.dask is not None},
                                    fast_samples=2)
            for return_grad in ([False, True] if p.values[1].grad else [False])]


@pytest.mark.parametrize(("spec", "sample", "return_grad"), _params())
def test_dask_matches_numpy(spec, sample, return_grad):
    chunks = sample.dask_chunks or {}
    names = list(spec.signature().parameters)
    args = tuple(_to_dask(a, chunks.get(name)) for name, a in zip(names, sample.args))
    kwargs = {k: _to_dask(v, chunks.get(k)) for k, v in sample.kwargs.items()}
    extra = {"return_grad": True} if return_grad else {}
    with dask.config.set(scheduler=_refuse):
        lazy = getattr(F, spec.name)(*args, **kwargs, **extra)
    want = leaves(getattr(F, spec.name)(*sample.args, **sample.kwargs, **extra))
    got = leaves(lazy)
    assert len(got) == len(want), f"{spec.name}: {len(got)} results, NumPy gives {len(want)}"
    assert all(isinstance(g, da.Array) for g, w in zip(got, want) if w is not None), (
        f"{spec.name}: a result is not a Dask array: {[type(g).__name__ for g in got]}")
    computed = iter(dask.compute(*(g for g in got if g is not None), scheduler="threads"))
    for i, w in enumerate(want):
        if w is None:
            assert got[i] is None, f"{spec.name}: result {i} should be None"
            continue
        assert_close(to_numpy(next(computed)), w, w.dtype, f"{spec.name} result {i}")
