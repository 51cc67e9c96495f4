"""A fake device backend for the host-sync tests: arrays that refuse every host read.

:class:`DeviceArray` holds a NumPy array but, like a GPU array, gives only its metadata to the
host: ``int``, ``float``, ``bool``, ``.item()``, ``.get()``, ``.tolist()`` and NumPy conversion
raise :class:`HostSync`. Arithmetic, methods and the :data:`XP` namespace (every NumPy
function) work on the device data and return device arrays, so the real front end (option
checks, canonical arrays, result shaping) runs on them unchanged.

The kernels of :class:`FakeDevice` are stand-ins derived from the CPU backend's kernels
(:func:`standin`): each runs the real CPU kernel on the device data and hands its outputs back
as device arrays. A new op's kernels therefore need no stand-in written by hand, and the
results can be compared with the NumPy call.

The module is named ``fakedevice`` and :class:`DeviceArray` is defined here, so
``nblosses``' array-module lookup (``type(a).__module__``) sends these arrays to the backend
whose ``array_modules`` is ``("fakedevice",)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

import nblosses

__all__ = ["XP", "DeviceArray", "FakeDevice", "HostSync", "registered", "standin",
           "to_device"]


class HostSync(AssertionError):
    """A device value was read on the host."""


#: Attributes of a NumPy array that read its data on the host (refused by DeviceArray).
_HOST_READS = frozenset({"item", "tolist", "get", "tobytes", "tofile", "dump", "dumps",
                         "data", "ctypes", "view", "base"})


class DeviceArray:
    """A NumPy array that cannot be read on the host: metadata only, like a GPU array.

    Parameters
    ----------
    data : array_like
        The array's contents ("on the device").
    """

    # NumPy defers binary operators with an ndarray on the left to this class.
    __array_priority__ = 100
    __hash__ = object.__hash__  # __eq__ is elementwise below

    def __init__(self, data: Any) -> None:
        self._d = np.asarray(data)

    def _sync(self, *args: Any, **kwargs: Any) -> Any:
        raise HostSync("a device value was read on the host")

    __int__ = __float__ = __bool__ = __index__ = __complex__ = __array__ = _sync
    item = tolist = get = _sync

    def __len__(self) -> int:
        return len(self._d)  # metadata

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self._d.shape}, dtype={self._d.dtype})"

    def __getattr__(self, name: str) -> Any:
        # Dunders are looked up on the type; refusing them here keeps NumPy from finding
        # __array_interface__, __dlpack__ and the like (which would read the data).
        if name.startswith("__") or name in _HOST_READS or name == "_d":
            raise AttributeError(name)
        attr = getattr(self._d, name)
        if callable(attr):
            return lambda *args, **kwargs: to_device(attr(*unwrap(args), **unwrap(kwargs)))
        return to_device(attr)  # shape, dtype, flags, T, strides...: as NumPy has them

    def __setitem__(self, key: Any, value: Any) -> None:
        self._d[unwrap(key)] = unwrap(value)


def _operator(name: str) -> Callable[..., Any]:
    def method(self: DeviceArray, *args: Any) -> Any:
        out = getattr(self._d, name)(*unwrap(args))
        if out is self._d:  # in-place operators return the array itself
            return self
        return NotImplemented if out is NotImplemented else to_device(out)
    method.__name__ = name
    return method


for _name in ("__getitem__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
              "__and__", "__or__", "__xor__", "__invert__", "__neg__", "__pos__", "__abs__",
              "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__",
              "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__iadd__", "__isub__",
              "__imul__", "__itruediv__"):
    setattr(DeviceArray, _name, _operator(_name))


def unwrap(value: Any) -> Any:
    """``value`` with every :class:`DeviceArray` (in tuples, lists and dicts too) replaced by
    its NumPy data."""
    if isinstance(value, DeviceArray):
        return value._d
    if isinstance(value, (tuple, list)):
        return type(value)(unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def to_device(value: Any, known: dict[int, DeviceArray] | None = None,
              scalars: bool = True) -> Any:
    """``value`` with every NumPy array (in tuples and lists too) as a :class:`DeviceArray`.

    ``known``: ``id(numpy array) -> DeviceArray`` of arrays that already have a wrapper (a
    kernel's output that is one of its inputs, e.g. a ``grad_buffer``, comes back as the
    caller's own object). ``scalars``: NumPy scalars become 0-d device arrays too (a value
    computed from device data stays on the device); ``False`` for values computed from host
    values alone (``xp.prod(shape)``), which the host may read.
    """
    if isinstance(value, np.ndarray) or (scalars and isinstance(value, np.generic)):
        if known is not None and id(value) in known:
            return known[id(value)]
        return DeviceArray(value)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, known, scalars) for v in value)
    return value


class _Namespace:
    """The fake device's array namespace: NumPy's functions on device data, returning device
    arrays (a NumPy scalar computed from device data stays on the device as a 0-d array, as
    CuPy's would); NumPy's types and constants as they are."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # np.dtype, np.float32, np.finfo, np.pi...

        def function(*args: Any, **kwargs: Any) -> Any:
            known = {id(v._d): v for v in _device_arrays((args, kwargs))}
            return to_device(attr(*unwrap(args), **unwrap(kwargs)), known, bool(known))
        return function


#: The array namespace (``Runtime.xp``) of the fake device.
XP = _Namespace()


def _asarray(a: Any, dtype: Any = None) -> DeviceArray:
    if isinstance(a, DeviceArray):
        return a if dtype is None else a.astype(dtype)
    return DeviceArray(np.asarray(a, dtype=dtype))  # a host value uploaded: fine


def standin(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """A device kernel standing in for ``kernel`` (a CPU kernel of the same protocol): it runs
    ``kernel`` on the device data of its arguments and returns its outputs as device arrays,
    so they have the real kernel's shapes, dtypes and values. An output that is one of the
    arguments (a ``grad_buffer`` written in place) comes back as that argument's wrapper."""
    def device_kernel(*args: Any, **kwargs: Any) -> Any:
        known = {id(v._d): v for v in _device_arrays((args, kwargs))}
        return to_device(kernel(*unwrap(args), **unwrap(kwargs)), known)
    device_kernel.__name__ = getattr(kernel, "__name__", "kernel")
    return device_kernel


def _device_arrays(value: Any) -> Iterator[DeviceArray]:
    if isinstance(value, DeviceArray):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _device_arrays(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _device_arrays(v)


class FakeDevice(nblosses.Backend):
    """A device backend whose arrays are :class:`DeviceArray` and whose kernels check class
    indices and probability ranges themselves (so the front end must not read them)."""

    name = "fakedevice"
    array_modules = ("fakedevice",)

    def build(self) -> nblosses.Runtime:
        from nblosses.backends.cpu import KERNELS

        return self.runtime({name: standin(k) for name, k in KERNELS.items()})

    def runtime(self, kernels: dict[str, Callable[..., Any]]) -> nblosses.Runtime:
        """A runtime of this backend with ``kernels`` (tests that replace a kernel)."""
        return nblosses.Runtime(self, xp=XP, asarray=_asarray, kernels=kernels,
                                kernel_checks={"class_index", "probability_range"})


@contextmanager
def registered() -> Iterator[None]:
    """The fake device registered as backend ``"fakedevice"`` for the duration."""
    nblosses.register_backend(FakeDevice())
    try:
        yield
    finally:
        nblosses.unregister_backend("fakedevice")
