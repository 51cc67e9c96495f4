"""Foreign arrays in and out by DLPack: torch tensors, JAX arrays, any array-API array.

:func:`nblosses._dispatch.call` sends a call here when one of its arrays is neither NumPy,
CuPy nor Dask but has ``__dlpack__``. Each such array is viewed without a copy as the array
type of its device (``numpy.from_dlpack`` on the CPU, ``cupy.from_dlpack`` on a CUDA device),
the backend follows the device (CPU -> ``"cpu"``, CUDA -> ``"cuda"``) unless the caller chose
one, the call runs on those views, and every array result comes back as the caller's array
type on the caller's device, again without a copy.

Rules (documented in ``docs/interop.rst``):

- Inputs are only read (read-only exports, like JAX's, are fine: the kernels get writeable
  aliases of them, see :func:`writeable_alias`); ``grad_buffer`` must be a
  writeable export (a torch tensor, not a JAX array) and is written through; the result then
  holds the caller's object itself.
- NumPy arrays, lists and scalars beside a foreign array (a NumPy ``weight`` beside torch
  logits) are taken as they are and moved to the device when it is a GPU, as nblosses' own
  front ends take array-likes. Foreign arrays of two libraries (torch and JAX) or of two
  devices in one call raise ``TypeError`` / ``ValueError``.
- torch tensors that require grad are refused (``TypeError``): these functions are not
  recorded by autograd; :mod:`nblosses.torch` has the differentiable versions.
- With torch CUDA tensors the kernels run on torch's current stream (no synchronisation).

torch, JAX and CuPy are imported only here, and only when one of their arrays is seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ._registry import array_module, get_backend

__all__ = ["call", "is_foreign"]

# DLDeviceType codes (dlpack.h) this module maps to a backend.
CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_BACKEND = {CPU: "cpu", CUDA_HOST: "cpu", CUDA: "cuda", CUDA_MANAGED: "cuda"}
_NATIVE = frozenset({"numpy", "cupy", "dask", "builtins"})

Values = dict[str, Any]
NativeCall = Callable[[Any, Values], Any]


def is_foreign(value: Any) -> bool:
    """Whether ``value`` is an array nblosses takes by DLPack (not NumPy, CuPy or Dask)."""
    return hasattr(value, "__dlpack__") and array_module(value) not in _NATIVE


def call(op: Any, values: Values, native_call: NativeCall) -> Any:
    """Run ``op`` on ``values`` holding foreign arrays; results in the caller's array type.

    Parameters
    ----------
    op : nblosses._ops.Op
        The op being called.
    values : dict
        Every parameter of the call by name, as the caller passed them.
    native_call : callable
        ``native_call(op, values)`` runs the op on NumPy / CuPy arrays.

    Returns
    -------
    object
        ``native_call``'s result with each array converted back (element-wise in tuples,
        nested ones included);
        a ``grad_buffer`` the caller passed comes back as the caller's own object.
    """
    # A tuple value (a top-k teacher) holds arrays too: its elements are named "name[i]".
    foreign = {key: v for name, value in values.items()
               for key, v in _elements(name, value) if is_foreign(v)}
    library, device = _common_origin(foreign)
    adapter = _adapter(library, next(iter(foreign.values())))
    native = dict(values)
    native["backend"] = _backend_for(values["backend"], device)
    if "dtype" in values and values["dtype"] is not None:
        native["dtype"] = adapter.native_dtype(values["dtype"], _DEVICE_BACKEND[device[0]] == "cpu")
    with adapter.kernel_context(device):
        for name, value in values.items():
            items = _elements(name, value)
            if any(key in foreign for key, _ in items):
                converted = tuple(_to_native(adapter, v, device, writeable=name == "grad_buffer")
                                  if key in foreign else v for key, v in items)
                native[name] = converted if type(value) is tuple else converted[0]
        result = native_call(op, native)
    return _from_native(adapter, result, (native.get("grad_buffer"), values.get("grad_buffer")))


def _elements(name: str, value: Any) -> list[tuple[str, Any]]:
    """``[(key, array)]``: the value itself, or each element of a tuple as ``name[i]``."""
    if type(value) is tuple:
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [(name, value)]


# ----------------------------------------------------------------------------- checks
def _library(value: Any) -> str:
    module = array_module(value)
    return "jax" if module == "jaxlib" else module


def _device(value: Any) -> tuple[int, int]:
    kind, index = value.__dlpack_device__()
    return int(kind), int(index)


def _common_origin(foreign: Values) -> tuple[str, tuple[int, int]]:
    """The one library and device of the foreign arrays; ``TypeError`` / ``ValueError`` if
    they mix libraries or devices (as torch refuses tensors on two devices)."""
    origins = {name: (_library(v), _device(v)) for name, v in foreign.items()}
    libraries = sorted({lib for lib, _ in origins.values()})
    if len(libraries) > 1:
        described = ", ".join(f"{name}: {type(foreign[name]).__module__}."
                              f"{type(foreign[name]).__name__}" for name in origins)
        raise TypeError(f"arrays of different libraries in one call ({described}); convert "
                        "them to one library (NumPy arrays and lists may accompany any)")
    devices = sorted({dev for _, dev in origins.values()})
    if len(devices) > 1:
        raise ValueError(f"arrays on different devices in one call "
                         f"({', '.join(_device_name(d) for d in devices)}); move them to one")
    device = devices[0]
    if device[0] not in _DEVICE_BACKEND:
        raise TypeError(f"{libraries[0]} arrays on {_device_name(device)} are not supported; "
                        "nblosses runs on the CPU and on CUDA devices")
    return libraries[0], device


def _device_name(device: tuple[int, int]) -> str:
    names = {CPU: "cpu", CUDA: "cuda", CUDA_HOST: "cuda_host", CUDA_MANAGED: "cuda_managed"}
    return f"{names.get(device[0], f'DLPack device type {device[0]}')}:{device[1]}"


def _backend_for(requested: str | None, device: tuple[int, int]) -> str:
    """The caller's backend (or the current default), else the device's; ``ValueError`` when
    a built-in backend cannot reach the device."""
    name = requested if requested is not None else get_backend()
    wanted = _DEVICE_BACKEND[device[0]]
    if name == "auto":
        return wanted
    if name in ("cpu", "cuda") and name != wanted:
        raise ValueError(f"backend {name!r} cannot take arrays on {_device_name(device)}; "
                         f"use backend={wanted!r} or move the arrays")
    return name


# ----------------------------------------------------------------------------- conversion
def _to_native(adapter: Adapter, value: Any, device: tuple[int, int], writeable: bool) -> Any:
    on_cpu = _DEVICE_BACKEND[device[0]] == "cpu"
    value = adapter.exportable(value, on_cpu, writeable)
    if on_cpu:
        import numpy

        view = numpy.from_dlpack(value)
        if writeable and not view.flags.writeable:
            raise TypeError(f"grad_buffer must be writeable; this {type(value).__name__} is "
                            "exported read-only (JAX arrays are immutable: leave grad_buffer "
                            "out and use the returned gradient)")
        return view if view.flags.writeable else writeable_alias(view)
    import cupy

    return cupy.from_dlpack(value)


def writeable_alias(view: Any) -> Any:
    """A writeable NumPy array over the memory of the read-only ``view`` (JAX's exports).

    Nothing writes an input (tests/api/test_errors.py checks every op), but a read-only array
    is another Numba type: each kernel would compile a second time for these views beside
    its build for NumPy arrays. The alias does not keep the exporter alive: the caller holds
    it for the call, and no result is an input."""
    import ctypes

    import numpy

    if not view.size:
        return numpy.empty(view.shape, view.dtype)
    extents = [(n - 1) * s for n, s in zip(view.shape, view.strides)]
    lo = sum(e for e in extents if e < 0)
    hi = sum(e for e in extents if e > 0) + view.itemsize
    memory = (ctypes.c_char * (hi - lo)).from_address(view.__array_interface__["data"][0] + lo)
    return numpy.ndarray(view.shape, view.dtype, buffer=memory, offset=-lo,
                         strides=view.strides)


def _from_native(adapter: Adapter, result: Any, buffer: tuple[Any, Any]) -> Any:
    """``result`` with every NumPy / CuPy array (in nested tuples too) converted back."""
    if isinstance(result, tuple):
        return tuple(_from_native(adapter, r, buffer) for r in result)
    if buffer[0] is not None and result is buffer[0]:
        return buffer[1]
    if array_module(result) in ("numpy", "cupy"):
        return adapter.from_dlpack(result)
    return result


class Adapter:
    """How one foreign library exports, imports and orders its work (the array-API default:
    ``x.__array_namespace__().from_dlpack``)."""

    def __init__(self, namespace: Callable[[], Any]) -> None:
        self._namespace = namespace

    def exportable(self, value: Any, on_cpu: bool, writeable: bool) -> Any:
        """``value`` ready for ``__dlpack__`` (or an error saying why it cannot be)."""
        return value

    def native_dtype(self, dtype: Any, on_cpu: bool) -> Any:
        """The NumPy / CuPy dtype for a caller's ``dtype=`` argument."""
        return dtype

    def from_dlpack(self, array: Any) -> Any:
        """A NumPy / CuPy result as this library's array, sharing memory when it can."""
        return self._namespace().from_dlpack(array)

    def kernel_context(self, device: tuple[int, int]) -> contextlib.AbstractContextManager[Any]:
        """Context the conversions and kernels run in (the library's CUDA stream)."""
        return contextlib.nullcontext()


class TorchAdapter(Adapter):
    """torch tensors: ``torch.from_dlpack`` back, torch dtypes accepted, torch's stream.

    bfloat16 on the CPU (NumPy has no such dtype) is computed in float32, as the CPU backend
    computes float16: the inputs are converted (a copy) and float results converted back.
    """

    def __init__(self) -> None:
        import torch

        super().__init__(lambda: torch)
        self._torch = torch
        self._restore: Any = None

    def exportable(self, value: Any, on_cpu: bool, writeable: bool) -> Any:
        if value.requires_grad:
            raise TypeError("nblosses.functional does not record torch autograd: pass "
                            "tensor.detach(), or use nblosses.torch (torch.autograd versions)")
        if on_cpu and value.dtype == self._torch.bfloat16:
            if writeable:
                raise TypeError("a bfloat16 grad_buffer cannot be written on the CPU (NumPy "
                                "has no bfloat16); leave it out or pass a float32 one")
            self._restore = value.dtype
            return value.float()
        return value

    def native_dtype(self, dtype: Any, on_cpu: bool) -> Any:
        if dtype == self._torch.bfloat16:
            if not on_cpu:
                return "bfloat16"
            self._restore = dtype
            return "float32"
        if isinstance(dtype, self._torch.dtype):
            return self._torch.empty(0, dtype=dtype).numpy().dtype
        return dtype

    def from_dlpack(self, array: Any) -> Any:
        tensor = self._torch.from_dlpack(array)
        if self._restore is not None and tensor.is_floating_point():
            return tensor.to(self._restore)
        return tensor

    def kernel_context(self, device: tuple[int, int]) -> contextlib.AbstractContextManager[Any]:
        if device[0] not in (CUDA, CUDA_MANAGED):
            return contextlib.nullcontext()
        import cupy

        return cuda_stream_context(cupy, device[1], self._torch.cuda.current_stream(device[1]))


@contextlib.contextmanager
def cuda_stream_context(cupy: Any, device_id: int, stream: Any) -> Iterator[Any]:
    """Make ``stream`` (another library's CUDA stream on ``device_id``, e.g. torch's current
    one) CuPy's current stream, so DLPack exchanges need no synchronisation and the kernels
    queue behind the caller's work. Unmeasured: written without a GPU to run it on.

    CuPy >= 14 wraps it through the CUDA stream protocol (``__cuda_stream__``); older CuPy
    through ``ExternalStream`` and the raw pointer.
    """
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        cupy_stream = cupy.cuda.Stream.from_external(stream)
    else:
        cupy_stream = cupy.cuda.ExternalStream(stream.cuda_stream, device_id)
    with cupy.cuda.Device(device_id), cupy_stream:
        yield cupy_stream


def _adapter(library: str, sample: Any) -> Adapter:
    if library == "torch":
        return TorchAdapter()
    if hasattr(sample, "__array_namespace__"):  # JAX, array-API libraries
        return Adapter(sample.__array_namespace__)
    import importlib

    return Adapter(lambda: importlib.import_module(library))
