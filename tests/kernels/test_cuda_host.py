"""Host-side logic of the CUDA backend, tested without a device (fakes for CuPy's calls).

- The deferred errors (``_device_errors``: bad class index -> IndexError, binary_cross_entropy
  input outside [0, 1] -> ValueError): a kernel's record reaches the host by an
  asynchronous copy; ``poll_errors`` raises once that copy is done (never waiting), and
  ``synchronize`` waits first; both clear the record after raising; nothing is queued or
  queried while the stream is capturing.
- The per-stream scratch of the single-launch reductions (``_scratch``): one zeroed buffer per
  (device, stream), a fresh one per launch under capture.
"""

from __future__ import annotations

import ctypes
import re
import types

import numpy as np
import pytest

pytest.importorskip("cupy")

from nblosses.backends.cuda import _device_errors as E
from nblosses.backends.cuda import _scratch as S


class FakeGPU:
    """A queue of device work that runs only when told (``run``), like an asynchronous device."""

    def __init__(self) -> None:
        self.queue: list = []
        self.done_ticks = 0
        self.ticks = 0
        self.capturing = False
        self.syncs = 0
        self.queries = 0

    def enqueue(self, fn) -> int:
        self.ticks += 1
        self.queue.append(fn)
        return self.ticks

    def run(self) -> None:
        for fn in self.queue:
            fn()
        self.queue.clear()
        self.done_ticks = self.ticks


class FakeDeviceArray:
    def __init__(self, gpu: FakeGPU, n: int, dtype) -> None:
        self.mem = np.zeros(n, dtype)
        self.nbytes = self.mem.nbytes
        gpu_ = gpu

        class Data:
            ptr = self.mem.ctypes.data

            @staticmethod
            def memset_async(value, size, stream=None):
                gpu_.enqueue(lambda: ctypes.memset(self.mem.ctypes.data, value, size))

        self.data = Data()

    def get(self):
        return self.mem.copy()


def fake_cupy(gpu: FakeGPU):
    stream = types.SimpleNamespace(ptr=7, is_capturing=lambda: gpu.capturing)

    class Event:
        def __init__(self, block=False, disable_timing=True) -> None:
            self.tick = 0

        def record(self, stream=None) -> None:
            self.tick = gpu.ticks

        @property
        def done(self) -> bool:
            assert not gpu.capturing, "event queried during capture"
            gpu.queries += 1
            return gpu.done_ticks >= self.tick

    def memcpy_async(dst, src, n, kind, stream_ptr):
        assert kind == 2
        gpu.enqueue(lambda: ctypes.memmove(dst, src, n))

    class Device:
        def __init__(self, i=0) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            gpu.syncs += 1
            gpu.run()

    runtime = types.SimpleNamespace(getDevice=lambda: 0, memcpyAsync=memcpy_async)
    cuda = types.SimpleNamespace(runtime=runtime, Event=Event, Device=Device,
                                 alloc_pinned_memory=lambda n: bytearray(n),
                                 get_current_stream=lambda: stream)
    return types.SimpleNamespace(
        int64=np.int64, float64=np.float64, cuda=cuda,
        zeros=lambda n, dt: FakeDeviceArray(gpu, n, dt),
        empty=lambda n, dt: FakeDeviceArray(gpu, n, dt)), stream


@pytest.fixture
def gpu(monkeypatch):
    g = FakeGPU()
    cp, stream = fake_cupy(g)
    monkeypatch.setattr(E, "_cupy", lambda: cp)
    E.reset()
    g.cupy, g.stream = cp, stream
    yield g
    E.reset()


def kernel_records(gpu: FakeGPU, record, state=E.COMPLETE, pos=5, value=-3, C=10,
                   kind=E.KIND_CLASS_INDEX) -> None:
    """A launch that finds a bad element (a class index by default; ``C`` is the record's
    detail word): queued, runs with the device."""
    def write():
        record.mem[:] = (state, pos, value, C, kind)
    gpu.enqueue(write)


def bits(x: float) -> int:
    """A float64's bit pattern as the kernel stores it (``__double_as_longlong``)."""
    return int(np.float64(x).view(np.int64))


def launch(gpu: FakeGPU, bad: bool, **kw):
    rec = E.record_for_launch(gpu.stream)
    if bad:
        kernel_records(gpu, rec, **kw)
    E.after_launch(gpu.stream)
    return rec


def test_poll_raises_after_the_device_ran_and_never_waits(gpu):
    launch(gpu, bad=True)
    E.poll_errors()  # the device has not run: nothing known yet, and no wait
    assert gpu.syncs == 0 and gpu.queries == 1
    gpu.run()
    with pytest.raises(IndexError, match=r"Target -3 is out of bounds \(number of classes: 10\)"):
        E.poll_errors()
    gpu.run()  # the reset queued by the raise
    E.poll_errors()  # raised once only
    launch(gpu, bad=False)
    gpu.run()
    E.poll_errors()


def test_clean_launches_stop_querying(gpu):
    launch(gpu, bad=False)
    gpu.run()
    E.poll_errors()
    q = gpu.queries
    E.poll_errors()
    assert gpu.queries == q  # nothing pending: no event query at all


def test_synchronize_waits_then_raises_and_clears(gpu):
    launch(gpu, bad=True, value=12, C=4)
    with pytest.raises(IndexError, match=r"Target 12 is out of bounds \(number of classes: 4\)"):
        E.synchronize()
    assert gpu.syncs == 1
    E.synchronize()  # the record was cleared
    gpu.run()
    E.poll_errors()


def test_one_copy_in_flight(gpu):
    """Calls queued ahead of the GPU add one copy-back, not one per call; an error recorded by
    a later launch still arrives through the next copy."""
    launch(gpu, bad=False)
    n_queued = len(gpu.queue)
    for _ in range(5):
        E.poll_errors()  # not done yet: nothing consumed
        launch(gpu, bad=False)
    assert len(gpu.queue) == n_queued  # no further copies
    launch(gpu, bad=True)  # recorded on the device after the only queued copy
    gpu.run()
    E.poll_errors()  # consumes the first (clean) copy
    launch(gpu, bad=False)  # queues the next copy
    gpu.run()
    with pytest.raises(IndexError):
        E.poll_errors()


PROB_MSG = r"binary_cross_entropy: all elements of input should be between 0 and 1 "


@pytest.mark.parametrize("value,width,shown", [
    (1.5, 32, "1.5"), (float(np.float32(1.1)), 32, "1.1"), (-0.25, 64, "-0.25"),
    (0.1 + 1.0, 64, "1.1"), (2.0, 16, "2.0"), (-2.0 ** -130, 0, repr(-2.0 ** -130)),
    (1.0078125, 0, "1.0078125"), (np.nan, 64, "nan"), (-np.inf, 32, "-inf")])
def test_probability_error_names_value_and_position(gpu, value, width, shown):
    """A bad binary_cross_entropy input is raised as ValueError with the value as its element
    type prints it (bfloat16, width 0, as the exact float64) and its flat position."""
    launch(gpu, bad=True, pos=4321, value=bits(value), C=width, kind=E.KIND_PROBABILITY)
    gpu.run()
    msg = PROB_MSG + rf"\(found {re.escape(shown)} at position 4321\)$"
    with pytest.raises(ValueError, match=msg):
        E.poll_errors()
    gpu.run()
    E.poll_errors()  # raised once; the record was cleared
    launch(gpu, bad=True, pos=3, value=bits(value), C=width, kind=E.KIND_PROBABILITY)
    with pytest.raises(ValueError, match=PROB_MSG + r"\(found .* at position 3\)$"):
        E.synchronize()


def test_infinite_log_target_error_names_the_position(gpu):
    """kl_div's +inf log-probability target (kind 2) is raised as its own ValueError."""
    launch(gpu, bad=True, pos=77, value=0, C=0, kind=E.KIND_LOG_TARGET)
    gpu.run()
    with pytest.raises(ValueError, match=r"kl_div: target must be < \+inf .* position 77$"):
        E.poll_errors()


def test_first_error_of_either_kind_is_reported(gpu):
    """Class indices and probabilities share one record: the kind word picks the exception."""
    launch(gpu, bad=True, value=bits(3.0), C=32, kind=E.KIND_PROBABILITY)
    gpu.run()
    with pytest.raises(ValueError):
        E.poll_errors()
    gpu.run()
    launch(gpu, bad=True, value=7, C=4)
    gpu.run()
    with pytest.raises(IndexError, match=r"Target 7 is out of bounds \(number of classes: 4\)"):
        E.poll_errors()


def test_synchronize_waits_without_any_record(gpu):
    E.synchronize()
    assert gpu.syncs == 1


def test_a_record_being_written_is_not_reported(gpu):
    launch(gpu, bad=True, state=1)
    gpu.run()
    E.poll_errors()


def test_nothing_touches_the_host_while_capturing(gpu):
    rec = launch(gpu, bad=False)
    gpu.run()
    E.poll_errors()
    gpu.capturing = True
    kernel_records(gpu, rec)
    E.after_launch(gpu.stream)  # no copy queued under capture
    E.poll_errors()  # no query (the fake event asserts)
    gpu.run()
    gpu.capturing = False
    E.poll_errors()  # no copy was queued: nothing known yet
    launch(gpu, bad=False)  # the next launch outside the capture copies the record back
    gpu.run()
    with pytest.raises(IndexError):
        E.poll_errors()


def test_first_launch_under_capture_gets_no_record(gpu):
    gpu.capturing = True
    assert E.record_for_launch(gpu.stream) is None
    gpu.capturing = False
    assert E.record_for_launch(gpu.stream) is not None


# ----------------------------------------------------------------------------- scratch
@pytest.fixture
def scratch_cupy(monkeypatch):
    import cupy

    g = FakeGPU()
    cp, _ = fake_cupy(g)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(cupy, "empty", cp.empty)
    monkeypatch.setattr(S, "_BUFFERS", {})
    monkeypatch.setattr(S, "_CAPTURED", [])
    return g


@pytest.mark.parametrize("capturing", [False, True])
def test_scratch_per_stream(scratch_cupy, capturing):
    g = scratch_cupy
    s1 = types.SimpleNamespace(ptr=1, is_capturing=lambda: capturing)
    s2 = types.SimpleNamespace(ptr=2, is_capturing=lambda: capturing)
    a, b, a2 = S.scratch(s1, 4), S.scratch(s2, 4), S.scratch(s1, 4)
    assert a is not b
    assert (a is a2) != capturing  # under capture every launch gets its own buffer
    g.run()  # the zero-fill is queued on the stream (captured into the graph under capture)
    assert not a.buf.mem.any()
    blocks = S.max_blocks(4)
    assert a.buf.nbytes >= 8 * (2 * blocks + 5)
    assert int(a.scal) - int(a.part) == 16 * blocks
    assert int(a.counter) + 4 <= int(a.part) + a.buf.nbytes
    assert len(S._CAPTURED) == (3 if capturing else 0)


# ----------------------------------------------------------------------------- linear CE algebra
def test_linear_ce_bad_class_index_rows_are_nan_and_never_indexed():
    """The per-row algebra shared with the CUDA linear cross-entropy: a class index outside
    [0, V) (left to the device check) is never used as an index, and its row's loss and
    gradient coefficient are NaN; ignored rows stay 0."""
    from nblosses.backends import _linear_ce as G

    v = 5
    t = np.array([1, 7, -100, -1, 4])
    weight = np.linspace(0.5, 1.5, v)
    st = {"m": np.zeros(5), "s": np.full(5, 2.0), "xt": np.full(5, 0.3), "swx": np.ones(5)}
    loss, _, coef, _, _ = G.finish_class(np, st, t, weight, -100, 0.1, v, weight.sum(), 0.0,
                                           1.0, True)
    assert np.isnan(loss[[1, 3]]).all() and np.isnan(coef[[1, 3]]).all()
    assert np.isfinite(loss[[0, 4]]).all() and loss[2] == 0 and coef[2] == 0
    d = G.mean_denominator(np, t, weight, -100, to_host=False)
    assert np.shape(d) == ()  # a 0-d array of xp (NumPy returns its scalar)
    assert float(d) == weight[1] + weight[4] + 2 * weight[0]  # bad rows count as class 0


@pytest.mark.parametrize("g,denom,want", [(2.0, 4.0, 0.5), (0.0, 0.0, np.nan),
                                          (1.0, 0.0, np.inf), (-1.0, 0.0, -np.inf)])
def test_linear_ce_device_scalars_match_host_scalars(g, denom, want):
    """A 0-d ``mean`` denominator (kept on the device) gives the host float path's results."""
    from nblosses.backends import _linear_ce as G

    with np.errstate(divide="ignore", invalid="ignore"):
        dev = G.upstream_scale("mean", g, np.array(denom))  # 0-d ndarray: not a float
        host = G.upstream_scale("mean", g, denom)
        mean_dev = G.mean_of(np, 3.0 * (denom != 0), np.array(denom))
    np.testing.assert_equal([float(dev), host], [want, want])
    np.testing.assert_equal(float(mean_dev), G.mean_of(np, 3.0 * (denom != 0), denom))
