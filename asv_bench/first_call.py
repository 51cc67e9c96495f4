"""First-call latency in a fresh process: cold (empty NUMBA_CACHE_DIR / CUPY_CACHE_DIR, so
every kernel compiles) and warm (a second process reusing that cache directory).

Reported with ``track_`` (seconds measured inside the child process around its first call, so
interpreter start-up is excluded; ``track_import`` is ``import nblosses`` alone).
"""

import shutil
import tempfile

from .common import BACKENDS, SkipNotImplemented, backend_or_skip, cases, firstcall


class FirstCall:
    params = [list(cases.OPS), BACKENDS, ["cold", "warm"]]
    param_names = ["op", "backend", "cache"]
    timeout = 600

    def setup(self, op, backend, cache):
        backend_or_skip(backend)
        self.dir = tempfile.mkdtemp(prefix="nblosses-asv-first-call-")
        if cache == "warm":
            try:
                firstcall.run_worker(op, self.dir, backend=backend)
            except RuntimeError as exc:
                raise SkipNotImplemented(str(exc)) from exc

    def teardown(self, op, backend, cache):
        shutil.rmtree(self.dir, ignore_errors=True)

    def track_first_call(self, op, backend, cache):
        return firstcall.run_worker(op, self.dir, backend=backend)["first_call_s"]

    track_first_call.unit = "seconds"


class Import:
    """``import nblosses`` in a fresh process (must not pull in numba kernels, torch, cupy)."""

    timeout = 120

    def setup(self):
        self.dir = tempfile.mkdtemp(prefix="nblosses-asv-import-")

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def track_import(self):
        return firstcall.run_worker("sigmoid", self.dir, shape="4x[10]")["import_s"]

    track_import.unit = "seconds"
