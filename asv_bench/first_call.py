"""First-call latency in a fresh process: cold (empty NUMBA_CACHE_DIR / CUPY_CACHE_DIR, so
every kernel compiles) and warm (a second process reusing that cache directory).

Reported with ``track_`` (seconds measured inside the child process around its first call, so
interpreter start-up is excluded; ``track_import`` is ``import nblosses`` alone).
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

import shutil
import tempfile

from .common import BACKENDS, SkipNotImplemented, backend_or_skip, cases, firstcall


class _TempDir:
    """``self.dir``: a fresh directory per benchmark, removed by teardown.

    asv runs teardown even when setup raised (a skip, e.g. no CUDA device), before
    ``self.dir`` existed: teardown must not assume it.
    """

    dir: str | None = None

    def make_dir(self, prefix: str) -> str:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        return self.dir

    def teardown(self, *args):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class FirstCall(_TempDir):
    """Every case but the slow ones (the LM heads' first call is their compile time plus
    seconds of arithmetic)."""

    params = [cases.case_names(), BACKENDS, ["cold", "warm"]]
    param_names = ["op", "backend", "cache"]
    timeout = 600

    def setup(self, op, backend, cache):
        backend_or_skip(backend)
        self.make_dir("nblosses-asv-first-call-")
        if cache == "warm":
            try:
                firstcall.run_worker(op, self.dir, backend=backend)
            except RuntimeError as exc:
                raise SkipNotImplemented(str(exc)) from exc

    def track_first_call(self, op, backend, cache):
        return firstcall.run_worker(op, self.dir, backend=backend)["first_call_s"]

    track_first_call.unit = "seconds"


class Import(_TempDir):
    """``import nblosses`` in a fresh process (must not pull in numba kernels, torch, cupy)."""

    timeout = 120

    def setup(self):
        self.make_dir("nblosses-asv-import-")

    def track_import(self):
        # any case will do: the worker times the import before it builds the case's inputs
        op = cases.case_names()[0]
        return firstcall.run_worker(op, self.dir, shape="4x[10]")["import_s"]

    track_import.unit = "seconds"
