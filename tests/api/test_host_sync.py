"""No call on a device backend reads a device value on the host (which would wait for the GPU):
the cases the generic test (``test_host_sync_specs.py``, every op's samples) does not make.

The fake device (:mod:`fakedevice`) holds its arrays in a :class:`~fakedevice.DeviceArray`,
which refuses every conversion to a host value (``int``, ``float``, ``bool``, ``.item()``,
``.get()``, NumPy conversion); its kernels are the CPU kernels run on the device data. Only
``validate="sync"`` and ``nblosses.synchronize()`` may read the device.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakedevice import XP, DeviceArray, FakeDevice, HostSync, registered

import nblosses
from nblosses import functional as F


@pytest.fixture(scope="module", autouse=True)
def fake_device():
    with registered():
        yield


def dev(a):
    return DeviceArray(a)


R = np.random.default_rng(0)
X = R.standard_normal((4, 5, 3))
T = R.integers(0, 5, (4, 3))
P = R.uniform(0, 1, (4, 5, 3))
G = R.standard_normal((4, 3))


#: Calls beyond the specs' samples (negative and last-axis dims, a weighted mean, a (1,)-shaped
#: upstream gradient of a reduced loss, the LM head's logsumexp, a broadcast BCE weight with
#: the mean). The cases the samples make (every op, its gradient, a device upstream gradient,
#: a device grad_buffer) are in test_host_sync_specs.py.
CALLS = {
    "log_softmax": lambda: F.log_softmax(dev(X), -1),
    "log_softmax_backward": lambda: F.log_softmax_backward(dev(X), dev(X), 2),
    "nll_loss": lambda: F.nll_loss(dev(X), dev(T), weight=dev(np.ones(5))),
    "nll_loss device grad_output": lambda: F.nll_loss(
        dev(X), dev(T), reduction="sum", return_grad=True, grad_output=dev(np.array([0.5]))),
    "linear_cross_entropy": lambda: F.linear_cross_entropy(
        dev(X[:, :, 0]), dev(X[0].T), dev(T[:, 0]), linear_bias=dev(np.ones(3)),
        return_grad=True, return_lse=True, grad_output=dev(np.array(2.0))),
    "bce": lambda: F.binary_cross_entropy(dev(P), dev(P), weight=dev(np.ones(3)),
                                          return_grad=True),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_device_call_never_reads_the_device(name):
    CALLS[name]()


def test_sync_validation_is_the_one_that_reads():
    with pytest.raises(HostSync):
        F.cross_entropy(dev(X), dev(T), validate="sync")
    with nblosses.use_validation("sync"), pytest.raises(HostSync):
        F.nll_loss(dev(X), dev(T))
    with pytest.raises(HostSync):
        F.binary_cross_entropy(dev(P), dev(P), validate="sync")
    with pytest.raises(HostSync):
        F.linear_cross_entropy(dev(X[:, :, 0]), dev(X[0].T), dev(T[:, 0]), validate="sync")


def test_device_grad_output_scales_the_gradient_on_the_device():
    """A reduced loss's device ``grad_output`` reaches the kernel as 1.0; the gradient is then
    multiplied by it on the device (the stand-in kernel's gradient is zeros: give it ones)."""
    seen = {}

    def ones_grad(x, t, w, *extra, reduction, want_grad, grad_output, grad_buffer=None, **kw):
        seen["grad_output"] = grad_output
        return XP.zeros((), dtype=x.dtype), XP.ones(x.shape, dtype=x.dtype)

    be = FakeDevice().runtime({"cross_entropy": ones_grad})
    from nblosses import _dispatch
    from nblosses.ops import SPECS

    op = SPECS["cross_entropy"]
    values = dict(op.signature().bind(dev(X), dev(T), return_grad=True,
                                      grad_output=dev(np.array(2.5))).arguments)
    for p in op.signature().parameters.values():
        values.setdefault(p.name, p.default)
    _, grad = op.runner(be, op, values, _dispatch.checked_options(op, values))
    assert seen["grad_output"] == 1.0
    np.testing.assert_array_equal(grad._d, np.full(X.shape, 2.5))


def test_the_fake_catches_a_host_read():
    with pytest.raises(HostSync):
        float(dev(X).max())
