"""The split of the suite into a fast and a slow tier (``tests/conftest.py``) stays true.

A rule of ``conftest.SLOW`` that names a test no longer there would silently move a slow sweep
back into the fast tier (or name nothing at all): each rule must name existing test functions.
The generic spec-driven tests and the meta-test are the fast tier's sample of every op: no rule
names them and they carry no ``slow`` marker of their own; ``helpers.sample_params(...,
fast_samples=k)`` keeps each op's first ``k`` samples fast (every op, every front end) and puts
its others in the slow tier, where each compiles kernels of its own.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest
from conftest import ROOT, SLOW, Slow

#: Always in the fast tier: every op, both dtypes, through every front end.
ALWAYS_FAST = ("tests/api/test_specs.py", "tests/api/test_host_sync_specs.py",
               "tests/dask/test_dask_specs.py", "tests/interop/test_interop_specs.py",
               "tests/tooling/test_meta.py")


def _test_functions(path: Path) -> set[str]:
    """Names of the test functions (module level or in classes) defined in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.name.startswith("test"):
            names.add(node.name)
    return names


@pytest.mark.parametrize("rule", SLOW, ids=[f"{r.path}:{','.join(r.tests)}" for r in SLOW])
def test_every_rule_names_existing_tests(rule: Slow):
    path = ROOT / rule.path
    assert path.is_file(), f"slow-tier rule for a missing file {rule.path}"
    defined = _test_functions(path)
    for pattern in rule.tests:
        assert fnmatch.filter(defined, pattern), (
            f"slow-tier rule {rule.path}::{pattern} names no test (defined: {sorted(defined)})")


def test_the_spec_driven_tests_stay_in_the_fast_tier():
    assert not [r.path for r in SLOW if r.path in ALWAYS_FAST]
    for rel in ALWAYS_FAST:
        assert "mark.slow" not in (ROOT / rel).read_text(), f"{rel} is marked slow"


def test_a_rule_keeps_its_fast_sample():
    """``Slow.matches`` puts a sweep's other cases in the slow tier, its sample in the fast."""

    class Item:  # the attributes a rule reads of a pytest item
        def __init__(self, name: str, params: dict) -> None:
            self.originalname = self.name = self.nodeid = name
            self.callspec = type("CallSpec", (), {"params": params})()

    rule = Slow("tests/x.py", "sweep", ("test_sweep*",), fast=lambda p: p["n"] == 2)
    assert rule.matches(Item("test_sweep_c", {"n": 1}))
    assert not rule.matches(Item("test_sweep_c", {"n": 2}))
    assert not rule.matches(Item("test_other", {"n": 1}))
    assert Slow("tests/x.py", "all").matches(Item("test_any", {}))
    with pytest.raises(pytest.UsageError, match="update the rule"):
        rule.matches(Item("test_sweep_c", {"m": 2}))
