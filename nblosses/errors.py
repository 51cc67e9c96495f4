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
