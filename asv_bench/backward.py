"""softmax_backward and log_softmax_backward (select with ``-b '^backward\\.'``); torch
references (its backward kernels, ``aten._softmax_backward_data`` ...)."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, DTYPES, SHAPES, OpBenchmark, PeerBenchmark

SOFTMAX_BACKWARD_OPS = ["softmax_backward", "log_softmax_backward"]


class SoftmaxBackward(OpBenchmark):
    params = [SOFTMAX_BACKWARD_OPS, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmaxBackward(PeerBenchmark):
    peer = "torch"
    params = [SOFTMAX_BACKWARD_OPS, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, device, shape, dtype):
        self.run()
