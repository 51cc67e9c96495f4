"""Public exceptions of nblosses (also importable from the top level).

Bad arguments raise Python's own exceptions (``TypeError``, ``ValueError``, ``IndexError``) with
torch's wording; the classes here name what only nblosses can get wrong: the backend.
"""

from __future__ import annotations

__all__ = ["BackendUnavailableError", "UnknownBackendError", "UnsupportedOpError"]


class UnknownBackendError(ValueError):
    """No backend is registered under the requested name."""


class BackendUnavailableError(RuntimeError):
    """The backend is known but cannot run here (missing package or device)."""


class UnsupportedOpError(NotImplementedError):
    """The backend has no kernel for the requested op."""


def class_index_error(value: int, n_classes: int | str) -> IndexError:
    """The error for a class-index target outside ``[0, C)`` (torch's wording), wherever it is
    found: the argument checks, a CPU kernel or a CUDA device error record."""
    return IndexError(f"Target {value} is out of bounds (number of classes: {n_classes}).")
