"""Fixtures shared by the whole suite.

``backend`` parametrises every parity test over ``"cpu"`` and ``"cuda"``; the CUDA half is
marked ``cuda`` and skipped, with the reason, when ``nblosses.available_backends()`` lacks it,
so one suite runs unchanged on a GPU machine (``pytest -m cuda`` there runs the GPU half).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import nblosses

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "nblosses", deadline=None, max_examples=40, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nblosses"))
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass

try:
    import torch

    torch.set_num_threads(1)  # the machine is shared; the reference needs no parallelism
except ImportError:  # pragma: no cover
    pass


def _cuda_available() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "cuda" in nblosses.available_backends()


CUDA_AVAILABLE = _cuda_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request) -> str:
    """The backend under test: ``"cpu"``, or ``"cuda"`` where a CUDA device is usable."""
    if request.param == "cuda" and not CUDA_AVAILABLE:
        pytest.skip("backend 'cuda' not available here (no CuPy or no CUDA device)")
    return request.param


@pytest.fixture
def restore_backend_default():
    """Reset the process-wide default backend after a test that changes it."""
    before = nblosses.get_backend()
    yield
    nblosses.set_backend(before)
