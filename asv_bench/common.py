"""Shared helpers for the asv benchmarks (models: pandas' asv_bench, SciPy's
benchmarks/benchmarks/common.py).

The benchmark harness is ``nblosses/_bench`` *of this working tree*, loaded by file path under
a private package name: asv installs other commits of nblosses to benchmark them (``asv
continuous``, ``asv run HASH``), and those commits may predate or differ in ``nblosses._bench``.
The loaded code calls nblosses' public API and reads the cases from the installed op specs
(``nblosses.ops``: each spec's ``bench``), so a new op's cases are benchmarked here without an
edit; commits older than the specs cannot be benchmarked with these modules.

Every case lands in one module, by its layout (:data:`SOFTMAX_FORWARD` ... :data:`LINEAR`):
the op lists below are read from the case table, never written by hand.

Conventions of every benchmark class here:

- ``params`` hold strings: case names (the ``op`` parameter), backend (``"cpu"``,
  ``"cuda"``), shape labels with the reduced axis in brackets (``"32x[21]x4096"``), dtypes;
- ``setup`` builds the inputs, raises :data:`SkipNotImplemented` when the backend (or the peer)
  is not usable here, and calls the function once: JIT compilation / NVRTC and thread-pool
  start-up happen there, never in the timed call;
- timed methods call the function and synchronise the device inside the timed call.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:  # asv < 0.6, or running without asv
    SkipNotImplemented = NotImplementedError

_BENCH_DIR = Path(__file__).resolve().parents[1] / "nblosses" / "_bench"
_PKG = "_nblosses_bench_worktree"


def _load_bench_package():
    """Import ``nblosses/_bench`` of this working tree as the package ``_PKG``."""
    if _PKG in sys.modules:
        return sys.modules[_PKG]
    if not (_BENCH_DIR / "cases.py").exists():  # benchmarks copied elsewhere: installed copy
        return importlib.import_module("nblosses._bench")
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [str(_BENCH_DIR)]
    pkg.__file__ = str(_BENCH_DIR / "__init__.py")
    sys.modules[_PKG] = pkg
    return pkg


_pkg = _load_bench_package()
cases = importlib.import_module(_pkg.__name__ + ".cases")
peers = importlib.import_module(_pkg.__name__ + ".peers")
config = importlib.import_module(_pkg.__name__ + ".config")
memory = importlib.import_module(_pkg.__name__ + ".memory")
firstcall = importlib.import_module(_pkg.__name__ + ".firstcall")

BACKENDS = ["cpu", "cuda"]
DTYPES = list(cases.DTYPES)
#: The six shapes the performance targets are stated on.
SHAPES = [s.label for s in cases.SHAPES]
#: Two sizes for elementwise ops and secondary losses (the layout does not matter there).
SHAPES_SMALL_GRID = ["4096x[1000]", "512x[32000]"]
#: One shape per CPU kernel path, about 1 Mi elements each (4 MiB in float32: larger than
#: the L2 caches of small machines, small enough for a quick run). The path is picked by the
#: layout; a vectorisation regression in one path shows up in its row only.
LAYOUTS = {
    "long-rows": "256x[4096]",       # contiguous rows, C >= 24: row-parallel vector loops
    "short-rows": "100000x[10]",     # contiguous rows, C < 24: transposed tiles
    "middle-axis": "16x[21]x3072",   # reduced axis in the middle (inner > 1): blocks
    "tiny-rows": "500000x[2]",       # C = 2: the degenerate short rows
}


#: The cases each module times, by layout; every case not slow lands in one of the first five.
SOFTMAX_FORWARD = cases.case_names(layouts=("softmax",), grad=False)  # softmax.py
SOFTMAX_BACKWARD = cases.case_names(layouts=("softmax",), grad=True)  # backward.py
#: Elementwise cases that are not losses (sigmoid.py).
ACTIVATIONS = [n for n in cases.case_names(layouts=("elementwise",))
               if "losses" not in cases.lookup(n).groups]
_LINEAR_LAYOUTS = ("linear", "linear_pair")
_ELSEWHERE = {*SOFTMAX_FORWARD, *SOFTMAX_BACKWARD, *ACTIVATIONS}
#: Class-index layouts (losses.py, on every target shape).
CLASS_CASES = [n for n in cases.case_names(layouts=("class",)) if n not in _ELSEWHERE]
#: Everything else but the LM heads: elementwise losses, pair and top-k layouts (losses.py,
#: on rows).
OTHER_CASES = [n for n in cases.case_names() if n not in _ELSEWHERE
               and n not in CLASS_CASES and cases.lookup(n).layout not in _LINEAR_LAYOUTS]
#: LM heads, slow or not (linear_ce.py, on their own NxDx[V] shapes).
LINEAR = cases.case_names(layouts=_LINEAR_LAYOUTS, slow=None)


def backend_or_skip(backend: str):
    """``(array module, sync)`` for ``backend``; SkipNotImplemented when unusable here."""
    import nblosses

    if backend == "cpu":  # numba is a hard dependency: a failure here is a bug, not a skip
        import numpy as np

        return np, None
    if backend not in nblosses.available_backends():
        raise SkipNotImplemented(f"backend {backend!r} is not available here")
    import cupy

    return cupy, cupy.cuda.get_current_stream().synchronize


def _skip_if_unsupported(fn):
    import nblosses

    try:
        return fn()
    except nblosses.UnsupportedOpError as exc:
        raise SkipNotImplemented(str(exc)) from exc


class _Callable:
    """A prepared ``self.fn`` (plus ``self.sync`` for devices): ``run`` calls it and waits."""

    def run(self):
        self.fn()
        if self.sync is not None:
            self.sync()

    def teardown(self, *args):
        # asv calls teardown after a setup that raised (skipped) too: set nothing required
        self.inputs = self.fn = None


class CaseBenchmark(_Callable):
    """``setup(op, backend, shape, dtype)``: nblosses on the case ``op``, ready to call as
    ``self.fn``."""

    param_names = ["op", "backend", "shape", "dtype"]
    timeout = 180

    def setup(self, op, backend, shape, dtype):
        xp, self.sync = backend_or_skip(backend)
        self.inputs = cases.make_inputs(op, shape, dtype).to(xp)
        self.fn = cases.nblosses_callable(self.inputs, backend)
        _skip_if_unsupported(self.fn)  # warm-up: JIT / NVRTC / thread pool
        self.run()


class PeerBenchmark(_Callable):
    """``setup(op, device, shape, dtype)``: ``self.peer``'s version of the case ``op`` as
    ``self.fn``."""

    peer = "torch"
    param_names = ["op", "device", "shape", "dtype"]
    timeout = 180

    def setup(self, op, device, shape, dtype):
        if self.peer not in peers.available_peers(device):
            raise SkipNotImplemented(f"{self.peer} is not installed / has no {device} device")
        xp, _ = backend_or_skip(device) if device != "cpu" else (None, None)
        self.inputs = cases.make_inputs(op, shape, dtype)
        if xp is not None:
            self.inputs = self.inputs.to(xp)
        if self.peer == "torch":
            peers.match_torch_threads()
        self.fn = peers.peer_callable(self.peer, self.inputs, device)
        if self.fn is None:
            raise SkipNotImplemented(f"{self.peer} has no {op}")
        self.sync = peers.peer_sync(self.peer, device)
        self.run()


def smallest_params(params, param_names):
    """One tiny parameter set (first values, the tiny shape of the first case's layout): for
    dry runs in tests."""
    out = [values[0] for values in params]
    if "shape" in param_names:
        op = out[param_names.index("op")] if "op" in param_names else None
        shape = cases.tiny_shape(op) if op is not None else cases.TINY_SHAPES[0]
        out[param_names.index("shape")] = shape.label
    return out

