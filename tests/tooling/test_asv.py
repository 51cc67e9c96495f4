"""The asv benchmarks cannot rot: `asv check` discovers them, one call of every benchmark of every
module runs here with the smallest parameters (a tiny shape), directly in Python, teardown
survives a skipped setup, each documented `-b` regex selects exactly one family, and every
benchmark case of the op specs is timed."""

from __future__ import annotations

import importlib
import inspect
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AREAS = ["softmax", "backward", "sigmoid", "losses", "layouts", "gate", "first_call", "peakmem"]
#: Every benchmark module, the five areas and any added since (helpers excluded).
MODULES = sorted({p.stem for p in (ROOT / "asv_bench").glob("*.py")
                  if p.stem not in ("__init__", "common")} | set(AREAS))
PREFIXES = ("time_", "peakmem_", "track_", "mem_")


def _asv_cmd():
    exe = Path(sys.executable).with_name("asv")
    if exe.exists():
        return [str(exe)]
    if shutil.which("asv"):
        return ["asv"]
    pytest.importorskip("asv")
    return [sys.executable, "-m", "asv"]


def test_asv_check():
    cmd = _asv_cmd() + ["check", "-E", f"existing:{sys.executable}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No problems found" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def asv_bench():
    sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module("asv_bench")
    finally:
        sys.path.remove(str(ROOT))


def _benchmarks(module):
    for name, cls in inspect.getmembers(module, inspect.isclass):
        # asv's discovery skips private names (bases shared by benchmark classes)
        if cls.__module__ != module.__name__ or name.startswith("_"):
            continue
        methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
        if methods:
            yield cls, methods


@pytest.mark.parametrize("name", MODULES)
def test_dry_run(asv_bench, name):
    module = importlib.import_module(f"asv_bench.{name}")
    common = importlib.import_module("asv_bench.common")
    ran, skipped = [], []
    for cls, methods in _benchmarks(module):
        params = getattr(cls, "params", [])
        args = common.smallest_params(params, cls.param_names) if params else []
        for method in methods:
            bench = cls()
            try:
                bench.setup(*args)
            except NotImplementedError:  # e.g. cuda without a device; asv tears down too
                if hasattr(bench, "teardown"):
                    bench.teardown(*args)
                skipped.append(f"{cls.__name__}.{method}")
                continue
            try:
                value = getattr(bench, method)(*args)
                if method.startswith("track_"):
                    assert isinstance(value, (int, float)) and math.isfinite(value), value
            finally:
                if hasattr(bench, "teardown"):
                    bench.teardown(*args)
            ran.append(f"{cls.__name__}.{method}")
    assert ran, f"nothing ran in asv_bench.{name} (skipped: {skipped})"


def _all_benchmarks(asv_bench):
    """``(module name, class)`` of every benchmark class in every module."""
    for name in MODULES:
        module = importlib.import_module(f"asv_bench.{name}")
        for cls, methods in _benchmarks(module):
            yield name, cls, methods


def _args(cls):
    common = importlib.import_module("asv_bench.common")
    params = getattr(cls, "params", [])
    return common.smallest_params(params, cls.param_names) if params else []


def test_every_case_is_timed(asv_bench):
    """Each case of the table (every one not slow, and the LM heads) is a parameter of a timed
    nblosses benchmark: the modules read the table, so a new op needs no edit here."""
    common = importlib.import_module("asv_bench.common")
    timed = set()
    for _, cls, methods in _all_benchmarks(asv_bench):
        names = getattr(cls, "param_names", [])
        if "op" in names and issubclass(cls, common.CaseBenchmark) and any(
                m.startswith("time_") for m in methods):
            timed.update(cls.params[names.index("op")])
    cases = common.cases
    expected = set(cases.case_names()) | set(common.LINEAR)
    assert expected and expected <= timed, sorted(expected - timed)
    assert timed <= set(cases.case_table())


def test_teardown_after_skipped_setup(asv_bench, monkeypatch):
    """asv runs teardown after a setup that raised NotImplementedError (a skip), so teardown
    must not need what setup would have set: every class, its backend check made to skip."""
    common = importlib.import_module("asv_bench.common")

    def unusable(backend):
        raise common.SkipNotImplemented(f"no {backend} here")

    checked = 0
    for name, cls, _ in _all_benchmarks(asv_bench):
        module = importlib.import_module(f"asv_bench.{name}")
        for where in (common, module):
            if hasattr(where, "backend_or_skip"):
                monkeypatch.setattr(where, "backend_or_skip", unusable)
        bench, args = cls(), _args(cls)
        try:
            bench.setup(*args)
        except NotImplementedError:  # SkipNotImplemented too, as asv catches them
            checked += 1
        if hasattr(bench, "teardown"):
            bench.teardown(*args)
    assert checked > 0


@pytest.mark.parametrize("error", ["SkipNotImplemented", "NotImplementedError"])
def test_first_call_teardown_after_skipped_setup(asv_bench, monkeypatch, error):
    first_call = importlib.import_module("asv_bench.first_call")
    common = importlib.import_module("asv_bench.common")
    exc = common.SkipNotImplemented if error == "SkipNotImplemented" else NotImplementedError

    def unusable(backend):
        raise exc(f"no {backend} here")

    monkeypatch.setattr(first_call, "backend_or_skip", unusable)
    bench = first_call.FirstCall()
    with pytest.raises(exc):
        bench.setup("softmax", "cuda", "cold")
    bench.teardown("softmax", "cuda", "cold")  # the asv failure: AttributeError on self.dir
    made = []
    monkeypatch.setattr(first_call, "backend_or_skip", lambda backend: None)
    bench.setup("softmax", "cpu", "cold")
    made.append(bench.dir)
    bench.teardown("softmax", "cpu", "cold")
    assert made[0] and not Path(made[0]).exists()


def _discovered():
    """What asv's own discovery lists: names (``module.Class.method``) and parameter reprs."""
    discovery = pytest.importorskip("asv_runner.discovery")
    return [{"name": b.name, "params": b.params}
            for b in discovery.disc_benchmarks(str(ROOT / "asv_bench"))]


def test_every_module_is_a_documented_family(asv_bench):
    assert set(asv_bench.FAMILIES) == set(MODULES)
    for regex in asv_bench.FAMILIES.values():
        assert f"``'{regex}'``" in asv_bench.__doc__, regex


def test_no_benchmark_listed_twice():
    """A benchmark class imported into another module is listed (and run) there too."""
    tails = [b["name"].split(".", 1)[1] for b in _discovered()]
    assert sorted(t for t in tails if tails.count(t) > 1) == []


@pytest.mark.parametrize("family", MODULES)
def test_family_regex_selects_one_module(asv_bench, family):
    """asv's own filter (regex searched in names *and* parameter strings) with each regex."""
    benchmarks = pytest.importorskip("asv.benchmarks")
    regex = asv_bench.FAMILIES[family]
    found = _discovered()
    conf = type("Conf", (), {"benchmark_dir": str(ROOT / "asv_bench")})()
    selected = benchmarks.Benchmarks(conf, found, regex=[regex])
    modules = {name.split(".", 1)[0] for name in selected}
    assert modules == {family}, (regex, sorted(selected))
    assert len(selected) == sum(b["name"].startswith(family + ".") for b in found)
    # the unanchored op name would not do: it matches other families' parameters
    if family == "softmax":
        loose = benchmarks.Benchmarks(conf, found, regex=["softmax"])
        assert {name.split(".", 1)[0] for name in loose} > {"softmax"}
