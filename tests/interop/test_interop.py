"""Foreign arrays through nblosses.functional: without copies; grad_buffer written through;
mixed inputs; CUDA stream logic (fakes). Every op with torch tensors and JAX arrays in, the same
kind out, is tested from the op specs in ``test_interop_specs.py``."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import nblosses
from nblosses import _dispatch, _interop
from nblosses import functional as F

torch = pytest.importorskip("torch")


def _capture(monkeypatch):
    """Record the native values and results of the next interop call."""
    seen = {}

    def native_call(op, values):
        seen["values"] = values
        seen["result"] = _dispatch.call(op, values)
        return seen["result"]

    real = _interop.call
    monkeypatch.setattr(_interop, "call", lambda op, values, _: real(op, values, native_call))
    return seen


def test_zero_copy_both_ways(monkeypatch):
    seen = _capture(monkeypatch)
    x = torch.randn(64, 33)
    t = torch.randint(0, 33, (64,))
    loss, grad = F.cross_entropy(x, t, reduction="none", return_grad=True)
    native = seen["values"]
    assert isinstance(native["input"], np.ndarray) and native["backend"] == "cpu"
    assert native["input"].ctypes.data == x.data_ptr()
    assert native["target"].ctypes.data == t.data_ptr()
    np_loss, np_grad = seen["result"]
    assert grad.data_ptr() == np_grad.ctypes.data
    assert loss.data_ptr() == np_loss.ctypes.data


def test_non_contiguous_and_half_inputs():
    x = torch.randn(6, 4, dtype=torch.float64).t()  # a transposed view: strides via DLPack
    np.testing.assert_allclose(F.softmax(x, dim=1).numpy(), F.softmax(x.numpy(), dim=1))
    h = torch.randn(3, 8).half()
    out = F.log_softmax(h, dim=1)
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.float().numpy(), torch.log_softmax(h.float(), 1).numpy(),
                               atol=2e-3)


def test_grad_buffer_is_written_through_and_returned():
    x = torch.randn(8, 6)
    t = torch.randint(0, 6, (8,))
    buffer = torch.zeros(8, 6)
    _, grad = F.cross_entropy(x, t, return_grad=True, grad_buffer=buffer)
    assert grad is buffer
    expected = F.cross_entropy(x.numpy(), t.numpy(), return_grad=True)[1]
    np.testing.assert_allclose(buffer.numpy(), expected, rtol=1e-6)


def test_grad_buffer_may_be_the_logits():
    x = torch.randn(8, 6)
    t = torch.randint(0, 6, (8,))
    expected = F.cross_entropy(x.numpy(), t.numpy(), return_grad=True)[1]
    _, grad = F.cross_entropy(x, t, return_grad=True, grad_buffer=x)
    assert grad is x
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("weight", [np.full(5, 0.5), [0.5] * 5])
def test_mixed_numpy_and_list_arguments(weight):
    x, t = torch.randn(4, 5), np.array([0, 1, 2, 3])
    got = F.cross_entropy(x, t, weight)
    assert isinstance(got, torch.Tensor)
    expected = torch.nn.functional.cross_entropy(x, torch.from_numpy(t), torch.full((5,), 0.5))
    assert torch.allclose(got, expected)


def test_torch_dtype_argument():
    out = F.softmax(torch.randn(2, 3), dim=1, dtype=torch.float64)
    assert out.dtype == torch.float64


def test_requires_grad_is_refused_with_the_autograd_path_named():
    with pytest.raises(TypeError, match=r"nblosses\.torch"):
        F.softmax(torch.randn(2, 3, requires_grad=True), dim=1)


def test_backend_must_reach_the_device():
    with pytest.raises(ValueError, match="backend 'cuda' cannot take arrays on cpu:0"):
        F.sigmoid(torch.zeros(2), backend="cuda")
    with nblosses.use_backend("cpu"):
        assert isinstance(F.sigmoid(torch.zeros(2)), torch.Tensor)


class _ArrayApi:
    """A minimal array-API array: DLPack export plus a namespace with ``from_dlpack``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kw):
        return self.array.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def __array_namespace__(self):
        return types.SimpleNamespace(from_dlpack=lambda a: _ArrayApi(np.from_dlpack(a)))


def test_any_array_api_array_comes_back_as_its_own_type():
    x = np.random.default_rng(1).standard_normal((3, 4))
    out = F.log_softmax(_ArrayApi(x), dim=1)
    assert isinstance(out, _ArrayApi)
    np.testing.assert_allclose(out.array, F.log_softmax(x, dim=1))


def test_two_libraries_in_one_call_name_both():
    with pytest.raises(TypeError, match=r"torch.*test_interop|test_interop.*torch"):
        F.cross_entropy(torch.randn(2, 3), _ArrayApi(np.array([0, 1])))


class _Device(_ArrayApi):
    def __init__(self, array: np.ndarray, device: tuple[int, int]) -> None:
        super().__init__(array)
        self.device = device

    def __dlpack_device__(self):
        return self.device


def test_devices_must_agree_and_be_supported():
    with pytest.raises(ValueError, match="different devices"):
        F.cross_entropy(_Device(np.zeros((2, 3)), (1, 0)), _Device(np.zeros(2, int), (2, 0)))
    with pytest.raises(TypeError, match="not supported"):
        F.sigmoid(_Device(np.zeros(2), (10, 0)))


# ----------------------------------------------------------------------------- CUDA stream (fakes)
class _FakeCupy:
    """Records how the CUDA context is built and entered."""

    def __init__(self, protocol: bool) -> None:
        self.events: list[tuple] = []
        fake = self

        class Ctx:
            def __init__(self, *what):
                self.what = what

            def __enter__(self):
                fake.events.append(("enter", *self.what))

            def __exit__(self, *exc):
                fake.events.append(("exit", *self.what))

        class Stream:
            pass

        if protocol:
            Stream.from_external = staticmethod(lambda s: Ctx("stream", s.cuda_stream))
        self.cuda = types.SimpleNamespace(
            Device=lambda i: Ctx("device", i), Stream=Stream,
            ExternalStream=lambda ptr, dev: Ctx("external", ptr, dev))


class _FakeTorchStream:
    cuda_stream = 0xABC

    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.mark.parametrize("protocol", [True, False])
def test_cuda_stream_context_uses_the_callers_stream(protocol):
    cupy = _FakeCupy(protocol)
    with _interop.cuda_stream_context(cupy, 1, _FakeTorchStream()):
        cupy.events.append(("work",))
    stream = ("stream", 0xABC) if protocol else ("external", 0xABC, 1)
    assert cupy.events == [("enter", "device", 1), ("enter", *stream), ("work",),
                           ("exit", *stream), ("exit", "device", 1)]


def test_torch_cuda_tensors_run_on_torchs_current_stream(monkeypatch):
    cupy = _FakeCupy(True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device: asked.append(device) or _FakeTorchStream())
    with _interop.TorchAdapter().kernel_context((_interop.CUDA, 3)):
        pass
    assert asked == [3]
    assert ("enter", "stream", 0xABC) in cupy.events
    with _interop.TorchAdapter().kernel_context((_interop.CPU, 0)):
        pass
    assert asked == [3], "a CPU call must not touch CUDA"


# ----------------------------------------------------------------------------- JAX
def test_jax_in_jax_out():
    jnp = pytest.importorskip("jax.numpy")
    x = np.random.default_rng(2).standard_normal((5, 7)).astype(np.float32)
    t = np.array([0, 6, 3, 2, 1])
    loss, grad = F.cross_entropy(jnp.asarray(x), jnp.asarray(t), return_grad=True)
    expected = F.cross_entropy(x, t, return_grad=True)
    for got, want in zip((loss, grad), expected):
        assert type(got).__module__.startswith("jax")
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    out = F.softmax(jnp.asarray(x), dim=1)
    np.testing.assert_allclose(np.asarray(out), F.softmax(x, dim=1), rtol=1e-6)


def test_jax_grad_buffer_is_refused():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match="immutable"):
        F.cross_entropy(x, jnp.asarray([0, 1]), return_grad=True, grad_buffer=x)


def test_importing_nblosses_imports_no_foreign_library():
    code = ("import sys, numpy, nblosses; nblosses.functional.sigmoid(numpy.zeros(2)); "
            "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_bfloat16_on_the_cpu_is_computed_in_float32_and_returned_as_bfloat16():
    x = torch.randn(4, 6).bfloat16()
    t = torch.tensor([0, 5, 2, 1])
    loss, grad = F.cross_entropy(x, t, return_grad=True)
    assert loss.dtype == grad.dtype == torch.bfloat16
    ref = x.float().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref, t).backward()
    torch.testing.assert_close(grad, ref.grad.bfloat16())
    assert F.softmax(torch.zeros(2, 3), dim=1, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="bfloat16 grad_buffer"):
        F.cross_entropy(x, t, return_grad=True, grad_buffer=torch.empty_like(x))


def test_nn_modules_take_torch_tensors():
    x, t = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 0])
    crit = nblosses.nn.CrossEntropyLoss(label_smoothing=0.1)
    loss = crit(x, t)
    grad = crit.backward()
    ref = x.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(ref, t, label_smoothing=0.1)
    want.backward()
    assert isinstance(loss, torch.Tensor) and isinstance(grad, torch.Tensor)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, ref.grad)


@pytest.mark.parametrize("take", [lambda a: a, lambda a: a[::-1], lambda a: a[:, ::-2],
                                  lambda a: a[1:, 2:7].T, lambda a: a[:0]])
def test_writeable_alias_reads_the_same_memory(take):
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    view = take(base)
    view.flags.writeable = False
    alias = _interop.writeable_alias(view)
    assert alias.flags.writeable and alias.shape == view.shape and alias.dtype == view.dtype
    np.testing.assert_array_equal(alias, view)
    assert not view.size or np.shares_memory(alias, base)


def test_jax_inputs_are_read_in_place_and_left_unchanged():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 30)), dtype=jnp.float32)
    t = jnp.asarray(np.arange(5))
    before = np.array(x)
    loss, grad = F.cross_entropy(x, t, return_grad=True)
    np.testing.assert_array_equal(np.asarray(x), before)
    want = F.cross_entropy(before, np.arange(5), return_grad=True)
    np.testing.assert_allclose(np.asarray(loss), want[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want[1], rtol=1e-6, atol=1e-7)
