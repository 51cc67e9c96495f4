"""The op specs (:class:`nblosses._spec.OpSpec`), one module per op family.

:data:`SPECS` maps each op's name to its spec, in the order the docs list them. Adding an op is
a spec in one of these modules (or a new module listed in :data:`FAMILIES`) plus its kernels;
every front end, registry, test, benchmark and docs list reads it from here.

Importing this package imports the argument checks and the registry, nothing heavy: the
runners reach kernels through the backend runtime, built on first use.
"""

from __future__ import annotations

from types import MappingProxyType

from .._spec import OpSpec
from . import (
    activations,
    binary_losses,
    class_losses,
    distillation,
    kl_div,
    linear_ce,
    linear_distillation,
    linear_token_logprobs,
    token_logprobs,
)

#: The family modules, in docs order; each defines ``SPECS``, a tuple of its specs.
FAMILIES = (activations, class_losses, binary_losses, kl_div, distillation, linear_ce,
            linear_distillation, token_logprobs, linear_token_logprobs)

SPECS: MappingProxyType[str, OpSpec] = MappingProxyType(
    {spec.name: spec for family in FAMILIES for spec in family.SPECS})


def kernel_modules() -> dict[str, str]:
    """Each kernel-protocol name -> the module, in every built-in backend package, that defines
    a function of that name (from the specs' ``kernels`` and ``kernel_module``)."""
    table: dict[str, str] = {}
    for spec in SPECS.values():
        for kernel in spec.kernels:
            if table.setdefault(kernel, spec.kernel_module) != spec.kernel_module:
                raise ValueError(f"kernel {kernel!r} is claimed by two modules: "
                                 f"{table[kernel]!r} and {spec.kernel_module!r}")
    return table
