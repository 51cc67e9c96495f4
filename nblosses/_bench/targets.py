"""Evaluate the performance targets of a benchmark configuration against a run's results.

Each target spec (see ``targets.json``) expands into one line per (op, dtype) or per
measurement it covers. A line is ``{"target", "kind", "op", "value", "goal", "cmp", "ok",
"text"}``; ``ok`` is ``None`` (printed SKIP) when the run measured the op but not what the
target needs, for example the peer is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["evaluate", "extra_pct", "geomean"]

Lines = list[dict[str, Any]]


def geomean(values: list[float]) -> float | None:
    """Geometric mean of the positive finite values; ``None`` when there are none."""
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def extra_pct(m: dict[str, Any] | None, input_bytes: int, key: str) -> float | None:
    """Extra peak beyond the outputs, as % of the input's bytes."""
    if not m or m.get(key) is None or not input_bytes:
        return None
    return 100.0 * (m[key] - m.get("out_bytes", 0)) / input_bytes


class _Names(dict):
    """``str.format_map`` mapping that leaves unknown ``{fields}`` of a name as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class _Run:
    """A run's results indexed for the target kinds, and the lines they produce."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.out, self.meta = out, out["meta"]
        self.geo = {(g["op"], g["dtype"]): g for g in out["summary"]["geomean"]}
        self.lines: Lines = []

    def pick(self, wanted: Any, present: list[str]) -> list[str]:
        """``present`` filtered by a spec's list (``"*"``: all of them), in run order."""
        return list(present) if wanted in ("*", None) else [x for x in present if x in wanted]

    def add(self, spec: dict[str, Any], value: float | None, text: str, **names: str) -> None:
        goal, cmp = float(spec["goal"]), spec.get("cmp", ">=")
        ok = None if value is None else (value <= goal if cmp == "<=" else value >= goal)
        name = spec["name"].format_map(_Names(names))
        self.lines.append({"target": name, "kind": spec["kind"],
                           "op": names.get("op"), "value": value, "goal": goal, "cmp": cmp,
                           "ok": ok, "text": text})


def _ratio(run: _Run, spec: dict[str, Any]) -> None:
    peer, stat = spec["peer"], spec["stat"]
    for dtype in run.pick(spec.get("dtypes"), run.meta["dtypes"]):
        for op in run.pick(spec["ops"], run.meta["ops"]):
            g = run.geo.get((op, dtype))
            if g is None:
                continue
            if peer not in g["ratio"]:
                run.add(spec, None, f"{peer} not measured", op=op, dtype=dtype)
                continue
            value = g["min_ratio"][peer] if stat == "min" else g["ratio"][peer]
            run.add(spec, value, "min ratio" if stat == "min" else "geomean ratio",
                    op=op, dtype=dtype)


def _pct_copy(run: _Run, spec: dict[str, Any]) -> None:
    if run.meta["backend"] not in spec.get("backends", [run.meta["backend"]]):
        return
    limit = spec["min_bytes"]
    if limit == "l2":
        limit = run.meta.get("machine", {}).get("l2_bytes")
    for dtype in run.pick(spec.get("dtypes"), run.meta["dtypes"]):
        for op in run.pick(spec["ops"], run.meta["ops"]):
            rows = [r for r in run.out["results"]
                    if r["op"] == op and r["dtype"] == dtype and "pct_copy" in r]
            if not rows:
                continue
            if limit is None:
                run.add(spec, None, "L2 size unknown", op=op, dtype=dtype)
                continue
            big = [r["pct_copy"] for r in rows if r.get("input_bytes", 0) > int(limit)]
            value = (min(big) if spec["stat"] == "min" else geomean(big)) if big else None
            text = (f"{spec['stat']} over {len(big)} shape(s) > {int(limit) >> 10} KiB" if big
                    else f"no shape > {int(limit) >> 10} KiB")
            run.add(spec, value, text, op=op, dtype=dtype)


def _memory(run: _Run, spec: dict[str, Any]) -> None:
    for m in run.out.get("memory", []):
        if m["op"] not in run.pick(spec["ops"], run.meta["ops"]) or "nblosses" not in m:
            continue
        # tracemalloc sees every allocation of NumPy and Numba (all nblosses allocates) and,
        # unlike the RSS, no page-granular noise from the interpreter or thread arenas.
        key = "traced" if m["nblosses"].get("traced") is not None else "rss"
        if run.meta["backend"] != "cpu":
            key = "device"
        pct = extra_pct(m["nblosses"], m.get("input_bytes", 0), key)
        run.add(spec, pct, f"% of logits ({key})", op=m["op"], shape=m["shape"],
                dtype=m["dtype"])


def _first_call(run: _Run, spec: dict[str, Any]) -> None:
    for f in run.out.get("first_call", []):
        if "warm" in f and f["op"] in run.pick(spec["ops"], run.meta["ops"]):
            run.add(spec, f["warm"]["first_call_s"],
                    f"seconds (cold: {f['cold']['first_call_s']:.2f} s)", op=f["op"])


def _relative(run: _Run, spec: dict[str, Any]) -> None:
    peer = spec["peer"]
    for op_spec, dtype, base_spec, base_dtype in spec["pairs"]:
        ops = run.meta["ops"] if op_spec == "*" else [op_spec]
        for op in ops:
            base_op = op if base_spec == "*" else base_spec
            g, b = run.geo.get((op, dtype)), run.geo.get((base_op, base_dtype))
            if g and b and peer in g["ratio"] and peer in b["ratio"]:
                run.add(spec, g["ratio"][peer] / b["ratio"][peer], "ratio of geomean ratios",
                        op=op, dtype=dtype, base_op=base_op, base_dtype=base_dtype)


_KINDS: dict[str, Callable[[_Run, dict[str, Any]], None]] = {
    "ratio": _ratio, "pct_copy": _pct_copy, "memory": _memory, "first_call": _first_call,
    "relative": _relative,
}


def evaluate(out: dict[str, Any], cfg: dict[str, Any]) -> Lines:
    """One line per target the run can evaluate (``out["summary"]["geomean"]`` must exist)."""
    run = _Run(out)
    for spec in cfg["targets"]:
        _KINDS[spec["kind"]](run, spec)
    return run.lines
