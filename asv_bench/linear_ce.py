"""LM heads (the ``linear`` and ``linear_pair`` layouts: linear_cross_entropy and any head added
since): forward and the input and weight gradients, float32, at each case's own shapes
(``NxDx[V]``, the quick one and the target ones), against torch's references:
``F.linear`` + ``F.cross_entropy`` + backward (``torch``) and, where the case has one,
``F.linear_cross_entropy`` on its chunked path (``torch_chunked``).

The target shapes take seconds per call (and torch's reference ~1.5 GB): a long timeout, one
repeat.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import BACKENDS, LINEAR, CaseBenchmark, PeerBenchmark, cases

#: Every LM-head case's own shapes, the small quick ones first.
SIZES = list(dict.fromkeys(s.label for quick in (True, False) for op in LINEAR
                           for s in cases.own_shapes(op, quick)))


class _Slow:
    """One call per sample, one sample: the setup's call was the warm-up."""

    timeout = 900
    number = 1
    repeat = 1
    warmup_time = 0
    params = [LINEAR, BACKENDS, SIZES, ["float32"]]


class LinearCrossEntropy(_Slow, CaseBenchmark):
    def time_forward_backward(self, op, backend, shape, dtype):
        self.run()


class TorchLinearCrossEntropy(_Slow, PeerBenchmark):
    peer = "torch"

    def time_forward_backward(self, op, device, shape, dtype):
        self.run()


class TorchChunkedLinearCrossEntropy(_Slow, PeerBenchmark):
    peer = "torch_chunked"

    def time_forward_backward(self, op, device, shape, dtype):
        self.run()
