"""``nblosses bench``: run every case on one backend against the installed peers.

:func:`run` returns a JSON-able dict (see :mod:`.report` for how it is printed):

``meta``
    versions, threads, backend, settings, and ``machine``: the CPU model, ISA level, L2 size,
    torch's CPU capability, Numba's target CPU and the copy bandwidth (see
    :func:`nblosses._sysinfo.cpu_facts`, :func:`.timing.copy_bandwidth`).
``results``
    one entry per (dtype, op, shape): nblosses' time (median, or min, seconds per call and the
    samples), effective GB/s and % of copy bandwidth, each peer's time and ``ratio`` =
    peer time / nblosses time (> 1: nblosses is faster), a result check against a peer.
``memory``, ``first_call``
    extra peak memory per (op, shape) and first-call latency per op (cold / warm cache).
``summary``
    geomeans per (op, dtype) and the targets of the configuration (:mod:`.config`), evaluated
    (:mod:`.targets`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nblosses._sysinfo import collect_info

from . import cases as C
from . import config as K
from . import firstcall, memory, timing
from . import peers as P
from . import targets as T

__all__ = ["BenchConfig", "run"]


@dataclass
class BenchConfig:
    backend: str = "cpu"
    #: Case names (``--ops``): :func:`.cases.parse_cases`.
    ops: list[str] = field(default_factory=C.parse_cases)
    shapes: list[C.Shape] = field(default_factory=lambda: list(C.SHAPES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    repeat: int = 7
    min_sample: float = 0.02
    budget: float = 1.5
    peers: list[str] | None = None  # None: every installed peer
    threads: int | None = None
    #: None: the configuration's ``memory_ops`` / ``first_call_ops`` among the selected ops.
    memory_ops: list[str] | None = None
    first_call_ops: list[str] | None = None
    copy_bytes: int = 128 << 20
    #: Compare each result with the first peer's (``--skip-result-check`` turns it off).
    result_check: bool = True
    quick: bool = False
    #: Which sample statistic the table uses: "median" (default) or "min" (on a busy machine
    #: the fastest sample is the one least disturbed by other processes).
    stat: str = "median"
    #: Peers and performance targets (a JSON file); None: ``targets.json`` of this package.
    targets_file: str | None = None


# ----------------------------------------------------------------------------- helpers
def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def _flatten(result: Any) -> list[np.ndarray]:
    if result is None:  # an absent output (no bias -> no bias gradient)
        return []
    if isinstance(result, (tuple, list)):
        return [x for r in result for x in _flatten(r)]
    return [_to_numpy(result).astype(np.float64, copy=False)]


def compare(ours: Any, ref: Any) -> float:
    """Largest normwise relative error over the outputs (loss, grad...)."""
    worst = 0.0
    a_list, b_list = _flatten(ours), _flatten(ref)
    if len(a_list) != len(b_list):
        return math.inf
    for a, b in zip(a_list, b_list):
        if a.size != b.size:
            return math.inf
        a, b = a.reshape(-1), b.reshape(-1)
        if a.size == 0:
            continue
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, np.abs(a - b))
        scale = max(float(np.nanmax(np.abs(b))) if not np.all(np.isnan(b)) else 0.0, 1e-30)
        err = float(np.max(diff)) / scale
        worst = max(worst, err if not math.isnan(err) else math.inf)
    return worst


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 200 else text[:197] + "..."


class _Progress:
    """tqdm on stderr when installed, else nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False,
                                dynamic_ncols=True, mininterval=0.2)
            except ImportError:
                pass

    def step(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def done(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the run
@dataclass
class _Ctx:
    """What every case of one run shares."""

    config: BenchConfig
    cfg: dict[str, Any]  # the peers-and-targets configuration
    xp: Any
    sync: Any
    peers: list[str]
    copy_gbps: float
    bar: _Progress

    @property
    def backend(self) -> str:
        return self.config.backend


def _selected(ops: list[str] | None, default: list[str], chosen: list[str]) -> list[str]:
    return [o for o in (ops if ops is not None else default) if o in chosen]


def _shapes_of(op: str, config: BenchConfig) -> list[C.Shape]:
    """The case's own shapes when it has some (LM heads), else the run's."""
    return list(C.own_shapes(op, config.quick)) or list(config.shapes)


def _cases(config: BenchConfig) -> list[tuple[str, str, C.Shape]]:
    """Every (dtype, op, shape) the run times."""
    return [(d, o, s) for d in config.dtypes for o in config.ops for s in _shapes_of(o, config)]


def _meta(ctx: _Ctx, info: dict[str, Any], copy: dict[str, Any]) -> dict[str, Any]:
    c = ctx.config
    machine = {k: info.get(k) for k in (
        "cpu", "cpu_count", "isa_level", "simd_flags", "l2_bytes", "torch_cpu_capability",
        "numba_cpu_name", "numba_code_isa", "numba_cpu_env", "numba_avx512f", "numba_avx2",
        "blas", "blas_core",
        "openblas_coretype_env")}
    machine["copy"] = copy
    return {
        "backend": c.backend, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "info": info,
        "machine": machine,
        "peers": {p: P.peer_version(p, ctx.cfg) for p in ctx.peers},
        "torch_threads": P.match_torch_threads() if "torch" in ctx.peers else None,
        "copy_gbps": copy["gbps"], "copy_bytes": copy["bytes"], "repeat": c.repeat,
        "stat": c.stat, "quick": c.quick, "ops": c.ops, "shapes": [s.label for s in c.shapes],
        "dtypes": c.dtypes,
        "standard_shapes": [s.label for s in c.shapes] == [s.label for s in C.SHAPES],
        "targets_file": str(c.targets_file or K.DEFAULT_FILE),
    }


def run(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark described by ``config``; returns the JSON-able results."""
    t_start = time.perf_counter()
    load_before = _loadavg()
    cfg = K.load(config.targets_file)
    xp, sync = timing.backend_namespace(config.backend)  # raises if the backend is unusable
    if config.threads:
        import numba

        numba.set_num_threads(config.threads)
    info = collect_info()
    peer_names = [p for p in P.available_peers(config.backend, cfg)
                  if config.peers is None or p in config.peers]
    copy = timing.copy_bandwidth(config.backend, config.copy_bytes)
    mem_ops = _selected(config.memory_ops, cfg["memory_ops"], config.ops)
    fc_ops = _selected(config.first_call_ops, cfg["first_call_ops"], config.ops)
    cases = _cases(config)
    mems = [(o, s) for o in mem_ops for s in _shapes_of(o, config)]
    bar = _Progress(len(cases) + len(mems) + len(fc_ops), progress)
    ctx = _Ctx(config, cfg, xp, sync, peer_names, copy["gbps"], bar)
    meta = _meta(ctx, info, copy)
    try:
        results = [_step(bar, f"{o} {s.label} {d}", _run_case, o, s, d, ctx)
                   for d, o, s in cases]
        mem = [_step(bar, f"memory {o} {s.label}", _run_memory, o, s, config.dtypes[0], ctx)
               for o, s in mems]
        first = [_step(bar, f"first call {o} (cold + warm)", _run_first_call, o, ctx)
                 for o in fc_ops]
    finally:
        bar.close()
    meta["load_before"] = load_before
    out: dict[str, Any] = {"meta": meta, "results": results, "memory": mem,
                           "first_call": first}
    out["summary"] = summarize(out, cfg)
    out["meta"]["wall_s"] = time.perf_counter() - t_start
    out["meta"]["load_after"] = _loadavg()
    return out


def _step(bar: _Progress, text: str, fn: Callable[..., Any], *args: Any) -> Any:
    bar.step(text)
    try:
        return fn(*args)
    finally:
        bar.done()


def _loadavg() -> float | None:
    """1-minute load average (None where the OS has none): other work skews timings."""
    import os

    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _first_call(ours: Callable[[], Any], sync: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = ours()
    if sync:
        sync()
    return out, time.perf_counter() - t0


def _peer_calls(inputs: C.Inputs, ctx: _Ctx, rec: dict[str, Any]) -> tuple[dict, Any, Any]:
    """Each usable peer's ``(fn, sync)``, and the first peer's output and name (reference)."""
    fns: dict[str, tuple[Callable[[], Any], Any]] = {}
    ref_out, ref_name = None, None
    for peer in ctx.peers:
        try:
            fn = P.peer_callable(peer, inputs, ctx.backend, ctx.cfg)
            if fn is None:
                continue
            psync = P.peer_sync(peer, ctx.backend)
            out, _ = _first_call(fn, psync)
        except Exception as exc:  # a failing case is recorded, the run goes on
            rec["peers"][peer] = {"error": _error_text(exc)}
            continue
        fns[peer] = (fn, psync)
        if ref_out is None:
            ref_out, ref_name = out, peer
        del out
    return fns, ref_out, ref_name


def _run_case(op: str, shape: C.Shape, dtype: str, ctx: _Ctx) -> dict[str, Any]:
    config = ctx.config
    rec: dict[str, Any] = {"op": op, "shape": shape.label, "dims": list(shape.dims),
                           "dim": shape.dim, "dtype": dtype, "backend": ctx.backend,
                           "peers": {}}
    try:
        inputs = C.make_inputs(op, shape, dtype).to(ctx.xp)
        rec["bytes_moved"], rec["input_bytes"] = inputs.nbytes_moved, inputs.nbytes_input
        ours = C.nblosses_callable(inputs, ctx.backend)
        ours_out, rec["first_call_in_process_s"] = _first_call(ours, ctx.sync)
    except Exception as exc:  # a failing case is recorded, the run goes on
        rec["error"] = _error_text(exc)
        ctx.bar.write(f"nblosses {op} {shape.label} {dtype}: {rec['error']}")
        return rec
    fns, ref_out, ref_name = _peer_calls(inputs, ctx, rec)
    if config.result_check and ref_out is not None:
        err = compare(ours_out, ref_out)
        rec["check"] = {"peer": ref_name, "rel_err": err,
                        "ok": err <= ctx.cfg["tolerance"].get(dtype, 1e-3)}
    del ours_out, ref_out
    try:
        # Slow cases (seconds per call) skip the warm-up: the first calls above were it.
        times = timing.measure({"nblosses": (ours, ctx.sync), **fns}, repeat=config.repeat,
                               min_sample=config.min_sample, budget=config.budget,
                               warmup=0 if C.is_slow(op) else 1)
    except Exception as exc:  # a failing case is recorded, the run goes on
        rec["error"] = _error_text(exc)
        return rec
    t = times.pop("nblosses")
    ours_s = getattr(t, config.stat)
    rec["time_s"] = ours_s
    rec["timing"] = t.as_dict()
    rec["gbps"] = inputs.nbytes_moved / ours_s / 1e9
    rec["pct_copy"] = 100.0 * rec["gbps"] / ctx.copy_gbps
    for peer, pt in times.items():
        peer_s = getattr(pt, config.stat)
        rec["peers"][peer] = {"time_s": peer_s, "ratio": peer_s / ours_s,
                              "timing": pt.as_dict()}
    return rec


def _run_memory(op: str, shape: C.Shape, dtype: str, ctx: _Ctx) -> dict[str, Any]:
    rec: dict[str, Any] = {"op": op, "shape": shape.label, "dtype": dtype,
                           "backend": ctx.backend}
    # A slow case ran before in this process: compiled, torch warmed up, no 2nd call.
    warmed = C.is_slow(op) and any(op == o for _, o, _ in _cases(ctx.config))
    try:
        inputs = C.make_inputs(op, shape, dtype).to(ctx.xp)
        rec["input_bytes"] = inputs.nbytes_input
        rec["nblosses"] = memory.extra_peak(C.nblosses_callable(inputs, ctx.backend),
                                            backend=ctx.backend, sync=ctx.sync, warmed=warmed)
    except Exception as exc:  # a failing case is recorded, the run goes on
        rec["error"] = _error_text(exc)
        return rec
    for peer in (p for p in ("torch", "torch_chunked") if p in ctx.peers):
        try:
            fn = P.peer_callable(peer, inputs, ctx.backend, ctx.cfg)
            if fn is not None:
                rec[peer] = memory.extra_peak(fn, backend=ctx.backend, peer="torch",
                                              warmed=warmed)
        except Exception as exc:  # a failing case is recorded, the run goes on
            rec[peer] = {"error": _error_text(exc)}
    return rec


def _run_first_call(op: str, ctx: _Ctx) -> dict[str, Any]:
    own = C.own_shapes(op, quick=True)  # the smallest a case with its own shapes takes
    try:
        return firstcall.first_call(op, backend=ctx.backend,
                                    shape=own[0].label if own else firstcall.FIRST_CALL_SHAPE)
    except Exception as exc:  # a failing case is recorded, the run goes on
        return {"op": op, "error": _error_text(exc)}


# ----------------------------------------------------------------------------- summary
def _geo_row(rows: list[dict[str, Any]], peers: list[str]) -> dict[str, Any]:
    r0 = rows[0]
    g: dict[str, Any] = {"op": r0["op"], "dtype": r0["dtype"], "n": len(rows),
                         "gbps": T.geomean([r["gbps"] for r in rows]),
                         "pct_copy": T.geomean([r["pct_copy"] for r in rows]),
                         "ratio": {}, "min_ratio": {}}
    for p in peers:
        ratios = [r["peers"][p]["ratio"] for r in rows if "ratio" in r["peers"].get(p, {})]
        if ratios:
            g["ratio"][p] = T.geomean(ratios)
            g["min_ratio"][p] = min(ratios)
    return g


def summarize(out: dict[str, Any], cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Geomeans per (op, dtype) and the configuration's targets, evaluated."""
    cfg = cfg or K.load()
    order = list(cfg["peers"])
    results = out["results"]
    peers = sorted({p for r in results for p, v in r["peers"].items() if "ratio" in v},
                   key=lambda p: order.index(p) if p in order else len(order))
    geo = []
    for dtype in out["meta"]["dtypes"]:
        for op in out["meta"]["ops"]:
            rows = [r for r in results if r["op"] == op and r["dtype"] == dtype and "time_s" in r]
            if rows:
                geo.append(_geo_row(rows, peers))
    summary: dict[str, Any] = {"peers": peers, "geomean": geo}
    out = dict(out, summary=summary)
    summary["targets"] = T.evaluate(out, cfg)
    return summary
