"""Backend registry: ``(op, backend)`` -> kernel, with lazy backend loading.

A *backend* is a named place where arrays live and kernels run (``"cpu"`` for NumPy arrays and
Numba kernels, ``"cuda"`` for CuPy arrays and CUDA kernels). Its kernels live in a provider
module that is imported only when the backend is first used, so ``import nblosses`` pulls in
neither Numba's compiled kernels nor CuPy.

The kernel protocol (canonical arguments only; validation happened in :mod:`nblosses._args`)
is documented in :mod:`nblosses.backends`. Third parties add a backend with
:func:`register_backend` and its kernels with :func:`register_kernel`; both APIs then reach it
through ``backend="name"``.

Errors are distinct so callers can tell them apart:

- :class:`UnknownBackendError` (a ``ValueError``): no backend has that name.
- :class:`BackendUnavailableError` (a ``RuntimeError``): known, but not usable here
  (package missing, no device); the message names what to install.
- :class:`UnsupportedOpError` (a ``NotImplementedError``): the backend exists but has no
  kernel for that op.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "UnknownBackendError",
    "UnsupportedOpError",
    "available_backends",
    "get_backend",
    "get_kernel",
    "register_backend",
    "register_kernel",
    "resolve_backend",
    "set_backend",
    "use_backend",
]


class UnknownBackendError(ValueError):
    """No backend is registered under the requested name."""


class BackendUnavailableError(RuntimeError):
    """The backend is known but cannot run here (missing package or device)."""


class UnsupportedOpError(NotImplementedError):
    """The backend has no kernel for the requested op."""


@dataclass
class Backend:
    """A named backend.

    Parameters
    ----------
    name : str
        The name users pass as ``backend=``.
    provider : str or None
        Dotted module path imported on first use; importing it registers the kernels.
    array_modules : tuple of str
        Top-level module names whose arrays belong to this backend (``"numpy"``, ``"cupy"``).
        Used by ``"auto"`` dispatch without importing anything.
    install_hint : str
        Appended to :class:`BackendUnavailableError` messages.
    check : callable or None
        Called once before the provider is imported; raises
        :class:`BackendUnavailableError` when the backend cannot run here.
    """

    name: str
    provider: str | None
    array_modules: tuple[str, ...]
    install_hint: str = ""
    check: Callable[[], None] | None = None
    #: Set by the provider module: converts any array-like to this backend's array type.
    asarray: Callable[..., Any] | None = None
    #: Set by the provider module: the array namespace (``numpy``, ``cupy``).
    xp: Any = None
    #: Optional, set by the provider: ``(min, max)`` of an integer array in one pass, for the
    #: class-index range check (default: ``xp``'s min and max, two passes).
    index_range: Callable[[Any], tuple[int, int]] | None = None
    #: Float dtypes the kernels take natively; others are computed in float32 and cast back.
    native_dtypes: tuple[str, ...] = ("float32", "float64")
    _loaded: bool = field(default=False, repr=False)
    _error: BaseException | None = field(default=None, repr=False)

    def load(self) -> "Backend":
        """Import the provider module once; raise BackendUnavailableError if that fails."""
        if self._loaded:
            return self
        with _LOAD_LOCK:
            if self._loaded:
                return self
            if self._error is not None:
                raise BackendUnavailableError(str(self._error)) from self._error
            try:
                if self.check is not None:
                    self.check()
                if self.provider is not None:
                    importlib.import_module(self.provider)
            except BackendUnavailableError as exc:
                self._error = exc
                raise
            except ImportError as exc:
                msg = f"backend {self.name!r} is not available: {exc}. {self.install_hint}".strip()
                self._error = BackendUnavailableError(msg)
                raise self._error from exc
            self._loaded = True
        return self

    def kernel(self, op: str) -> Callable[..., Any]:
        """Return this backend's kernel for ``op``, loading the backend if needed."""
        return get_kernel(op, self.name)

    def owns(self, array: Any) -> bool:
        """Whether ``array`` is one of this backend's array types (no import needed)."""
        return _array_module_name(array) in self.array_modules


_LOAD_LOCK = threading.RLock()
_BACKENDS: dict[str, Backend] = {}
_KERNELS: dict[tuple[str, str], Callable[..., Any]] = {}
# None = "not chosen in this context": fall back to the process-wide choice of set_backend().
_DEFAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("nblosses_backend", default=None)
_GLOBAL_DEFAULT = ["auto"]


def register_backend(
    name: str,
    provider: str | None = None,
    *,
    array_modules: tuple[str, ...] = (),
    install_hint: str = "",
    check: Callable[[], None] | None = None,
    native_dtypes: tuple[str, ...] = ("float32", "float64"),
) -> Backend:
    """Register (or replace) a backend.

    Parameters
    ----------
    name : str
        Name used with ``backend=``; ``"auto"`` is reserved.
    provider : str, optional
        Module imported on first use. It should call :func:`register_kernel` for each op and
        set the backend's ``asarray`` and ``xp``.
    array_modules : tuple of str
        Top-level module names whose arrays ``"auto"`` sends to this backend.
    install_hint : str
        What to install when the backend is unavailable.
    check : callable, optional
        Raises :class:`BackendUnavailableError` when the backend cannot run here.
    native_dtypes : tuple of str
        Float dtypes the kernels accept; other float inputs are computed in float32.

    Returns
    -------
    Backend
    """
    if name == "auto":
        raise ValueError("'auto' is reserved for dispatch by array type")
    backend = Backend(name, provider, tuple(array_modules), install_hint, check,
                      native_dtypes=tuple(native_dtypes))
    _BACKENDS[name] = backend
    return backend


def register_kernel(op: str, backend: str, fn: Callable[..., Any] | None = None):
    """Register ``fn`` as the kernel of ``op`` on ``backend``; usable as a decorator."""
    if backend not in _BACKENDS:
        raise UnknownBackendError(_unknown_message(backend))

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        _KERNELS[(op, backend)] = f
        return f

    return deco(fn) if fn is not None else deco


def _unknown_message(name: str) -> str:
    names = ", ".join(repr(n) for n in ["auto", *_BACKENDS])
    return f"unknown backend {name!r}; known backends: {names}"


def lookup(name: str) -> Backend:
    """Return the registered backend called ``name`` (not loaded)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(_unknown_message(name)) from None


def get_kernel(op: str, backend: str) -> Callable[..., Any]:
    """Return the kernel of ``op`` on ``backend``, importing the backend on first use."""
    be = lookup(backend).load()
    try:
        return _KERNELS[(op, be.name)]
    except KeyError:
        raise UnsupportedOpError(f"backend {backend!r} has no kernel for {op!r}") from None


def available_backends() -> list[str]:
    """Names of the registered backends that can run here (loading each to find out)."""
    names = []
    for name, be in _BACKENDS.items():
        try:
            be.load()
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto":
        lookup(name)
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend: a registered name or ``"auto"``.

    A :func:`use_backend` block still overrides it inside the block.
    """
    _GLOBAL_DEFAULT[0] = _check_name(name)


def get_backend() -> str:
    """The current default backend name (``"auto"`` unless changed)."""
    value = _DEFAULT.get()
    # A thread started after set_backend() has a fresh context; fall back to the global choice.
    return value if value is not None else _GLOBAL_DEFAULT[0]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager that makes ``name`` the default backend inside the ``with`` block.

    The choice is context-local (``contextvars``): other threads and asyncio tasks keep theirs.
    """
    token = _DEFAULT.set(_check_name(name))
    try:
        yield name
    finally:
        _DEFAULT.reset(token)


@functools.lru_cache(maxsize=256)
def _type_module(cls: type) -> str:
    # Cached per type: every call of every op asks this of each argument.
    return cls.__module__.partition(".")[0]


def _array_module_name(array: Any) -> str:
    """Top-level module of ``array``'s type (``"numpy"``, ``"cupy"``, ``"dask"``, ...)."""
    return _type_module(type(array))


def is_dask_array(obj: Any) -> bool:
    """Whether ``obj`` is a dask array, without importing dask."""
    return _type_module(type(obj)) == "dask"


def resolve_backend(requested: str | None, *arrays: Any) -> Backend:
    """Pick the backend for a call and load it.

    ``requested`` (the call's or module's ``backend=``) wins, then the context default, then
    ``"auto"``: the backend owning the array types among ``arrays`` (``None`` and Python
    scalars ignored). Mixed array kinds under auto raise ``TypeError``.
    """
    name = requested if requested is not None else get_backend()
    if _check_name(name) != "auto":
        return lookup(name).load()
    owner = None
    for a in arrays:
        if a is None or isinstance(a, _NOT_ARRAYS):
            continue
        this = _owner(a)
        if owner is None:
            owner = this
        elif this != owner:
            owners = sorted({_owner(b) for b in arrays
                             if b is not None and not isinstance(b, _NOT_ARRAYS)})
            raise TypeError(
                "inputs live on different backends ({}); move them to one array type or pass "
                "backend= explicitly".format(", ".join(owners))
            )
    return lookup(owner or "cpu").load()


_NOT_ARRAYS = (int, float, bool, list, tuple)


def _owner(array: Any) -> str:
    """The backend whose ``array_modules`` hold ``array``'s type; "cpu" when none does (NumPy
    converts it or says why not)."""
    module = _array_module_name(array)
    for be in _BACKENDS.values():
        if module in be.array_modules:
            return be.name
    return "cpu"
