"""Backend registry and public API: lazy imports, default-backend selection (process-wide and
context-local), auto dispatch by array type, third-party backends and missing kernels."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import assert_close, rng

import nblosses
from nblosses import _registry, nn
from nblosses import functional as F


# ----------------------------------------------------------------------------- imports
def test_import_is_lazy():
    code = (
        "import sys, nblosses\n"
        "heavy = sorted(m for m in ('cupy', 'torch', 'dask', 'scipy', 'numba') "
        "if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    loaded = set(filter(None, out.split(",")))
    assert not loaded & {"cupy", "torch", "dask", "scipy"}, f"import nblosses loaded {loaded}"


def test_first_cpu_call_does_not_import_cupy_torch_dask():
    code = (
        "import sys, numpy as np, nblosses.functional as F\n"
        "F.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), return_grad=True)\n"
        "F.softmax(np.zeros((2, 3)), dim=1)\n"
        "print(','.join(m for m in ('cupy', 'torch', 'dask') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    assert out == "", f"a CPU call imported {out}"


def test_public_surface():
    for name in ("functional", "nn", "set_backend", "use_backend", "get_backend",
                 "available_backends", "register_backend", "unregister_backend",
                 "UnknownBackendError", "BackendUnavailableError", "UnsupportedOpError"):
        assert hasattr(nblosses, name), name
    assert issubclass(nblosses.UnknownBackendError, ValueError)
    assert issubclass(nblosses.BackendUnavailableError, RuntimeError)
    assert "cpu" in nblosses.available_backends()


# ----------------------------------------------------------------------------- defaults
def test_default_is_auto():
    assert nblosses.get_backend() == "auto"


def test_set_backend_is_process_wide(restore_backend_default):
    nblosses.set_backend("cpu")
    assert nblosses.get_backend() == "cpu"
    seen = []
    th = threading.Thread(target=lambda: seen.append(nblosses.get_backend()))
    th.start()
    th.join()
    assert seen == ["cpu"]
    nblosses.set_backend("auto")
    assert nblosses.get_backend() == "auto"


def test_set_backend_rejects_non_string(restore_backend_default):
    with pytest.raises(TypeError):
        nblosses.set_backend(None)
    assert nblosses.get_backend() == "auto"


def test_use_backend_nested_blocks_restore():
    assert nblosses.get_backend() == "auto"
    with nblosses.use_backend("cpu") as name:
        assert name == "cpu" and nblosses.get_backend() == "cpu"
        with nblosses.use_backend("cuda"):  # known name; nothing runs, so no device needed
            assert nblosses.get_backend() == "cuda"
            with nblosses.use_backend("auto"):
                assert nblosses.get_backend() == "auto"
            assert nblosses.get_backend() == "cuda"
        assert nblosses.get_backend() == "cpu"
    assert nblosses.get_backend() == "auto"


def test_use_backend_restores_after_exception():
    with pytest.raises(KeyError):
        with nblosses.use_backend("cuda"):
            raise KeyError("boom")
    assert nblosses.get_backend() == "auto"


def test_use_backend_overrides_set_backend(restore_backend_default):
    nblosses.set_backend("cuda")
    with nblosses.use_backend("cpu"):
        assert nblosses.get_backend() == "cpu"
    assert nblosses.get_backend() == "cuda"


def test_use_backend_is_context_local():
    """A thread started inside a use_backend block keeps its own default (the process-wide one),
    and its own use_backend block does not leak into the starting thread."""
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def worker():
        seen["start"] = nblosses.get_backend()
        with nblosses.use_backend("cuda"):
            barrier.wait()  # main checks its own default while this block is open
            seen["inside"] = nblosses.get_backend()
            barrier.wait()
        seen["after"] = nblosses.get_backend()

    with nblosses.use_backend("cpu"):
        th = threading.Thread(target=worker)
        th.start()
        barrier.wait()
        main_during = nblosses.get_backend()
        barrier.wait()
        th.join()
        assert nblosses.get_backend() == "cpu"
    assert main_during == "cpu"
    assert seen == {"start": "auto", "inside": "cuda", "after": "auto"}


def test_use_backend_default_reaches_calls():
    """Inside use_backend('cuda') a NumPy call goes to 'cuda' (unavailable here -> error), and
    an explicit backend= on the call wins over the block."""
    x = np.zeros((2, 3))
    with nblosses.use_backend("cpu"):
        assert isinstance(F.softmax(x, dim=1), np.ndarray)
    if "cuda" in nblosses.available_backends():
        return
    with nblosses.use_backend("cuda"):
        with pytest.raises(nblosses.BackendUnavailableError):
            F.softmax(x, dim=1)
        assert isinstance(F.softmax(x, dim=1, backend="cpu"), np.ndarray)


# ----------------------------------------------------------------------------- auto dispatch
def test_auto_dispatch_numpy_returns_numpy():
    x = rng(0).standard_normal((3, 4))
    t = np.array([0, 1, 3])
    out = F.softmax(x, dim=1)
    assert type(out) is np.ndarray
    loss, grad = F.cross_entropy(x, t, return_grad=True)
    assert type(loss) is np.ndarray and loss.shape == () and type(grad) is np.ndarray
    assert type(nn.CrossEntropyLoss()(x, t)) is np.ndarray
    assert type(F.binary_cross_entropy_with_logits(x, np.ones((3, 4)))) is np.ndarray


def test_auto_dispatch_python_lists():
    out = F.softmax([[1.0, 2.0, 3.0]], dim=1)
    assert type(out) is np.ndarray
    assert_close(out, F.softmax(np.array([[1.0, 2.0, 3.0]]), dim=1), "float64", "list input")


class _FakeCupyArray:
    """Looks like a CuPy array to dispatch (``type(x).__module__ == 'cupy'``)."""

    __module__ = "cupy"
    shape = (4,)
    ndim = 1
    dtype = np.dtype("int64")


_FakeCupyArray.__module__ = "cupy"


@pytest.mark.parametrize("call", [
    lambda fake: F.cross_entropy(np.zeros((4, 3)), fake),
    lambda fake: F.nll_loss(np.zeros((4, 3)), fake),
    lambda fake: F.binary_cross_entropy(np.full((4,), 0.5), fake),
    lambda fake: F.softmax_backward(np.zeros((4,)), fake, 0),
    lambda fake: F.cross_entropy(np.zeros((4, 3)), np.zeros(4, np.int64), weight=fake),
], ids=["ce", "nll", "bce", "softmax_backward", "weight"])
def test_mixed_numpy_cupy_under_auto_is_type_error(call):
    with pytest.raises(TypeError, match=r"cpu.*cuda|cuda.*cpu"):
        call(_FakeCupyArray())


def test_resolve_backend_picks_by_array_module():
    assert _registry.resolve_backend(None, np.zeros(2)).name == "cpu"
    assert _registry.resolve_backend(None, None, 1.0, [1, 2]).name == "cpu"
    assert _registry.resolve_backend("cpu", np.zeros(2)).name == "cpu"


# ----------------------------------------------------------------------------- third parties
@pytest.fixture
def toy_backend():
    calls = []

    def softmax_kernel(x3):
        calls.append(x3.shape)
        e = np.exp(x3 - x3.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    class Toy(nblosses.Backend):
        name = "toy"
        array_modules = ("toy_mod",)

        def build(self):
            return nblosses.Runtime(self, xp=np, asarray=np.asarray,
                                    kernels={"softmax": softmax_kernel})

    be = nblosses.register_backend(Toy())
    try:
        yield be, calls
    finally:
        nblosses.unregister_backend("toy")


class ToyArray:
    """An array type of a third-party module 'toy_mod'."""

    def __init__(self, data):
        self.data = np.asarray(data)

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)


ToyArray.__module__ = "toy_mod"


def test_third_party_backend_reaches_kernel(toy_backend):
    _, calls = toy_backend
    assert "toy" in nblosses.available_backends()
    x = rng(1).standard_normal((3, 4, 2))
    out = F.softmax(x, dim=1, backend="toy")
    assert calls == [(3, 4, 2)]  # canonical (outer, C, inner)
    assert_close(out, F.softmax(x, dim=1, backend="cpu"), "float64", "toy softmax")
    out2 = nn.Softmax(dim=1, backend="toy")(x)
    assert len(calls) == 2
    assert_close(out2, out, "float64", "toy nn.Softmax")
    with nblosses.use_backend("toy"):
        F.softmax(x, dim=-1)
    assert calls[-1] == (12, 2, 1)
    # auto dispatch by the array's module
    F.softmax(ToyArray(x), dim=0)
    assert calls[-1] == (1, 3, 8)


def test_third_party_backend_missing_kernel(toy_backend):
    x = np.zeros((2, 3))
    with pytest.raises(nblosses.UnsupportedOpError, match="log_softmax"):
        F.log_softmax(x, dim=1, backend="toy")
    with pytest.raises(nblosses.UnsupportedOpError, match="cross_entropy"):
        F.cross_entropy(x, np.array([0, 1]), backend="toy")
    with pytest.raises(nblosses.UnsupportedOpError):
        nn.Sigmoid(backend="toy")(x)
    assert issubclass(nblosses.UnsupportedOpError, NotImplementedError)


def test_toy_backend_cleaned_up():
    """Runs after the toy tests (file order): the fixture removed every trace."""
    assert "toy" not in _registry._BACKENDS and "toy" not in _registry._RUNTIMES
    with pytest.raises(nblosses.UnknownBackendError):
        F.softmax(np.zeros(2), dim=0, backend="toy")


def test_unregister_unknown_backend():
    with pytest.raises(nblosses.UnknownBackendError):
        nblosses.unregister_backend("no-such-backend")


def test_runtime_is_immutable(toy_backend):
    rt = _registry.load("toy")
    with pytest.raises(AttributeError):
        rt.xp = None
    with pytest.raises(TypeError):
        rt.kernels["sigmoid"] = np.tanh


def test_auto_is_reserved_and_backends_are_instances():
    class Auto(nblosses.Backend):
        name = "auto"

    with pytest.raises(ValueError):
        nblosses.register_backend(Auto())
    with pytest.raises(TypeError):
        nblosses.register_backend("toy")
