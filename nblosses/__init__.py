"""nblosses: torch.nn's softmax family and classification losses for NumPy and CuPy arrays.

>>> import numpy as np
>>> import nblosses as nbl
>>> print(nbl.functional.cross_entropy(np.zeros((2, 4)), np.array([0, 3])).round(4))
1.3863
"""

from __future__ import annotations

from . import backends as _backends  # noqa: F401  (registers "cpu" and "cuda" by name only)
from . import errors, functional, nn
from ._output_cache import OutputCache, output_cache
from ._registry import *  # noqa: F403  (the public names are _registry.__all__)
from ._registry import __all__ as _registry_all
from .errors import *  # noqa: F403  (the public exceptions are errors.__all__)

__version__ = "0.1.0"

__all__ = ["functional", "nn", "OutputCache", "output_cache", *_registry_all, *errors.__all__]
