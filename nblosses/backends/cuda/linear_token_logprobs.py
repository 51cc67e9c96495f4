"""linear_token_logprobs on CUDA: the chunked LM-head driver (:mod:`nblosses.backends._lm_head`,
the loss's host side :mod:`nblosses.backends._linear_token_logprobs`) with the products and
column sums of :mod:`.lm_head` and the block kernels of ``linear_token_logprobs.cu``
(``ltlp_stats``: a block per row; ``ltlp_grad``: a thread per element), launched
asynchronously on CuPy's current stream, nothing read back inside a call.

float32 and float64 run natively; half-precision inputs are computed in float32 (inputs upcast
once, the gradients cast back; the statistics stay float32), as the linear cross-entropy's. Class
indices are checked on the device (:mod:`._device_errors`): a bad one gives its row NaN
statistics and gradient, and ``IndexError`` at the next poll. Status: compiled by NVRTC
(``tests/kernels/test_cuda_compile.py``); its launches checked on a fake device against the
compiled parameter lists, and run there by NumPy stand-ins of the kernels against a dense
reference (``tests/kernels/test_linear_token_logprobs_cuda.py``); never run on a device yet.

Importing this module registers the source's catalogue with :mod:`._kernels`.
"""

from __future__ import annotations

import cupy

from .. import _linear_token_logprobs as T
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from .lm_head import CudaHead

SRC = "linear_token_logprobs.cu"
#: Threads per block of ``ltlp_stats`` (one block per row).
STATS_BLOCK = 256
PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "ltlp_stats": (("z", "T* __restrict__"), ("rows", "i64"), ("cols", "i64"),
                   ("bias", "const T* __restrict__"), ("cap", "double"),
                   ("t", "const long long* __restrict__"), ("c0", "i64"), ("inv_t", "double"),
                   ("out", "double* __restrict__"), ("row0", "i64"), ("n_classes", "i64"),
                   ("ignore", "i64"), ("err", "long long*")),
    "ltlp_grad": (("z", "T* __restrict__"), ("rows", "i64"), ("cols", "i64"),
                  ("bias", "const T* __restrict__"), ("cap", "double"), ("raw", "int"),
                  ("t", "const long long* __restrict__"), ("c0", "i64"), ("ignore", "i64"),
                  ("inv_t", "double"), ("m", "const double* __restrict__"),
                  ("coefs", "const double* __restrict__")),
}


def stats_kernel(ct: str) -> str:
    return K.name("ltlp_stats", ct, STATS_BLOCK)


def grad_kernel(ct: str) -> str:
    return K.name("ltlp_grad", ct)


def instantiations(ct: str) -> tuple[str, ...]:
    """Both kernels for float and double (half inputs are computed in float32)."""
    return (stats_kernel(ct), grad_kernel(ct)) if ct in K.LCE_CTYPES else ()


K.register(K.Source(SRC, PARAMS, {"ltlp_stats": "ltlp_stats", "ltlp_grad": "ltlp_grad"},
                    instantiations))


@L.on_input_device
def block_stats(z, bias, target, *, c0: int, temperature: float, softcap: float, row0: int = 0,
                err=None, n_classes: int = 0, ignore_index: int = -100):
    """Prepare the logits block ``z`` in place; its rows' statistics ``(R, 4)`` float64 (kernel
    protocol: ``linear_token_logprobs.block_stats``). The driver adds the block's first row
    ``row0``, the device error record ``err`` (``None``: the caller checked the targets),
    ``n_classes`` and ``ignore_index``, for the record of a bad class index."""
    rows, cols = z.shape
    out = cupy.empty((rows, len(T.STATS)), cupy.float64)
    L.launch(SRC, z.dtype, stats_kernel(K.ctype_of(z.dtype.name)),
             L.grid_for(rows, 1, STATS_BLOCK), STATS_BLOCK,
             K.pack("ltlp_stats", z=z, rows=rows, cols=cols, bias=bias, cap=float(softcap),
                    t=target, c0=c0, inv_t=1.0 / temperature, out=out, row0=row0,
                    n_classes=n_classes, ignore=ignore_index, err=err))
    return out


@L.on_input_device
def block_grad(z, bias, target, m, coefs, *, c0: int, raw: bool, ignore_index: int,
               temperature: float, softcap: float) -> None:
    """Overwrite the block ``z`` with ``dL/dz`` (kernel protocol:
    ``linear_token_logprobs.block_grad``)."""
    rows, cols = z.shape
    L.launch(SRC, z.dtype, grad_kernel(K.ctype_of(z.dtype.name)),
             L.grid_for(z.size, K.COL_BLOCK, K.COL_BLOCK), K.COL_BLOCK,
             K.pack("ltlp_grad", z=z, rows=rows, cols=cols, bias=bias, cap=float(softcap),
                    raw=int(raw), t=target, c0=c0, ignore=ignore_index, inv_t=1.0 / temperature,
                    m=m, coefs=coefs))


class _CudaLinearTokenLogprobs(CudaHead, T.LinearTokenLogprobs):
    """The block kernels on CuPy arrays, bad class indices recorded by ``ltlp_stats``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.err = E.record_for_launch(cupy.cuda.get_current_stream())

    def block_stats(self, z, bias, t, r0: int, c0: int):
        return block_stats(z, bias, t, c0=c0, temperature=self.temperature, softcap=self.cap,
                           row0=r0, err=self.err, n_classes=self.v, ignore_index=self.ignore)

    def block_grad(self, z, bias, t, m, coefs, raw: bool, c0: int) -> None:
        block_grad(z, bias, t, m, coefs, c0=c0, raw=raw, ignore_index=self.ignore,
                   temperature=self.temperature, softcap=self.cap)


def _upcast(a):
    return None if a is None else a.astype(cupy.float32)


def linear_token_logprobs(x2, w2, bias, target, *, ignore_index, temperature, softcap,
                          want_entropy, want_grad, grad_output, grad_entropy, chunk_rows=None,
                          chunk_classes=None):
    """Kernel protocol as :func:`nblosses.backends.cpu.linear_token_logprobs.
    linear_token_logprobs`."""
    dtype = x2.dtype
    half = dtype.itemsize < 4
    if half:
        x2, w2, bias = (_upcast(a) for a in (x2, w2, bias))
    with x2.device:
        logp, ent, grads = T.run(
            _CudaLinearTokenLogprobs, x2, w2, bias, target, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, want_entropy=want_entropy,
            want_grad=want_grad, grad_output=grad_output, grad_entropy=grad_entropy,
            chunk_rows=chunk_rows, chunk_classes=chunk_classes)
        E.after_launch(cupy.cuda.get_current_stream())  # the record's copy-back, queued last
    if half and grads is not None:
        grads = tuple(None if g is None else g.astype(dtype) for g in grads)
    return logp, ent, grads


# The block operations of the protocol, reached as attributes of the kernel.
vars(linear_token_logprobs).update(block_stats=block_stats, block_grad=block_grad)
