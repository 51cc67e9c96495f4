"""Per-call Python cost of every case (argument checks, dispatch, result shaping).

Select with ``-b '^overhead\\.'``. The calls go to a backend whose kernels replay the result
of their first call (computed by the CPU kernels), so what is timed is nblosses' own Python
path, the part a GPU call cannot hide (the goal: <= 10 us per call), and every op of the case
table is covered whatever its kernels return. The backend defers class-index and probability
checks to its "kernels", as the CUDA backend does, so the host never reads the targets.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import nblosses
from nblosses import functional as F
from nblosses.backends import CpuBackend

from .common import LINEAR, cases

#: Every case but the LM heads, at one small shape.
CASES = [op for op in cases.case_names() if op not in LINEAR]
SHAPE = "32x[1000]"


def _replay(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel``'s result of the first call, returned again by every later call."""
    first: list[Any] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append(kernel(*args, **kwargs))
        return first[0]

    return call


class ReplayBackend(nblosses.Backend):
    """Kernels that cost a list lookup: the call's cost is the front end's."""

    name = "noop"

    def build(self) -> nblosses.Runtime:
        cpu = CpuBackend().load()
        return nblosses.Runtime(self, xp=np, asarray=np.asarray,
                                kernels={k: _replay(fn) for k, fn in cpu.kernels.items()},
                                kernel_checks={"class_index", "probability_range"})


class Overhead:
    """Wall time of one call at (32, 1000) float32 with replaying kernels."""

    params = [CASES]
    param_names = ["op"]
    number = 2000
    repeat = (3, 10, 2.0)

    def setup(self, op: str) -> None:
        nblosses.register_backend(ReplayBackend())
        inputs = cases.make_inputs(op, SHAPE)
        run, arrays, dim = inputs.case.run, inputs.arrays, inputs.dim
        self.fn = lambda: run(F, arrays, dim, "noop")
        self.fn()  # the kernels' one real call

    def teardown(self, op: str) -> None:
        nblosses.unregister_backend("noop")

    def time_call(self, op: str) -> None:
        self.fn()
