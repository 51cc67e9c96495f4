"""Fast paths: the plainest call of an op on NumPy arrays, served without the dispatcher.

For small calls the generic path costs more than the work: option checks, backend
resolution, canonical ``(outer, C, inner)`` views and the host plan in :mod:`nblosses._dispatch`
take 3-12 us, while ``nll_loss`` forward of 64 rows takes well under a microsecond of kernel
time and a softmax of 8 rows of 100 about one. A fast path takes the call only when every
argument is the plain default kind (C-contiguous NumPy arrays of the compute dtypes, default
options, the CPU backend) and runs the kernel the dispatcher would run on it; anything else
returns :data:`MISS` and goes through the dispatcher, which also owns every error message (a
fast path raises only what its kernel finds, with the same wording). Results equal the
dispatcher's bit for bit; ``tests/api/test_fast_paths.py`` compares the two.

An op's spec names its fast path (``fast_path``); the generated function of
:mod:`nblosses.functional` tries it first. Importing this module imports NumPy only: the CPU
kernels load on the first call that qualifies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import get_backend, numpy_owner

#: Returned by a fast path that does not take the call.
MISS: Any = object()

_NDARRAY = np.ndarray
_INT64 = np.dtype(np.int64)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_REDUCTIONS = ("mean", "sum", "none")
_modules: dict[str, Any] = {}  # the CPU kernel modules, once loaded


def _runs_on_cpu(backend: Any) -> bool:
    """Whether a call with NumPy arrays and this ``backend=`` runs on the CPU backend."""
    name = backend if backend is not None else get_backend()
    return name == "cpu" or (name == "auto" and numpy_owner() == "cpu")


def _cpu(module: str) -> Any:
    """The CPU kernel module ``module``, imported on the first call that needs one."""
    if not _modules:
        from .backends.cpu import class_losses, softmax

        _modules.update(class_losses=class_losses, softmax=softmax)
    return _modules[module]


def _plain_float(a: Any) -> bool:
    """Whether ``a`` is a C-contiguous NumPy array of float32/float64 with a dimension."""
    return (type(a) is _NDARRAY and a.dtype in _FLOATS and a.ndim > 0
            and a.flags.c_contiguous)


def _plain_class_call(x: Any, t: Any, ignore_index: Any, reduction: Any, backend: Any) -> bool:
    """Whether ``x`` is an ``(N, C)`` float32/float64 NumPy array, ``t`` its ``(N,)`` int64
    targets, ``ignore_index`` a Python int, ``reduction`` one of torch's three and the call
    runs on the CPU backend (one function: each call costs 0.05 us of a 2 us call)."""
    if not (type(x) is _NDARRAY and type(t) is _NDARRAY and type(ignore_index) is int
            and x.ndim == 2 and t.ndim == 1 and x.dtype in _FLOATS and t.dtype is _INT64
            and len(t) == len(x) and type(reduction) is str and reduction in _REDUCTIONS):
        return False
    name = backend if backend is not None else get_backend()  # _runs_on_cpu, inlined
    return name == "cpu" or (name == "auto" and numpy_owner() == "cpu")


def _or_miss(result: Any) -> Any:
    return MISS if result is None else result


def softmax(input: Any, dim: Any, _stacklevel: Any, dtype: Any, backend: Any) -> Any:
    """``softmax`` over the last axis of a C-contiguous float32/float64 array with rows of
    24 classes or more; :data:`MISS` for any other call."""
    return _softmax(input, dim, dtype, backend, False)


def log_softmax(input: Any, dim: Any, _stacklevel: Any, dtype: Any, backend: Any) -> Any:
    """``log_softmax``, as :func:`softmax`."""
    return _softmax(input, dim, dtype, backend, True)


def _softmax(x: Any, dim: Any, dtype: Any, backend: Any, log: bool) -> Any:
    # dim=None (torch's legacy choice, with its warning) and other axes: the dispatcher.
    if (dtype is not None or type(dim) is not int or not _plain_float(x)
            or (dim != -1 and dim != x.ndim - 1) or not _runs_on_cpu(backend)):
        return MISS
    return _or_miss(_cpu("softmax").softmax_last_axis(x, log))


def softmax_backward(grad_output: Any, output: Any, dim: Any, backend: Any) -> Any:
    """``softmax_backward`` over the last axis of C-contiguous float32/float64 arrays of one
    shape and dtype; :data:`MISS` for any other call."""
    return _softmax_backward(grad_output, output, dim, backend, False)


def log_softmax_backward(grad_output: Any, output: Any, dim: Any, backend: Any) -> Any:
    """``log_softmax_backward``, as :func:`softmax_backward` (its short rows' split kernel
    stays with the dispatcher)."""
    return _softmax_backward(grad_output, output, dim, backend, True)


def _softmax_backward(g: Any, y: Any, dim: Any, backend: Any, log: bool) -> Any:
    if (type(dim) is not int or not _plain_float(y) or not _plain_float(g)
            or g.dtype is not y.dtype or g.shape != y.shape
            or (dim != -1 and dim != y.ndim - 1) or not _runs_on_cpu(backend)):
        return MISS
    return _or_miss(_cpu("softmax").softmax_backward_last_axis(g, y, log))


def sigmoid(input: Any, backend: Any) -> Any:
    """``sigmoid`` of a C-contiguous float32/float64 array; :data:`MISS` for any other call."""
    if not _plain_float(input) or not _runs_on_cpu(backend):
        return MISS
    return _cpu("softmax").sigmoid_any_shape(input)


def nll_loss(input: Any, target: Any, weight: Any, size_average: Any, ignore_index: Any,
             reduce: Any, reduction: Any, return_grad: Any, grad_output: Any, grad_buffer: Any,
             validate: Any, backend: Any) -> Any:
    """``nll_loss`` forward of an ``(N, C)`` float32/float64 array and ``(N,)`` int64 targets,
    no weight, on the CPU backend; :data:`MISS` for any other call."""
    if (weight is not None or size_average is not None or reduce is not None
            or return_grad is not False or validate is not None
            or not _plain_class_call(input, target, ignore_index, reduction, backend)):
        return MISS
    return _cpu("class_losses").nll_loss_rows(input, target, ignore_index, reduction)


def cross_entropy(input: Any, target: Any, weight: Any, size_average: Any, ignore_index: Any,
                  reduce: Any, reduction: Any, label_smoothing: Any, z_loss: Any, softcap: Any,
                  return_lse: Any, return_grad: Any, grad_output: Any, grad_buffer: Any,
                  validate: Any, backend: Any) -> Any:
    """``cross_entropy`` forward of a C-contiguous ``(N, C)`` float32/float64 array with
    ``C >= 24`` and ``(N,)`` int64 class indices, no weight, smoothing, z-loss, soft cap or
    logsumexp, on the CPU backend; :data:`MISS` for any other call."""
    if (weight is not None or size_average is not None or reduce is not None
            or return_grad is not False or return_lse is not False or softcap is not None
            or validate is not None or type(label_smoothing) is not float
            or label_smoothing != 0.0 or type(z_loss) is not float or z_loss != 0.0
            or not _plain_class_call(input, target, ignore_index, reduction, backend)):
        return MISS
    return _or_miss(_cpu("class_losses").cross_entropy_rows(input, target, ignore_index,
                                                            reduction))
