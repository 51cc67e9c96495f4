"""Functional API: torch.nn.functional's softmax and classification losses for NumPy/CuPy.

Every function here is built from its entry in the op table (:mod:`nblosses._ops`): torch's
signature plus nblosses' keyword-only additions, a docstring from the same table, and one body,
``call(op, arguments)`` (:mod:`nblosses._dispatch`): check the options, pick the backend
(:func:`nblosses.use_backend`), bring the arrays to canonical form, run the kernel. Results are
arrays of the backend's type in the input's dtype; reduced losses are 0-d arrays. Dask arrays
are accepted by every function (lazy, chunked).

``functional.pyi`` beside this file spells out the same signatures for type checkers; it is
generated from the op table too (``python -m nblosses._stubs``) and a test keeps it current.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._dispatch import call
from ._fast import MISS, PATHS
from ._ops import OPS, Op

__all__ = sorted(OPS)


def _make(op: Op) -> Callable[..., Any]:
    """A plain Python function with ``op``'s exact signature whose body is ``call(op, ...)``
    (after the op's fast path, if it has one).

    Generated source rather than ``*args, **kwargs`` + ``Signature.bind``: binding costs a few
    microseconds per call, and a real signature gives ``help()``, ``inspect`` and error messages
    for free (the same technique as ``collections.namedtuple`` and ``dataclasses``).
    """
    namespace: dict[str, Any] = {"_call": call, "_op": op}
    params, names, star = [], [], False
    for p in op.signature().parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if p.default is p.empty:
            params.append(p.name)
        else:
            namespace[f"_default_{p.name}"] = p.default
            params.append(f"{p.name}=_default_{p.name}")
        names.append(p.name)
    body = ", ".join(f"{n!r}: {n}" for n in names)
    source = f"def {op.name}({', '.join(params)}):\n"
    if op.name in PATHS:  # the plain NumPy call first (:mod:`nblosses._fast`)
        namespace.update(_fast=PATHS[op.name], _MISS=MISS)
        source += (f"    result = _fast({', '.join(names)})\n"
                   "    if result is not _MISS:\n        return result\n")
    source += f"    return _call(_op, {{{body}}})\n"
    exec(compile(source, f"<nblosses.functional.{op.name}>", "exec"), namespace)
    fn = namespace[op.name]
    fn.__module__ = __name__
    fn.__doc__ = op.docstring()
    fn.__signature__ = op.signature()  # type: ignore[attr-defined]
    return fn


for _op in OPS.values():
    globals()[_op.name] = _make(_op)
del _op
