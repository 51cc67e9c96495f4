"""Backend registry: named backends, built lazily, and the default-backend context.

A *backend* is a place where arrays live and kernels run. It comes in two parts:

- a :class:`Backend` subclass instance, registered by name at import time: what the registry and
  ``"auto"`` dispatch need to know without importing anything heavy (the array modules it owns,
  its native dtypes, how to check that it can run here, what to install otherwise);
- the :class:`Runtime` its :meth:`Backend.build` returns on first use: the array namespace, the
  converter and the kernels, complete and immutable from then on.

Third parties add a backend by subclassing :class:`Backend` and calling
:func:`register_backend`; ``backend="name"`` then reaches it from every front end. The kernel
protocol (canonical arguments only; validation happens in :mod:`nblosses._args`) is documented
in :mod:`nblosses.backends`.

Examples
--------
>>> import numpy as np
>>> import nblosses
>>> from nblosses import Backend, Runtime
>>> class Toy(Backend):
...     name = "toy"
...     def build(self):
...         return Runtime(self, xp=np, asarray=np.asarray,
...                        kernels={"sigmoid": lambda x: 1 / (1 + np.exp(-x))})
>>> _ = nblosses.register_backend(Toy())
>>> nblosses.functional.sigmoid(np.zeros(2), backend="toy")
array([0.5, 0.5])
>>> nblosses.unregister_backend("toy")
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, cast

from .errors import BackendUnavailableError, UnknownBackendError, UnsupportedOpError

# The public names (re-exported by the package); load / resolve_backend are the front end's.
__all__ = [
    "Backend",
    "Runtime",
    "available_backends",
    "get_backend",
    "get_validation",
    "register_backend",
    "set_backend",
    "set_validation",
    "synchronize",
    "unregister_backend",
    "use_backend",
    "use_validation",
]


class Backend:
    """Description of a backend, cheap to create: subclass it and register an instance.

    Attributes
    ----------
    name : str
        What users pass as ``backend=``; ``"auto"`` is reserved.
    array_modules : tuple of str
        Top-level module names whose arrays ``"auto"`` sends here (``"numpy"``, ``"cupy"``),
        matched without importing anything.
    fallback : bool
        Whether ``"auto"`` sends arrays that no backend owns here (Python lists, scalars, other
        array-likes); at most one registered backend should say so.
    native_dtypes : tuple of str
        Float dtypes the kernels take; other float inputs are computed in float32.
    install_hint : str
        What to install when the backend cannot run; ends every unavailability message.
    """

    name: ClassVar[str] = ""
    array_modules: ClassVar[tuple[str, ...]] = ()
    fallback: ClassVar[bool] = False
    native_dtypes: ClassVar[tuple[str, ...]] = ("float32", "float64")
    install_hint: ClassVar[str] = ""

    def check(self) -> None:
        """Raise :class:`BackendUnavailableError` when the backend cannot run here."""

    def build(self) -> Runtime:
        """Import what the backend needs and return its :class:`Runtime` (called once)."""
        raise NotImplementedError

    def load(self) -> Runtime:
        """This backend's runtime, built on first use (see :func:`load`)."""
        return load(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _no_op() -> None:
    return None


@dataclass(frozen=True)
class Runtime:
    """A backend ready to run: array namespace, converter and kernels.

    Parameters
    ----------
    backend : Backend
        The description it was built from (name, native dtypes, array modules).
    xp : module
        The array namespace (``numpy``, ``cupy``).
    asarray : callable
        Converts any array-like to this backend's array type (a no-op for its own arrays).
    kernels : mapping of str to callable
        Op name -> kernel, following the protocol in :mod:`nblosses.backends`.
    index_range : callable, optional
        ``(min, max)`` of an int64 array in one pass, for the eager class-index check
        (default: ``xp``'s ``min`` and ``max``).
    kernel_checks : frozenset of str
        Value checks the kernels make themselves, on the device, reporting a failure later
        through ``poll_errors`` / ``synchronize`` instead of the eager host check (which would
        wait for the device): ``"class_index"`` (class losses: index in ``[0, C)`` or
        ignored), ``"probability_range"`` (``binary_cross_entropy``: input in ``[0, 1]``).
    poll_errors : callable
        Raises an error a kernel recorded earlier, once it is known, without waiting for the
        device. Called at the start of every call on this backend.
    synchronize : callable
        Waits for every queued kernel, then raises any recorded error.
    """

    backend: Backend
    xp: Any
    asarray: Callable[..., Any]
    kernels: Mapping[str, Callable[..., Any]]
    index_range: Callable[[Any], tuple[int, int]] | None = None
    kernel_checks: frozenset[str] = frozenset()
    poll_errors: Callable[[], None] = _no_op
    synchronize: Callable[[], None] = _no_op
    name: str = field(init=False)
    native_dtypes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.backend.name)
        object.__setattr__(self, "native_dtypes", tuple(self.backend.native_dtypes))
        object.__setattr__(self, "kernels", MappingProxyType(dict(self.kernels)))
        object.__setattr__(self, "kernel_checks", frozenset(self.kernel_checks))

    def kernel(self, op: str) -> Callable[..., Any]:
        """This backend's kernel for ``op``."""
        try:
            return self.kernels[op]
        except KeyError:
            raise UnsupportedOpError(f"backend {self.name!r} has no kernel for {op!r}") from None

    def owns(self, array: Any) -> bool:
        """Whether ``array`` is one of this backend's array types."""
        return array_module(array) in self.backend.array_modules


_LOCK = threading.RLock()
_BACKENDS: dict[str, Backend] = {}
_RUNTIMES: dict[str, Runtime] = {}
_FAILURES: dict[str, BackendUnavailableError] = {}
# Bumped by every (un)registration: keys the cached "which backend owns this array type" answer.
_GENERATION = [0]


def register_backend(backend: Backend) -> Backend:
    """Register ``backend`` under its ``name`` (replacing one of that name).

    Parameters
    ----------
    backend : Backend
        An instance of a :class:`Backend` subclass.

    Returns
    -------
    Backend
        ``backend``, so the call can be used as a decorator-like one-liner.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a Backend instance, got "
                        f"{type(backend).__name__}")
    if not backend.name or backend.name == "auto":
        raise ValueError("a backend needs a name other than 'auto' ('auto' means dispatch by "
                         "array type)")
    with _LOCK:
        _BACKENDS[backend.name] = backend
        _GENERATION[0] += 1
        _RUNTIMES.pop(backend.name, None)
        _FAILURES.pop(backend.name, None)
    return backend


def unregister_backend(name: str) -> None:
    """Remove the backend called ``name`` (an unknown name raises ``UnknownBackendError``)."""
    with _LOCK:
        lookup(name)
        del _BACKENDS[name]
        _GENERATION[0] += 1
        _RUNTIMES.pop(name, None)
        _FAILURES.pop(name, None)


def _unknown_message(name: str) -> str:
    names = ", ".join(repr(n) for n in ["auto", *_BACKENDS])
    return f"unknown backend {name!r}; known backends: {names}"


def lookup(name: str) -> Backend:
    """The registered backend called ``name`` (not built)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(_unknown_message(name)) from None


def load(name: str) -> Runtime:
    """The :class:`Runtime` of backend ``name``, built on first use.

    Raises
    ------
    UnknownBackendError
        No backend has that name.
    BackendUnavailableError
        It cannot run here; the message ends with what to install. Remembered: later calls
        raise the same error without trying again.
    """
    runtime = _RUNTIMES.get(name)
    if runtime is not None:
        return runtime
    with _LOCK:
        backend = lookup(name)
        if name in _RUNTIMES:
            return _RUNTIMES[name]
        if name in _FAILURES:
            raise _FAILURES[name]
        try:
            backend.check()
            runtime = backend.build()
        except BackendUnavailableError as exc:
            _FAILURES[name] = exc
            raise
        except ImportError as exc:
            msg = f"backend {name!r} is not available: {exc}. {backend.install_hint}".strip()
            _FAILURES[name] = BackendUnavailableError(msg)
            raise _FAILURES[name] from exc
        _RUNTIMES[name] = runtime
        return runtime


def available_backends() -> list[str]:
    """Names of the registered backends that can run here (building each to find out)."""
    names = []
    for name in list(_BACKENDS):
        try:
            load(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def loaded_runtimes() -> list[Runtime]:
    """The runtimes built so far in this process (what ``synchronize`` has to wait for)."""
    return list(_RUNTIMES.values())


def check_name(name: Any) -> str:
    """``name`` if it is ``"auto"`` or a registered backend; ``TypeError`` / ``UnknownBackendError``
    otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto":
        lookup(name)
    return name


class _ContextDefault:
    """A setting with a process-wide value and a context-local override (``with`` block)."""

    def __init__(self, name: str, initial: str, check: Callable[[Any], str]) -> None:
        self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar(name, default=None)
        self._global = initial
        self._check = check

    def get(self) -> str:
        value = self._var.get()
        # A thread started after set() has a fresh context: fall back to the global choice.
        return value if value is not None else self._global

    def set(self, value: Any) -> None:
        self._global = self._check(value)

    @contextlib.contextmanager
    def use(self, value: Any) -> Iterator[str]:
        token = self._var.set(self._check(value))
        try:
            yield value
        finally:
            self._var.reset(token)


def _check_validation(mode: Any) -> str:
    if mode not in ("async", "sync"):
        raise ValueError(f"validation mode must be 'async' or 'sync', got {mode!r}")
    return mode


_VALIDATION = _ContextDefault("nblosses_validation", "async", _check_validation)
_BACKEND = _ContextDefault("nblosses_backend", "auto", check_name)


def set_backend(name: str) -> None:
    """Set the process-wide default backend: a registered name or ``"auto"``.

    A :func:`use_backend` block still overrides it inside the block.
    """
    _BACKEND.set(name)


def get_backend() -> str:
    """The current default backend name (``"auto"`` unless changed)."""
    return _BACKEND.get()


def use_backend(name: str) -> contextlib.AbstractContextManager[str]:
    """Context manager that makes ``name`` the default backend inside the ``with`` block.

    The choice is context-local (``contextvars``): other threads and asyncio tasks keep theirs.
    """
    return _BACKEND.use(name)


def get_validation() -> str:
    """How device backends check class indices by default: ``"async"`` (in the kernels,
    reported later) or ``"sync"`` (eagerly, waiting for the device)."""
    return _VALIDATION.get()


def set_validation(mode: str) -> None:
    """Set the process-wide default of ``validate=`` (``"async"`` or ``"sync"``)."""
    _VALIDATION.set(mode)


def use_validation(mode: str) -> contextlib.AbstractContextManager[str]:
    """Context manager: ``validate=mode`` by default inside the ``with`` block (context-local).

    Examples
    --------
    >>> import numpy as np, nblosses
    >>> with nblosses.use_validation("sync"):
    ...     print(nblosses.get_validation())
    sync
    """
    return _VALIDATION.use(mode)


def synchronize() -> None:
    """Wait for the work queued by every backend used so far, then raise any error a kernel
    recorded (a class index out of range on a device backend: ``IndexError``).

    The only call besides ``validate="sync"`` that makes the host wait for a device.
    """
    for runtime in list(_RUNTIMES.values()):
        runtime.synchronize()


@functools.lru_cache(maxsize=256)
def _type_module(cls: Hashable) -> str:
    # Cached per type: every call of every op asks this of each argument.
    return getattr(cls, "__module__", "").partition(".")[0]


def array_module(array: Any) -> str:
    """Top-level module of ``array``'s type (``"numpy"``, ``"cupy"``, ...)."""
    return _type_module(cast(Hashable, type(array)))


_NOT_ARRAYS = (int, float, bool, list, tuple, type(None))


def resolve_backend(requested: str | None, *arrays: Any) -> Runtime:
    """Pick the backend of a call and build it.

    ``requested`` (the call's or module's ``backend=``) wins, then the context default, then
    ``"auto"``: the backend owning the array types among ``arrays`` (``None`` and Python
    scalars ignored; types no backend owns go to the ``fallback`` backend). Mixed array kinds
    under auto raise ``TypeError``.
    """
    name = requested if requested is not None else get_backend()
    if name != "auto":
        return _RUNTIMES.get(name) or load(check_name(name))
    owner = None
    for a in arrays:
        if isinstance(a, _NOT_ARRAYS):
            continue
        this = owner_of(array_module(a))
        if owner is None:
            owner = this
        elif this != owner:
            owners = sorted({owner_of(array_module(b)) for b in arrays
                             if not isinstance(b, _NOT_ARRAYS)})
            raise TypeError(
                "inputs live on different backends ({}); move them to one array type or pass "
                "backend= explicitly".format(", ".join(owners))
            )
    return load(owner or owner_of(""))


def numpy_runtime(requested: str | None) -> Runtime:
    """:func:`resolve_backend` of a call whose arrays are all NumPy arrays (at least one; the
    others ``None`` or Python scalars), without looking at them: the plain call's lane of
    :func:`nblosses._dispatch.call`."""
    name = requested if requested is not None else _BACKEND.get()
    if name == "auto":
        name = numpy_owner()
    runtime = _RUNTIMES.get(name)
    return runtime if runtime is not None else load(check_name(name))


# [(registry generation, name of the backend owning NumPy arrays)] (see numpy_owner); one
# tuple, replaced whole, so that a concurrent reader never sees a name of another generation.
_NUMPY_OWNER: list[tuple[int, str]] = [(-1, "")]


def numpy_owner() -> str:
    """``owner_of("numpy")``, cached until the next (un)registration: 0.05 against 0.13 us, on
    the path of every plain NumPy call."""
    generation, owner = _NUMPY_OWNER[0]
    if generation != _GENERATION[0]:
        generation = _GENERATION[0]
        owner = owner_of("numpy")
        _NUMPY_OWNER[0] = (generation, owner)
    return owner


@functools.lru_cache(maxsize=64)
def _owner_cached(module: str, generation: int) -> str:
    fallback = None
    for be in _BACKENDS.values():
        if module in be.array_modules:
            return be.name
        if be.fallback and fallback is None:
            fallback = be.name
    if fallback is None:
        raise TypeError(f"no registered backend takes {module or 'these'} arrays; pass backend=")
    return fallback


def owner_of(module: str) -> str:
    """The backend owning arrays of top-level module ``module`` (the fallback one if none)."""
    return _owner_cached(module, _GENERATION[0])
