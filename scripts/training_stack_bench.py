"""The training-stack targets of issue 26: a transformers training step with and without
:func:`nblosses.torch.transformers.patch`, and the vocabulary-parallel loss's memory per rank.

1. A tiny random ``LlamaForCausalLM`` (``V = 32000``, ``d = 256``, 2 layers, ``B * T = 2048``
   tokens), one training step (forward with labels, backward, SGD step), on ``--threads``
   threads: the step time of the patched and the unpatched model (two copies of one model,
   taking turns within each repeat; the minimum over repeats), and each one's peak resident
   set size during a step, in a fresh process per configuration; then both peaks at
   ``V = 128256`` (Llama 3's vocabulary).
2. ``nblosses.torch.distributed.cross_entropy`` (and ``linear_cross_entropy``, ``d = 256``) on
   2 gloo processes, ``N = 2048``, ``V = 32000`` (16000 classes each): each rank's peak memory
   of the loss and its gradient, against :mod:`nblosses.torch`'s single-process call (and
   torch's, for scale).

Memory is the kernel's peak resident set size (``VmHWM``), reset after warm-up steps (which
compile the kernels), minus the resident size just before the measured step: the step's extra
memory; the table also gives the peak itself. glibc's mmap threshold is fixed so that freed
large blocks leave the resident set (as ``scripts/torch_autograd_bench.py`` does), and
nblosses' output cache is off, so that the measured step's allocations are not served from
blocks the warm-up left in it.

Usage::

    python scripts/training_stack_bench.py [--threads 2] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_autograd_bench import _peak_rss, _reset_peak_rss

MIB = 1 << 20
TOKENS, D_MODEL = 2048, 256


def _setup(threads: int) -> None:
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 1. training step
def _llama(vocab: int, patched: bool, seed: int = 0) -> Any:
    import torch
    import transformers

    from nblosses.torch.transformers import patch

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=D_MODEL,
                                      intermediate_size=4 * D_MODEL, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    return patch(model) if patched else model


def _batch(vocab: int, batch: int, seq: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 16] = -100  # a prompt, ignored
    return ids, labels


def _trainer(model: Any) -> Any:
    """One training step of ``model`` (forward with labels, backward, SGD)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(ids: Any, labels: Any) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def step_times(vocab: int, repeats: int) -> dict[str, float]:
    """Best step time (s) of the unpatched and the patched model, taking turns."""
    steps = {"unpatched": _trainer(_llama(vocab, False)),
             "patched": _trainer(_llama(vocab, True))}
    ids, labels = _batch(vocab, 8, TOKENS // 8)
    best = dict.fromkeys(steps, math.inf)
    for i in range(repeats + 1):  # the first round warms up
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(ids, labels)
            if i:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def step_memory(vocab: int, patched: bool) -> dict[str, float]:
    """Peak RSS of one training step and its extra over the RSS before it, in MiB (run in a
    fresh process: see :func:`_child`)."""
    step = _trainer(_llama(vocab, patched))
    step(*_batch(vocab, 1, 16))  # compiles the kernels
    ids, labels = _batch(vocab, 8, TOKENS // 8)
    gc.collect()
    before = _reset_peak_rss()
    step(ids, labels)
    peak = _peak_rss()
    return {"peak": peak / MIB, "extra": (peak - before) / MIB}


# ----------------------------------------------------------------------------- 2. vocab parallel
def _ce_inputs(vocab: int, head: str, seed: int = 0) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 32000, (TOKENS,), generator=g)
    if head == "linear":
        return (torch.randn(TOKENS, D_MODEL, generator=g, requires_grad=True),
                torch.randn(vocab, D_MODEL, generator=g).div_(16).requires_grad_(), target)
    return torch.randn(TOKENS, vocab, generator=g, requires_grad=True), target


def _single(impl: str, head: str, inputs: tuple[Any, ...]) -> None:
    import torch.nn.functional as TF

    import nblosses.torch as nbt

    if head == "linear":
        x, w, t = inputs
        loss = (TF.cross_entropy(x @ w.T, t) if impl == "torch"
                else nbt.linear_cross_entropy(x, w, t))
    else:
        x, t = inputs
        loss = (TF.cross_entropy if impl == "torch" else nbt.cross_entropy)(x, t)
    loss.backward()


def single_memory(impl: str, head: str) -> dict[str, float]:
    """One process, the whole vocabulary: peak and extra RSS of loss + gradient (MiB)."""
    _single(impl, head, _ce_inputs(32000, head, seed=1))  # warm-up: compilation, pools
    inputs = _ce_inputs(32000, head)
    gc.collect()
    before = _reset_peak_rss()
    _single(impl, head, inputs)
    peak = _peak_rss()
    return {"peak": peak / MIB, "extra": (peak - before) / MIB}


def rank_memory(rank: int, world: int, store: str, head: str) -> dict[str, float]:
    """One rank of ``world`` holding its shard of the 32000 classes (logits, or the head's
    weight rows): peak and extra RSS of loss + gradient (MiB)."""
    import datetime

    import torch.distributed as dist

    from nblosses.torch import distributed as vp

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))

    def run(inputs: tuple[Any, ...]) -> None:
        group = dist.group.WORLD
        loss = (vp.linear_cross_entropy(*inputs, process_group=group) if head == "linear"
                else vp.cross_entropy(*inputs, process_group=group))
        loss.backward()

    try:
        width = 32000 // world
        run(_ce_inputs(width, head, seed=1))  # warm-up
        inputs = _ce_inputs(width, head)
        gc.collect()
        dist.barrier()
        before = _reset_peak_rss()
        run(inputs)
        peak = _peak_rss()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {"peak": peak / MIB, "extra": (peak - before) / MIB}


# ----------------------------------------------------------------------------- processes
def _child(argv: list[str]) -> None:
    """``--child KIND ...``: one measurement, its JSON on the last line of stdout."""
    kind, threads = argv[0], int(argv[1])
    _setup(threads)
    if kind == "step":
        out = step_memory(int(argv[2]), argv[3] == "patched")
    elif kind == "single":
        out = single_memory(argv[2], argv[3])
    else:
        out = rank_memory(int(argv[2]), int(argv[3]), argv[4], argv[5])
    print(json.dumps(out))


def _env() -> dict[str, str]:
    # A fixed mmap threshold: large blocks are mapped on allocation and unmapped on free; no
    # output cache (nblosses.output_cache), whose blocks kept from the warm-up would hide the
    # measured step's allocations.
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", NBLOSSES_OUTPUT_CACHE_BYTES="0")


def _in_subprocess(*args: Any) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                         capture_output=True, text=True, check=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _in_group(world: int, threads: int, head: str) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [subprocess.Popen([sys.executable, __file__, "--child", "rank", str(threads),
                                   str(r), str(world), store, head],
                                  stdout=subprocess.PIPE, text=True, env=_env())
                 for r in range(world)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a rank failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def _mem(m: dict[str, float]) -> str:
    return f"peak {m['peak']:7.0f} MiB, step extra {m['extra']:7.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats, no V = 128256 run, no linear head")
    args = parser.parse_args(argv)
    _setup(args.threads)
    import torch
    import transformers

    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, float32, {os.cpu_count()} CPUs")

    print(f"\n1. LlamaForCausalLM step: V=32000, d={D_MODEL}, 2 layers, B*T={TOKENS} "
          f"(8 x {TOKENS // 8}), SGD; min of {repeats}")
    t = step_times(32000, repeats)
    print(f"   step time: unpatched {t['unpatched']:.3f} s, patched {t['patched']:.3f} s, "
          f"speed-up {t['unpatched'] / t['patched']:.2f}x")
    for vocab in (32000,) if args.quick else (32000, 128256):
        mem = {p: _in_subprocess("step", args.threads, vocab, p)
               for p in ("unpatched", "patched")}
        print(f"   V={vocab}: unpatched {_mem(mem['unpatched'])}")
        print(f"   V={vocab}: patched   {_mem(mem['patched'])}")
        print(f"   V={vocab}: patched / unpatched: peak "
              f"{mem['patched']['peak'] / mem['unpatched']['peak']:.2f}x, step extra "
              f"{mem['patched']['extra'] / mem['unpatched']['extra']:.2f}x")

    print(f"\n2. vocabulary parallel: N={TOKENS}, V=32000, 2 gloo ranks of 16000")
    for head in ("logits",) if args.quick else ("logits", "linear"):
        name = ("cross_entropy on (N, V) logits" if head == "logits"
                else f"linear_cross_entropy, d={D_MODEL}")
        single = {impl: _in_subprocess("single", args.threads, impl, head)
                  for impl in ("nblosses", "torch")}
        ranks = _in_group(2, args.threads, head)
        worst = max(ranks, key=lambda m: m["extra"])
        print(f"   {name}:")
        print(f"     torch, 1 process:    {_mem(single['torch'])}")
        print(f"     nblosses, 1 process: {_mem(single['nblosses'])}")
        for r, m in enumerate(ranks):
            print(f"     rank {r} of 2:         {_mem(m)}")
        print(f"     per rank / nblosses 1 process: step extra "
              f"{worst['extra'] / single['nblosses']['extra']:.2f}x, peak "
              f"{worst['peak'] / single['nblosses']['peak']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
