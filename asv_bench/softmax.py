"""Softmax, log_softmax and sigmoid forward; torch, SciPy and cupyx references."""

from .common import (BACKENDS, DTYPES, SHAPES, SHAPES_SMALL_GRID, OpBenchmark,
                     PeerBenchmark)

SOFTMAX_OPS = ["softmax", "log_softmax"]


class Softmax(OpBenchmark):
    """nblosses softmax / log_softmax along the bracketed axis of each target shape."""

    params = [SOFTMAX_OPS, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, backend, shape, dtype):
        self.run()


class Sigmoid(OpBenchmark):
    params = [["sigmoid"], BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_forward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmax(PeerBenchmark):
    """torch.nn.functional, as many threads as Numba (reference)."""

    peer = "torch"
    params = [SOFTMAX_OPS, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class TorchSigmoid(PeerBenchmark):
    peer = "torch"
    params = [["sigmoid"], BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class ScipySoftmax(PeerBenchmark):
    """scipy.special.softmax / log_softmax / expit (reference, CPU only)."""

    peer = "scipy"
    params = [SOFTMAX_OPS + ["sigmoid"], ["cpu"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class CupyxSoftmax(PeerBenchmark):
    """cupyx.scipy.special.softmax / log_softmax / expit (reference, CUDA only)."""

    peer = "cupyx"
    params = [SOFTMAX_OPS + ["sigmoid"], ["cuda"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()
