"""Command line: ``nblosses info`` and ``nblosses bench``.

``nblosses info`` prints versions (optional packages too, without failing when absent),
registered and available backends, Numba's threading layer, thread count and cache location,
and the CUDA device when there is one.

``nblosses bench`` prints the machine (CPU model, ISA level, torch's and Numba's view of the
CPU, copy bandwidth), times every op on the standard shapes on one backend against each
installed peer (torch with Numba's thread count, scipy.special, cupyx), then measures extra peak
memory and first-call latency, prints Markdown tables (progress bar on stderr) and evaluates
the performance targets of the benchmark configuration. ``--check`` turns a failed target into
exit status 1; ``--skip-result-check`` skips comparing each result with the peer's. The cases
are the op specs' benchmark cases (:mod:`nblosses._bench.cases`). See ``nblosses bench
--help``. Needs the ``bench`` extra: ``pip install 'nblosses[bench]'``, which brings the pinned
CPU build of torch.

``nblosses info`` needs only the library (:mod:`nblosses._sysinfo`), never the benchmark
harness. Heavy packages (numba kernels, torch, scipy, cupy, matplotlib, tqdm) are imported only
by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


_EXIT_CODES = """exit status:
  0  every case ran and matched its peer's result (with --check: and no performance target
     failed)
  1  a case failed or disagreed with its peer's result; with --check, also any FAIL target
  2  bad arguments, an unreadable --targets file, the backend is not available here,
     or --plot without matplotlib"""

_INFO_ROWS = [
    ("nblosses", "nblosses"), ("python", "python"), ("platform", "platform"), ("cpu", "cpu"),
    ("cpu_count", "cpu count"), ("isa_level", "ISA level"), ("simd_flags", "SIMD flags"),
    ("l2_bytes", "L2 bytes (all cores)"), ("torch_cpu_capability", "torch CPU capability"),
    ("numba_cpu_name", "numba target CPU"), ("numba_code_isa", "numba code ISA"),
    ("numba_avx512f", "numba host avx512f"),
    ("numba_avx2", "numba host avx2"), ("blas", "BLAS"), ("numpy", "numpy"), ("numba", "numba"),
    ("llvmlite", "llvmlite"), ("scipy", "scipy"), ("torch", "torch"), ("cupy", "cupy"),
]
_INFO_OPTIONAL = [
    ("openblas_coretype_env", "OPENBLAS_CORETYPE"), ("numba_cpu_env", "numba target set by"),
    ("numba_threading_layer", "numba threading layer"), ("numba_threads", "numba threads"),
    ("numba_max_threads", "numba max threads"), ("numba_cache_dir", "numba cache"),
    ("torch_threads", "torch threads"), ("torch_cuda", "torch CUDA available"),
    ("cuda_device", "CUDA device"), ("cuda_runtime", "CUDA runtime"),
    ("cuda_driver", "CUDA driver"),
]


def _info(args: argparse.Namespace) -> int:
    from nblosses._sysinfo import collect_info

    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    width = 24
    for key, label in _INFO_ROWS:
        value = info.get(key)
        if isinstance(value, list):
            value = " ".join(value) or "-"
        print(f"{label:<{width}} {value if value is not None else 'not installed'}")
    print(f"{'backends':<{width}} " + ", ".join(info["backends"]))
    print(f"{'available backends':<{width}} " + (", ".join(info["available_backends"]) or "none"))
    for name, state in info["backends"].items():
        if state != "available":
            print(f"{'  ' + name:<{width}} {state}")
    for key, label in _INFO_OPTIONAL:
        if info.get(key) is not None:
            print(f"{label:<{width}} {info[key]}")
    return 0


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


def _pick(ops: list[str], choice: str) -> list[str] | None:
    """``--memory`` / ``--first-call``: None (the configuration's default), [], ops, a list."""
    from nblosses._bench import cases as C

    if choice == "default":
        return None
    if choice == "none":
        return []
    if choice == "all":
        return list(ops)
    return C.parse_cases(choice)


def _bench_config(args: argparse.Namespace) -> Any:
    """The run's :class:`~nblosses._bench.runner.BenchConfig`; ValueError on bad arguments."""
    from nblosses._bench import cases as C
    from nblosses._bench import config as K
    from nblosses._bench import runner

    ops = C.parse_cases(args.ops)
    if args.shapes:
        sep = ";" if ";" in args.shapes else ","
        shapes = [C.parse_shape(s) for s in args.shapes.split(sep)]
    else:
        shapes = list(C.QUICK_SHAPES if args.quick else C.SHAPES)
    dtypes = list(C.DTYPES) if args.dtype == "all" else _csv(args.dtype) or ["float32"]
    bad = [dt for dt in dtypes if dt not in ("float16", "float32", "float64")]
    if bad:
        raise ValueError(f"unsupported dtype {bad[0]!r}")
    try:
        K.load(args.targets)  # fail before any timing
    except OSError as exc:
        what = "--targets file" if args.targets else "the packaged targets.json"
        raise ValueError(f"cannot read {what}: {exc}") from exc
    peers = None
    if args.peers is not None:
        peers = [] if args.peers in ("", "none") else _csv(args.peers)
    return runner.BenchConfig(
        backend=args.backend, ops=ops, shapes=shapes, dtypes=dtypes,
        repeat=args.repeat or (3 if args.quick else 7),
        min_sample=0.005 if args.quick else 0.02,
        budget=1.0 if args.quick else 1.5,
        peers=peers, threads=args.threads,
        memory_ops=_pick(ops, args.memory), first_call_ops=_pick(ops, args.first_call),
        copy_bytes=(32 << 20) if args.quick else (128 << 20),
        result_check=not args.skip_result_check, quick=args.quick, stat=args.stat,
        targets_file=args.targets)


def _exit_status(out: dict[str, Any], gate: bool) -> int:
    """1 when a case failed or mismatched, or (``gate``: ``--check``) a target failed."""
    bad = [r for r in out["results"]
           if "error" in r or not r.get("check", {"ok": True})["ok"]]
    if bad:
        print(f"nblosses bench: {len(bad)} case(s) failed or did not match the reference",
              file=sys.stderr)
    failed = [t for t in out["summary"]["targets"] if t["ok"] is False]
    if failed:
        print(f"nblosses bench: {len(failed)} performance target(s) FAIL"
              + ("" if gate else " (exit status unaffected without --check)"), file=sys.stderr)
    return 1 if bad or (gate and failed) else 0


def _bench(args: argparse.Namespace) -> int:
    from nblosses._bench import report, runner, timing

    try:
        config = _bench_config(args)
        out = runner.run(config, progress=not args.no_progress)
    except (ValueError, timing.BackendUnusable) as exc:  # ConfigError is a ValueError
        print(f"nblosses bench: {exc}", file=sys.stderr)
        return 2
    print(report.format_report(out, args.format))
    if args.json:
        report.write_json(out, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            report.plot(out, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except ImportError as exc:
            print(f"nblosses bench: --plot needs matplotlib ({exc})", file=sys.stderr)
            return 2
    return _exit_status(out, args.check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nblosses", description="nblosses: environment report and benchmarks.")
    from . import __version__  # the package is imported already: the CLI lives in it

    parser.add_argument("--version", action="version", version=f"nblosses {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    p = sub.add_parser("info", help="versions, backends, CPU facts, threading, caches, device")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="time every op against torch / scipy / cupyx on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Time nblosses against each installed peer (torch with Numba's thread count, "
            "scipy.special, cupyx on CUDA).\n"
            "The report starts with the machine (CPU model, ISA level, the CPU Numba compiles "
            "for, threads).\nTable columns: ms = median per call; GB/s = ideal bytes moved / "
            "time; % copy = GB/s against this\nmachine's copy bandwidth; vs X = X's time / "
            "nblosses' time (> 1: nblosses faster); check = the result\nagrees with the first "
            "peer's. Then: extra peak memory and first-call latency in a fresh process\n(cold "
            "and warm compile cache) of the configuration's cases, and the performance targets "
            "(PASS /\nFAIL / SKIP lines; goals and peers come from the benchmark "
            "configuration, --targets).\n\n" + _ops_help()),
        epilog=_EXIT_CODES)
    p.add_argument("--backend", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true",
                   help="smaller shapes, fewer repeats (CI, smoke tests)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), float64, a comma list, or 'all'")
    p.add_argument("--ops", default=None,
                   help="comma list of cases and groups (default: all, the slow cases "
                        "excepted)")
    p.add_argument("--shapes", default=None,
                   help="shape labels, reduced axis in brackets: '4096x[1000],32x[21]x4096' "
                        "(separate with ';' to use ',' inside labels); slow cases keep their "
                        "own NxDx[V] shapes")
    p.add_argument("--repeat", type=int, default=None,
                   help="samples per timing (default 7, --quick 3)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="sample statistic for times and ratios (default median; min is the "
                        "least disturbed sample on a busy machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="Numba (and torch) threads (default: Numba's default)")
    p.add_argument("--peers", default=None,
                   help="comma list among torch, torch_chunked, scipy, cupyx, or 'none' "
                        "(default: installed)")
    p.add_argument("--memory", default="default", metavar="OPS",
                   help="cases to measure extra peak memory for: default (the configuration's "
                        "memory_ops among the selected cases), all, none, or a comma list")
    p.add_argument("--first-call", default="default", metavar="OPS",
                   help="cases to measure first-call latency for: default (the "
                        "configuration's first_call_ops among the selected cases), all, none, "
                        "or a comma list")
    p.add_argument("--format", choices=["markdown", "rst"], default="markdown",
                   help="table style: Markdown pipe tables (default) or reStructuredText "
                        "simple tables (docs/perf_table.rst)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of speed vs torch")
    p.add_argument("--check", action="store_true",
                   help="the targets decide the exit status: 1 when a performance target "
                        "FAILs (a CI gate; without it the targets are printed and the exit "
                        "status ignores them)")
    p.add_argument("--targets", metavar="FILE", default=None,
                   help="benchmark configuration (peers and targets, JSON) instead of the "
                        "packaged targets.json; see its _doc entry")
    p.add_argument("--skip-result-check", action="store_true",
                   help="do not compare each case's result with the first peer's (the 'check' "
                        "column; unrelated to --check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)


def _ops_help() -> str:
    """The case names and groups for ``bench --help``; the harness may be absent."""
    try:
        from nblosses._bench import cases as C
    except ImportError:
        return "(the benchmark harness nblosses._bench is not installed)"
    groups = [g for g in C.case_groups() if g != C.SLOW]
    return ("cases (--ops; each op spec's benchmark cases): " + ", ".join(C.case_names())
            + "\ngroups: " + ", ".join(groups)
            + f"\nslow cases (seconds per call; in no group but '{C.SLOW}', run only when "
              "named, on their own shapes, smaller with --quick): "
            + ", ".join(C.case_names(slow=True)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nblosses`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
