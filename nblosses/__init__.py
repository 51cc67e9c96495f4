"""nblosses: torch.nn's softmax family and classification losses for NumPy and CuPy arrays.

>>> import numpy as np
>>> import nblosses as nbl
>>> print(nbl.functional.cross_entropy(np.zeros((2, 4)), np.array([0, 3])).round(4))
1.3863
"""

from __future__ import annotations

from . import backends as _backends  # noqa: F401  (registers "cpu" and "cuda" by name only)
from . import functional, nn
from ._registry import (
    Backend,
    Runtime,
    available_backends,
    get_backend,
    get_validation,
    register_backend,
    set_backend,
    set_validation,
    synchronize,
    unregister_backend,
    use_backend,
    use_validation,
)
from .errors import BackendUnavailableError, UnknownBackendError, UnsupportedOpError

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Runtime",
    "UnknownBackendError",
    "UnsupportedOpError",
    "available_backends",
    "functional",
    "get_backend",
    "get_validation",
    "nn",
    "register_backend",
    "set_backend",
    "set_validation",
    "synchronize",
    "unregister_backend",
    "use_backend",
    "use_validation",
]
