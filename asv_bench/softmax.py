"""Softmax and log_softmax forward (select with ``-b '^softmax\\.'``); torch, SciPy and cupyx
references."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, DTYPES, SHAPES, OpBenchmark, PeerBenchmark

SOFTMAX_OPS = ["softmax", "log_softmax"]


class Softmax(OpBenchmark):
    """nblosses softmax / log_softmax along the bracketed axis of each target shape."""

    params = [SOFTMAX_OPS, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmax(PeerBenchmark):
    """torch.nn.functional, as many threads as Numba (reference)."""

    peer = "torch"
    params = [SOFTMAX_OPS, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class ScipySoftmax(PeerBenchmark):
    """scipy.special.softmax / log_softmax (reference, CPU only)."""

    peer = "scipy"
    params = [SOFTMAX_OPS, ["cpu"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class CupyxSoftmax(PeerBenchmark):
    """cupyx.scipy.special.softmax / log_softmax (reference, CUDA only)."""

    peer = "cupyx"
    params = [SOFTMAX_OPS, ["cuda"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()
