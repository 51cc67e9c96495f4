"""The ``"cuda"`` backend: CuPy arrays, CUDA C++ kernels compiled by NVRTC at run time.

Importing this package (done by :mod:`nblosses._registry` on the first call that needs the
backend, after its device check) registers a kernel for every op of the protocol in
:mod:`nblosses.backends` and sets the backend's array namespace. It touches neither NVRTC nor
the device: each kernel is compiled the first time a call needs it (see :mod:`._loader`).

Array dtypes: float16, float32 and float64. bfloat16 kernels exist and compile, but CuPy 14 has
no bfloat16 array dtype, so a bfloat16 input cannot reach them yet.
"""

from __future__ import annotations

import cupy

from ..._registry import lookup
from . import binary_losses, class_losses, softmax  # noqa: F401  (register kernels)

_backend = lookup("cuda")
_backend.xp = cupy
_backend.asarray = cupy.asarray
