"""Memory: asv's ``peakmem_`` (peak RSS of the benchmark process, inputs included) and
``track_extra_peak`` (memory one call adds beyond its outputs, % of the input; on the CPU the
rise of the RSS high-water mark, on CUDA the CuPy pool / torch allocator peak).

The cases with a memory target (``memory_ops`` of nblosses/_bench/targets.json: cross_entropy
forward <= 1% of the logits, forward+gradient <= the gradient + 1%; ``track_extra_peak``
excludes outputs, so <= 1% for both) run on every target shape, against torch; every other case
but the LM heads (``linear_ce.py``) on two row shapes.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import (
    BACKENDS,
    LINEAR,
    SHAPES,
    SHAPES_SMALL_GRID,
    CaseBenchmark,
    PeerBenchmark,
    cases,
    config,
    memory,
)

#: The configuration's memory cases (slow ones aside: they take seconds per call).
TARGETED = [op for op in config.load()["memory_ops"] if not cases.is_slow(op)]
OTHER_OPS = [op for op in cases.case_names() if op not in TARGETED and op not in LINEAR]


def _extra_pct(bench, backend, peer=None):
    m = memory.extra_peak(bench.fn, backend=backend, peer=peer, sync=bench.sync)
    if backend == "cpu":
        used = m["rss"] if m["rss"] is not None else m["traced"]
    else:
        used = m["device"]
    return 100.0 * (used - m["out_bytes"]) / bench.inputs.nbytes_input


class _PeakMem(CaseBenchmark):
    timeout = 300

    def peakmem_call(self, op, backend, shape, dtype):
        self.run()

    def track_extra_peak(self, op, backend, shape, dtype):
        return _extra_pct(self, backend)

    track_extra_peak.unit = "% of input"


class PeakMemTargeted(_PeakMem):
    params = [TARGETED, BACKENDS, SHAPES, ["float32"]]


class PeakMem(_PeakMem):
    params = [OTHER_OPS, BACKENDS, SHAPES_SMALL_GRID, ["float32"]]


class TorchPeakMemTargeted(PeerBenchmark):
    peer = "torch"
    params = [TARGETED, BACKENDS, SHAPES, ["float32"]]
    timeout = 300

    def peakmem_call(self, op, device, shape, dtype):
        self.run()

    def track_extra_peak(self, op, device, shape, dtype):
        return _extra_pct(self, device, peer="torch")

    track_extra_peak.unit = "% of input"
