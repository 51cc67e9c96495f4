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
from nblosses._bench import config as K
from nblosses._bench import memory, targets, timing

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nblosses.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env, check=False)


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
    _check_machine_facts(info)


def _check_machine_facts(facts):
    """CPU model, ISA level, L2, torch's and Numba's view of the CPU: present, sane types."""
    assert isinstance(facts["cpu"], str) and facts["cpu"]
    assert facts["cpu_count"] >= 1
    assert facts["isa_level"] is None or facts["isa_level"].startswith("x86-64-v")
    assert isinstance(facts["simd_flags"], list)
    assert facts["l2_bytes"] is None or facts["l2_bytes"] >= 64 << 10
    assert isinstance(facts["numba_cpu_name"], str) and facts["numba_cpu_name"]
    assert isinstance(facts["numba_avx2"], bool) and isinstance(facts["numba_avx512f"], bool)
    if facts["numba_avx512f"] and facts["isa_level"]:
        assert facts["isa_level"] == "x86-64-v4" or "avx512f" in facts["simd_flags"]
    torch_cap = facts["torch_cpu_capability"]
    assert torch_cap is None or (isinstance(torch_cap, str) and torch_cap)


def test_info_needs_no_benchmark_harness():
    """`nblosses info` is part of the library: it must run without nblosses._bench."""
    code = ("import sys, io, contextlib; sys.modules['nblosses._bench'] = None\n"
            "from nblosses import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()): rc = cli.main(['info', '--json'])\n"
            "print(rc, sorted(m for m, mod in sys.modules.items()\n"
            "                 if m.startswith('nblosses._bench') and mod is not None))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "[]"]


def test_bench_quick_softmax(tmp_path):
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = run_cli("bench", "--quick", "--ops", "softmax", "--json", str(js), "--plot",
                   str(png), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    assert "| op" in table and "GB/s" in table and "% copy" in table
    assert "softmax" in table and "geomean" in table
    assert "First call" in table

    for fact in ("CPU:", "ISA level", "torch CPU capability", "Numba target CPU",
                 "copy bandwidth:"):
        assert fact in table
    out = json.loads(js.read_text())
    meta = out["meta"]
    assert meta["backend"] == "cpu" and meta["copy_gbps"] > 0
    _check_machine_facts(meta["machine"])
    copy = meta["machine"]["copy"]
    assert copy["gbps"] == max(copy["copyto_gbps"], copy["parallel_gbps"]) == meta["copy_gbps"]
    assert copy["copyto_threads"] == 1 and copy["parallel_threads"] >= 1
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
    assert md[0].startswith("Measured ") and meta["machine"]["cpu"] in md[0]
    assert meta["machine"]["numba_cpu_name"] in md[0] and "GB/s" in md[0]
    assert md[2].split(" | ")[1:-1] == meta["shapes"]
    if "torch" in rows[0]["peers"]:
        assert md[4].startswith("| softmax, float32 | ")
        assert md[4].split(" | ")[1:-1] == [f"{r['peers']['torch']['ratio']:.2f}x" for r in rows]
    table = subprocess.run(script + ["--rst"], capture_output=True, text=True, check=True).stdout
    warnings = io.StringIO()
    docutils_core.publish_doctree(table, settings_overrides={"warning_stream": warnings,
                                                             "report_level": 2})
    assert warnings.getvalue() == ""


def test_bench_rejects_unknown_op():
    proc = run_cli("bench", "--quick", "--ops", "no_such_op")
    assert proc.returncode == 2 and "unknown op" in proc.stderr


def _targets_file(tmp_path, goal):
    """The packaged configuration with one target: softmax at ``goal`` % of copy bandwidth."""
    cfg = json.loads(K.DEFAULT_FILE.read_text())
    cfg["targets"] = [{"kind": "pct_copy", "name": "{op} {dtype} % copy", "stat": "min",
                       "min_bytes": 0, "ops": ["softmax"], "dtypes": "*", "goal": goal}]
    path = tmp_path / f"targets-{goal:g}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(("goal", "check", "status", "rc"), [
    (1e9, True, "FAIL", 1),   # an impossible goal fails the gate
    (1e9, False, "FAIL", 0),  # printed, but the exit status ignores targets without --check
    (0.0, True, "PASS", 0),
])
def test_bench_check_exit_status(tmp_path, goal, check, status, rc):
    args = ["bench", "--quick", "--ops", "softmax", "--shapes", "64x[100]", "--peers", "none",
            "--first-call", "none", "--memory", "none", "--no-progress", "--repeat", "3",
            "--targets", str(_targets_file(tmp_path, goal))]
    proc = run_cli(*args, *(["--check"] if check else []))
    assert proc.returncode == rc, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "softmax float32 % copy" in ln)
    assert line.startswith(f"| {status}")


def test_bench_help_documents_exit_status():
    out = run_cli("bench", "--help").stdout
    assert "exit status" in out and "--check" in out and "--targets" in out
    for code in ("0 ", "1 ", "2 "):
        assert f"\n  {code}" in out


@pytest.mark.parametrize("content", ["{not json", json.dumps({"peers": {}})])
def test_bench_rejects_bad_targets_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    proc = run_cli("bench", "--quick", "--targets", str(path))
    assert proc.returncode == 2 and "nblosses bench:" in proc.stderr


def test_entry_point_installed():
    exe = Path(sys.executable).with_name("nblosses")
    exe = str(exe) if exe.exists() else shutil.which("nblosses")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    proc = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nblosses"]


def test_cli_imports_nothing_heavy():
    code = ("import sys, nblosses, nblosses.cli, nblosses._bench.cases; "
            "print(sorted(m for m in ('torch', 'scipy', 'cupy', 'matplotlib', 'tqdm') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bench_quick_linear_cross_entropy(tmp_path):
    """The slow op runs alone on its quick shape against both torch peers, memory included."""
    js = tmp_path / "lce.json"
    op = "linear_cross_entropy_grad"
    proc = run_cli("bench", "--quick", "--ops", op, "--json", str(js), "--no-progress",
                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert op in proc.stdout and "vs torch_chunked" in proc.stdout
    out = json.loads(js.read_text())
    quick = [s.label for s in C.SLOW_OPS[op].quick_shapes]
    rows = out["results"]
    assert [r["shape"] for r in rows] == quick
    for r in rows:
        assert "error" not in r, r
        assert r["op"] == op and r["time_s"] > 0
        assert set(r["peers"]) == {"torch", "torch_chunked"}, r["peers"]
        for v in r["peers"].values():
            assert "error" not in v and v["ratio"] == pytest.approx(v["time_s"] / r["time_s"])
        # loss and both gradients agree with torch's reference (no bias: no bias gradient)
        assert r["check"]["peer"] == "torch" and r["check"]["ok"], r["check"]
    mem = out["memory"]
    assert [m["shape"] for m in mem] == quick
    for m in mem:
        assert "error" not in m, m
        assert m["nblosses"]["traced"] > 0 and "torch" in m and "torch_chunked" in m
    names = [t["target"] for t in out["summary"]["targets"]]
    assert len([n for n in names if n.startswith(op)]) == 3, names
    assert not out["first_call"]  # not in the configuration's first-call ops


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


@pytest.mark.parametrize("slow", list(C.SLOW_OPS))
def test_slow_ops_only_when_named(slow):
    """Seconds-per-call ops stay out of the default run and of every group, `targets` too."""
    assert slow not in C.parse_ops(None)
    for group in C.OP_GROUPS:
        assert slow not in C.parse_ops(group), group
    assert C.parse_ops(f"softmax,{slow}") == ["softmax", slow]
    op = C.lookup_op(slow)
    assert op.own_shapes(quick=False) and op.own_shapes(quick=True)
    big = max(s.size for s in op.own_shapes(quick=False))
    assert all(s.size < big for s in op.own_shapes(quick=True))


def test_linear_inputs_layout():
    inputs = C.make_inputs("linear_cross_entropy_grad", "6x4x[10]")
    a = inputs.arrays
    assert a["x"].shape == (6, 4) and a["w"].shape == (10, 4) and a["t"].shape == (6,)
    assert 0 <= a["t"].min() and a["t"].max() < 10
    assert inputs.nbytes_input == 6 * 10 * 4  # the N x V logits: base of memory percentages
    loss, grads = C.nblosses_callable(inputs)()
    assert np.isfinite(loss) and grads[0].shape == (6, 4) and grads[1].shape == (10, 4)
    with pytest.raises(ValueError):
        C.make_inputs("linear_cross_entropy_grad", "6x[10]")


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


def test_packaged_config_is_valid():
    cfg = K.load()
    assert set(K.KINDS) == set(targets._KINDS)
    assert {t["kind"] for t in cfg["targets"]} == set(K.KINDS)
    assert set(cfg["peers"]) == {"torch", "torch_chunked", "scipy", "cupyx"}
    for spec in cfg["targets"]:
        for op in spec.get("ops", []) if spec.get("ops") != "*" else []:
            assert op in C.OPS or op in C.SLOW_OPS, spec


def _fake_run(ratios, l2=1 << 20):
    """A run's JSON for :func:`targets.evaluate`: softmax on two shapes, torch ``ratios``."""
    results = [{"op": "softmax", "dtype": "float32", "shape": f"s{i}", "input_bytes": size,
                "pct_copy": pct, "peers": {"torch": {"ratio": r}} if r else {}}
               for i, (r, size, pct) in enumerate(zip(ratios, (2 << 20, 1 << 10), (70.0, 5.0)))]
    peers = {"torch": (sum(r for r in ratios) / 2)} if all(ratios) else {}
    geo = [{"op": "softmax", "dtype": "float32", "ratio": peers,
            "min_ratio": {"torch": min(ratios)} if peers else {}}]
    meta = {"ops": ["softmax"], "dtypes": ["float32"], "backend": "cpu",
            "machine": {"l2_bytes": l2}}
    return {"meta": meta, "results": results, "summary": {"geomean": geo}}


@pytest.mark.parametrize(("ratios", "kinds_ok"), [
    ((2.0, 0.9), {"min": False, "geomean": False, "pct_copy": True}),
    ((2.0, 1.2), {"min": True, "geomean": False, "pct_copy": True}),
    ((None, None), {"min": None, "geomean": None, "pct_copy": True}),  # torch missing: SKIP
])
def test_targets_evaluate(ratios, kinds_ok):
    cfg = {"targets": [
        {"kind": "ratio", "name": "{op} min", "peer": "torch", "stat": "min", "ops": "*",
         "goal": 1.0},
        {"kind": "ratio", "name": "{op} geomean", "peer": "torch", "stat": "geomean",
         "ops": ["softmax"], "dtypes": ["float32"], "goal": 1.8},
        {"kind": "pct_copy", "name": "{op} {dtype} copy", "stat": "min", "min_bytes": "l2",
         "ops": "*", "dtypes": "*", "goal": 60.0},
    ]}
    lines = {t["target"]: t for t in targets.evaluate(_fake_run(ratios), cfg)}
    assert lines["softmax min"]["ok"] is kinds_ok["min"]
    assert lines["softmax geomean"]["ok"] is kinds_ok["geomean"]
    # only the shape larger than L2 counts: 70% passes, the 5% in-cache shape is left out
    assert lines["softmax float32 copy"]["value"] == 70.0
    assert lines["softmax float32 copy"]["ok"] is kinds_ok["pct_copy"]


def _fake_bench():
    """The parts of a bench JSON that scripts/perf_table.py reads."""
    machine = {"cpu": "Test CPU", "cpu_count": 2, "isa_level": "x86-64-v3",
               "torch_cpu_capability": "AVX2", "numba_cpu_name": "znver9",
               "copy": {"gbps": 40.0, "threads": 2}}
    info = {"numpy": "2", "numba": "0.6", "numba_threading_layer": "omp", "numba_threads": 2}
    meta = {"date": "2026-01-02 03:04:05", "shapes": ["8x[10]"], "ops": ["softmax"],
            "dtypes": ["float32"], "peers": {"torch": "2.13.0"}, "torch_threads": 2,
            "info": info, "machine": machine}
    results = [{"op": "softmax", "dtype": "float32", "shape": "8x[10]",
                "peers": {"torch": {"ratio": 1.5}}}]
    geo = [{"op": "softmax", "dtype": "float32", "ratio": {"torch": 1.5}}]
    return {"meta": meta, "results": results, "summary": {"geomean": geo, "targets": []}}


def test_perf_table_write(tmp_path):
    """`scripts/perf_table.py --write` replaces the README block and docs/perf_table.rst."""
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(_fake_bench()))
    (tmp_path / "docs").mkdir()
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import perf_table
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "README.md").write_text(f"intro\n{perf_table.BEGIN}\nold table\n"
                                        f"{perf_table.END}\noutro\n")
    perf_table.main([str(js), "--write", "--root", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    assert "old table" not in readme and readme.startswith("intro\n")
    assert readme.endswith(f"{perf_table.END}\noutro\n")
    assert "Measured 2026-01-02 on Test CPU" in readme and "znver9" in readme
    assert "| softmax, float32 | 1.50x | **1.50x** |" in readme
    rst = (tmp_path / "docs" / "perf_table.rst").read_text()
    assert "Test CPU" in rst and "     - 1.50x" in rst
