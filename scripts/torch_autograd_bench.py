"""Cross-entropy forward+backward inside torch autograd: nblosses.torch against torch.

Times ``loss = cross_entropy(x, t); loss.backward()`` on float32 logits that require grad
(class-index targets) for the six standard shapes, both with ``torch.nn.functional`` and with
:mod:`nblosses.torch` (and its ``inplace_grad=True`` variant), same thread count on both
sides, the implementations taking turns within each repeat. Reports the minimum over repeats,
the ratio torch / nblosses (> 1: nblosses is faster), their geometric mean, and the peak extra
memory of one forward+backward as a multiple of the logits' size (measured in a fresh process
per case: the kernel's peak resident set size, reset after two warm-up steps on the same
shape, above the resident size then).

Usage::

    python scripts/torch_autograd_bench.py [--threads 2] [--repeats 7] [--quick] [--no-memory]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

# (shape, class axis) as in the README's speed tables: [C] marks the class axis.
SHAPES = {
    "4096x[1000]": (4096, 1000),
    "512x[32000]": (512, 32000),
    "64x[128256]": (64, 128256),
    "65536x[10]": (65536, 10),
    "8x1024x[1024]": (8, 1024, 1024),
    "32x[21]x4096": (32, 21, 4096),
}
IMPLS = ("torch", "nblosses", "nblosses_inplace")


def _setup(threads: int) -> None:
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _inputs(shape: tuple[int, ...]):
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    return x, t


def _step(impl: str):
    import torch.nn.functional as TF

    import nblosses.torch as nbt

    def run(x, t):
        if impl == "torch":
            TF.cross_entropy(x, t).backward()
        elif impl == "nblosses":
            nbt.cross_entropy(x, t).backward()
        else:  # the gradient overwrites the logits (later repeats run on gradient values)
            y = x.detach().requires_grad_(True)
            nbt.cross_entropy(y, t, inplace_grad=True).backward()

    return run


def _times(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Best time of each implementation; the repeats take turns (torch, nblosses, ...) so
    that a busy spell of a shared machine hits every side alike."""
    runs = {impl: _step(impl) for impl in IMPLS}
    inputs = {impl: _inputs(shape) for impl in IMPLS}  # the in-place variant overwrites its own
    best = dict.fromkeys(IMPLS, math.inf)
    for i in range(repeats + 1):  # the first round warms up (compilation, page faults)
        for impl, run in runs.items():
            x, t = inputs[impl]
            x.requires_grad_(True)
            x.grad = None
            t0 = time.perf_counter()
            run(x, t)
            if i:
                best[impl] = min(best[impl], time.perf_counter() - t0)
    return best


def _peak_extra(impl: str, shape: tuple[int, ...]) -> float:
    """Peak extra memory of one forward+backward / the logits' size (own process)."""
    import gc

    run = _step(impl)
    for _ in range(2):  # warm-up on the same shape: compilation, thread pools, caches
        w, tw = _inputs(shape)
        w.requires_grad_(True)
        run(w, tw)
        del w, tw
    x, t = _inputs(shape)
    x.requires_grad_(True)
    gc.collect()
    before = _reset_peak_rss()
    run(x, t)
    return (_peak_rss() - before) / (x.numel() * x.element_size())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak resident set size (Linux >= 4.0: the warm-up's compiler
    spike would hide the step otherwise) and return the current one, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS:") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM:") * 1024


def _memory_in_subprocess(impl: str, name: str, threads: int) -> float:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import torch_autograd_bench as b; "
            f"b._setup({threads}); print(b._peak_extra({impl!r}, b.SHAPES[{name!r}]))")
    # A fixed mmap threshold: every large block is mapped on allocation and unmapped on free
    # (glibc otherwise raises the threshold after a free and serves the next large block from
    # the warm-up's freed heap, hiding it from the resident-size peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 repeats, first 2 shapes")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    _setup(args.threads)
    import torch

    shapes = list(SHAPES.items())[:2] if args.quick else list(SHAPES.items())
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {args.threads} threads, float32, class indices, "
          f"min of {repeats}; ratio = torch / nblosses (> 1: nblosses faster)")
    head = f"{'shape':>15} {'torch ms':>9} {'nbl ms':>8} {'ratio':>6} {'inpl ms':>8} {'ratio':>6}"
    print(head + ("" if args.no_memory else "   peak extra / logits: torch  nbl  inplace"))
    logs: dict[str, list[float]] = {"nblosses": [], "nblosses_inplace": []}
    for name, shape in shapes:
        ms = {impl: sec * 1e3 for impl, sec in _times(shape, repeats).items()}
        line = f"{name:>15} {ms['torch']:9.2f}"
        for impl, values in logs.items():
            values.append(math.log(ms["torch"] / ms[impl]))
            line += f" {ms[impl]:8.2f} {ms['torch'] / ms[impl]:5.2f}x"
        if not args.no_memory:
            mem = [_memory_in_subprocess(impl, name, args.threads) for impl in IMPLS]
            line += "   " + "  ".join(f"{m:5.2f}x" for m in mem)
        print(line, flush=True)
    print("geomean ratio: " + ", ".join(f"{impl} {math.exp(sum(v) / len(v)):.2f}x"
                                        for impl, v in logs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
