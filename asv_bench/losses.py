"""Losses, forward and fused forward+gradient (``return_grad=True``); torch references
(forward, and forward + ``torch.autograd.grad``)."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import (
    BACKENDS,
    DTYPES,
    SHAPES,
    SHAPES_SMALL_GRID,
    OpBenchmark,
    PeerBenchmark,
)

CE_OPS = ["cross_entropy", "cross_entropy_grad"]
NLL_OPS = ["nll_loss", "nll_loss_grad"]
BCE_OPS = ["bce", "bce_grad", "bce_with_logits", "bce_with_logits_grad"]
NLL_SHAPES = SHAPES_SMALL_GRID + ["32x[21]x4096"]


class CrossEntropy(OpBenchmark):
    """cross_entropy with class indices, mean reduction; class axis bracketed."""

    params = [CE_OPS, BACKENDS, SHAPES, DTYPES]

    def time_loss(self, op, backend, shape, dtype):
        self.run()


class NLLLoss(OpBenchmark):
    params = [NLL_OPS, BACKENDS, NLL_SHAPES, DTYPES]

    def time_loss(self, op, backend, shape, dtype):
        self.run()


class BinaryCrossEntropy(OpBenchmark):
    """binary_cross_entropy and binary_cross_entropy_with_logits (elementwise, mean)."""

    params = [BCE_OPS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_loss(self, op, backend, shape, dtype):
        self.run()


class TorchCrossEntropy(PeerBenchmark):
    peer = "torch"
    params = [CE_OPS, BACKENDS, SHAPES, DTYPES]

    def time_loss(self, op, device, shape, dtype):
        self.run()


class TorchNLLLoss(PeerBenchmark):
    peer = "torch"
    params = [NLL_OPS, BACKENDS, NLL_SHAPES, DTYPES]

    def time_loss(self, op, device, shape, dtype):
        self.run()


class TorchBinaryCrossEntropy(PeerBenchmark):
    peer = "torch"
    params = [BCE_OPS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_loss(self, op, device, shape, dtype):
        self.run()
