"""Losses and every other case not timed elsewhere, forward and fused forward+gradient
(``return_grad=True``); torch references (forward, and forward + ``torch.autograd.grad``).

Class-index layouts (cross_entropy, nll_loss, ...) run on every target shape, the class axis
bracketed; the others (binary losses, pair and top-k layouts) on two row shapes. The cases come
from the case table by layout (:data:`.common.CLASS_CASES`, :data:`.common.OTHER_CASES`)."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import (
    BACKENDS,
    CLASS_CASES,
    DTYPES,
    OTHER_CASES,
    SHAPES,
    SHAPES_SMALL_GRID,
    CaseBenchmark,
    PeerBenchmark,
)


class ClassLosses(CaseBenchmark):
    """Class indices, mean reduction; class axis bracketed."""

    params = [CLASS_CASES, BACKENDS, SHAPES, DTYPES]

    def time_loss(self, op, backend, shape, dtype):
        self.run()


class Losses(CaseBenchmark):
    """Elementwise, pair and top-k layouts, mean reduction."""

    params = [OTHER_CASES, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_loss(self, op, backend, shape, dtype):
        self.run()


class TorchClassLosses(PeerBenchmark):
    peer = "torch"
    params = [CLASS_CASES, BACKENDS, SHAPES, DTYPES]

    def time_loss(self, op, device, shape, dtype):
        self.run()


class TorchLosses(PeerBenchmark):
    peer = "torch"
    params = [OTHER_CASES, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_loss(self, op, device, shape, dtype):
        self.run()
