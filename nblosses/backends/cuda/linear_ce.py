"""Linear cross-entropy on CUDA: the chunked driver of :mod:`nblosses.backends._linear_ce` with
cuBLAS products (``cupy.cublas.gemm``, ``beta = 1`` for the accumulated gradients) and the
kernels of ``linear_ce.cu`` (block statistics, gradient in place, column sums).

float32 and float64 run natively. float16 inputs are computed in float32 (inputs upcast once,
results cast back): the float32 copy of the weight is the one allocation beyond the chunk
budget. Status: compiled by NVRTC in CI (``tests/test_linear_cross_entropy.py``), never run on a
device yet.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import cupy
import numpy as np

from .. import _linear_ce as G

SOURCE = "linear_ce.cu"
#: Threads per block of the per-row statistics kernel (one block per row).
STATS_BLOCK = 256
#: Threads per block of the elementwise kernels.
BLOCK = 256
#: Largest grid of the grid-stride kernels.
MAX_GRID = 65535
CTYPES = {"float32": "float", "float64": "double"}
#: A null pointer argument (8 zero bytes) for optional arrays.
NULL = np.uint64(0)


def instantiations(ctype: str) -> list[str]:
    """The template instantiations ``linear_ce.cu`` is compiled for, per element type."""
    return [f"lce_stats<{ctype}, {STATS_BLOCK}>", f"lce_grad<{ctype}>", f"lce_col_sums<{ctype}>"]


@functools.cache
def source() -> str:
    return (Path(__file__).resolve().parent / SOURCE).read_text()


@functools.cache
def _module(device: int, dtype_name: str) -> cupy.RawModule:
    return cupy.RawModule(code=source(), options=("--std=c++17",),
                          name_expressions=instantiations(CTYPES[dtype_name]))


def _kernel(dtype, index: int) -> cupy.RawKernel:
    ctype = CTYPES[dtype.name]
    mod = _module(cupy.cuda.runtime.getDevice(), dtype.name)
    return mod.get_function(instantiations(ctype)[index])


def _ptr(a):
    return NULL if a is None else a


def _grid(units: int, per_block: int) -> tuple[int]:
    return (max(1, min(MAX_GRID, -(-units // per_block))),)


class _CudaLinearCE(G.ChunkedLinearCE):
    """The driver's hooks on CuPy arrays."""

    xp: ClassVar[Any] = cupy

    def gemm(self, a, b, c, beta: float) -> None:
        from cupy import cublas  # loads libcublas: not at import (CI has no CUDA libraries)

        cublas.gemm("N", "N", a, b, out=c, beta=beta)

    def _target_args(self, r0: int, r1: int, c0: int, c1: int):
        """``(t, y, ldy)`` kernel arguments of the block."""
        if self.probs:
            return NULL, self.target[r0:r1, c0:c1], np.int64(self.v)
        return self.target[r0:r1], NULL, np.int64(0)

    def merge(self, z, st: dict, r0: int, r1: int, c0: int, c1: int) -> None:
        bias, w = self.slices(c0, c1)
        t, y, ldy = self._target_args(r0, r1, c0, c1)
        sa, sb = (st["a_sum"], st["b_sum"]) if self.probs else (st["swx"], NULL)
        xt = NULL if self.probs else st["xt"]
        rows, cols = z.shape
        _kernel(z.dtype, 0)(_grid(rows, 1), (STATS_BLOCK,), (
            z, np.int64(rows), np.int64(cols), _ptr(bias), np.float64(self.cap), t,
            np.int64(c0), _ptr(w), np.int32(self.eps > 0 and not self.probs), y, ldy,
            np.float64(1.0 - self.eps), np.float64(self.eps / self.v), st["m"], st["s"], xt,
            sa, sb))

    def gradient_block(self, z, raw: bool, r0: int, r1: int, c0: int, c1: int, st: dict,
                       coefs) -> None:
        coef, b, a = coefs
        bias, w = self.slices(c0, c1)
        t, y, ldy = self._target_args(r0, r1, c0, c1)
        rows, cols = z.shape
        ignore = np.int64(0 if self.ignore is None else self.ignore)
        _kernel(z.dtype, 1)(_grid(z.size, BLOCK), (BLOCK,), (
            z, np.int64(rows), np.int64(cols), _ptr(bias), np.float64(self.cap), np.int32(raw),
            t, np.int64(c0), ignore, _ptr(w), y, ldy, np.float64(1.0 - self.eps),
            np.float64(self.eps / self.v), st["m"], coef, b, _ptr(a)))

    def col_sums(self, z, out) -> None:
        rows, cols = z.shape
        _kernel(z.dtype, 2)(_grid(cols, BLOCK), (BLOCK,), (z, np.int64(rows), np.int64(cols),
                                                             out))


def _upcast(a):
    return None if a is None or a.dtype.kind != "f" else a.astype(cupy.float32)


def linear_cross_entropy(x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse,
                         chunk_rows=None, chunk_classes=None):
    """Kernel protocol as :func:`nblosses.backends.cpu.linear_ce.linear_cross_entropy`."""
    half = x2.dtype.name not in CTYPES
    if half:
        target = target if target.dtype.kind == "i" else _upcast(target)
        x2, w2, bias, weight = (_upcast(a) for a in (x2, w2, bias, weight))
        if reduction == "none" and grad_output is not None:
            grad_output = _upcast(grad_output)
    with x2.device:
        loss, lse, grads = G.run(
            _CudaLinearCE, x2, w2, bias, target, weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
            softcap=softcap, want_grad=want_grad, grad_output=grad_output, want_lse=want_lse,
            chunk_rows=chunk_rows, chunk_classes=chunk_classes)
    if half:
        # lse stays float32 for half inputs (the front end's convention); the rest goes back.
        loss = loss.astype(cupy.float16)
        grads = None if grads is None else tuple(
            None if g is None else g.astype(cupy.float16) for g in grads)
    return loss, lse, grads
