"""Per-stream scratch of the single-launch reductions (see ``finish_loss`` in ``_common.cu``).

A loss kernel with a reduction writes one (loss, denominator) pair per block, counts the blocks
that are done with an atomic counter, and its last block sums the pairs and resets the counter
to 0. The prep kernel of the class losses also leaves ``[D, g / D, W]`` there. One zeroed buffer
per (device, stream), allocated on first use and kept: launches on one stream run in order, so
they never share a counter while in flight, and launches on different streams have their own.
No per-call allocation and no per-call memset.

Under stream capture, a stream without scratch yet gets a fresh buffer whose zero-fill is part
of the graph (replays then start from a clean counter); it is kept alive for the process, since
the graph may be replayed at any time. Run one call on the stream before capturing to reuse
the stream's buffer instead.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import _kernels as K

_LOCK = threading.Lock()
_BUFFERS: dict[tuple[int, int], Scratch] = {}
_CAPTURED: list[Scratch] = []  # buffers referenced by captured graphs: never freed


def max_blocks(sm_count: int) -> int:
    """Upper bound on any reduction kernel's grid (``grid_for`` caps it lower)."""
    return sm_count * max(1, K.THREADS_PER_SM // 32)


class Scratch:
    """Device addresses of the partials, the prep scalars and the counter of one buffer."""

    __slots__ = ("buf", "counter", "part", "scal")

    def __init__(self, cupy: Any, blocks: int, stream: Any) -> None:
        words = 2 * blocks + 4 + 1  # partial pairs, scal[0:3] (+1 pad), counter (low 4 bytes)
        self.buf = cupy.empty(words, cupy.float64)
        self.buf.data.memset_async(0, self.buf.nbytes, stream)
        base = int(self.buf.data.ptr)
        self.part = np.uint64(base)
        self.scal = np.uint64(base + 8 * 2 * blocks)
        self.counter = np.uint64(base + 8 * (2 * blocks + 4))


def scratch(stream: Any, sm_count: int) -> Scratch:
    """The scratch of the current device and ``stream``."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), int(stream.ptr))
    s = _BUFFERS.get(key)
    if s is not None:
        return s
    capturing = False
    try:
        capturing = bool(stream.is_capturing())
    except Exception:
        capturing = True
    with _LOCK:
        s = _BUFFERS.get(key)
        if s is None:
            s = Scratch(cupy, max_blocks(sm_count), stream)
            if capturing:
                _CAPTURED.append(s)
            else:
                _BUFFERS[key] = s
    return s
