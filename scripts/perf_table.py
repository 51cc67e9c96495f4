"""Ratio tables (op x dtype rows, shape columns) from one ``nblosses bench --json`` run.

The README's speed table and ``docs/perf_table.rst`` are both printed from the same file, so the
two never disagree and nobody copies numbers by hand::

    nblosses bench --stat min --dtype all --ops targets --json bench.json
    python scripts/perf_table.py bench.json --peer torch              # Markdown, for the README
    python scripts/perf_table.py bench.json --peer torch --rst > docs/perf_table.rst
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def ratio_rows(bench: dict[str, Any], peer: str) -> tuple[list[str], list[list[str]]]:
    """Header (shapes) and one row per (op, dtype): ``peer``'s time / ours, then the geomean."""
    shapes = bench["meta"]["shapes"]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in bench["results"]:
        ratio = r.get("peers", {}).get(peer, {}).get("ratio")
        if ratio is not None:
            cells.setdefault((r["op"], r["dtype"]), {})[r["shape"]] = ratio
    geo = {(g["op"], g["dtype"]): g["ratio"].get(peer) for g in bench["summary"]["geomean"]}
    rows = []
    for dtype in bench["meta"]["dtypes"]:
        for op in bench["meta"]["ops"]:
            if (op, dtype) not in cells:
                continue
            row = [f"{op}, {dtype}"]
            row += [f"{cells[op, dtype][s]:.2f}x" if s in cells[op, dtype] else "-" for s in shapes]
            g = geo.get((op, dtype))
            row.append(f"**{g:.2f}x**" if g else "-")
            rows.append(row)
    return ["op, dtype", *shapes, "geomean"], rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rst(header: list[str], rows: list[list[str]], bench: dict[str, Any], peer: str) -> str:
    meta, info = bench["meta"], bench["meta"]["info"]
    out = [
        ".. This file is included by performance.rst and printed by scripts/perf_table.py from",
        "   one run of ``nblosses bench --stat min --dtype all --ops targets --json``.",
        "",
        f"Measured {meta['date'][:10]} on {info['cpu']} ({info['cpu_count']} CPUs), NumPy "
        f"{info['numpy']}, Numba {info['numba']} ({info['numba_threading_layer']} layer, "
        f"{info['numba_threads']} threads), {peer} {meta['peers'].get(peer, '')} with "
        f"{meta.get('torch_threads', info['numba_threads'])} threads. Each cell is {peer}'s time "
        "divided by nblosses' time for the same call (> 1: nblosses is faster); ``[ ]`` marks "
        "the reduced axis.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
    ]
    for row in [header, *rows]:
        out.append(f"   * - {row[0]}")
        out += [f"     - {cell.replace('**', '')}" for cell in row[1:]]
    return "\n".join(out + ["", *summary(bench)]) + "\n"


def summary(bench: dict[str, Any]) -> list[str]:
    """The run's other results, as sentences: SciPy ratio, extra peak memory, first call."""
    lines = []
    sm = next((g for g in bench["summary"]["geomean"]
               if g["op"] == "softmax" and g["dtype"] == "float32"), None)
    if sm and "scipy" in sm["ratio"]:
        lines.append(f"softmax against ``scipy.special.softmax``: {sm['ratio']['scipy']:.1f}x "
                     "(geomean, float32).")
    targets = bench["summary"]["targets"]

    def worst(prefix: str) -> float | None:
        values = [t["value"] for t in targets if t["target"].startswith(prefix)]
        return max(values) if values else None

    fwd, grad = worst("cross_entropy extra peak"), worst("cross_entropy_grad extra peak")
    if fwd is not None and grad is not None:
        lines.append(f"Extra peak memory of ``cross_entropy``: at most {fwd:.2f}% of the logits "
                     f"(forward) and the gradient plus at most {grad:.2f}% (forward+gradient).")
    warm = [t["value"] for t in targets if t["target"].startswith("first call")]
    if warm:
        lines.append(f"First call in a fresh process with a warm compile cache: "
                     f"{min(warm):.2f}-{max(warm):.2f} s per op.")
    return [" ".join(lines)] if lines else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_file")
    p.add_argument("--peer", default="torch")
    p.add_argument("--rst", action="store_true", help="reStructuredText list-table (docs)")
    args = p.parse_args(argv)
    with open(args.json_file) as f:
        bench = json.load(f)
    header, rows = ratio_rows(bench, args.peer)
    print(rst(header, rows, bench, args.peer) if args.rst else markdown(header, rows))


if __name__ == "__main__":
    main()
