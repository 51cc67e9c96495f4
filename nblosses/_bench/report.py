"""Print, save and plot what :func:`nblosses._bench.runner.run` returns.

Tables are Markdown pipe tables (readable in a terminal, pasteable into issues and docs).
``ratio`` columns are peer time / nblosses time: above 1 nblosses is faster.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .targets import extra_pct

__all__ = ["format_report", "plot", "write_json"]


_STYLE = ["markdown"]  # set by format_report: "markdown" or "rst"


def _table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    if _STYLE[0] == "rst":
        return _rst_table(header, rows)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    align = align or "l" * len(header)

    def fmt(cells: list[str]) -> str:
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.rjust(w) if a == "r" else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                            for w, a in zip(widths, align)) + " |"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def _rst_table(header: list[str], rows: list[list[str]]) -> str:
    """A reStructuredText simple table (no empty cell in the first column)."""
    rows = [[c if c or i else ".." for i, c in enumerate(r)] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    rule = " ".join("=" * w for w in widths)

    def fmt(cells: list[str]) -> str:
        return " ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, fmt(header), rule, *(fmt(r) for r in rows), rule])


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None or not math.isfinite(v) else fmt.format(v)


def _gbps(v: float | None) -> str:
    return _num(v, "{:.2f}" if v is not None and v < 10 else "{:.1f}")


def _shape_cell(label: str) -> str:
    return label


def format_results(out: dict[str, Any]) -> str:
    peers = out["summary"]["peers"]
    header = ["op", "shape", "dtype", "ms", "GB/s", "% copy", *[f"vs {p}" for p in peers],
              "check"]
    align = "lll" + "r" * (3 + len(peers)) + "l"
    rows: list[list[str]] = []
    geo = {(g["op"], g["dtype"]): g for g in out["summary"]["geomean"]}
    last_key = None

    def geo_row(key: tuple[str, str]) -> None:
        g = geo.get(key)
        if g is None:
            return
        rows.append([f"**{key[0]}**", f"geomean of {g['n']}", key[1], "",
                     _gbps(g["gbps"]), _num(g["pct_copy"], "{:.0f}"),
                     *[f"**{_x(g['ratio'].get(p))}**" if p in g["ratio"] else "-"
                       for p in peers], ""])

    for r in out["results"]:
        key = (r["op"], r["dtype"])
        if last_key is not None and key != last_key:
            geo_row(last_key)
        last_key = key
        if "error" in r:
            rows.append([r["op"], _shape_cell(r["shape"]), r["dtype"], "ERROR", "", "",
                         *["" for _ in peers], r["error"][:60]])
            continue
        cells = []
        for p in peers:
            v = r["peers"].get(p)
            cells.append("-" if v is None else "err" if "error" in v else _x(v.get("ratio")))
        chk = r.get("check")
        check = ("-" if chk is None else "ok" if chk["ok"]
                 else f"MISMATCH {chk['rel_err']:.1e} vs {chk['peer']}")
        rows.append([r["op"], _shape_cell(r["shape"]), r["dtype"], _ms(r["time_s"]),
                     _gbps(r["gbps"]), _num(r["pct_copy"], "{:.0f}"), *cells, check])
    if last_key is not None:
        geo_row(last_key)
    return _table(header, rows, align)


def format_memory(out: dict[str, Any]) -> str:
    mem = out.get("memory") or []
    if not mem:
        return ""
    backend = out["meta"]["backend"]
    if backend == "cpu":
        header = ["op", "shape", "dtype", "input MB", "output MB", "ours extra % (rss)",
                  "ours extra % (tracemalloc)", "torch extra % (rss)"]
        keys = [("nblosses", "rss"), ("nblosses", "traced"), ("torch", "rss")]
    else:
        header = ["op", "shape", "dtype", "input MB", "output MB", "ours extra % (device)",
                  "torch extra % (device)"]
        keys = [("nblosses", "device"), ("torch", "device")]
    if any("torch_chunked" in m for m in mem):  # linear cross-entropy: torch's chunked path
        header.append(f"torch_chunked extra % ({keys[-1][1]})")
        keys.append(("torch_chunked", keys[-1][1]))
    rows = []
    for m in mem:
        if "error" in m:
            rows.append([m["op"], m["shape"], m["dtype"], "ERROR", m["error"][:60],
                         *["" for _ in keys[1:]]])
            continue
        ib = m.get("input_bytes", 0)
        ob = m["nblosses"].get("out_bytes", 0)
        cells = [_num(extra_pct(m.get(who), ib, key), "{:.2f}") for who, key in keys]
        rows.append([m["op"], m["shape"], m["dtype"], _num(ib / 1e6), _num(ob / 1e6, "{:.2f}"),
                     *cells])
    return _table(header, rows, "lll" + "r" * (len(header) - 3))


def format_first_call(out: dict[str, Any]) -> str:
    fc = out.get("first_call") or []
    if not fc:
        return ""
    header = ["op", "import nblosses s", "first call, cold cache s", "first call, warm cache s",
              "second call ms"]
    rows = []
    for f in fc:
        if "error" in f:
            rows.append([f["op"], "ERROR", f["error"][:60], "", ""])
            continue
        rows.append([f["op"], f"{f['warm']['import_s']:.3f}", f"{f['cold']['first_call_s']:.2f}",
                     f"{f['warm']['first_call_s']:.3f}", _ms(f["warm"]["second_call_s"])])
    return _table(header, rows, "l" + "r" * 4)


def format_targets(out: dict[str, Any]) -> str:
    t = out["summary"]["targets"]
    if not t:
        return ""
    status = {True: "PASS", False: "FAIL", None: "SKIP"}
    rows = [[status[x["ok"]], x["target"], "-" if x["value"] is None else f"{x['value']:.3g}",
             f"{x['cmp']} {x['goal']:g}", x["text"]] for x in t]
    return _table(["status", "target", "value", "goal", "measure"], rows, "llrrl")


def ran_on(meta: dict[str, Any]) -> str:
    """One line saying where the run ran: the CPU, its ISA level, the CPU and ISA Numba's
    code was compiled for, and the threads of nblosses and torch."""
    m, info = meta.get("machine") or {}, meta.get("info") or {}
    forced = f", set by {m['numba_cpu_env']}" if m.get("numba_cpu_env") else ""
    threads = f"{info.get('numba_threads', '?')} Numba threads"
    if meta.get("torch_threads"):
        threads += (f", torch {m.get('torch_cpu_capability') or '?'} kernels on "
                    f"{meta['torch_threads']} threads")
    return (f"ran on: {m.get('cpu', '?')}, {m.get('isa_level') or 'ISA level unknown'}; "
            f"Numba code for {m.get('numba_cpu_name', '?')} "
            f"({m.get('numba_code_isa') or 'ISA unknown'}{forced}); {threads}")


def machine_lines(meta: dict[str, Any]) -> list[str]:
    """The CPU and its measured copy bandwidth, one fact per line (also for perf tables)."""
    m = meta.get("machine") or {}
    flags = " ".join(m.get("simd_flags") or []) or "-"
    host_isa = " ".join(f for f in ("avx512f", "avx2") if m.get(f"numba_{f}")) or "neither"
    l2 = m.get("l2_bytes")
    cpu = (f"CPU: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, ISA level "
           f"{m.get('isa_level') or '-'} ({flags}), L2 {l2 >> 10 if l2 else '?'} KiB in all")
    isa = (f"torch CPU capability: {m.get('torch_cpu_capability') or 'torch not installed'}; "
           f"Numba target CPU: {m.get('numba_cpu_name', '?')}, its code "
           f"{m.get('numba_code_isa') or 'of unknown ISA'} (host features of avx512f, avx2: "
           f"{host_isa})")
    lines = [cpu, isa]
    if m.get("blas"):
        blas = f"BLAS (linear_cross_entropy products): {m['blas']}"
        forced = m.get("openblas_coretype_env")
        if forced:
            blas += (f" -- OPENBLAS_CORETYPE={forced} is set: OpenBLAS runs that kernel family "
                     "instead of its own choice for this CPU")
        lines.append(blas)
    copy = m.get("copy")
    if copy:
        parts = [f"{copy['copyto_gbps']:.1f} GB/s copyto ({_threads(copy['copyto_threads'])})"]
        if copy.get("parallel_gbps"):
            parts.append(f"{copy['parallel_gbps']:.1f} GB/s parallel copy "
                         f"({_threads(copy['parallel_threads'])})")
        lines.append(f"copy bandwidth: {copy['gbps']:.1f} GB/s = % copy reference; "
                     + ", ".join(parts) + f"; {copy['bytes'] >> 20} MiB, best of "
                     f"{copy['repeat']}, bytes read + written")
        if copy.get("fresh_gbps"):
            lines.append(f"copy into new memory (x.copy(): page faults, pages zeroed by the OS, "
                         f"as for any call returning a new large array): "
                         f"{copy['fresh_gbps']:.1f} GB/s")
    return lines


def _threads(n: int | None) -> str:
    return "device" if n is None else f"{n} thread{'s' if n != 1 else ''}"


def format_header(out: dict[str, Any]) -> str:
    m, info = out["meta"], out["meta"]["info"]
    versions = (f"python {info['python']}, numpy {info['numpy']}, numba {info['numba']} "
                f"(threading layer {info.get('numba_threading_layer', '?')}, "
                f"{info.get('numba_threads', '?')} threads)")
    lines = [f"nblosses {info['nblosses']} bench, backend {m['backend']}, {m['date']}",
             ran_on(m), *machine_lines(m), versions]
    if m["backend"] == "cuda" and info.get("cuda_device"):
        lines.append(f"device: {info['cuda_device']}")
    peers = ", ".join(f"{p} {v}" for p, v in m["peers"].items()) or "none installed"
    if m.get("torch_threads"):
        peers += f" (torch threads: {m['torch_threads']})"
    lines.append(f"peers: {peers}")
    load, cpus = m.get("load_before"), info.get("cpu_count") or 1
    if load is not None:
        busy = load > 0.5 * cpus
        lines.append(f"load average before the run: {load:.2f} on {cpus} CPUs"
                     + (" -- WARNING: other processes were running, timings are skewed"
                        if busy else ""))
    lines.append("times: {} of up to {} round-robin samples after warm-up; vs X = X's time "
                 "/ nblosses' time (>1: nblosses faster); GB/s = ideal bytes moved / time"
                 .format(m.get("stat", "median"), m["repeat"]))
    return "\n".join(lines)


def format_report(out: dict[str, Any], style: str = "markdown") -> str:
    """All tables of a run, as Markdown pipe tables or reStructuredText simple tables."""
    if style not in ("markdown", "rst"):
        raise ValueError(f"unknown table style {style!r}")
    _STYLE[0] = style
    try:
        return _format_report(out)
    finally:
        _STYLE[0] = "markdown"


def _format_report(out: dict[str, Any]) -> str:
    header = format_header(out)
    if _STYLE[0] == "rst":  # one paragraph per line
        header = "\n".join(f"- {line}" for line in header.splitlines())
    parts = [header, "", format_results(out)]
    mem = format_memory(out)
    if mem:
        parts += ["", "Extra peak memory of one call beyond its outputs, % of the input:", mem]
    fc = format_first_call(out)
    if fc:
        parts += ["", "First call in a fresh process (small input; cold = empty compile cache):",
                  fc]
    tg = format_targets(out)
    if tg:
        note = "" if out["meta"]["standard_shapes"] else " (non-standard shapes: indicative only)"
        parts += ["", f"Targets{note} ({out['meta'].get('targets_file', 'targets.json')}):",
                  tg]
    parts.append("")
    parts.append(f"total wall time {out['meta']['wall_s']:.0f} s")
    return "\n".join(parts)


def write_json(out: dict[str, Any], path: str) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    with open(path, "w") as f:
        json.dump(clean(out), f, indent=1)
        f.write("\n")


_CLIP = 16.0


def _bars(out: dict[str, Any], peer: str | None) -> tuple[list[tuple[str, float, bool]],
                                                          list[int]]:
    """``(label, ratio, is_geomean)`` per bar, each op's geomean last; first bar of each op."""
    multi_dtype = len(out["meta"]["dtypes"]) > 1
    geo = {(g["op"], g["dtype"]): g for g in out["summary"]["geomean"]}
    bars: list[tuple[str, float, bool]] = []
    groups: list[int] = []
    last = None

    def close(key: tuple[str, str] | None) -> None:
        if key is not None and peer in geo.get(key, {}).get("ratio", {}):
            bars.append((f"{key[0]} geomean", geo[key]["ratio"][peer], True))

    for r in out["results"]:
        v = r["peers"].get(peer, {}) if peer else {}
        if "ratio" not in v:
            continue
        key = (r["op"], r["dtype"])
        if key != last:
            close(last)
            groups.append(len(bars))
            last = key
        dt = f" {r['dtype']}" if multi_dtype else ""
        bars.append((f"{r['op']}  {r['shape']}{dt}", v["ratio"], False))
    close(last)
    return bars, groups


def plot(out: dict[str, Any], path: str) -> str:
    """Horizontal bars: speed ratio vs torch (or the first peer present) per op x shape.

    Bars grow from the 1.0 line (log scale): right and green where nblosses is faster, left and
    red where it is slower; each op ends with its geomean bar (darker).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    peers = out["summary"]["peers"]
    peer = "torch" if "torch" in peers else (peers[0] if peers else None)
    bars, groups = _bars(out, peer)

    n = max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(9, 1.3 + 0.23 * n))
    ax.set_xscale("log")
    if bars:
        y = list(range(len(bars)))[::-1]
        true_vals = [b[1] for b in bars]
        # Keep the scale readable: bars beyond [1/CLIP, CLIP] stop at the edge, labelled.
        vals = [min(max(v, 1 / _CLIP), _CLIP) for v in true_vals]
        colors = [("#1b6e33" if b[2] else "#34a853") if b[1] >= 1 else
                  ("#8e1b2c" if b[2] else "#e05263") for b in bars]
        ax.barh(y, [v - 1.0 for v in vals], left=1.0, color=colors, height=0.72)
        ax.set_yticks(y, [b[0] for b in bars], fontsize=8, family="monospace")
        for tick, b in zip(ax.get_yticklabels(), bars):
            if b[2]:
                tick.set_fontweight("bold")
        lo = min(min(vals), 0.5) / (4.5 if min(vals) <= 1 / _CLIP else 2.2)  # label room
        hi = max(max(vals), 2.0) * (4.5 if max(vals) >= _CLIP else 1.8)
        ax.set_xlim(lo, hi)
        for yi, v, tv in zip(y, vals, true_vals):
            right = v >= 1
            text = f"{tv:.2f}x" if tv >= 0.1 else f"{tv:.2g}x"
            if v != tv:
                text = f"{text} (off scale)"
            ax.text(v * (1.03 if right else 0.97), yi, text, va="center",
                    ha="left" if right else "right", fontsize=7)
        for g in groups[1:]:
            ax.axhline(y[g] + 0.5, color="0.8", lw=0.8)
        ax.set_ylim(-0.7, len(bars) - 0.3)
        fine = hi / lo <= 16
        ticks = [t for t in [2.0 ** k for k in range(-10, 11)] + ([1.5, 3] if fine else [])
                 if lo <= t <= hi]
        if not fine:  # wide range: every other power of two, 1x always
            ticks = [t for t in ticks if round(math.log2(t)) % 2 == 0 or t == 1]
        if len(bars) > 30:  # tall chart: the scale on top as well
            ax.tick_params(axis="x", labeltop=True)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v:g}x" if v >= 0.1 else f"1/{round(1 / v)}x"))
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
    else:
        ax.text(0.5, 0.5, "no peer (torch, scipy, cupyx) measured: nothing to compare\n"
                "install torch or scipy, or see the table for GB/s", ha="center", va="center",
                transform=ax.transAxes)
        ax.axis("off")
    ax.axvline(1.0, color="black", lw=1.2)
    m = out["meta"]
    who = peer or "peer"
    ax.set_xlabel(f"speed vs {who} = {who} time / nblosses time (log scale; right of 1x: "
                  f"nblosses faster)", fontsize=9)
    ax.set_title(f"nblosses vs {who}, {m['backend']} backend, {', '.join(m['dtypes'])}, "
                 f"{m['info'].get('numba_threads', '?')} threads, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
