"""token_logprobs on CUDA (kernels in ``token_logprobs.cu``; protocol in
:mod:`nblosses.backends`, semantics of :mod:`nblosses.backends.cpu.token_logprobs`).

One launch per call, asynchronous on CuPy's current stream, no host round trip (a call can be
captured into a CUDA graph): ``inner == 1`` runs ``tlp_rows`` (a group of threads per row, the
group size from the row's length as for the streamed cross-entropy rows: an online pass for the
statistics, a second pass for the gradient), ``inner > 1`` runs ``tlp_cols`` (a thread per
position). Half-precision logits are read and the gradient written in their own type; the
statistics and the upstream gradients are float32. Class indices are checked on the device
(:mod:`._device_errors`).

Importing this module registers the source's catalogue with :mod:`._kernels`.
"""

from __future__ import annotations

import cupy
import numpy as np

from .._host import ignore_value
from . import _device_errors as E
from . import _kernels as K
from . import _loader as L
from .softmax import row_vec

SRC = "token_logprobs.cu"
_ACC = "const typename AccT<T>::type* __restrict__"
PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "tlp": (("x", "const T*"), ("t", "const long long* __restrict__"), ("nrows", "i64"),
            ("C", "i64"), ("inner", "i64"), ("ignore", "i64"), ("inv_t", "double"),
            ("cap", "double"), ("go", _ACC), ("ge", _ACC),
            ("logp", "typename AccT<T>::type* __restrict__"),
            ("ent", "typename AccT<T>::type* __restrict__"), ("gx", "T*"),
            ("err", "long long*")),
}


#: CAP template values: 0 = no soft cap, 1 = soft-capped logits.
CAPS = (0, 1)


def rows_kernel(ct: str, cap: int, vec: int, g: int, block: int) -> str:
    """The name expression of ``tlp_rows`` (groups of ``g`` threads, ``block`` per block)."""
    return K.name("tlp_rows", ct, cap, vec, g, block)


def cols_kernel(ct: str, cap: int) -> str:
    return K.name("tlp_cols", ct, cap)


def instantiations(ct: str) -> tuple[str, ...]:
    """Every name the launch below can ask for: each soft-cap mode, vector width and looped
    group size."""
    return (*(rows_kernel(ct, c, v, g, b) for c in CAPS for v in K.vec_choices(ct)
              for g, b in K.LOOPED_GS),
            *(cols_kernel(ct, c) for c in CAPS))


K.register(K.Source(SRC, PARAMS, {"tlp_rows": "tlp", "tlp_cols": "tlp"}, instantiations))


@L.on_input_device
def token_logprobs(x3, t2, *, ignore_index, temperature, softcap, want_entropy, want_grad,
                   grad_output, grad_entropy, grad_buffer):
    """Per-position target log-probabilities and entropies (kernel protocol in
    :mod:`nblosses.backends`)."""
    n, C, inner = x3.shape
    dt = x3.dtype
    ct = K.ctype_of(dt.name)
    stats = np.dtype("float32") if dt.itemsize < 4 else dt
    gx = None
    if want_grad:
        gx = grad_buffer if grad_buffer is not None else cupy.empty_like(x3)
    if x3.size == 0:  # no logits: every position is ignored (or C == 0 and unchecked)
        if gx is not None:
            gx.fill(0)
        return (cupy.zeros((n, inner), stats),
                cupy.zeros((n, inner), stats) if want_entropy else None, gx)
    logp = cupy.empty((n, inner), stats)
    ent = cupy.empty((n, inner), stats) if want_entropy else None
    stream = cupy.cuda.get_current_stream()
    capped = int(float(softcap) > 0.0)
    args = K.pack("tlp", x=x3, t=t2, nrows=n, C=C, inner=inner, ignore=ignore_value(ignore_index),
                  inv_t=1.0 / float(temperature), cap=float(softcap),
                  go=grad_output if want_grad else None,
                  ge=grad_entropy if want_grad else None, logp=logp, ent=ent, gx=gx,
                  err=E.record_for_launch(stream))
    if inner == 1:
        vec = row_vec(ct, C, x3, gx)
        g, block = K.looped_config(C // vec)
        L.launch(SRC, dt, rows_kernel(ct, capped, vec, g, block),
                 L.grid_for(n, K.rows_per_block(g, block), block), block, args)
    else:
        block = K.COL_BLOCK
        L.launch(SRC, dt, cols_kernel(ct, capped), L.grid_for(n * inner, block, block), block, args)
    E.after_launch(stream)
    return logp, ent, gx
