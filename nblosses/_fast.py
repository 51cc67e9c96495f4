"""Fast paths: the plainest call of an op on NumPy arrays, served without the dispatcher.

For ops whose work is tiny next to the generic call path (``nll_loss`` forward gathers one
value per row: 64 rows take well under a microsecond of kernel time), the ~6 us of option
checks, backend resolution and canonical copies in :mod:`nblosses._dispatch` would make the
call several times slower than torch's. A fast path takes the call only when every argument is
the plain default kind (NumPy arrays of the compute dtypes, default options, the
CPU backend); anything else returns :data:`MISS` and goes through the dispatcher, which also
owns every error message (a fast path raises only what its kernel finds, with the same
wording). Results equal the dispatcher's; ``tests/test_fast_paths.py`` compares the two.

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
_kernels: list[Any] = []  # the CPU class-loss module, once loaded


def _runs_on_cpu(backend: Any) -> bool:
    """Whether a call with NumPy arrays and this ``backend=`` runs on the CPU backend."""
    name = backend if backend is not None else get_backend()
    return name == "cpu" or (name == "auto" and numpy_owner() == "cpu")


def _cpu_class_losses() -> Any:
    if not _kernels:
        from .backends.cpu import class_losses

        _kernels.append(class_losses)
    return _kernels[0]


def nll_loss(input: Any, target: Any, weight: Any, size_average: Any, ignore_index: Any,
             reduce: Any, reduction: Any, return_grad: Any, grad_output: Any, grad_buffer: Any,
             validate: Any, backend: Any) -> Any:
    """``nll_loss`` forward of an ``(N, C)`` float32/float64 array and ``(N,)`` int64 targets,
    no weight, on the CPU backend; :data:`MISS` for any other call."""
    if (type(input) is not _NDARRAY or type(target) is not _NDARRAY or weight is not None
            or size_average is not None or reduce is not None or return_grad is not False
            or validate is not None or type(ignore_index) is not int
            or input.ndim != 2 or target.ndim != 1 or input.dtype not in _FLOATS
            or target.dtype is not _INT64 or target.shape[0] != input.shape[0]
            or type(reduction) is not str or reduction not in _REDUCTIONS
            or not _runs_on_cpu(backend)):
        return MISS
    return _cpu_class_losses().nll_loss_rows(input, target, ignore_index, reduction)
