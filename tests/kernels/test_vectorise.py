"""Every hot loop of the CPU kernels compiles to packed SIMD code on AVX2 and AVX-512 CPUs.

A subprocess per CPU name compiles the kernels and their loop helpers for that CPU
(``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES=""``: the CPU's own feature set, not the host's; a
fresh ``NUMBA_CACHE_DIR``, so no cached host code is reused and the assembly can be inspected)
without running them, and reports per function how many packed (``ymm``/``zmm``) and scalar
(``ss``/``sd``) instructions of each kind its assembly holds. The checks:

- each loop helper holds the packed form of the operation its loop exists for (a max-reduction
  ``vmaxps``/``vmaxpd``, an exp or log loop packed FMAs, a scaling loop packed multiplies, ...);
- each kernel holds the packed forms of its passes' operations (max, FMA for exp, ...).

The helpers are the precise check (one loop each: the scalar ``row_max`` that Numba's ``max()``
compiled to under LLVM 22 holds nine ``vmaxss`` and no ``vmaxps``); kernels add their inline
loops. The probe itself is checked: code built for ``haswell`` holds no ``zmm`` register, code
for the AVX-512 CPUs does. No such CPU is needed: code is compiled, never run. The three CPUs
compile in parallel subprocesses. Run as a script with those variables set, this file prints
the counts (``PROBE_ONLY=name`` compiles only matching functions).
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from helpers import PROBE_CPUS, run_asm_probes

CPUS = PROBE_CPUS

# Instruction kinds, as regular expressions on AT&T assembly lines (operation, then operands).
KINDS = {
    "max": r"vmaxp[sd]",
    "fma": r"vf(?:n?m(?:add|sub)|maddsub|msubadd)\d+p[sd]",
    "add": r"vaddp[sd]",
    "sub": r"vsubp[sd]",
    "mul": r"vmulp[sd]",
    "div": r"vdivp[sd]",
    "gather": r"vgather[dq]p[sd]",
    "scatter": r"vscatter[dq]p[sd]",
}
SCALAR_MAX = r"vmaxs[sd]"

# helper or kernel -> the packed kinds its loops must hold.
_EXP = ("fma",)
EXPECT = {
    "_math.row_max": ("max",),
    "_math.sum_exp": _EXP + ("add",),
    "_math.sum_exp_store": _EXP + ("add",),
    "_blocks.vmax": ("max",),
    "_blocks.vmax4": ("max",),
    "_blocks.vsum_exp": _EXP,
    "_blocks.vsum_exp4": _EXP,
    "_blocks.vsum_exp_store": _EXP,
    "_blocks.vsum_exp_store4": _EXP,
    "_blocks.vlog": ("fma", "div"),
    "_blocks.vsub": ("sub",),
    "_blocks.vmul": ("mul",),
    "_blocks.vrecip": ("div",),
    "_blocks.block_stats": ("max",) + _EXP,
    "_blocks.block_stats_store": ("max",) + _EXP,
    "_blocks.tile_stats": ("max",) + _EXP,
    "_blocks.split_stats": ("max",) + _EXP,
    "softmax._softmax_rows": ("max", "fma", "mul", "sub"),
    "softmax._softmax_tiles": ("max", "fma", "mul", "sub"),
    "softmax._softmax_split_tiles": ("max", "fma", "mul", "sub"),
    "softmax._softmax_blocks": ("max", "fma", "mul", "sub"),
    "softmax._softmax_backward_rows": ("fma",),
    "softmax._log_softmax_backward_split": ("fma", "add"),
    "softmax._softmax_backward_blocks": ("fma",),
    "softmax._sigmoid": ("fma", "div"),
    "softmax._sigmoid_backward": ("mul",),
    "class_losses._ce_rows": ("max", "fma"),
    "class_losses._ce_tiles": ("max", "fma"),
    "class_losses._ce_split_tiles": ("max", "fma"),
    "class_losses._ce_blocks": ("max", "fma"),
    "class_losses._ce_probs_rows": ("max", "fma"),
    "class_losses._ce_probs_blocks": ("max", "fma"),
    "class_losses._ce_grad_row": ("fma",),
    "class_losses._vce_grad": ("fma",),
    "class_losses._vprob_sums": ("fma",),
    "class_losses._vprob_grad": ("fma",),
    "class_losses._vaxpy": ("fma",),
    "class_losses._capped_row": ("fma", "div"),
    "binary_losses._bce": ("fma", "div"),
    "binary_losses._bce_logits": ("fma", "div"),
    "kl_div._kl_div": ("fma", "div"),
    "kl_div._kl_block": ("fma",),
    "distillation._max2": ("max",),
    "distillation._pair_sums": _EXP + ("add",),
    "distillation._jsd_sums": ("fma", "div"),
    "distillation._grad_pass": ("fma", "div"),
    "distillation._sums_store": _EXP + ("add",),
    "distillation._stored_pass": ("fma",),
    "distillation._pair_rows": ("max", "fma"),
    "distillation._topk_rows": ("max", "fma"),
    "_blocks.tile_store": (),
}
#: On AVX-512 CPUs only (LLVM's cost model keeps them scalar for Haswell's gathers): the short-
#: row tiles' transposes, column by column through strided views, as vector gathers / scatters.
EXPECT_AVX512 = {
    "_blocks.tile_stats": ("gather",),
    "_blocks.tile_store": ("scatter",),
}


def _examples(dtype):
    """Arguments per function of :data:`EXPECT` (their types select the compiled signature);
    every optional array present, so that no loop is pruned away."""
    import numpy as np

    from nblosses.backends.cpu.class_losses import CEScalars, ProbScalars

    f = np.dtype(dtype).type
    x2, y2, g2 = (np.ones((4, 40), dtype) for _ in range(3))
    x3, y3, g3 = (np.ones((2, 21, 64), dtype) for _ in range(3))
    v = np.ones(64, dtype)
    t1, t2 = np.zeros(4, np.int64), np.zeros((2, 64), np.int64)
    w, g1, o1 = np.ones(40, dtype), np.ones(4, dtype), np.ones(4, dtype)
    w3, gb, ob = np.ones(21, dtype), np.ones((2, 64), dtype), np.ones((2, 64), dtype)
    # the default path: z_loss 0.0, no soft cap, no lse output; scalars as the host packs them
    def ce(c):
        return tuple(CEScalars(ignore=-100, eps=0.1, w_total=float(c), g_scalar=0.0, z=0.0))

    probs = tuple(ProbScalars(eps=0.1, g_scalar=0.0, z=0.0))
    ce_rows = (x2, t1, w, g1, o1, g2, None, None, ce(40))
    from nblosses.backends.cpu.distillation import DistillScalars, RowCoef
    distill = DistillScalars(-100, 0.5, 0.0, 0.7, 0.3, 1.0)
    distill_coef = RowCoef(*(f(1) for _ in RowCoef._fields))
    return {
        "_math.row_max": (v,),
        "_math.sum_exp": (v, f(0)),
        "_math.sum_exp_store": (v, v.copy(), f(0), True),
        "_blocks.vmax": (v, v.copy()),
        "_blocks.vmax4": (v, *(v.copy() for _ in range(4))),
        "_blocks.vsum_exp": (v, v.copy(), v.copy()),
        "_blocks.vsum_exp4": (v, *(v.copy() for _ in range(5))),
        "_blocks.vsum_exp_store": (v, v.copy(), v.copy(), v.copy(), True),
        "_blocks.vsum_exp_store4": (v, *(v.copy() for _ in range(9)), True),
        "_blocks.vlog": (v, v.copy()),
        "_blocks.vsub": (v, v.copy()),
        "_blocks.vmul": (v, v.copy()),
        "_blocks.vrecip": (v, v.copy()),
        "_blocks.block_stats": (x3[0], 0, 64, v, v.copy()),
        "_blocks.block_stats_store": (x3[0], 0, 64, v, v.copy(), y3[0], 0, True),
        "_blocks.tile_stats": (x2, 0, True, None, np.ones((40, 128), dtype), np.ones(128, dtype),
                               np.ones(128, dtype)),
        "_blocks.tile_store": (y2, 0, 4, np.ones((40, 128), dtype), None, None),
        "_blocks.split_stats": (np.ones((5, 256), dtype), np.ones(128, dtype),
                                np.ones(128, dtype), np.ones(256, dtype), np.ones(256, dtype),
                                4, True, (0,) * 5, (0,) * 2),
        "softmax._softmax_rows": (x2, y2, True),
        "softmax._softmax_tiles": (x2, y2, True, 2),
        "softmax._softmax_split_tiles": (np.ones(40, dtype), np.ones(40, dtype), True, 2,
                                         (0,) * 5, (0,) * 2),  # C = 10 = 5 x 2
        "softmax._softmax_blocks": (x3, y3, True, 64),
        "softmax._softmax_backward_rows": (g2, y2, x2, True),
        "softmax._log_softmax_backward_split": (np.ones(40, dtype), np.ones(40, dtype),
                                                np.ones(40, dtype), 2, (0,) * 5, (0,) * 2),
        "softmax._softmax_backward_blocks": (g3, y3, x3, True, 64),
        "softmax._sigmoid": (v, v.copy()),
        "softmax._sigmoid_backward": (v, v.copy(), v.copy()),
        "class_losses._ce_rows": ce_rows,
        "class_losses._ce_tiles": ce_rows + (2,),
        "class_losses._ce_split_tiles": (np.ones(40, dtype), np.ones((4, 10), dtype), t1,
                                         np.ones(10, dtype), g1, o1, np.ones(40, dtype), None,
                                         ce(10), 2, (0,) * 5,
                                         (0,) * 2),  # C = 10 = 5 x 2, with a gradient
        "class_losses._ce_blocks": (x3, t2, w3, gb, ob, g3, None, None, ce(21), 64),
        "class_losses._ce_probs_rows": (x2, y2, w, g1, o1, g2, None, None, probs),
        "class_losses._ce_probs_blocks": (x3, y3, w3, gb, ob, g3, None, None, probs, 64),
        "class_losses._ce_grad_row": (v, 1.0, 0.5, v.copy()),
        "class_losses._vce_grad": (v, v.copy(), v.copy(), 1.0),
        "class_losses._vprob_sums": (v, v.copy(), v.copy(), v.copy(), 1.0, 0.9, 0.1),
        "class_losses._vprob_grad": (v, v.copy(), v.copy(), v.copy(), v.copy(), v.copy(),
                                     v.copy(), 1.0, 0.9, 0.1),
        "class_losses._vaxpy": (v, 1.0, v.copy()),
        "class_losses._capped_row": (v, 5.0),
        "binary_losses._bce": (v, v.copy(), v.copy(), v.copy(), 0.0, v.copy(), v.copy(),
                               np.zeros(1)),
        "binary_losses._bce_logits": (v, v.copy(), v.copy(), v.copy(), v.copy(), 0.0, v.copy(),
                                      v.copy(), np.zeros(1)),
        # kl_div on probabilities (t log t), its block with log-targets (exp, +inf count)
        "kl_div._kl_div": (v, v.copy(), (), v.copy(), 0.0, v.copy(), v.copy(), np.zeros(1),
                           np.zeros(1, np.int64)),
        "kl_div._kl_block": (v, v.copy(), (0,), v.copy(), f(1), v.copy(), v.copy(), 0, 64),
        # distillation: forward KL with the hard loss's own softmax; the JSD's passes
        "distillation._max2": (v, v.copy()),
        "distillation._pair_sums": (v, v.copy(), f(1), f(0), f(0), (), (0,), f(0)),
        "distillation._jsd_sums": (v, v.copy(), f(1), f(0), f(0), f(0.5)),
        "distillation._grad_pass": (v, v.copy(), v.copy(), f(1), distill_coef, (0, 0), (), None),
        "distillation._sums_store": (v, v.copy(), f(1), f(0), f(0), (), v.copy(), v.copy()),
        "distillation._stored_pass": (v, v.copy(), v.copy(), distill_coef, None),
        "distillation._pair_rows": (x2, y2, t1, g1, o1, g2, None, distill, (), ()),
        "distillation._topk_rows": (x2, np.zeros((4, 3), np.int64), np.ones((4, 3), dtype), t1,
                                    g1, o1, g2, None, distill, ()),
    }


def _count(asm: str) -> dict[str, int]:
    """Packed instructions per kind (on ymm/zmm registers), scalar maxima, zmm mentions."""
    counts = {k: len(re.findall(rf"^\s*{rx}\s[^\n]*%[yz]mm", asm, re.M))
              for k, rx in KINDS.items()}
    counts["scalar_max"] = len(re.findall(rf"^\s*{SCALAR_MAX}\s", asm, re.M))
    counts["zmm"] = len(re.findall(r"%zmm", asm))
    return counts


def probe() -> dict[str, dict[str, dict[str, int]]]:
    """Compile every function of :data:`EXPECT` for float32 and float64 (this process's CPU
    settings) and count its instructions; nothing runs."""
    import importlib

    import numba

    out: dict[str, dict[str, dict[str, int]]] = {}
    only = os.environ.get("PROBE_ONLY", "")  # a name filter, for working on one kernel
    for dtype in ("float32", "float64"):
        for name, args in _examples(dtype).items():
            if only not in name:
                continue
            module, func = name.split(".")
            fn = getattr(importlib.import_module(f"nblosses.backends.cpu.{module}"), func)
            fn = getattr(fn, "serial", fn)  # a ParallelKernel: its serial build, same loops
            sig = tuple(numba.typeof(a) for a in args)
            fn.compile(sig)
            out.setdefault(name, {})[dtype] = _count(fn.inspect_asm(sig))
    return out


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """``{cpu: counts}``, one subprocess per CPU name, all started at once."""
    return run_asm_probes(__file__, tmp_path_factory.mktemp("probes"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cpu", CPUS)
def test_hot_loops_are_packed(probes, cpu, dtype):
    failures = []
    expect = {k: EXPECT[k] + (EXPECT_AVX512.get(k, ()) if cpu != "haswell" else ())
              for k in EXPECT}
    for name, kinds in expect.items():
        c = probes[cpu][name][dtype]
        missing = [k for k in kinds if c[k] == 0]
        if missing:
            failures.append(f"{name}: no packed {', '.join(missing)} ({c})")
    assert not failures, f"{cpu} {dtype}:\n" + "\n".join(failures)


@pytest.mark.parametrize("cpu", CPUS)
def test_probe_compiles_for_the_named_cpu(probes, cpu):
    """The probe really targets the named CPU: AVX2-only code holds no zmm register, and
    AVX-512 code does (otherwise the checks above would test the host's code three times)."""
    zmm = sum(c["zmm"] for per in probes[cpu].values() for c in per.values())
    assert (zmm == 0) if cpu == "haswell" else (zmm > 0), f"{cpu}: {zmm} zmm uses"


def test_criterion_catches_a_scalar_max():
    """The counts tell a scalar max-reduction (Numba's ``max()``) from a packed one."""
    scalar = "\tvmaxss\t%xmm1, %xmm0, %xmm0\n" * 9
    packed = "\tvmaxps\t%zmm1, %zmm0, %zmm0\n" + "\tvmaxss\t%xmm1, %xmm0, %xmm0\n"
    assert _count(scalar)["max"] == 0 and _count(scalar)["scalar_max"] == 9
    assert _count(packed)["max"] == 1 and _count(packed)["zmm"] == 3


if __name__ == "__main__":
    result = probe()
    if sys.stdout.isatty():
        for name, per in result.items():
            print(name, per)
    print(json.dumps(result))
