"""sigmoid and sigmoid_backward, elementwise (select with ``-b '^sigmoid\\.'``); torch, SciPy
(``expit``) and cupyx references."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, DTYPES, SHAPES_SMALL_GRID, OpBenchmark, PeerBenchmark

SIGMOID_OPS = ["sigmoid", "sigmoid_backward"]


class Sigmoid(OpBenchmark):
    params = [SIGMOID_OPS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, backend, shape, dtype):
        self.run()


class TorchSigmoid(PeerBenchmark):
    peer = "torch"
    params = [SIGMOID_OPS, BACKENDS, SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()


class ScipySigmoid(PeerBenchmark):
    """scipy.special.expit (CPU only)."""

    peer = "scipy"
    params = [["sigmoid"], ["cpu"], SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()


class CupyxSigmoid(PeerBenchmark):
    """cupyx.scipy.special.expit (CUDA only)."""

    peer = "cupyx"
    params = [["sigmoid"], ["cuda"], SHAPES_SMALL_GRID, DTYPES]

    def time_sigmoid(self, op, device, shape, dtype):
        self.run()
