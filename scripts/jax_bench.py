"""nblosses inside a JAX program: ``jax.jit(jax.value_and_grad(cross_entropy))`` by
:mod:`nblosses.jax` against the same loss written with ``jax.nn.log_softmax`` (XLA's own CPU
code), float32, class-index targets, ``reduction="mean"``.

Columns, per shape (milliseconds, each the best of ``--repeats`` calls interleaved in one
process, so that a busy machine slows every column alike):

- ``xla``: the composite ``-mean(take_along_axis(log_softmax(x), t))`` under ``jit`` +
  ``value_and_grad``;
- ``nblosses.jax``: :func:`nblosses.jax.cross_entropy` the same way (one XLA FFI call writing the
  loss and the gradient into XLA's buffers);
- ``pure_callback``: the same kernel call through :func:`jax.pure_callback` (the bridge
  nblosses.jax had before: copies of the operands and of the results);
- ``numpy``: ``F.cross_entropy(x, t, return_grad=True)`` on NumPy arrays, the kernel alone
  (what the bridge should cost no more than);
- ``x xla``: ``xla / nblosses.jax``; the last row is the geometric mean.

Each import order runs in its own process: JAX only, and torch imported first (as in a program
that uses both; torch's OpenMP runtime is then the one loaded). Run from the repository root::

    python scripts/jax_bench.py                      # both processes, the three shapes
    python scripts/jax_bench.py --shapes 512x32000 --repeats 20
    python scripts/jax_bench.py --process torch-first --json out.json   # one process

:func:`measure` returns the rows for other tools (``nblosses bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

SHAPES = ("4096x1000", "512x32000", "64x128256")
PROCESSES = ("jax-only", "torch-first")
COLUMNS = ("xla", "nblosses.jax", "pure_callback", "numpy")


@dataclass
class Row:
    """One shape's best times in milliseconds, by column."""

    shape: str
    ms: dict[str, float]

    @property
    def speedup(self) -> float:
        """XLA's composite time over nblosses.jax's."""
        return self.ms["xla"] / self.ms["nblosses.jax"]


def _callables(n: int, c: int, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """The four zero-argument calls of one shape, compiled and checked against each other."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import nblosses.jax as nbj
    from nblosses import functional as F

    rng = np.random.default_rng(seed)
    xn = rng.standard_normal((n, c), dtype=np.float32)
    tn = rng.integers(0, c, n).astype(np.int32)
    x, t = jnp.asarray(xn), jnp.asarray(tn)

    def composite(x: Any, t: Any) -> Any:
        logp = jax.nn.log_softmax(x, axis=1)
        return -jnp.take_along_axis(logp, t[:, None], axis=1).mean()

    def host(x: Any, t: Any) -> Any:
        return F.cross_entropy(np.asarray(x), np.asarray(t), return_grad=True, backend="cpu")

    def callback(x: Any, t: Any) -> Any:
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.pure_callback(host, shapes, x, t, vmap_method="sequential")

    xla = jax.jit(jax.value_and_grad(composite))
    ours = jax.jit(jax.value_and_grad(lambda x, t: nbj.cross_entropy(x, t)))
    old = jax.jit(callback)
    calls = {"xla": lambda: jax.block_until_ready(xla(x, t)),
             "nblosses.jax": lambda: jax.block_until_ready(ours(x, t)),
             "pure_callback": lambda: jax.block_until_ready(old(x, t)),
             "numpy": lambda: F.cross_entropy(xn, tn, return_grad=True)}
    (want, want_grad), (got, got_grad) = calls["xla"](), calls["nblosses.jax"]()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-9)
    return calls


def measure(shapes: tuple[str, ...] = SHAPES, repeats: int = 10) -> list[Row]:
    """Best time of each column per shape, the columns interleaved call by call."""
    rows = []
    for shape in shapes:
        n, c = (int(v) for v in shape.split("x"))
        calls = _callables(n, c)
        best = dict.fromkeys(calls, math.inf)
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
        rows.append(Row(f"{n}x[{c}]", {k: v * 1e3 for k, v in best.items()}))
    return rows


def table(title: str, rows: list[Row]) -> str:
    """The rows as a text table, with the geometric mean of the speedups."""
    head = f"{'shape':<12}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'x xla':>9}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.shape:<12}" + "".join(f"{r.ms[c]:>15.2f}" for c in COLUMNS)
                     + f"{r.speedup:>8.2f}x")
    geomean = math.exp(sum(math.log(r.speedup) for r in rows) / len(rows))
    lines.append(f"{'geomean':<12}" + " " * 15 * len(COLUMNS) + f"{geomean:>8.2f}x")
    return "\n".join(lines)


def _child(process: str, shapes: tuple[str, ...], repeats: int) -> list[Row]:
    if process == "torch-first":
        import torch  # noqa: F401  (loaded first: its OpenMP runtime is the process's)
    return measure(shapes, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="NxC")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--process", choices=PROCESSES,
                        help="measure in this process only (default: one process of each)")
    parser.add_argument("--json", help="write the rows of --process as JSON here")
    args = parser.parse_args(argv)
    shapes = tuple(args.shapes)
    if args.process:
        rows = _child(args.process, shapes, args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in rows], f)
        print(table(args.process, rows))
        return
    for process in PROCESSES:
        cmd = [sys.executable, __file__, "--process", process, "--repeats",
               str(args.repeats), "--shapes", *shapes]
        print(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)


if __name__ == "__main__":
    main()
