"""Softmax-layout gradient cases: softmax_backward, log_softmax_backward and any op added on
that layout (select with ``-b '^backward\\.'``); torch references (its backward kernels,
``aten._softmax_backward_data`` ...)."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, DTYPES, SHAPES, SOFTMAX_BACKWARD, CaseBenchmark, PeerBenchmark


class SoftmaxBackward(CaseBenchmark):
    params = [SOFTMAX_BACKWARD, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmaxBackward(PeerBenchmark):
    peer = "torch"
    params = [SOFTMAX_BACKWARD, BACKENDS, SHAPES, DTYPES]

    def time_backward(self, op, device, shape, dtype):
        self.run()
