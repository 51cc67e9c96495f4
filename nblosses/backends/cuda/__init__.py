"""The ``"cuda"`` backend: CuPy arrays, CUDA C++ kernels compiled by NVRTC at run time.

Imported on the first call that needs the backend, after its device check
(:meth:`nblosses.backends.CudaBackend.build`); :data:`KERNELS` lists a kernel for every op of
the protocol in :mod:`nblosses.backends`. Importing touches neither NVRTC nor the device: each
kernel is compiled the first time a call needs it (see :mod:`._loader`).

Array dtypes: float16, bfloat16, float32 and float64. bfloat16 arrays reach the kernels as
CuPy arrays of ml_dtypes' ``bfloat16`` (e.g. ``cupy.from_dlpack`` of a torch bfloat16 tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cupy

from ..._registry import Backend, Runtime
from .. import collect_kernels
from . import _device_errors

KERNELS: dict[str, Callable[..., Any]] = collect_kernels(__name__)


def runtime(backend: Backend) -> Runtime:
    """The CUDA backend's runtime (kernels compile on first use, per dtype and shape class).

    Class indices and ``binary_cross_entropy``'s probabilities are checked inside the kernels
    (:mod:`._device_errors`): the front end skips its eager host checks unless
    ``validate="sync"``, polls for a recorded error at the start of every call, and
    :func:`nblosses.synchronize` waits and raises.
    """
    return Runtime(backend, xp=cupy, asarray=cupy.asarray, kernels=KERNELS,
                   kernel_checks=frozenset({"class_index", "probability_range"}),
                   poll_errors=_device_errors.poll_errors,
                   synchronize=_device_errors.synchronize)
