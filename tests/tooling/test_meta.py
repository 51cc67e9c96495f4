"""Every op is wired end to end: the meta-test over the op specs (:mod:`nblosses.ops`).

The generic tests run whatever each spec provides: torch parity and gradients
(``tests/api/test_specs.py``), Dask (``tests/dask/test_dask_specs.py``), torch / JAX arrays
(``tests/interop/test_interop_specs.py``) and the fake device (``tests/api/
test_host_sync_specs.py``). A spec that provides nothing would pass them all; this test fails
instead, naming the op and each missing piece:

- a torch parity case: ``reference`` and ``samples``;
- a gradient check: a sample with ``grad=True`` for an op with ``return_grad``;
- a Dask case: a ``dask`` plan (the generic Dask test runs the samples through it);
- an interop case: samples whose arrays are NumPy float64 / int64 arrays (or tuples of them),
  which the generic tests convert to torch, JAX, Dask and device arrays;
- a host-sync case: a CPU kernel for each of the op's kernels, from which the fake device's
  stand-in is derived;
- a docs entry: ``docs/<docs_page>.rst`` exists and names the op, and the API page lists it
  (``nblosses._codegen.api_lists``, included by ``docs/api.rst``);
- a bench case: ``spec.bench`` (and each case is in the benchmark table).

And every spec's kernels exist in both built-in backend packages (``KERNEL_MODULES``): the CPU
module imports and defines them, the CUDA host module's file defines them (read as source, so
no CuPy is needed).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import spec_samples

import nblosses
from nblosses import _codegen
from nblosses.backends import KERNEL_MODULES
from nblosses.ops import SPECS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BACKENDS = Path(nblosses.__file__).parent / "backends"
#: The dtypes a sample's arrays may have (the generic tests cast float64 to each tested dtype).
SAMPLE_DTYPES = (np.dtype("float64"), np.dtype("int64"))


def _arrays(value: Any) -> Iterator[Any]:
    """The array-like leaves of a sample argument (tuple-valued arguments included)."""
    if isinstance(value, tuple):
        for v in value:
            yield from _arrays(v)
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        yield value


def _defines(path: Path, name: str) -> bool:
    """Whether the module at ``path`` binds ``name`` at top level (def, assignment, import)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, ast.Assign):
            bound = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound = [node.target.id]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = [(a.asname or a.name).partition(".")[0] for a in node.names]
        else:
            continue
        if name in bound:
            return True
    return False


def _api_listed() -> set[str]:
    """Names in the API page's generated function lists that ``docs/api.rst`` includes."""
    api = (DOCS / "api.rst").read_text()
    listed: set[str] = set()
    for file, text in _codegen.api_lists().items():
        if file.startswith("functions_") and f"_generated/{file}" in api:
            listed |= set(re.findall(r"^   (\w+)$", text, re.M))
    return listed


def missing(spec: Any) -> list[str]:
    """What ``spec`` lacks of the wiring every op must have (empty: nothing)."""
    from nblosses._bench.cases import case_table
    from nblosses.backends.cpu import KERNELS

    out = []
    samples = spec_samples(spec)
    if spec.reference is None:
        out.append("a torch parity case: spec.reference (the op written with torch)")
    if not samples:
        out.append("a torch parity case: spec.samples (small calls for the generic tests)")
    grad_samples = [s for s in samples if s.grad]
    if "return_grad" in spec.results and not grad_samples:
        out.append("a gradient check: a Sample with grad=True")
    if grad_samples and "return_grad" not in spec.results:
        out.append("a gradient check: samples with grad=True, but 'return_grad' is not in "
                   "spec.results")
    if spec.dask is None:
        out.append("a Dask case: spec.dask (a plan of nblosses._dask)")
    for i, s in enumerate(samples):
        bad = [f"{type(a).__name__} {getattr(a, 'dtype', '')}".strip()
               for a in _arrays((*s.args, *s.kwargs.values()))
               if not (isinstance(a, np.ndarray) and a.dtype in SAMPLE_DTYPES)]
        if bad:
            out.append(f"an interop case: sample {i} holds {', '.join(bad)} where the generic "
                       f"tests need NumPy float64 / int64 arrays")
    no_cpu = [k for k in spec.kernels if k not in KERNELS]
    if no_cpu:
        out.append(f"a host-sync case: no CPU kernel {no_cpu} to derive the fake device's "
                   f"stand-in from")
    page = DOCS / f"{spec.docs_page}.rst"
    if not page.exists():
        out.append(f"a docs entry: docs/{spec.docs_page}.rst (spec.docs_page) does not exist")
    elif not re.search(rf"\b{re.escape(spec.name)}\b", page.read_text()):
        out.append(f"a docs entry: docs/{spec.docs_page}.rst does not mention {spec.name}")
    if spec.name not in _api_listed():
        out.append("a docs entry: the API page (docs/api.rst's generated lists) does not list "
                   "it")
    if not spec.bench:
        out.append("a bench case: spec.bench")
    table = case_table()
    for case in spec.bench:
        if table.get(case.name) is not case:
            out.append(f"a bench case: {case.name!r} is not in the benchmark table")
    return out


@pytest.mark.parametrize("spec", SPECS.values(), ids=list(SPECS))
def test_every_op_is_wired_end_to_end(spec):
    lacking = missing(spec)
    assert not lacking, f"op {spec.name!r} lacks:\n  - " + "\n  - ".join(lacking)


def test_the_meta_test_finds_what_a_spec_lacks():
    """A spec stripped of its wiring is reported on every count (the check itself can fail)."""
    spec = SPECS["cross_entropy"]
    bare = dataclasses.replace(spec, name="unwired_op", reference=None, samples=None, dask=None,
                               bench=(), docs_page="no_such_page", kernels=("no_such_kernel",))
    lacking = "\n".join(missing(bare))
    for what in ("spec.reference", "spec.samples", "gradient check", "spec.dask",
                 "host-sync case", "docs/no_such_page.rst", "API page", "spec.bench"):
        assert what in lacking, f"{what!r} not reported in:\n{lacking}"
    listed = dataclasses.replace(spec, samples=lambda rng: [
        dataclasses.replace(s, args=(list(s.args[0]), *s.args[1:]))
        for s in spec.samples(rng)])
    assert "an interop case" in "\n".join(missing(listed))


@pytest.mark.parametrize("spec", SPECS.values(), ids=list(SPECS))
def test_kernels_exist_in_both_builtin_backends(spec):
    for kernel in spec.kernels:
        module = KERNEL_MODULES.get(kernel)
        assert module == spec.kernel_module, (
            f"op {spec.name!r}: KERNEL_MODULES maps {kernel!r} to {module!r}, the spec says "
            f"{spec.kernel_module!r}")
        cpu = importlib.import_module(f"nblosses.backends.cpu.{module}")
        assert callable(getattr(cpu, kernel, None)), (
            f"op {spec.name!r}: nblosses/backends/cpu/{module}.py defines no {kernel}")
        cuda = BACKENDS / "cuda" / f"{module}.py"
        assert cuda.exists(), f"op {spec.name!r}: no CUDA host module {cuda.relative_to(ROOT)}"
        assert _defines(cuda, kernel), (
            f"op {spec.name!r}: {cuda.relative_to(ROOT)} defines no {kernel}")


def test_the_source_check_finds_definitions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import a.b\nfrom c import d as e\nf = 1\ndef g(): pass\nclass H: pass\n"
                    "if True:\n    hidden = 1\n")
    assert all(_defines(path, n) for n in ("a", "e", "f", "g", "H"))
    assert not any(_defines(path, n) for n in ("d", "hidden", "b"))
