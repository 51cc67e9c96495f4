"""Errors found by the kernels on the device, reported without waiting for it.

Two checks run inside the kernels:

- class indices (the class losses): a target outside ``[0, C)`` that is not ``ignore_index`` is
  never used as an address, its position's loss and gradient become NaN;
- probabilities (``binary_cross_entropy``): an input outside ``[0, 1]`` or NaN gets a NaN loss
  and gradient.

The first bad element of either kind is written to a small *error record* in device memory
(5 int64: state, flat position, value, detail, kind; one record per device, allocated and
zeroed once; the layout is ``record_error`` in ``_common.cu``).

The host learns about it without a synchronisation:

- after each launch that can record (:func:`after_launch`), an asynchronous copy of the record
  into pinned host memory and an event are queued on the current stream;
- :func:`poll_errors` (the front end calls it at the start of every call on this backend)
  asks the event whether that copy is done (``cudaEventQuery``, never blocking); if it is and
  the record is set, the record is cleared and the error is raised (``IndexError`` for a class
  index, ``ValueError`` for a probability, the messages of the front end's eager checks);
- :func:`synchronize` waits for the device, then raises the same way.

So a bad target raises at the next call (or at :func:`synchronize`), not at the call that had
it, like an asynchronous CUDA error; ``validate="sync"`` in the front end keeps the eager check.

Stream capture (CUDA graphs): nothing here touches the host while the current stream is
capturing: kernels still record into the device record when the graph is replayed, and the next
call outside the capture copies it back. The record of a device is allocated by the first call
on that device; if that call is being captured, the launch gets no record (run one call before
capturing, as CUDA graphs need anyway for the compile).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...errors import class_index_error

#: int64 words of the record: state (0 clean, 1 being written, 2 complete), position, value,
#: detail, kind.
RECORD_WORDS = 5
COMPLETE = 2
#: Kinds (``NBL_ERR_*`` in ``_common.cu``): value = the target, detail = number of classes ...
KIND_CLASS_INDEX = 0
#: ... value = the input's bits as a float64, detail = its type's width in bits (0: bfloat16).
KIND_PROBABILITY = 1
#: ... position = the flat index of a ``+inf`` log-probability target of ``kl_div``.
KIND_LOG_TARGET = 2
_WIDTHS = {16: np.float16, 32: np.float32, 64: np.float64}
_NBYTES = RECORD_WORDS * 8
_D2H = 2  # cudaMemcpyDeviceToHost

_LOCK = threading.Lock()
_STATES: dict[int, DeviceRecord] = {}


def _cupy():
    import cupy

    return cupy


class DeviceRecord:
    """The error record of one device: device words, pinned host copy, completion event."""

    __slots__ = ("_pinned", "device", "event", "host", "pending", "record")

    def __init__(self, device: int) -> None:
        cupy = _cupy()
        self.device = device
        self.record = cupy.zeros(RECORD_WORDS, cupy.int64)
        self._pinned = cupy.cuda.alloc_pinned_memory(_NBYTES)
        self.host = np.frombuffer(self._pinned, np.int64, RECORD_WORDS)
        self.host[:] = 0
        self.event = cupy.cuda.Event(block=False, disable_timing=True)
        self.pending = False

    def queue_copy(self, stream: Any) -> None:
        """Queue the record's copy to the host and the event that says it is done."""
        cupy = _cupy()
        cupy.cuda.runtime.memcpyAsync(self.host.ctypes.data, self.record.data.ptr, _NBYTES,
                                      _D2H, stream.ptr)
        self.event.record(stream)
        self.pending = True

    def take(self, words) -> Exception | None:
        """The error described by ``words`` (clearing the record), or ``None`` if clean."""
        if int(words[0]) != COMPLETE:
            return None
        err = describe(words)
        self.record.data.memset_async(0, _NBYTES)
        self.host[:] = 0
        self.pending = False
        return err


def describe(words) -> Exception:
    """The exception for a complete record's words (the front end's eager checks' messages)."""
    pos, value, detail, kind = (int(w) for w in words[1:RECORD_WORDS])
    if kind == KIND_PROBABILITY:
        x = float(np.int64(value).view(np.float64))
        shown = str(_WIDTHS[detail](x)) if detail in _WIDTHS else repr(x)  # as numpy prints it
        return ValueError("binary_cross_entropy: all elements of input should be between 0 and 1 "
                          f"(found {shown} at position {pos})")
    if kind == KIND_LOG_TARGET:
        from ...ops.kl_div import infinite_log_target_error

        return infinite_log_target_error(pos)
    return class_index_error(value, detail)


def _capturing(stream: Any) -> bool:
    try:
        return bool(stream.is_capturing())
    except Exception:  # querying is itself illegal in some capture modes: treat as capturing
        return True


def record_for_launch(stream: Any) -> Any:
    """The current device's record (an int64 device array) for a kernel's ``err`` argument, or
    ``None`` when it does not exist yet and ``stream`` is capturing."""
    cupy = _cupy()
    dev = cupy.cuda.runtime.getDevice()
    st = _STATES.get(dev)
    if st is None:
        if _capturing(stream):
            return None
        with _LOCK:
            st = _STATES.get(dev)
            if st is None:
                st = _STATES[dev] = DeviceRecord(dev)
    return st.record


def after_launch(stream: Any) -> None:
    """Queue the non-blocking copy-back after a launch that may record.

    Skipped under capture, and while an earlier copy is still pending (not yet seen done by
    :func:`poll_errors`): at most one copy in flight per device, so a loop of calls queued far
    ahead of the GPU adds one small copy, not one per call. The record persists on the device,
    so the next copy (queued after the poll that consumed the pending one) carries any error.
    """
    st = _STATES.get(_cupy().cuda.runtime.getDevice())
    if st is not None and not st.pending and not _capturing(stream):
        st.queue_copy(stream)


def poll_errors() -> None:
    """Raise the error a kernel recorded (``IndexError``: class index; ``ValueError``:
    probability), if the device already said so; never waits, and does nothing while the current
    stream is capturing."""
    if not _STATES:
        return
    pending = [st for st in _STATES.values() if st.pending]
    if not pending:
        return
    cupy = _cupy()
    if _capturing(cupy.cuda.get_current_stream()):
        return
    for st in pending:
        with cupy.cuda.Device(st.device):
            if not st.event.done:
                continue
            st.pending = False
            err = st.take(st.host)
        if err is not None:
            raise err


def synchronize() -> None:
    """Wait for the current device and every device that ran a checking kernel, then raise
    any recorded error."""
    cupy = _cupy()
    devices = {cupy.cuda.runtime.getDevice(), *_STATES}
    for dev in sorted(devices):
        with cupy.cuda.Device(dev):
            cupy.cuda.Device(dev).synchronize()
            st = _STATES.get(dev)
            err = None
            if st is not None:
                st.pending = False  # the device is idle: any queued copy is done
                err = st.take(st.record.get())
        if err is not None:
            raise err


def reset() -> None:
    """Forget every record (tests)."""
    with _LOCK:
        _STATES.clear()
