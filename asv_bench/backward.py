"""Explicit backward functions: softmax_backward, log_softmax_backward, sigmoid_backward; torch
references (its backward kernels, ``aten._softmax_backward_data`` ...)."""

from .common import (BACKENDS, DTYPES, SHAPES, SHAPES_SMALL_GRID, OpBenchmark,
                     PeerBenchmark)

SOFTMAX_BACKWARD_OPS = ["softmax_backward", "log_softmax_backward"]


class SoftmaxBackward(OpBenchmark):
    params = [SOFTMAX_BACKWARD_OPS, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, backend, shape, dtype):
        self.run()


class SigmoidBackward(OpBenchmark):
    params = [["sigmoid_backward"], BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_backward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmaxBackward(PeerBenchmark):
    peer = "torch"
    params = [SOFTMAX_BACKWARD_OPS, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, device, shape, dtype):
        self.run()


class TorchSigmoidBackward(PeerBenchmark):
    peer = "torch"
    params = [["sigmoid_backward"], BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_backward(self, op, device, shape, dtype):
        self.run()
