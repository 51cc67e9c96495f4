"""``nblosses bench``: run every case on one backend against the installed peers.

:func:`run` returns a JSON-able dict (see :mod:`.report` for how it is printed):

``meta``
    versions, threads, backend, copy bandwidth, settings.
``results``
    one entry per (dtype, op, shape): nblosses' time (median, or min, seconds per call and the
    samples), effective GB/s and % of copy bandwidth, each peer's time and ``ratio`` =
    peer time / nblosses time (> 1: nblosses is faster), a result check against a peer.
``memory``, ``first_call``
    extra peak memory per (op, shape) and first-call latency per op (cold / warm cache).
``summary``
    geomeans per (op, dtype) and the issue's targets, evaluated.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import cases as C
from . import firstcall, memory, peers as P, timing

__all__ = ["BenchConfig", "collect_info", "run"]

#: Ops whose extra peak memory is measured by default (the issue's memory targets), when
#: selected; ``--memory all`` measures every selected op.
MEMORY_OPS = ("cross_entropy", "cross_entropy_grad")
#: Ops whose first-call latency is measured by default, when selected.
FIRST_CALL_OPS = ("softmax", "log_softmax", "cross_entropy", "cross_entropy_grad")

#: Normwise relative error above which a result is flagged as not matching the peer.
TOLERANCE = {"float16": 2e-2, "float32": 2e-4, "float64": 1e-9}


@dataclass
class BenchConfig:
    backend: str = "cpu"
    ops: list[str] = field(default_factory=lambda: list(C.OPS))
    shapes: list[C.Shape] = field(default_factory=lambda: list(C.SHAPES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    repeat: int = 7
    min_sample: float = 0.02
    budget: float = 1.5
    peers: list[str] | None = None  # None: every installed peer
    threads: int | None = None
    memory_ops: list[str] | None = None  # None: MEMORY_OPS among the selected ops
    first_call_ops: list[str] | None = None  # None: FIRST_CALL_OPS among the selected ops
    copy_bytes: int = 128 << 20
    check: bool = True
    quick: bool = False
    #: Which sample statistic the table uses: "median" (default) or "min" (on a busy machine
    #: the fastest sample is the one least disturbed by other processes).
    stat: str = "median"


# ----------------------------------------------------------------------------- info
def _version(module: str) -> str | None:
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return None
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as exc:  # a broken install must not break `nblosses info`
        return f"unusable ({type(exc).__name__}: {exc})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_info() -> dict[str, Any]:
    """Versions, backends, threading and caches: what ``nblosses info`` prints."""
    import os

    import nblosses
    from nblosses import _registry

    info: dict[str, Any] = {
        "nblosses": nblosses.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "cupy": _version("cupy"),
    }
    backends: dict[str, str] = {}
    for name, be in _registry._BACKENDS.items():
        try:
            be.load()
            backends[name] = "available"
        except Exception as exc:
            backends[name] = f"unavailable: {exc}"
    info["backends"] = backends
    info["available_backends"] = [n for n, s in backends.items() if s == "available"]
    if backends.get("cpu") == "available":
        import numba

        from nblosses.backends.cpu import _parallel

        info["numba_threading_layer"] = _parallel.threading_layer()
        info["numba_threads"] = numba.get_num_threads()
        info["numba_max_threads"] = numba.config.NUMBA_NUM_THREADS
        info["numba_cache_dir"] = _numba_cache_dir()
    if info["torch"] and not str(info["torch"]).startswith("unusable"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = bool(torch.cuda.is_available())
    if backends.get("cuda") == "available":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            info["cuda_device"] = name.decode() if isinstance(name, bytes) else str(name)
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:
            info["cuda_device"] = f"unknown ({exc})"
    return info


def _numba_cache_dir() -> str:
    """Where Numba stores nblosses' compiled CPU kernels."""
    import numba

    if numba.config.CACHE_DIR:
        return f"{numba.config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:
        from nblosses.backends.cpu import _parallel

        return str(_parallel._touch._cache._cache_path)
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------- helpers
def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def _flatten(result: Any) -> list[np.ndarray]:
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


def _geomean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


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
def run(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark described by ``config``; returns the JSON-able results."""
    t_start = time.perf_counter()
    load_before = _loadavg()
    backend = config.backend
    xp, sync = timing.backend_namespace(backend)  # raises if the backend is unusable

    if config.threads:
        import numba

        numba.set_num_threads(config.threads)
    info = collect_info()
    peer_names = [p for p in P.available_peers(backend)
                  if config.peers is None or p in config.peers]
    torch_threads = P.match_torch_threads() if "torch" in peer_names else None
    copy_gbps = timing.copy_bandwidth(backend, config.copy_bytes)

    mem_ops = [o for o in (config.memory_ops if config.memory_ops is not None else MEMORY_OPS)
               if o in config.ops]
    fc_ops = [o for o in (config.first_call_ops if config.first_call_ops is not None
                          else FIRST_CALL_OPS) if o in config.ops]
    n_cases = len(config.dtypes) * len(config.ops) * len(config.shapes)
    bar = _Progress(n_cases + len(mem_ops) * len(config.shapes) + len(fc_ops), progress)

    results: list[dict[str, Any]] = []
    try:
        for dtype in config.dtypes:
            for op in config.ops:
                for shape in config.shapes:
                    bar.step(f"{op} {shape.label} {dtype}")
                    results.append(_run_case(op, shape, dtype, backend, xp, sync, peer_names,
                                             copy_gbps, config, bar))
                    bar.done()
        mem = []
        for op in mem_ops:
            for shape in config.shapes:
                bar.step(f"memory {op} {shape.label}")
                mem.append(_run_memory(op, shape, config.dtypes[0], backend, xp, sync,
                                       peer_names))
                bar.done()
        first = []
        for op in fc_ops:
            bar.step(f"first call {op} (cold + warm)")
            try:
                first.append(firstcall.first_call(op, backend=backend))
            except Exception as exc:
                first.append({"op": op, "error": _error_text(exc)})
            bar.done()
    finally:
        bar.close()

    out: dict[str, Any] = {
        "meta": {
            "backend": backend,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "info": info,
            "peers": {p: P.peer_version(p) for p in peer_names},
            "torch_threads": torch_threads,
            "copy_gbps": copy_gbps,
            "copy_bytes": config.copy_bytes,
            "repeat": config.repeat,
            "stat": config.stat,
            "quick": config.quick,
            "ops": config.ops,
            "shapes": [s.label for s in config.shapes],
            "dtypes": config.dtypes,
            "standard_shapes": [s.label for s in config.shapes] == [s.label for s in C.SHAPES],
            "load_before": load_before,
        },
        "results": results,
        "memory": mem,
        "first_call": first,
    }
    out["summary"] = summarize(out)
    out["meta"]["wall_s"] = time.perf_counter() - t_start
    out["meta"]["load_after"] = _loadavg()
    return out


def _loadavg() -> float | None:
    """1-minute load average (None where the OS has none): other work skews timings."""
    import os

    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _run_case(op: str, shape: C.Shape, dtype: str, backend: str, xp: Any, sync: Any,
              peer_names: list[str], copy_gbps: float, config: BenchConfig,
              bar: _Progress) -> dict[str, Any]:
    rec: dict[str, Any] = {"op": op, "shape": shape.label, "dims": list(shape.dims),
                           "dim": shape.dim, "dtype": dtype, "backend": backend, "peers": {}}
    try:
        inputs = C.make_inputs(op, shape, dtype).to(xp)
        rec["bytes_moved"] = inputs.nbytes_moved
        ours = C.nblosses_callable(inputs, backend)
        t0 = time.perf_counter()
        ours_out = ours()
        if sync:
            sync()
        rec["first_call_in_process_s"] = time.perf_counter() - t0
    except Exception as exc:
        rec["error"] = _error_text(exc)
        bar.write(f"nblosses {op} {shape.label} {dtype}: {rec['error']}")
        return rec

    fns: dict[str, tuple[Callable[[], Any], Any]] = {"nblosses": (ours, sync)}
    ref_out, ref_name = None, None
    for peer in peer_names:
        try:
            fn = P.peer_callable(peer, inputs, backend)
            if fn is None:
                continue
            psync = P.peer_sync(peer, backend)
            out = fn()
            if psync:
                psync()
        except Exception as exc:
            rec["peers"][peer] = {"error": _error_text(exc)}
            continue
        fns[peer] = (fn, psync)
        if ref_out is None:
            ref_out, ref_name = out, peer
        del out

    if config.check and ref_out is not None:
        err = compare(ours_out, ref_out)
        rec["check"] = {"peer": ref_name, "rel_err": err,
                        "ok": err <= TOLERANCE.get(dtype, 1e-3)}
    del ours_out, ref_out

    try:
        times = timing.measure(fns, repeat=config.repeat, min_sample=config.min_sample,
                               budget=config.budget)
    except Exception as exc:
        rec["error"] = _error_text(exc)
        return rec
    t = times.pop("nblosses")
    ours_s = getattr(t, config.stat)
    rec["time_s"] = ours_s
    rec["timing"] = t.as_dict()
    rec["gbps"] = inputs.nbytes_moved / ours_s / 1e9
    rec["pct_copy"] = 100.0 * rec["gbps"] / copy_gbps
    for peer, pt in times.items():
        peer_s = getattr(pt, config.stat)
        rec["peers"][peer] = {"time_s": peer_s, "ratio": peer_s / ours_s,
                              "timing": pt.as_dict()}
    return rec


def _run_memory(op: str, shape: C.Shape, dtype: str, backend: str, xp: Any, sync: Any,
                peer_names: list[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {"op": op, "shape": shape.label, "dtype": dtype, "backend": backend}
    try:
        inputs = C.make_inputs(op, shape, dtype).to(xp)
        rec["input_bytes"] = inputs.nbytes_input
        rec["nblosses"] = memory.extra_peak(C.nblosses_callable(inputs, backend),
                                            backend=backend, sync=sync)
    except Exception as exc:
        rec["error"] = _error_text(exc)
        return rec
    if "torch" in peer_names:
        try:
            fn = P.peer_callable("torch", inputs, backend)
            if fn is not None:
                rec["torch"] = memory.extra_peak(fn, backend=backend, peer="torch")
        except Exception as exc:
            rec["torch"] = {"error": _error_text(exc)}
    return rec


# ----------------------------------------------------------------------------- summary
def extra_pct(m: dict[str, Any] | None, input_bytes: int, key: str) -> float | None:
    """Extra peak beyond the outputs, as % of the input's bytes."""
    if not m or m.get(key) is None or not input_bytes:
        return None
    return 100.0 * (m[key] - m.get("out_bytes", 0)) / input_bytes


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """Geomeans per (op, dtype) and the issue's targets."""
    results = out["results"]
    peers = sorted({p for r in results for p, v in r["peers"].items() if "ratio" in v},
                   key=lambda p: P.PEERS.index(p) if p in P.PEERS else 99)
    geo: list[dict[str, Any]] = []
    for dtype in out["meta"]["dtypes"]:
        for op in out["meta"]["ops"]:
            rows = [r for r in results if r["op"] == op and r["dtype"] == dtype and "time_s" in r]
            if not rows:
                continue
            g: dict[str, Any] = {"op": op, "dtype": dtype, "n": len(rows),
                                 "gbps": _geomean([r["gbps"] for r in rows]),
                                 "pct_copy": _geomean([r["pct_copy"] for r in rows]),
                                 "ratio": {}, "min_ratio": {}}
            for p in peers:
                ratios = [r["peers"][p]["ratio"] for r in rows if "ratio" in r["peers"].get(p, {})]
                if ratios:
                    g["ratio"][p] = _geomean(ratios)
                    g["min_ratio"][p] = min(ratios)
            geo.append(g)
    return {"peers": peers, "geomean": geo, "targets": _targets(out, geo)}


def _targets(out: dict[str, Any], geo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPU issue's targets that this run's data can evaluate."""
    def find(op: str, dtype: str = "float32") -> dict[str, Any] | None:
        return next((g for g in geo if g["op"] == op and g["dtype"] == dtype), None)

    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, text: str, le: bool = False) -> None:
        if value is None:
            return
        ok = value <= goal if le else value >= goal
        targets.append({"target": name, "value": value, "goal": goal,
                        "cmp": "<=" if le else ">=", "ok": ok, "text": text})

    for op in ("softmax", "log_softmax", "cross_entropy"):
        g = find(op)
        if g and "torch" in g["ratio"]:
            add(f"{op} vs torch, every shape", g["min_ratio"]["torch"], 1.0, "min ratio")
            add(f"{op} vs torch, geomean", g["ratio"]["torch"], 1.5, "geomean ratio")
    g = find("cross_entropy_grad")
    if g and "torch" in g["ratio"]:
        add("cross_entropy fwd+grad vs torch fwd+bwd, geomean", g["ratio"]["torch"], 2.5,
            "geomean ratio")
    g = find("softmax")
    if g and "scipy" in g["ratio"]:
        add("softmax vs scipy.special.softmax, geomean", g["ratio"]["scipy"], 4.0,
            "geomean ratio")
    for m in out.get("memory", []):
        if m["op"] not in MEMORY_OPS or "nblosses" not in m:
            continue
        # tracemalloc sees every allocation of NumPy and Numba (all nblosses allocates) and,
        # unlike the RSS, no page-granular noise from the interpreter or thread arenas.
        key = "traced" if m["nblosses"].get("traced") is not None else "rss"
        pct = extra_pct(m["nblosses"], m.get("input_bytes", 0), key)
        what = "beyond the gradient" if m["op"] == "cross_entropy_grad" else ""
        add(f"{m['op']} extra peak {what} {m['shape']}".replace("  ", " "), pct, 1.0,
            f"% of logits ({key})", le=True)
    for f in out.get("first_call", []):
        if "warm" in f:
            add(f"first call {f['op']}, fresh process, warm cache", f["warm"]["first_call_s"],
                1.0, f"seconds (cold: {f['cold']['first_call_s']:.2f} s)", le=True)
    # float64 and backward ops: no slower relative to torch than float32 forward
    pairs = [(op, "float64", op, "float32") for op in out["meta"]["ops"]]
    pairs += [("softmax_backward", "float32", "softmax", "float32"),
              ("log_softmax_backward", "float32", "log_softmax", "float32"),
              ("sigmoid_backward", "float32", "sigmoid", "float32")]
    for op, dt, base_op, base_dt in pairs:
        g, b = find(op, dt), find(base_op, base_dt)
        if g and b and "torch" in g["ratio"] and "torch" in b["ratio"]:
            add(f"{op} {dt} vs torch, relative to {base_op} {base_dt}",
                g["ratio"]["torch"] / b["ratio"]["torch"], 1.0, "ratio of geomean ratios")
    return targets
