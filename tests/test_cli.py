"""`nblosses info` and `nblosses bench` run and report sane numbers (timings are never
asserted: they belong to benchmarks). Kept fast: one op on the --quick shapes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nblosses._bench import cases as C
from nblosses._bench import memory, timing

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nblosses.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def test_info_text():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("nblosses", "numpy", "numba", "llvmlite", "python", "available backends",
                 "numba threading layer", "numba threads", "numba cache"):
        assert text in out
    assert "cpu" in out.split("available backends", 1)[1].splitlines()[0]


def test_info_json():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "cpu" in info["available_backends"]
    assert set(info["backends"]) >= {"cpu", "cuda"}
    assert info["numba_threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["numba_threads"] >= 1
    for optional in ("torch", "scipy", "cupy"):  # present or None, never a crash
        assert optional in info


def test_bench_quick_softmax(tmp_path):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = run_cli("bench", "--quick", "--ops", "softmax", "--json", str(js), "--plot",
                   str(png), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "| op" in table and "GB/s" in table and "% copy" in table
    assert "softmax" in table and "geomean" in table
    assert "First call" in table

    out = json.loads(js.read_text())
    meta = out["meta"]
    assert meta["backend"] == "cpu" and meta["copy_gbps"] > 0
    assert meta["shapes"] == [s.label for s in C.QUICK_SHAPES]
    rows = out["results"]
    assert [r["shape"] for r in rows] == meta["shapes"]
    for r in rows:
        assert "error" not in r, r
        assert r["op"] == "softmax" and r["dtype"] == "float32"
        assert r["time_s"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0
        assert r["timing"]["repeat"] >= 3 and len(r["timing"]["samples"]) == r["timing"]["repeat"]
        for peer, v in r["peers"].items():
            assert peer in ("torch", "scipy")
            assert v["ratio"] == pytest.approx(v["time_s"] / r["time_s"])
        if r["peers"]:
            assert r["check"]["ok"], r["check"]
    geo = out["summary"]["geomean"]
    assert [g["op"] for g in geo] == ["softmax"]
    fc = out["first_call"]
    assert fc and fc[0]["op"] == "softmax"
    assert fc[0]["cold"]["first_call_s"] > 0 and fc[0]["warm"]["first_call_s"] > 0

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # the same results as reStructuredText tables (docs/perf_table.rst) parse cleanly
    from nblosses._bench import report

    rst = report.format_report(out, "rst")
    assert "=====" in rst and "softmax" in rst
    docutils_core = pytest.importorskip("docutils.core")
    import io

    warnings = io.StringIO()
    docutils_core.publish_doctree(rst, settings_overrides={"warning_stream": warnings,
                                                           "report_level": 2})
    assert warnings.getvalue() == ""

    # scripts/perf_table.py: the README's ratio table and docs/perf_table.rst from this JSON
    script = [sys.executable, str(ROOT / "scripts" / "perf_table.py"), str(js)]
    md = subprocess.run(script, capture_output=True, text=True, check=True).stdout.splitlines()
    assert md[0].split(" | ")[1:-1] == meta["shapes"]
    if "torch" in rows[0]["peers"]:
        assert md[2].startswith("| softmax, float32 | ")
        assert md[2].split(" | ")[1:-1] == [f"{r['peers']['torch']['ratio']:.2f}x" for r in rows]
    table = subprocess.run(script + ["--rst"], capture_output=True, text=True, check=True).stdout
    warnings = io.StringIO()
    docutils_core.publish_doctree(table, settings_overrides={"warning_stream": warnings,
                                                             "report_level": 2})
    assert warnings.getvalue() == ""


def test_bench_rejects_unknown_op():
    proc = run_cli("bench", "--quick", "--ops", "no_such_op")
    assert proc.returncode == 2 and "unknown op" in proc.stderr


def test_entry_point_installed():
    exe = Path(sys.executable).with_name("nblosses")
    exe = str(exe) if exe.exists() else shutil.which("nblosses")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    proc = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nblosses"]


def test_cli_imports_nothing_heavy():
    code = ("import sys, nblosses, nblosses.cli, nblosses._bench.cases; "
            "print(sorted(m for m in ('torch', 'scipy', 'cupy', 'matplotlib', 'tqdm') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- pieces
def test_shape_labels_round_trip():
    for s in (*C.SHAPES, *C.QUICK_SHAPES, *C.TINY_SHAPES):
        assert C.parse_shape(s.label) == s
    assert C.parse_shape("8x1024x1024") == C.Shape((8, 1024, 1024), 2)
    assert C.parse_shape("8x1024x1024:-1").axis == 2
    assert C.parse_shape("32x[21]x4096").class_layout() == ((32, 21, 4096), (32, 4096))
    assert C.parse_shape("8x1024x[1024]").class_layout() == ((8192, 1024), (8192,))
    with pytest.raises(ValueError):
        C.parse_shape("4x[5]x[6]")
    with pytest.raises(ValueError):
        C.parse_shape("banana")


def test_parse_ops():
    assert C.parse_ops(None) == list(C.OPS)
    assert C.parse_ops("softmax,cross_entropy_grad") == ["softmax", "cross_entropy_grad"]
    assert set(C.parse_ops("losses")) >= {"cross_entropy", "bce_grad"}
    with pytest.raises(ValueError):
        C.parse_ops("softmax,nope")


@pytest.mark.parametrize("op", list(C.OPS))
def test_every_case_builds_and_runs_tiny(op):
    for shape in C.TINY_SHAPES:
        inputs = C.make_inputs(op, shape, "float32")
        assert inputs.nbytes_moved > 0 and inputs.nbytes_input > 0
        C.nblosses_callable(inputs)()


def test_measure_round_robin():
    calls = {"a": 0, "b": 0}

    def f(name):
        def run():
            calls[name] += 1
        return run

    t = timing.measure({"a": (f("a"), None), "b": (f("b"), None)}, repeat=3, min_sample=1e-4)
    assert set(t) == {"a", "b"}
    for v in t.values():
        assert v.repeat == 3 and v.min <= v.median and v.number >= 1


def test_extra_peak_sees_a_temporary():
    n = 2_000_000  # 16 MB float64

    def fn():
        tmp = np.ones(n)
        return float(tmp.sum())

    m = memory.extra_peak(fn)
    assert m["out_bytes"] == 0
    assert m["traced"] >= 8 * n
    if m["rss"] is not None:
        assert 0.9 * 8 * n <= m["rss"] <= 1.5 * 8 * n
