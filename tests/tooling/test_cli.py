"""`nblosses info` and `nblosses bench` run and report sane numbers (timings are never
asserted: they belong to benchmarks). Kept fast: one op on the --quick shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

import nblosses
from nblosses._bench import cases as C
from nblosses._bench import config as K
from nblosses._bench import memory, peers, targets, timing
from nblosses._spec import BenchCase, Layout
from nblosses.ops import SPECS

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
    assert facts["numba_code_isa"] in ("AVX-512", "AVX2", "SSE", None)
    if facts["numba_code_isa"] == "AVX-512" and not facts["numba_cpu_env"]:
        assert facts["numba_avx512f"]  # without an override Numba compiles for the host
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
    # the second line says where it ran: CPU, ISA level, Numba's target and code ISA, threads
    ran_on = table.splitlines()[1]
    machine = meta["machine"]
    assert ran_on.startswith(f"ran on: {machine['cpu']}, {machine['isa_level']}")
    assert f"Numba code for {machine['numba_cpu_name']} ({machine['numba_code_isa']}" in ran_on
    assert f"{meta['info']['numba_threads']} Numba threads" in ran_on
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
    # the result-check skip is not named as the opposite of --check
    assert "--skip-result-check" in out and "--no-check" not in out
    # every case and group of the table is listed
    listed = out.split("cases (--ops", 1)[1]
    for name in [*C.case_table(), *C.case_groups()]:
        assert name in listed, name


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (a peer)")
@pytest.mark.parametrize("skip", [False, True])
def test_bench_skip_result_check(tmp_path, skip):
    """``--skip-result-check`` drops the comparison with the peer's result, nothing else."""
    js = tmp_path / "out.json"
    args = ["bench", "--ops", "softmax", "--shapes", "64x[100]", "--peers", "torch",
            "--first-call", "none", "--memory", "none", "--no-progress", "--repeat", "3",
            "--json", str(js)]
    proc = run_cli(*args, *(["--skip-result-check"] if skip else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(js.read_text())["results"]
    assert "ratio" in row["peers"]["torch"]
    assert ("check" in row) is not skip
    if not skip:
        assert row["check"]["peer"] == "torch" and row["check"]["ok"]
    assert run_cli(*args, "--no-check").returncode == 2  # the old, confusing name is gone


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
    # --version: the script runs nblosses.cli without the info report's probes (torch, the
    # CPU facts: seconds), which test_info_json runs in-tree
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nblosses {nblosses.__version__}"


def test_cli_imports_nothing_heavy():
    code = ("import sys, nblosses, nblosses.cli, nblosses._bench.cases as C; "
            "C.make_inputs(next(iter(C.case_table())), '8x[10]'); "
            "print(sorted(m for m in ('torch', 'scipy', 'cupy', 'matplotlib', 'tqdm') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bench_quick_linear_cross_entropy(tmp_path):
    """The slow case runs alone on its quick shape against both torch peers, memory included."""
    js = tmp_path / "lce.json"
    op = "linear_cross_entropy_grad"
    proc = run_cli("bench", "--quick", "--ops", op, "--json", str(js), "--no-progress",
                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert op in proc.stdout and "vs torch_chunked" in proc.stdout
    out = json.loads(js.read_text())
    quick = [s.label for s in C.own_shapes(op, quick=True)]
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


def test_case_table_is_the_specs_bench_cases():
    """Every spec's cases, in spec order, and nothing else: no hand-kept list."""
    expected = [case.name for spec in SPECS.values() for case in spec.bench]
    assert list(C.case_table()) == expected
    for name, case in C.case_table().items():
        assert C.lookup(name) is case
    assert set(typing.get_args(Layout)) == set(C.LAYOUTS)


def test_parse_cases():
    assert C.parse_cases(None) == C.parse_cases("all") == C.case_names()
    assert C.parse_cases("softmax,cross_entropy_grad") == ["softmax", "cross_entropy_grad"]
    assert set(C.parse_cases("losses")) >= {"cross_entropy", "bce_grad"}
    # groups come from the cases' own groups
    for group, names in C.case_groups().items():
        assert C.parse_cases(group) == list(names)
        if group not in ("all", C.SLOW):
            assert all(group in C.lookup(n).groups for n in names)
    with pytest.raises(ValueError, match="unknown op"):
        C.parse_cases("softmax,nope")


@pytest.mark.parametrize("slow", C.case_names(slow=True))
def test_slow_cases_only_when_named(slow):
    """Seconds-per-call cases stay out of the default run and of every group but `slow`."""
    assert C.is_slow(slow) and slow not in C.parse_cases(None)
    for group in C.case_groups():
        assert (slow in C.parse_cases(group)) is (group == C.SLOW), group
    assert C.parse_cases(f"softmax,{slow}") == ["softmax", slow]
    own, quick = C.own_shapes(slow, quick=False), C.own_shapes(slow, quick=True)
    assert own and quick
    assert all(s.size < max(b.size for b in own) for s in quick)


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


@pytest.mark.parametrize("op", list(C.case_table()))
def test_every_case_builds_and_runs_tiny(op):
    linear = C.lookup(op).layout.startswith("linear")
    for shape in [C.tiny_shape(op)] if linear else C.TINY_SHAPES:
        inputs = C.make_inputs(op, shape, "float32")
        assert inputs.nbytes_moved > 0 and inputs.nbytes_input > 0
        C.nblosses_callable(inputs)()


def _case(layout, **kw):
    """A case of ``layout`` that no spec has (the layouts new ops use)."""
    return BenchCase("probe", layout, True, "probe", "-", run=lambda F, a, d, b: None, **kw)


@pytest.mark.parametrize(("name", "moved"), [
    ("softmax", lambda n, t: 2 * n),  # read x, write y
    ("softmax_backward", lambda n, t: 3 * n),  # read g and y, write the gradient
    ("cross_entropy", lambda n, t: n + t),  # read logits and targets
    ("cross_entropy_grad", lambda n, t: 2 * n + t),  # ... and write the gradient
    ("nll_loss", lambda n, t: t + 4 * 4096),  # targets, one gathered float32 per row
    ("nll_loss_grad", lambda n, t: t + 4 * 4096 + n),
])
def test_bytes_moved(name, moved):
    """Every array the case reads once (or its ``moved``), plus the output of a writer."""
    inputs = C.make_inputs(name, "4096x[10]")
    n, t = 4096 * 10 * 4, 4096 * 8
    assert inputs.nbytes_input == n and inputs.nbytes_moved == moved(n, t)


def test_pair_and_topk_layouts():
    pair = C.make_inputs(_case("pair", writes=True), "6x[100]", "float64")
    assert {k: v.shape for k, v in pair.arrays.items()} == {"x": (6, 100), "y": (6, 100)}
    assert pair.dim == 1 and pair.nbytes_moved == 3 * 6 * 100 * 8
    top = C.make_inputs(_case("topk"), "4x[21]x5")  # a middle class axis
    a = top.arrays
    assert a["x"].shape == (4, 21, 5) and top.dim == 1
    assert a["top_index"].shape == a["top_logp"].shape == (4, min(21, C.TOPK), 5)
    assert a["top_index"].dtype == np.int64 and a["top_logp"].dtype == np.float32
    # the indices are distinct classes; their probabilities sum to at most 1
    assert (np.sort(a["top_index"], axis=1) == np.arange(21)[None, :, None]).all()
    np.testing.assert_allclose(np.exp(a["top_logp"].astype(np.float64)).sum(axis=1), 1.0,
                               rtol=1e-5)
    k = C.make_inputs(_case("topk"), "3x[1000]").arrays
    assert k["top_index"].shape == (3, C.TOPK) and len(set(k["top_index"][0])) == C.TOPK
    assert (k["top_logp"] < 0).all()


def test_linear_pair_layout():
    inputs = C.make_inputs(_case("linear_pair", writes=True), "6x4x[10]")
    a = inputs.arrays
    assert {k: v.shape for k, v in a.items()} == {
        "x": (6, 4), "w": (10, 4), "t": (6,), "tx": (6, 4), "tw": (10, 4)}
    # the student's input and weight gradients are written; the logits are the base
    reads = sum(v.nbytes for v in a.values())
    assert inputs.nbytes_moved == reads + a["x"].nbytes + a["w"].nbytes
    assert inputs.nbytes_input == 6 * 10 * 4


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_peers_come_from_the_cases():
    """A peer runs a case exactly when the case says how (``torch``, ``torch_peers``,
    ``scipy``); the packaged configuration lets every case through."""
    for name, case in C.case_table().items():
        inputs = C.make_inputs(name, C.tiny_shape(name))
        assert (peers.peer_callable("torch", inputs) is None) is (case.torch is None), name
        chunked = peers.peer_callable("torch_chunked", inputs)
        assert (chunked is None) is ("torch_chunked" not in case.torch_peers), name
        scipy = peers.peer_callable("scipy", inputs)
        assert (scipy is None) is (case.scipy is None), name
        if scipy is not None:
            np.testing.assert_allclose(scipy(), C.nblosses_callable(inputs)(), rtol=1e-5)


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
            assert op in C.case_table(), spec
    for op in cfg["memory_ops"] + cfg["first_call_ops"]:
        assert op in C.case_table(), op


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
                "peers": {"torch": {"ratio": 1.5}, "scipy": {"ratio": 4.25}}}]
    geo = [{"op": "softmax", "dtype": "float32", "ratio": {"torch": 1.5, "scipy": 4.25}}]
    targets = [{"kind": "memory", "op": "cross_entropy", "value": v} for v in (0.5, 0.75)]
    targets.append({"kind": "first_call", "op": "softmax", "value": 0.25})
    return {"meta": meta, "results": results, "summary": {"geomean": geo, "targets": targets}}


def _script(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_perf_table_write(tmp_path):
    """`scripts/perf_table.py --write` replaces the README block and docs/perf_table.rst."""
    js = tmp_path / "bench.json"
    js.write_text(json.dumps(_fake_bench()))
    (tmp_path / "docs").mkdir()
    perf_table = _script("perf_table")
    (tmp_path / "README.md").write_text(f"intro\n{perf_table.BEGIN}\nold table\n"
                                        f"{perf_table.END}\noutro\n")
    perf_table.main([str(js), "--write", "--root", str(tmp_path)])
    readme = (tmp_path / "README.md").read_text()
    assert "old table" not in readme and readme.startswith("intro\n")
    assert readme.endswith(f"{perf_table.END}\noutro\n")
    assert "Measured 2026-01-02 on Test CPU" in readme and "znver9" in readme
    assert "| softmax, float32 | 1.50x | **1.50x** |" in readme
    # the sentences under the table name whichever cases the run measured
    assert "Against `scipy.special` (geomean, float32): `softmax` 4.2x." in readme
    assert "at most: `cross_entropy` 0.75% of the input." in readme
    assert "warm compile cache: 0.25-0.25 s per op." in readme
    rst = (tmp_path / "docs" / "perf_table.rst").read_text()
    assert "Test CPU" in rst and "     - 1.50x" in rst


def test_gpu_bench_reads_the_case_table():
    """scripts/gpu_bench.py times the case table's cases (planned here, without a GPU)."""
    gpu_bench = _script("gpu_bench")
    quick = gpu_bench.plan(None, True, ("float32",))
    assert [name for name, _, _ in quick] == C.case_names()  # one shape each, slow ones out
    rows = gpu_bench.plan(f"all,{C.SLOW}", False, gpu_bench.DTYPES)
    assert {name for name, _, _ in rows} == set(C.case_table())
    for name, shape, dtype in rows:
        own = [s.label for s in C.own_shapes(name, quick=False)]
        assert shape in (own or gpu_bench.GPU_SHAPES) and dtype in gpu_bench.DTYPES
    assert all(C.parse_shape(gpu_bench.host_shape(n)) for n in C.case_table())
