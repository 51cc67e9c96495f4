"""No op reads a device value on the host, generated from the op specs.

Every spec's samples run through the real front end on the fake device of
:mod:`fakedevice` (arrays that raise on any host read; kernels derived from the CPU kernels);
samples with ``grad=True`` also with ``return_grad=True``, with the upstream gradient held on
the device and, where the op takes one, with a ``grad_buffer`` on the device.
No call may read the device, every result must come back on the device, and, since the
stand-in kernels compute the CPU kernels' values, the results must equal the NumPy call's.
Hand-written cases (``validate="sync"`` reads, the device ``grad_output`` scale) are in
``test_host_sync.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fakedevice import DeviceArray, registered
from helpers import assert_close, leaves, map_call, result_parts, sample_params

from nblosses import functional as F
from nblosses.ops import SPECS


@pytest.fixture(scope="module", autouse=True)
def fake_device():
    with registered():
        yield


def _variants(spec: Any, sample: Any) -> list[str]:
    if not sample.grad:
        return ["plain"]
    out = ["plain", "grad", "device_grad_output"]
    if "grad_buffer" in spec.signature().parameters:
        out.append("grad_buffer")
    return out


# Each op's first two samples fast (its options and, where it has one, its gradient); the
# fake device's kernels compile per call signature.
PARAMS = [pytest.param(*p.values, variant, id=f"{p.id}-{variant}", marks=p.marks)
          for p in sample_params(SPECS, fast_samples=1) for variant in _variants(*p.values)]


@pytest.mark.parametrize(("spec", "sample", "variant"), PARAMS)
def test_device_call_never_reads_the_device(spec, sample, variant):
    extra: dict[str, Any] = {} if variant == "plain" else {"return_grad": True}
    want = getattr(F, spec.name)(*sample.args, **sample.kwargs, **extra)
    if variant == "device_grad_output":
        out = result_parts(spec, want, {**sample.kwargs, **extra})["out"]
        extra["grad_output"] = np.linspace(0.5, 2.0, out.size).reshape(out.shape)
        want = getattr(F, spec.name)(*sample.args, **sample.kwargs, **extra)
    args, kwargs = map_call(sample.args, sample.kwargs, DeviceArray)
    device_extra = {k: DeviceArray(v) if isinstance(v, np.ndarray) else v
                    for k, v in extra.items()}
    if variant == "grad_buffer":
        device_extra["grad_buffer"] = buffer = DeviceArray(np.zeros_like(sample.args[0]))
    got = getattr(F, spec.name)(*args, **kwargs, **device_extra)
    if variant == "grad_buffer":
        assert result_parts(spec, got, {**sample.kwargs, **extra})["return_grad"] is buffer
    got_leaves, want_leaves = leaves(got), leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if w is None:
            assert g is None, f"{spec.name}: result {i} should be None"
            continue
        assert isinstance(g, DeviceArray), f"{spec.name}: result {i} came back on the host"
        assert_close(g._d, w, w.dtype, f"{spec.name} result {i}")
