"""Elementwise cases that are not losses: sigmoid, sigmoid_backward and any activation added
on that layout (select with ``-b '^sigmoid\\.'``); torch, and SciPy (``expit``) / cupyx where
the case has a ``scipy.special`` peer."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import (
    ACTIVATIONS,
    BACKENDS,
    DTYPES,
    SHAPES_SMALL_GRID,
    CaseBenchmark,
    PeerBenchmark,
    cases,
)

#: The activations SciPy (CPU) and cupyx (CUDA) compute too.
SPECIAL = [n for n in ACTIVATIONS if cases.lookup(n).scipy is not None]


class Sigmoid(CaseBenchmark):
    params = [ACTIVATIONS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, backend, shape, dtype):
        self.run()


class TorchSigmoid(PeerBenchmark):
    peer = "torch"
    params = [ACTIVATIONS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()


class ScipySigmoid(PeerBenchmark):
    """scipy.special (CPU only)."""

    peer = "scipy"
    params = [SPECIAL, ["cpu"], SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()


class CupyxSigmoid(PeerBenchmark):
    """cupyx.scipy.special (CUDA only)."""

    peer = "cupyx"
    params = [SPECIAL, ["cuda"], SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()
