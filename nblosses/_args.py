"""Argument validation and canonical forms, shared by every backend.

Everything torch checks before computing is checked here, once, with torch's exceptions and
wording; backends receive only canonical arguments (see :mod:`nblosses.backends`). The option
checks (``check_*``) are named by the op table (:mod:`nblosses._ops`) and run once per call; the
shape and dtype checks need only array metadata, so the Dask front end runs the same ones on
lazy arrays. Nothing here writes to a caller's array.
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
    """``array`` on the backend, C-contiguous, in ``dtype`` (a copy only when needed)."""
    a = be.asarray(array)
    if a.dtype != dtype:
        a = a.astype(dtype)
    return be.xp.ascontiguousarray(a)


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
    if not shape:
        return 1, 1, 1
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


@dataclass(slots=True)
class ArrayArgs:
    """Canonical arrays of an activation-type call, with the shape and dtype to return."""

    arrays: tuple[Any, ...]  # (outer, C, inner) views for the softmax family, flat otherwise
    shape: tuple[int, ...]
    dtype: Any


def check_softmax_input(be: Backend, name: str, x: Any, dim: Any) -> int:
    """Metadata checks of a softmax-family input; returns the normalised ``dim``."""
    if not is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array (or pass dtype=), "
                        f"got dtype {x.dtype.name}")
    d = softmax_dim(name, x.ndim, dim)
    compute_dtype(be, x.dtype)
    return d


def softmax_args(be: Backend, name: str, input: Any, dim: Any, dtype: Any) -> ArrayArgs:
    """Validate and canonicalise ``softmax`` / ``log_softmax`` arguments."""
    x = as_array(be, input, "input")
    if dtype is not None:
        x = x.astype(be.xp.dtype(dtype), copy=False)
    d = check_softmax_input(be, name, x, dim)
    x3 = to_compute(be, x, compute_dtype(be, x.dtype)).reshape(split_shape(x.shape, d))
    return ArrayArgs((x3,), tuple(x.shape), x.dtype)


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


def softmax_backward_args(be: Backend, name: str, grad_output: Any, output: Any,
                          dim: Any) -> ArrayArgs:
    """Canonical ``(g3, y3)`` for the softmax-family backwards."""
    y = as_array(be, output, "output")
    g = as_array(be, grad_output, "grad_output")
    check_same_shape(name, g, y)
    cdt = check_backward_dtypes(be, name, g, y)
    s3 = split_shape(y.shape, softmax_dim(name, y.ndim, dim))
    return ArrayArgs((to_compute(be, g, cdt).reshape(s3), to_compute(be, y, cdt).reshape(s3)),
                     tuple(y.shape), y.dtype)


def elementwise_args(be: Backend, name: str, *arrays: Any) -> ArrayArgs:
    """Flat compute-dtype arrays of same-shaped float arrays (sigmoid and its gradient)."""
    xs = [as_array(be, a, "input") for a in arrays]
    if len(xs) == 2:
        check_same_shape(name, xs[0], xs[1])
        cdt = check_backward_dtypes(be, name, xs[0], xs[1])
    else:
        cdt = compute_dtype(be, xs[0].dtype)
    return ArrayArgs(tuple(to_compute(be, a, cdt).reshape(-1) for a in xs),
                     tuple(xs[-1].shape), xs[-1].dtype)


# ----------------------------------------------------------------------------- class losses
# The argument records below are plain slotted dataclasses, not frozen ones: they are built on
# every call, and a frozen dataclass's __init__ costs a microsecond or two more.
@dataclass(slots=True)
class ClassLossLayout:
    """What a class-loss call's metadata says: target kind and shapes."""

    probs: bool  # probability targets (the input's shape) rather than class indices
    input_shape: tuple[int, ...]
    shape3: tuple[int, int, int]  # the input as (N, C, inner)
    loss_shape: tuple[int, ...]  # shape of the unreduced loss


@dataclass(slots=True)
class ClassLossArgs:
    """Canonical class-loss arrays (see the kernel protocol in :mod:`nblosses.backends`)."""

    x3: Any
    target: Any  # (N, inner) int64, or (N, C, inner) probabilities
    weight: Any
    layout: ClassLossLayout
    dtype: Any  # the caller's input dtype: results are returned in it


def _canonical_input(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) <= 2:  # (C,) and (N, C), the common cases, without math.prod
        return (1, input_shape[0], 1) if len(input_shape) == 1 else (input_shape[0],
                                                                      input_shape[1], 1)
    return split_shape(input_shape, 1)


def class_loss_args(be: Backend, name: str, input: Any, target: Any, weight: Any,
                    ignore_index: int, *, allow_probs: bool, check_indices: bool) -> ClassLossArgs:
    """Validate ``nll_loss`` / ``cross_entropy`` arrays and bring them to canonical form.

    ``check_indices``: check class indices here, eagerly (a device backend whose kernels check
    them asynchronously passes ``False`` unless the caller asked for ``validate="sync"``).
    """
    x = as_array(be, input, "input")
    t = as_array(be, target, "target")
    w = None if weight is None else as_array(be, weight, "weight")
    layout = check_class_loss(be, name, x, t, w, ignore_index, allow_probs)
    cdt = compute_dtype(be, x.dtype)
    if layout.probs:
        target_c = to_compute(be, t, cdt).reshape(layout.shape3)
    else:
        n, c, inner = layout.shape3
        target_c = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(n, inner)
        if check_indices:
            check_targets(be, target_c, c, ignore_index)
    if w is not None:
        w = to_compute(be, w, cdt)
    x3 = to_compute(be, x, cdt).reshape(layout.shape3)
    return ClassLossArgs(x3, target_c, w, layout, x.dtype)


def check_class_loss(be: Backend, name: str, x: Any, t: Any, w: Any, ignore_index: int,
                     allow_probs: bool) -> ClassLossLayout:
    """Every class-loss check that needs only dtypes and shapes (so dask arrays pass through
    it unevaluated)."""
    if not is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if x.ndim < 1:
        raise ValueError(f"{name}: input must have 1 or more dimensions (got 0)")
    compute_dtype(be, x.dtype)
    shape = tuple(x.shape)
    shape3 = _canonical_input(shape)
    loss_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    # A target of the input's shape, or a float one of its rank, is meant as class
    # probabilities: tell what is wrong with it in those terms.
    probs = allow_probs and (tuple(t.shape) == shape or (is_float(t.dtype) and t.ndim == x.ndim))
    if probs:
        _check_probability_target(name, x, t, ignore_index)
    else:
        _check_index_target(name, x, t, loss_shape)
    if w is not None:
        if w.ndim != 1 or w.shape[0] != shape3[1]:
            raise ValueError(f"{name}: weight must be a 1-D array of length C = {shape3[1]} "
                             f"(input shape {tuple(x.shape)}), got shape {tuple(w.shape)}")
        if not is_float(w.dtype):
            raise TypeError(f"{name}: weight must be floating point, got {w.dtype.name}")
    return ClassLossLayout(probs, shape, shape3, loss_shape)


def _check_probability_target(name: str, x: Any, t: Any, ignore_index: int) -> None:
    if not is_float(t.dtype):
        raise TypeError(f"{name}: expected a floating-point target for class probabilities "
                        f"(target shape equals input shape {tuple(x.shape)}), got dtype "
                        f"{t.dtype.name}")
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name}: probability targets must have the input's shape "
                         f"{tuple(x.shape)}, got target shape {tuple(t.shape)} (class-index "
                         f"targets are integers of shape {tuple(x.shape[:1] + x.shape[2:])})")
    if ignore_index >= 0:
        raise ValueError(f"{name}: ignore_index ({ignore_index}) is not supported for "
                         f"class-probability targets")


def _check_index_target(name: str, x: Any, t: Any, loss_shape: tuple[int, ...]) -> None:
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


# ----------------------------------------------------------------------------- linear + CE
@dataclass(slots=True)
class LinearCELayout:
    """What a ``linear_cross_entropy`` call's metadata says."""

    probs: bool
    squeeze: bool  # the caller's input was (d,): one row
    n: int
    d: int
    v: int
    out_features: tuple[int, ...]  # torch's K-dimensional loss: linear_weight (V, *out, d)


def check_linear_ce(be: Backend, name: str, x: Any, w: Any, t: Any, b: Any, cw: Any,
                    ignore_index: int | None) -> LinearCELayout:
    """Metadata checks of ``linear_cross_entropy`` (torch 2.13's rules and wording)."""
    if not is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if not 1 <= x.ndim <= 2:
        raise ValueError(f"{name}: expected input with dimensionality 1 or 2, got {x.ndim}")
    if w.ndim < 2:
        raise ValueError(f"{name}: expected linear_weight with dimensionality at least 2, got "
                         f"{w.ndim}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"{name}: expected equal input and linear_weight last dimensions "
                         f"(in_features), got {x.shape[-1]} and {w.shape[-1]}, respectively")
    compute_dtype(be, x.dtype)
    v, out = int(w.shape[0]), tuple(w.shape[1:-1])
    if b is not None and tuple(b.shape) != (v, *out):
        raise ValueError(f"{name}: expected linear_bias shape {(v, *out)}, got "
                         f"{tuple(b.shape)}")
    if out and x.ndim == 1:
        raise ValueError(f"{name}: K-dimensional loss defined by linear_weight shape "
                         f"{tuple(w.shape)} requires batched input (N, {x.shape[-1]}), got "
                         f"unbatched input with shape {tuple(x.shape)}")
    logits_shape = (*x.shape[:-1], v, *out)
    probs = tuple(t.shape) == logits_shape
    if probs:
        if ignore_index is not None:
            raise ValueError(f"{name}: ignore_index cannot be specified when target contains "
                             f"probabilities")
        if not is_float(t.dtype):
            raise TypeError(f"{name}: expected a floating-point target for class probabilities "
                            f"(shape {logits_shape}), got dtype {t.dtype.name}")
    else:
        _check_index_target(name, _Shape(logits_shape), t,
                            tuple(x.shape[:-1]) + out)
    if cw is not None and (cw.ndim != 1 or cw.shape[0] != v):
        raise ValueError(f"{name}: weight must be a 1-D array of length C = {v}, got shape "
                         f"{tuple(cw.shape)}")
    n = int(x.shape[0]) if x.ndim == 2 else 1
    return LinearCELayout(probs, x.ndim == 1, n, int(x.shape[-1]), v, out)


@dataclass(slots=True)
class _Shape:
    """Shape metadata standing in for the logits (which are never formed)."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(slots=True)
class LinearCEArgs:
    """Canonical ``linear_cross_entropy`` arrays: ``x2`` (N, d), ``w2`` (V, d)."""

    x2: Any
    w2: Any
    bias: Any
    target: Any  # (N,) int64 or (N, V) probabilities
    weight: Any
    layout: LinearCELayout
    dtype: Any


def linear_ce_args(be: Backend, name: str, input: Any, linear_weight: Any, target: Any,
                   linear_bias: Any, weight: Any, ignore_index: int | None, *,
                   check_indices: bool = True) -> LinearCEArgs:
    """Validate ``linear_cross_entropy`` arrays and bring them to canonical form
    (``check_indices`` as for :func:`class_loss_args`)."""
    x = as_array(be, input, "input")
    w = as_array(be, linear_weight, "linear_weight")
    t = as_array(be, target, "target")
    b = None if linear_bias is None else as_array(be, linear_bias, "linear_bias")
    cw = None if weight is None else as_array(be, weight, "weight")
    lay = check_linear_ce(be, name, x, w, t, b, cw, ignore_index)
    cdt = compute_dtype(be, x.dtype)
    rows = (lay.n, *t.shape[x.ndim - 1:]) if lay.probs else (lay.n, *lay.out_features)
    if lay.probs:
        tc = to_compute(be, t, cdt).reshape(rows)
    else:
        tc = be.xp.ascontiguousarray(t.astype("int64", copy=False)).reshape(rows)
        if check_indices:
            check_targets(be, tc, lay.v, -100 if ignore_index is None else ignore_index)
    return LinearCEArgs(to_compute(be, x, cdt).reshape(lay.n, lay.d), to_compute(be, w, cdt),
                        None if b is None else to_compute(be, b, cdt), tc,
                        None if cw is None else to_compute(be, cw, cdt), lay, x.dtype)


# ----------------------------------------------------------------------------- binary losses
@dataclass(slots=True)
class BinaryLossArgs:
    """Canonical binary-loss call: flat arrays of one length."""

    x: Any
    y: Any
    weight: Any
    pos_weight: Any
    shape: tuple[int, ...]
    dtype: Any


def _broadcast_flat(be: Backend, name: str, what: str, value: Any, shape, cdt) -> Any:
    if value is None:
        return None
    v = as_array(be, value, what)
    if not is_float(v.dtype):
        v = v.astype(cdt)
    try:
        full = be.xp.broadcast_to(v, shape)
    except ValueError:
        raise ValueError(f"{name}: {what} of shape {tuple(v.shape)} cannot be broadcast to the "
                         f"input shape {tuple(shape)}") from None
    return to_compute(be, full, cdt).reshape(-1)


def check_binary_loss(be: Backend, name: str, x: Any, y: Any) -> Any:
    """Metadata checks of a binary loss; returns the compute dtype."""
    if not is_float(x.dtype):
        raise TypeError(f"{name}: input must be a floating-point array, got dtype {x.dtype.name}")
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"{name}: target size {tuple(y.shape)} must be the same as input size "
                         f"{tuple(x.shape)}")
    return compute_dtype(be, x.dtype)


def binary_loss_args(be: Backend, name: str, input: Any, target: Any, weight: Any,
                     pos_weight: Any, probabilities: bool,
                     check_range: bool = True) -> BinaryLossArgs:
    """Validate ``binary_cross_entropy`` (``probabilities=True``) or its logits variant.

    ``check_range``: check here that probabilities lie in ``[0, 1]`` (reads the input's min and
    max: a device backend whose kernel checks them passes ``False`` unless ``validate="sync"``).
    """
    x = as_array(be, input, "input")
    y = as_array(be, target, "target")
    cdt = check_binary_loss(be, name, x, y)
    xc = to_compute(be, x, cdt).reshape(-1)
    if probabilities and check_range and xc.size:
        lo, hi = float(xc.min()), float(xc.max())  # min/max propagate NaN
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"{name}: all elements of input should be between 0 and 1 "
                             f"(found min {lo}, max {hi})")
    yc = to_compute(be, y if is_float(y.dtype) else y.astype(cdt), cdt).reshape(-1)
    return BinaryLossArgs(
        xc, yc,
        _broadcast_flat(be, name, "weight", weight, x.shape, cdt),
        _broadcast_flat(be, name, "pos_weight", pos_weight, x.shape, cdt),
        tuple(x.shape), x.dtype,
    )


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
