"""The ``"cuda"`` backend: CuPy arrays, CUDA C++ kernels compiled by NVRTC at run time.

Imported on the first call that needs the backend, after its device check
(:meth:`nblosses.backends.CudaBackend.build`); :data:`KERNELS` lists a kernel for every op of
the protocol in :mod:`nblosses.backends`. Importing touches neither NVRTC nor the device: each
kernel is compiled the first time a call needs it (see :mod:`._loader`).

Array dtypes: float16, bfloat16, float32 and float64. bfloat16 arrays reach the kernels as
CuPy arrays of ml_dtypes' ``bfloat16`` (e.g. ``cupy.from_dlpack`` of a torch bfloat16 tensor).
"""

from __future__ import annotations

from typing import Any, Callable

import cupy

from ..._registry import Backend, Runtime
from . import _device_errors, binary_losses, class_losses, linear_ce, softmax

KERNELS: dict[str, Callable[..., Any]] = {
    "softmax": softmax.softmax,
    "log_softmax": softmax.log_softmax,
    "softmax_backward": softmax.softmax_backward,
    "log_softmax_backward": softmax.log_softmax_backward,
    "sigmoid": softmax.sigmoid,
    "sigmoid_backward": softmax.sigmoid_backward,
    "nll_loss": class_losses.nll_loss,
    "cross_entropy": class_losses.cross_entropy,
    "cross_entropy_probs": class_losses.cross_entropy_probs,
    "binary_cross_entropy": binary_losses.binary_cross_entropy,
    "binary_cross_entropy_with_logits": binary_losses.binary_cross_entropy_with_logits,
    "linear_cross_entropy": linear_ce.linear_cross_entropy,
}


def runtime(backend: Backend) -> Runtime:
    """The CUDA backend's runtime (kernels compile on first use, per dtype and shape class).

    Class indices are checked inside the kernels (:mod:`._device_errors`): the front end skips
    its eager host check unless ``validate="sync"``, polls for a recorded error at the start of
    every call, and :func:`nblosses.synchronize` waits and raises.
    """
    return Runtime(backend, xp=cupy, asarray=cupy.asarray, kernels=KERNELS,
                   defers_index_errors=True, poll_errors=_device_errors.poll_errors,
                   synchronize=_device_errors.synchronize)
