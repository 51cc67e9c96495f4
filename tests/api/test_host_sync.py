"""No call on a device backend reads a device value on the host (which would wait for the GPU).

A fake device backend holds its arrays in :class:`DeviceArray`, which refuses every conversion
to a host value (``int``, ``float``, ``bool``, ``.item()``, ``.get()``, NumPy conversion). Every
op runs through the real front end (option checks, canonical arrays, result shaping) on it; the
kernels are stand-ins of the right shapes. Only ``validate="sync"`` and
``nblosses.synchronize()`` may read the device.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import nblosses
from nblosses import functional as F


class HostSync(AssertionError):
    """A device value was read on the host."""


class DeviceArray:
    """A NumPy array that cannot be read on the host: metadata only, like a GPU array."""

    __array_priority__ = 100

    def __init__(self, data):
        self._d = np.asarray(data)

    shape = property(lambda self: self._d.shape)
    ndim = property(lambda self: self._d.ndim)
    dtype = property(lambda self: self._d.dtype)
    size = property(lambda self: self._d.size)
    flags = property(lambda self: self._d.flags)

    def _sync(self, *args, **kwargs):
        raise HostSync("a device value was read on the host")

    __int__ = __float__ = __bool__ = __index__ = __array__ = _sync
    item = tolist = get = _sync



def _device_method(name):
    """``DeviceArray.name``: NumPy's method on the device data, the result on the device."""
    def method(self, *args, **kwargs):
        args = [a._d if isinstance(a, DeviceArray) else a for a in args]
        return DeviceArray(getattr(self._d, name)(*args, **kwargs))
    return method


for _name in ("astype", "reshape", "min", "max", "sum", "copy", "__getitem__", "__lt__",
              "__ge__", "__ne__", "__and__", "__or__", "__mul__"):
    setattr(DeviceArray, _name, _device_method(_name))
DeviceArray.__module__ = "fakedevice"


def _unwrap(a):
    return a._d if isinstance(a, DeviceArray) else a


def _xp_function(name):
    def fn(*args, **kwargs):
        out = getattr(np, name)(*map(_unwrap, args), **kwargs)
        return DeviceArray(out) if isinstance(out, np.ndarray) else out
    return fn


def _multiply(a, b, out):
    np.multiply(_unwrap(a), _unwrap(b), out=_unwrap(out))
    return out


XP = types.SimpleNamespace(
    dtype=np.dtype, float32=np.float32, float64=np.float64, int64=np.int64, multiply=_multiply,
    **{n: _xp_function(n) for n in ("empty", "ones", "zeros", "ascontiguousarray",
                                    "broadcast_to", "argmax", "full")})


def _asarray(a, dtype=None):
    if isinstance(a, DeviceArray):
        return a if dtype is None else a.astype(dtype)
    return DeviceArray(np.asarray(a, dtype=dtype))  # a host value uploaded: fine


def _loss_kernel(x, t, w, *extra, reduction, want_grad, grad_output, grad_buffer=None,
                 lse_out=None, **options):
    n = x.shape[0]
    loss = XP.zeros(() if reduction != "none" else (n,) + x.shape[2:], dtype=x.dtype)
    grad = None
    if want_grad:
        grad = grad_buffer if grad_buffer is not None else XP.zeros(x.shape, dtype=x.dtype)
    return loss, grad


def _linear_kernel(x2, w2, bias, target, weight, *, reduction, want_grad, grad_output,
                   want_lse, **options):
    loss = XP.zeros(() if reduction != "none" else (x2.shape[0],), dtype=x2.dtype)
    grads = None
    if want_grad:
        grads = (XP.zeros(x2.shape, dtype=x2.dtype), XP.zeros(w2.shape, dtype=x2.dtype),
                 None if bias is None else XP.zeros(bias.shape, dtype=x2.dtype))
    return loss, (XP.zeros((x2.shape[0],), dtype=x2.dtype) if want_lse else None), grads


def _same(x, *rest):
    return XP.zeros(x.shape, dtype=x.dtype)


class FakeDevice(nblosses.Backend):
    name = "fakedevice"
    array_modules = ("fakedevice",)

    def build(self):
        kernels = {op: _same for op in ("softmax", "log_softmax", "softmax_backward",
                                        "log_softmax_backward", "sigmoid", "sigmoid_backward")}
        kernels.update({op: _loss_kernel for op in (
            "nll_loss", "cross_entropy", "cross_entropy_probs", "binary_cross_entropy",
            "binary_cross_entropy_with_logits")})
        kernels["linear_cross_entropy"] = _linear_kernel
        return nblosses.Runtime(self, xp=XP, asarray=_asarray, kernels=kernels,
                                kernel_checks={"class_index", "probability_range"})


@pytest.fixture(scope="module", autouse=True)
def fake_device():
    nblosses.register_backend(FakeDevice())
    yield
    nblosses.unregister_backend("fakedevice")


def dev(a):
    return DeviceArray(a)


R = np.random.default_rng(0)
X = R.standard_normal((4, 5, 3))
T = R.integers(0, 5, (4, 3))
P = R.uniform(0, 1, (4, 5, 3))
G = R.standard_normal((4, 3))


CALLS = {
    "softmax": lambda: F.softmax(dev(X), 1),
    "log_softmax": lambda: F.log_softmax(dev(X), -1),
    "softmax_backward": lambda: F.softmax_backward(dev(X), dev(X), 1),
    "log_softmax_backward": lambda: F.log_softmax_backward(dev(X), dev(X), 2),
    "sigmoid": lambda: F.sigmoid(dev(X)),
    "sigmoid_backward": lambda: F.sigmoid_backward(dev(X), dev(X)),
    "nll_loss": lambda: F.nll_loss(dev(X), dev(T), weight=dev(np.ones(5))),
    "nll_loss grad none": lambda: F.nll_loss(dev(X), dev(T), reduction="none",
                                             return_grad=True, grad_output=dev(G)),
    "cross_entropy": lambda: F.cross_entropy(dev(X), dev(T), label_smoothing=0.1),
    "cross_entropy grad": lambda: F.cross_entropy(dev(X), dev(T), return_grad=True,
                                                  z_loss=1e-4, softcap=30.0, return_lse=True),
    "cross_entropy grad_buffer": lambda: F.cross_entropy(dev(X), dev(T), return_grad=True,
                                                         grad_buffer=dev(np.zeros_like(X))),
    "cross_entropy probs": lambda: F.cross_entropy(dev(X), dev(P), return_grad=True),
    "cross_entropy device grad_output": lambda: F.cross_entropy(
        dev(X), dev(T), return_grad=True, grad_output=dev(np.array(2.0))),
    "nll_loss device grad_output": lambda: F.nll_loss(
        dev(X), dev(T), reduction="sum", return_grad=True, grad_output=dev(np.array([0.5]))),
    "bce device grad_output": lambda: F.binary_cross_entropy(
        dev(P), dev(P), return_grad=True, grad_output=dev(np.array(3.0))),
    "linear_cross_entropy": lambda: F.linear_cross_entropy(
        dev(X[:, :, 0]), dev(X[0].T), dev(T[:, 0]), linear_bias=dev(np.ones(3)),
        return_grad=True, return_lse=True, grad_output=dev(np.array(2.0))),
    "bce": lambda: F.binary_cross_entropy(dev(P), dev(P), weight=dev(np.ones(3)),
                                          return_grad=True),
    "bce_with_logits": lambda: F.binary_cross_entropy_with_logits(
        dev(X), dev(P), pos_weight=dev(np.ones(3)), return_grad=True),
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

    be = nblosses.Runtime(FakeDevice(), xp=XP, asarray=_asarray,
                          kernels={"cross_entropy": ones_grad},
                          kernel_checks={"class_index"})
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
