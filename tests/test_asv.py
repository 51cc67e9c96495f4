"""The asv benchmarks cannot rot: `asv check` discovers them, and one call of every benchmark
of every module runs here with the smallest parameters (a tiny shape), directly in Python."""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ["softmax", "losses", "backward", "first_call", "peakmem"]
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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
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
            except common.SkipNotImplemented:  # e.g. cuda without a device
                skipped.append(f"{cls.__name__}.{method}")
                continue
            try:
                value = getattr(bench, method)(*args)
                if method.startswith("track_"):
                    assert isinstance(value, (int, float)) and value == value, value
            finally:
                if hasattr(bench, "teardown"):
                    bench.teardown(*args)
            ran.append(f"{cls.__name__}.{method}")
    assert ran, f"nothing ran in asv_bench.{name} (skipped: {skipped})"
