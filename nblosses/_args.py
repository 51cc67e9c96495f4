"""Argument validation and canonical forms: the pieces every op's argument builder uses.

Everything torch checks before computing is checked with torch's exceptions and wording, once,
by these functions; backends receive only canonical arguments (see :mod:`nblosses.backends`).
The option checks (``check_*``) are named by the op specs (:mod:`nblosses.ops`) and run once per
call; the shape and dtype checks need only array metadata, so the Dask front end runs the same
ones on lazy arrays. Each op's own argument builder (its layout checks and canonical arrays)
lives beside its spec. Nothing here writes to a caller's array.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any

from ._registry import Runtime as Backend
from ._registry import array_module, get_validation
from .errors import class_index_error

REDUCTIONS = ("none", "mean", "sum")
# Frames of the package's files and of the functions generated from the op table.
_OWN_FILES = (os.path.dirname(os.path.abspath(__file__)) + os.sep, "<nblosses.")


def warn_at_caller(message: str) -> None:
    """``UserWarning`` attributed to the first frame outside nblosses (the user's line), however
    deep inside the package (wrappers, modules, dask) it is raised."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


# ----------------------------------------------------------------------------- dtypes
def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating-point dtype (bfloat16 from ml_dtypes included)."""
    # kind first: dtype.name is slow (it is rebuilt on every access)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name == "bfloat16")


_COMPUTE: dict[tuple[tuple[str, ...], Any], Any] = {}  # (native dtypes, dtype) -> compute dtype


def compute_dtype(be: Backend, dtype: Any, what: str = "input") -> Any:
    """The dtype kernels run in for an input of ``dtype`` (float32 for unsupported floats)."""
    try:
        return _COMPUTE[be.native_dtypes, dtype]
    except KeyError:
        pass
    if not is_float(dtype):
        raise TypeError(f"{what} must be a floating-point array, got dtype {dtype.name}")
    result = dtype if dtype.name in be.native_dtypes else be.xp.dtype("float32")
    _COMPUTE[be.native_dtypes, dtype] = result
    return result


def to_compute(be: Backend, array: Any, dtype: Any) -> Any:
    """``array`` on the backend, C-contiguous, in ``dtype`` (a copy only when needed; a 0-d
    array comes back 1-d, as ``ascontiguousarray`` gives it)."""
    a = be.asarray(array)
    if a.dtype is not dtype and a.dtype != dtype:  # NumPy's dtypes are mostly singletons
        a = a.astype(dtype)
    # ascontiguousarray, which returns a contiguous array itself, costs 0.15 us more
    return a if a.ndim and a.flags.c_contiguous else be.xp.ascontiguousarray(a)


def as_array(be: Backend, array: Any, what: str) -> Any:
    """``array`` as the backend's array type; Python scalars and lists are converted."""
    try:
        return be.asarray(array)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be array-like: {exc}") from exc


# ----------------------------------------------------------------------------- reduction
def reduction_from(size_average: Any, reduce: Any, reduction: str) -> str:
    """Resolve torch's legacy ``size_average`` / ``reduce`` pair, or check ``reduction``."""
    if size_average is None and reduce is None and reduction in REDUCTIONS:
        return reduction
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        if size_average and reduce:
            resolved = "mean"
        elif reduce:
            resolved = "sum"
        else:
            resolved = "none"
        warn_at_caller(f"size_average and reduce args will be deprecated, please use "
                       f"reduction='{resolved}' instead.")
        return resolved
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction; "
                         f"expected one of {', '.join(REDUCTIONS)}")
    return reduction


# ----------------------------------------------------------------------------- option checks
def check_ignore_index(op: str, value: Any) -> int:
    """``ignore_index`` as a Python int (any integer type; not bool)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: ignore_index must be an integer, got {value!r}") from None


def _real(op: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # NumPy / 0-d array scalars
        except (TypeError, ValueError):
            raise TypeError(f"{op}: {name} must be a real number, got {value!r}") from None
    return float(value)


def check_label_smoothing(op: str, value: Any) -> float:
    """``label_smoothing`` in ``[0, 1]`` as a float."""
    eps = _real(op, "label_smoothing", value)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {value}")
    return eps


def check_z_loss(op: str, value: Any) -> float:
    """``z_loss``: a finite float >= 0."""
    z = _real(op, "z_loss", value)
    if not (math.isfinite(z) and z >= 0.0):
        raise ValueError(f"{op}: z_loss must be a finite number >= 0, got {value!r}")
    return z


def check_softcap(op: str, value: Any) -> float:
    """``softcap``: ``None`` (off, 0.0 for the kernels) or a finite float > 0."""
    if value is None:
        return 0.0
    c = _real(op, "softcap", value)
    if not (math.isfinite(c) and c > 0.0):
        raise ValueError(f"{op}: softcap must be None or a finite number > 0, got {value!r}")
    return c


def check_optional_ignore_index(op: str, value: Any) -> int | None:
    """``ignore_index`` that may be ``None`` (torch's linear_cross_entropy: -100 for class
    indices, and it must stay None with probability targets)."""
    return None if value is None else check_ignore_index(op, value)


def check_chunking(op: str, value: Any) -> int | None:
    """torch's ``LinearCrossEntropyOptions`` (or None): the row-chunk size it asks for, if any.

    nblosses chooses its chunks itself; ``batch_chunk_size`` is honoured when given."""
    if value is None:
        return None
    size = getattr(value, "batch_chunk_size", None)
    if size is None:
        return None
    size = check_ignore_index(op, size)
    if size < 1:
        raise ValueError(f"{op}: options.batch_chunk_size must be >= 1, got {size}")
    return size


@dataclass(frozen=True)
class Chunking:
    """torch's ``LinearCrossEntropyOptions`` as the LM heads read it (:func:`check_chunking`):
    blocks of ``batch_chunk_size`` rows of the whole vocabulary. What nblosses passes on where
    it forwards a row block (the JAX bridge's requests, :mod:`nblosses.torch`'s custom op,
    ``nblosses.torch.transformers.patch``): torch's own class is not needed (older torch
    lacks it)."""

    batch_chunk_size: int | None


def chunking(rows: int | None) -> Chunking | None:
    """The options asking for ``rows`` per block, or None (nblosses' own plan): the inverse of
    :func:`check_chunking`."""
    return None if rows is None else Chunking(rows)


VALIDATION_MODES = ("async", "sync")


def check_validate(op: str, value: Any) -> str:
    """``validate``: ``"async"`` or ``"sync"``; ``None`` means the current default."""
    if value is None:
        return get_validation()
    if value not in VALIDATION_MODES:
        raise ValueError(f"{op}: validate must be one of {', '.join(VALIDATION_MODES)} or None, "
                         f"got {value!r}")
    return value


# ----------------------------------------------------------------------------- softmax family
def implicit_dim(ndim: int) -> int:
    """torch's legacy softmax axis when ``dim`` is not given: 0 for ndim 0, 1, 3, else 1."""
    return 0 if ndim in (0, 1, 3) else 1


def softmax_dim(name: str, ndim: int, dim: Any) -> int:
    """torch's dim handling: ``None`` warns and picks :func:`implicit_dim`."""
    if dim is None:
        dim = implicit_dim(ndim)
        warn_at_caller(f"Implicit dimension choice for {name} has been deprecated. "
                       f"Change the call to include dim=X as an argument.")
        return dim
    if type(dim) is int and 0 <= dim < ndim:  # the common call, in one comparison
        return dim
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"dim must be an integer, got {type(dim).__name__}") from None
    extent = max(ndim, 1)  # a 0-d array accepts dim 0 and -1, as in torch
    if not -extent <= dim < extent:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-extent}, {extent - 1}], "
            f"but got {dim})"
        )
    return dim % extent


def split_shape(shape: tuple[int, ...], dim: int) -> tuple[int, int, int]:
    """``(outer, C, inner)`` of ``shape`` around axis ``dim`` (a 0-d shape is ``(1, 1, 1)``)."""
    if len(shape) == 2:  # the common case without math.prod (0.28 -> 0.1 us)
        return (shape[0], shape[1], 1) if dim == 1 else (1, shape[0], shape[1])
    if not shape:
        return 1, 1, 1
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def check_same_shape(name: str, g: Any, y: Any, what: str = "output") -> None:
    """ValueError naming both shapes when ``grad_output`` and ``what`` differ."""
    if tuple(g.shape) != tuple(y.shape):
        raise ValueError(f"{name}: grad_output shape {tuple(g.shape)} does not match {what} "
                         f"shape {tuple(y.shape)}")


def check_backward_dtypes(be: Backend, name: str, g: Any, y: Any) -> Any:
    """Compute dtype of a backward call (from ``output``); ``grad_output`` must be float."""
    cdt = compute_dtype(be, y.dtype, "output")
    if not is_float(g.dtype):
        raise TypeError(f"{name}: grad_output must be floating point, got {g.dtype.name}")
    return cdt


# ----------------------------------------------------------------------------- class losses
def check_index_target(name: str, x: Any, t: Any, loss_shape: tuple[int, ...]) -> None:
    """TypeError / ValueError unless ``t`` is an integer target of shape ``loss_shape`` (torch's
    wording; ``x`` is the input, or shape metadata standing in for it)."""
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer target of class indices with shape "
                        f"{loss_shape}, got dtype {t.dtype.name} with shape {tuple(t.shape)}")
    if tuple(t.shape) != loss_shape:
        if x.ndim <= 2:
            batch = x.shape[0] if x.ndim == 2 else "none"
            raise ValueError(f"{name}: expected input batch_size ({batch}) to match target "
                             f"batch_size; input shape {tuple(x.shape)}, target shape "
                             f"{tuple(t.shape)}")
        raise ValueError(f"{name}: expected target shape {loss_shape} for input shape "
                         f"{tuple(x.shape)}, got target shape {tuple(t.shape)}")


def check_class_weight(name: str, w: Any, n_classes: int, input_shape: tuple[int, ...]) -> None:
    """ValueError / TypeError unless ``w`` is ``None`` or a float ``(C,)`` array."""
    if w is None:
        return
    if w.ndim != 1 or w.shape[0] != n_classes:
        raise ValueError(f"{name}: weight must be a 1-D array of length C = {n_classes} "
                         f"(input shape {tuple(input_shape)}), got shape {tuple(w.shape)}")
    if not is_float(w.dtype):
        raise TypeError(f"{name}: weight must be floating point, got {w.dtype.name}")


def check_targets(be: Backend, t2: Any, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first class index outside ``[0, C)`` that is not ignored.

    Runs before the kernel so that it never uses a bad index as an address. Costs one read of
    the targets (O(N), against the kernel's O(N*C)). A device backend whose kernels check the
    indices themselves (``"class_index"`` in its ``kernel_checks``) runs it only for
    ``validate="sync"``: reading ``min`` / ``max`` on the host waits for the device.
    """
    if t2.size == 0:
        return
    xp = be.xp
    lo, hi = be.index_range(t2) if be.index_range else (int(t2.min()), int(t2.max()))
    if lo >= 0 and hi < n_classes:
        return
    bad = ((t2 < 0) | (t2 >= n_classes)) & (t2 != ignore_index)
    if bool(bad.any()):
        value = int(t2.reshape(-1)[int(xp.argmax(bad.reshape(-1)))])
        raise class_index_error(value, n_classes)


# ----------------------------------------------------------------------------- gradients
def grad_output_arg(be: Backend, grad_output: Any, reduction: str, loss_shape, cdt, flat_shape):
    """Canonical ``grad_output``: for reduced losses a float, or a 0-d array of the backend
    when the caller's value is a device array (reading it here would wait for the device);
    an array of ``flat_shape`` for ``"none"``."""
    if reduction != "none":
        if grad_output is None:
            return 1.0
        g = as_array(be, grad_output, "grad_output")
        if g.size != 1:
            raise ValueError(f"grad_output for a reduced loss must be a scalar, got shape "
                             f"{tuple(g.shape)}")
        on_host = "numpy" in (array_module(grad_output), array_module(g)) or isinstance(
            grad_output, (int, float))
        return float(g.reshape(())) if on_host else g.reshape(())
    if grad_output is None:
        return be.xp.ones(flat_shape, dtype=cdt)
    g = as_array(be, grad_output, "grad_output")
    if tuple(g.shape) != tuple(loss_shape):
        raise ValueError(f"grad_output shape {tuple(g.shape)} does not match the loss shape "
                         f"{tuple(loss_shape)}")
    return to_compute(be, g, cdt).reshape(flat_shape)


def grad_buffer_arg(be: Backend, buffer: Any, input_shape, canonical_shape, cdt) -> Any:
    """Check a caller's gradient buffer: the backend's array type, input's shape, compute dtype,
    C-contiguous, writeable. Returned as a canonical view that writes through."""
    if buffer is None:
        return None
    if not be.owns(buffer):
        raise TypeError(f"grad_buffer must be a {be.name} backend array, got "
                        f"{type(buffer).__name__}")
    if tuple(buffer.shape) != tuple(input_shape):
        raise ValueError(f"grad_buffer shape {tuple(buffer.shape)} does not match input shape "
                         f"{tuple(input_shape)}")
    if buffer.dtype != cdt:
        raise TypeError(f"grad_buffer dtype {buffer.dtype.name} must be {be.xp.dtype(cdt).name}")
    if not buffer.flags.c_contiguous or not getattr(buffer.flags, "writeable", True):
        raise ValueError("grad_buffer must be C-contiguous and writeable")
    return buffer.reshape(canonical_shape)
