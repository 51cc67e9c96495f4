"""nblosses' CPU kernels inside XLA: one FFI target, ``nblosses_cpu``, that runs an
:mod:`nblosses.functional` call on XLA's own buffers.

Why not :func:`jax.pure_callback` (measured on the 2-core Zen 4 this project benches on, JAX
0.10, ``value_and_grad`` of a cross-entropy at 512x[32000] float32): its callback took ~90 ms
around a ~6 ms kernel. JAX hands the callback ``jax.Array`` copies of the operands (~30 ms for
the 65 MB logits), and XLA copies the returned gradient into its output buffer, whose freshly
mapped pages fault in 4 KiB at a time (~20-50 ms). Here XLA calls :func:`_handle` (a
:mod:`ctypes` function pointer registered with :func:`jax.ffi.register_ffi_target`) with
pointers to its buffers: the operands are read in place, through NumPy views, and the
kernels write the results straight into XLA's output buffers (the gradient through the op's
``grad_buffer`` where it has one); large output buffers are advised into transparent huge
pages first, as NumPy does for its own large arrays, so that first touching them costs 2 MiB
faults instead of 4 KiB ones. What is left is the kernel's own traffic.

A call is described by a :class:`Request` (op, array layout, options, whether the gradient is
wanted), travelling as the custom call's string attribute ``request`` (JSON: the compiled
program is self-contained, so JAX's persistent compilation cache stays valid across
processes; an option that is an object in :mod:`nblosses.functional`, torch's chunking
``options`` of the LM heads, travels as the one value it carries). Errors in the call come
back to XLA as FFI errors carrying the Python exception's type and message. On a non-CPU JAX
backend the same request runs through :func:`jax.pure_callback` instead (the arrays travel to
the host and back).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np

from .. import _args, functional
from ..ops import SPECS

__all__ = ["Request", "call", "execute"]

TARGET = "nblosses_cpu"


@dataclass(frozen=True)
class Request:
    """One :mod:`nblosses.functional` call, as the FFI target runs it.

    Parameters
    ----------
    op : str
        The function's name.
    arrays : tuple of (str, int)
        The array arguments in operand order: name and count (0: ``None``, no operand; -1:
        one array; k > 0: a tuple of k arrays, k operands).
    options : tuple of (str, object)
        The other arguments (JSON values: ``None``, bool, int, float, str).
    return_grad : bool
        The call also returns the gradient: its last result (the second of a loss, the third
        of ``token_logprobs`` with ``return_entropy``), or its last results where the op
        returns several gradients (the LM heads' ``(grad_input, grad_linear_weight,
        grad_linear_bias)``: one result each, none for a bias gradient of ``None``).
    """

    op: str
    arrays: tuple[tuple[str, int], ...]
    options: tuple[tuple[str, Any], ...]
    return_grad: bool = False

    @functools.cached_property
    def text(self) -> str:
        """The request as the custom call's attribute."""
        return json.dumps([self.op, self.arrays, self.options, self.return_grad])

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def parse(text: bytes) -> Request:
        op, arrays, options, grad = json.loads(text)
        return Request(op, tuple((n, c) for n, c in arrays), tuple((k, v) for k, v in options),
                       grad)


def call(request: Request, operands: list[Any],
         results: tuple[jax.ShapeDtypeStruct, ...]) -> tuple[Any, ...]:
    """Run ``request`` on ``operands`` (JAX arrays or tracers, in ``request.arrays``' order)
    inside the current JAX program; ``results``: the shapes and dtypes of its results."""
    _register()
    ffi = jax.ffi.ffi_call(TARGET, results, vmap_method="sequential")
    return tuple(jax.lax.platform_dependent(
        *operands, cpu=lambda *ops: ffi(*ops, request=request.text),
        default=lambda *ops: _host_callback(request, ops, results)))


def _host_callback(request: Request, operands: tuple[Any, ...],
                   results: tuple[jax.ShapeDtypeStruct, ...]) -> Any:
    """``request`` through :func:`jax.pure_callback` (non-CPU backends: a host round trip)."""

    def host(*arrays: Any) -> tuple[np.ndarray, ...]:
        outputs = [np.empty(r.shape, r.dtype) for r in results]
        execute(request, [np.asarray(a) for a in arrays], outputs)
        return tuple(outputs)

    return jax.pure_callback(host, results, *operands, vmap_method="sequential")


# ----------------------------------------------------------------------------- running
def execute(request: Request, operands: list[np.ndarray], outputs: list[np.ndarray]) -> None:
    """Run ``request`` on NumPy ``operands``, writing its results into ``outputs``."""
    kwargs: dict[str, Any] = {name: _OBJECTS[name](value) if name in _OBJECTS else value
                              for name, value in request.options}
    pending = iter(operands)
    for name, count in request.arrays:
        kwargs[name] = (None if count == 0 else next(pending) if count < 0
                        else tuple(next(pending) for _ in range(count)))
    for out in outputs:
        _prefer_huge_pages(out)
    if request.return_grad:
        kwargs["return_grad"] = True
        # Into XLA's buffer directly where the op takes one in the input's dtype (its compute
        # dtype must be the input's: not for half precision, computed in float32).
        if _takes_grad_buffer(request.op) and outputs[-1].dtype.itemsize >= 4:
            kwargs["grad_buffer"] = outputs[-1]
    result = getattr(functional, request.op)(**kwargs, backend="cpu")
    for out, r in zip(outputs, _flat(result), strict=True):
        if r is out:
            continue
        if tuple(r.shape) != out.shape:
            raise RuntimeError(f"nblosses.jax: {request.op} returned shape {tuple(r.shape)} "
                               f"where {out.shape} was declared (OpSpec.loss_shape?)")
        np.copyto(out, r)


def _flat(result: Any) -> list[Any]:
    """A call's results in order, a tuple of gradients (the LM heads') spread out and a
    ``None`` gradient (no bias) left out."""
    out: list[Any] = []
    for r in result if isinstance(result, tuple) else (result,):
        if isinstance(r, tuple):
            out.extend(g for g in r if g is not None)
        else:
            out.append(r)
    return out


#: Options that are objects in :mod:`nblosses.functional`, by name: how a request's JSON value
#: becomes the object again (``options``: its ``batch_chunk_size``, an int or None).
_OBJECTS = {"options": _args.chunking}


@functools.cache
def _takes_grad_buffer(op: str) -> bool:
    return any(p.name == "grad_buffer" for p in SPECS[op].params)


_HUGE = 1 << 22  # NumPy's threshold for huge-page advice on its own allocations (4 MiB)
_PAGE = 4096


def _madvise() -> Any:
    """``madvise`` of the C library, where transparent huge pages exist (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()
_MADV_HUGEPAGE = 14


def _prefer_huge_pages(out: np.ndarray) -> None:
    """Advise a large output buffer's whole pages into transparent huge pages before it is
    first written: a hint (no effect on its contents, ignored where THP is off)."""
    if _MADVISE is None or out.nbytes < _HUGE:
        return
    start = (out.ctypes.data + _PAGE - 1) & ~(_PAGE - 1)
    end = (out.ctypes.data + out.nbytes) & ~(_PAGE - 1)
    _MADVISE(start, end - start, _MADV_HUGEPAGE)


# ----------------------------------------------------------------------------- the FFI ABI
# The structures of xla/ffi/api/c_api.h (jax.ffi.include_dir()) this handler reads or writes.
class _Extension(ctypes.Structure):
    pass


_Extension._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                       ("next", ctypes.POINTER(_Extension))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("items", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_Extension)), ("api", ctypes.c_void_p),
                ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _List),
                ("rets", _List), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # the leading fields of XLA_FFI_Api, up to XLA_FFI_Error_Create
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ErrorCreate)]


_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
_ATTR_STRING = 4  # XLA_FFI_AttrType_STRING
_ERROR_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL
_ERROR_ARGS_SIZE = _ErrorCreateArgs.errc.offset + ctypes.sizeof(ctypes.c_int)
# The FFI API version this handler is written against (its structures exist since 0.1).
_API_VERSION = (0, 1)

#: XLA_FFI_DataType -> NumPy dtype, for the types nblosses takes (bfloat16: ml_dtypes', which
#: JAX itself depends on).
_DTYPES = {1: np.dtype(np.bool_), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
           4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.uint8),
           10: np.dtype(np.float16), 11: np.dtype(np.float32), 12: np.dtype(np.float64),
           16: np.dtype(ml_dtypes.bfloat16)}


def _view(address: int, writeable: bool) -> np.ndarray:
    """The NumPy view of the XLA_FFI_Buffer at ``address`` (no copy)."""
    buf = _Buffer.from_address(address)
    shape = tuple(buf.dims[:buf.rank])
    dtype = _DTYPES.get(buf.dtype)
    if dtype is None:
        raise TypeError(f"nblosses.jax: XLA data type {buf.dtype} is not supported (floating "
                        "and integer arrays are)")
    size = math.prod(shape) * dtype.itemsize
    if size == 0:
        return np.empty(shape, dtype)
    array = np.frombuffer((ctypes.c_char * size).from_address(buf.data), dtype).reshape(shape)
    array.flags.writeable = writeable
    return array


def _request(frame: _CallFrame) -> Request:
    attrs = frame.attrs
    for i in range(attrs.size):
        name = attrs.names[i].contents
        if ctypes.string_at(name.ptr, name.len) == b"request":
            if attrs.types[i] != _ATTR_STRING:
                break
            text = _ByteSpan.from_address(attrs.attrs[i])
            return Request.parse(ctypes.string_at(text.ptr, text.len))
    raise RuntimeError("nblosses.jax: custom call without its request")


def _handle(frame_address: int) -> int | None:
    """The FFI handler: answers XLA's metadata query, else runs the call's request; returns
    ``NULL`` or an XLA_FFI_Error."""
    frame = _CallFrame.from_address(frame_address)
    if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
        metadata = ctypes.cast(frame.extension_start,
                               ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
        metadata.api_version.major_version, metadata.api_version.minor_version = _API_VERSION
        metadata.traits = 0
        return None
    try:
        # Writeable views of the operands, though nothing writes them (the ops never modify
        # their inputs: tests/api/test_errors.py): a read-only array is another Numba type, so
        # read-only views would compile every kernel a second time beside its NumPy build.
        operands = [_view(frame.args.items[i], True) for i in range(frame.args.size)]
        outputs = [_view(frame.rets.items[i], True) for i in range(frame.rets.size)]
        execute(_request(frame), operands, outputs)
        return None
    except BaseException as exc:  # every error goes back to XLA (ctypes would drop it)
        return _error(frame.api, f"{type(exc).__name__}: {exc}")


def _error(api_address: int, message: str) -> int | None:
    """An XLA_FFI_Error carrying ``message`` (XLA copies it), made by the runtime's API."""
    text = message.encode("utf-8", "replace")
    args = _ErrorCreateArgs(_ERROR_ARGS_SIZE, None, text, _ERROR_INTERNAL)
    error: int | None = _Api.from_address(api_address).error_create(ctypes.byref(args))
    return error


# Kept for the life of the process: XLA holds the function pointer.
_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(_handle)


@functools.cache
def _register() -> None:
    """Register the target with XLA's CPU platform, once."""
    address = ctypes.cast(_HANDLER, ctypes.c_void_p).value
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(address), platform="cpu")
