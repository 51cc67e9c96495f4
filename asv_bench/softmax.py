"""Softmax-layout forward cases: softmax, log_softmax and any op added on that layout (select
with ``-b '^softmax\\.'``); torch, and SciPy / cupyx where the case has a ``scipy.special``
peer."""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, DTYPES, SHAPES, SOFTMAX_FORWARD, CaseBenchmark, PeerBenchmark, cases

#: The forward cases SciPy (CPU) and cupyx (CUDA) compute too.
SPECIAL = [n for n in SOFTMAX_FORWARD if cases.lookup(n).scipy is not None]


class Softmax(CaseBenchmark):
    """nblosses along the bracketed axis of each target shape."""

    params = [SOFTMAX_FORWARD, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, backend, shape, dtype):
        self.run()


class TorchSoftmax(PeerBenchmark):
    """torch.nn.functional, as many threads as Numba (reference)."""

    peer = "torch"
    params = [SOFTMAX_FORWARD, BACKENDS, SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class ScipySoftmax(PeerBenchmark):
    """scipy.special (reference, CPU only)."""

    peer = "scipy"
    params = [SPECIAL, ["cpu"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()


class CupyxSoftmax(PeerBenchmark):
    """cupyx.scipy.special (reference, CUDA only)."""

    peer = "cupyx"
    params = [SPECIAL, ["cuda"], SHAPES, DTYPES]

    def time_forward(self, op, device, shape, dtype):
        self.run()
