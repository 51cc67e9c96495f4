"""The ``"cpu"`` backend: NumPy arrays, Numba kernels (``parallel=True``, cached on disk).

Importing this package registers every CPU kernel; :mod:`nblosses._registry` does so lazily on
the first call that needs the backend. Kernels compile per dtype on first use and are cached
(``cache=True``), so a new process loads them from disk instead of recompiling.
"""

from __future__ import annotations

import numpy as np

from ..._registry import lookup
from . import _parallel  # noqa: F401  (chooses the threading layer before any kernel runs)
from . import binary_losses, class_losses, softmax  # noqa: F401  (register kernels)



def _to_host(array, dtype=None):
    """``np.asarray``, but device arrays (CuPy's ``.get()``) are copied to the host first, so
    ``backend="cpu"`` accepts them as design.md promises ("inputs are moved if needed")."""
    if type(array) is np.ndarray and dtype is None:  # the common case, first
        return array
    if type(array).__module__.partition(".")[0] == "cupy":
        array = array.get()
    return np.asarray(array, dtype=dtype)


_backend = lookup("cpu")
_backend.xp = np
_backend.asarray = _to_host
_backend.index_range = class_losses.index_range
