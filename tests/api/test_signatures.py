"""Every front end's signature against torch's and against each other, all from the op table."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from nblosses import _codegen, nn
from nblosses import functional as F
from nblosses._spec import OpSpec, Param, Role
from nblosses.ops import SPECS

OPS = list(SPECS.values())
MODULE_OPS = [op for op in OPS if op.module]
#: Modules torch has too (DistillationLoss is nblosses' own).
TORCH_MODULE_OPS = [op for op in MODULE_OPS if hasattr(torch.nn, str(op.module))]


def _torch_params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values()
            # torch.nn.Sigmoid inherits Module.__init__(*args, **kwargs), which takes none
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _ours(sig: inspect.Signature, op: OpSpec) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if op.param(p.name).torch]


def _plain(sig: inspect.Signature) -> list[tuple]:
    """Names, kinds and defaults (the generated functions add annotations)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _same(ours: list[inspect.Parameter], theirs: list[inspect.Parameter], what: str) -> None:
    assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], what
    for a, b in zip(ours, theirs):
        assert a.default == b.default, (what, a, b)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_functional_signature_is_torchs_plus_keyword_only_extras(op):
    sig = inspect.signature(getattr(F, op.name))
    assert _plain(sig) == _plain(op.signature())
    torch_fn = getattr(torch.nn.functional, op.name, None)
    if torch_fn is not None:  # the *_backward ops have no torch.nn.functional counterpart
        _same(_ours(sig, op), _torch_params(torch_fn), op.name)
    extras = [p for p in sig.parameters.values() if not op.param(p.name).torch]
    assert extras and all(p.kind is p.KEYWORD_ONLY for p in extras), extras


@pytest.mark.parametrize("op", TORCH_MODULE_OPS, ids=lambda op: op.module)
def test_module_constructor_is_torchs_plus_keyword_only_extras(op):
    sig = inspect.signature(getattr(nn, op.module))
    _same(_ours(sig, op), _torch_params(getattr(torch.nn, op.module)), op.module)
    assert sig.parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("op", MODULE_OPS, ids=lambda op: op.module)
def test_module_constructor_is_the_functional_configuration(op):
    """The constructor takes exactly the functional's non-array, per-module parameters, in the
    functional's order, with the same defaults."""
    ctor = list(inspect.signature(getattr(nn, op.module)).parameters.values())
    func = [p for p in inspect.signature(getattr(F, op.name)).parameters.values()
            if op.param(p.name).role is Role.CONFIG]
    assert [(p.name, p.kind, p.default) for p in ctor] == \
        [(p.name, p.kind, p.default) for p in func]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_docstring_documents_every_parameter(op):
    doc = inspect.getdoc(getattr(F, op.name))
    for p in op.params:
        assert f"\n{p.name} : " in doc, (op.name, p.name)


def test_dask_front_end_has_no_signatures_of_its_own():
    """Dask arrays go through the same functions (one contract), routed by the dispatcher: the
    package exports ``call`` alone, and none of its modules defines a function's name."""
    pytest.importorskip("dask.array")
    import importlib
    import pkgutil

    from nblosses import _dask

    assert _dask.__all__ == ["call"]
    modules = [_dask, *(importlib.import_module(f"{_dask.__name__}.{m.name}")
                        for m in pkgutil.iter_modules(_dask.__path__))]
    assert len(modules) > 1
    for module in modules:
        public = [n for n in vars(module) if not n.startswith("_") and n in F.__all__]
        assert public == [], (module.__name__, public)


def test_signature_table_lists_every_op():
    table = _codegen.signature_table()
    for op in OPS:
        assert f"F.{op.name}(" in table
        if op.module:
            assert f"nn.{op.module}" in table


def test_adding_an_option_is_one_param():
    """A keyword option added to a spec reaches the generated function and the runner."""
    seen = {}

    def check(op_name, value):
        seen["checked"] = value
        return float(value)

    extra = Param("temperature", 1.0, "float\n    test option", keyword_only=True,
                  check=check, kernel=True, torch=False)
    op = SPECS["softmax"]
    # No fast path: softmax's takes the public parameters in order, and this op has one more.
    new = dataclasses.replace(op, params=(*op.params, extra), fast_path=None,
                              runner=lambda be, op_, v, opts: seen.update(opts) or np.zeros(1))
    namespace: dict = {}
    # The generator's text, run where its spec table holds the new spec.
    exec(_codegen._function(new), {**vars(F), "_SPECS": {"softmax": new}}, namespace)
    fn = namespace["softmax"]
    assert "temperature" in inspect.signature(fn).parameters
    fn(np.zeros(3), 0, temperature=2)
    assert seen["checked"] == 2 and seen["temperature"] == 2.0


def test_linear_cross_entropy_module_constructor_is_torchs_plus_keyword_only_extras():
    ours = inspect.signature(nn.LinearCrossEntropyLoss).parameters
    theirs = _torch_params(torch.nn.LinearCrossEntropyLoss)
    _same([ours[p.name] for p in theirs], theirs, "LinearCrossEntropyLoss")
    extras = [p for n, p in ours.items() if n not in {q.name for q in theirs}]
    assert {p.name for p in extras} == {"z_loss", "softcap", "return_lse", "backend"}
    assert all(p.kind is p.KEYWORD_ONLY for p in extras)
