"""linear_token_logprobs on the CPU: ``token_logprobs`` of an LM head's logits ``x @ W.T + b``,
with the gradients of the input, the weight and the bias, never forming the ``(N, V)`` logits.

The block loop is :mod:`nblosses.backends._lm_head`'s, the statistics' merge and each row's
finish :mod:`nblosses.backends._linear_token_logprobs`'; here are the block kernels (Numba, in
place on a C-contiguous ``(R, Vc)`` logits block of the columns ``c0:c0+Vc``), each row's
loops along the contiguous row, vectorised, with ``token_logprobs``' own helpers
(:mod:`.token_logprobs`: the clamped shift ``d``, the float64 sums of ``e`` and ``e d``):

- :func:`block_stats`: bias and soft cap in place, then the block's :data:`STATS` per row;
- :func:`block_grad`: ``z_c = (e_c (a + b d_c) + [c == t] go / T) cap'(y_c)`` in place.

They are also the kernel's block operations (``linear_token_logprobs.block_stats`` /
``.block_grad``), which the Dask plan holding logits blocks calls (the LM head's
vocabulary-parallel plan, :mod:`nblosses._dask.linear_token_vocab`). Between two BLAS products
the driver runs their serial builds (:mod:`.lm_head`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _linear_token_logprobs as T
from ._math import JIT, fast_exp_nonpos, like, row_max
from ._parallel import guarded, parallel_kernel
from .linear_ce_kernels import _add_at_target, _prepare_row, _start_grad_row
from .lm_head import CpuHead
from .token_logprobs import _exp_sums, _shift

STATS = T.STATS


@parallel_kernel(**JIT)
def _stats_rows(z, bias, cap, t, c0, inv_t, out):
    """Prepare ``z`` and write each row's ``(m, s, q, yt)`` into ``out`` ``(R, 4)``."""
    n, nc = z.shape
    for i in prange(n):
        row = z[i]
        _prepare_row(row, bias, cap)
        big = row_max(row)
        ti = t[i] - c0
        out[i, 3] = row[ti] if 0 <= ti < nc else 0.0
        out[i, 0] = big
        if big == -np.inf:  # only -inf here (user logits): the block adds nothing to the row
            out[i, 1] = 0.0
            out[i, 2] = 0.0
        else:
            out[i, 1], out[i, 2] = _exp_sums(row, big, inv_t, None)


@njit(**JIT)
def _grad_row(row, big, inv_t, a, b, cap):
    """``row_c = e_c (a + b d_c)`` in place, times the soft cap's slope at the capped logit
    ``row_c`` (``cap > 0``); one array per loop, which LLVM vectorises."""
    inv, m = like(inv_t, row), like(big, row)
    a, b = like(a, row), like(b, row)
    if cap > 0:
        ic, one = like(1.0 / cap, row), like(1, row)
        for c in range(row.size):
            v = row[c]
            d = _shift(v, m, inv)
            u = v * ic
            row[c] = fast_exp_nonpos(d) * (a + b * d) * (one - u * u)
    else:
        for c in range(row.size):
            d = _shift(row[c], m, inv)
            row[c] = fast_exp_nonpos(d) * (a + b * d)


@parallel_kernel(**JIT)
def _grad_rows(z, bias, cap, raw, t, c0, ignore, inv_t, m, coefs):
    """Overwrite ``z`` with ``dL/dz`` from the rows' merged max ``m`` and ``coefs`` ``(R, 3)``
    (``a``, ``b``, ``go / T``); ignored rows become zero."""
    for i in prange(z.shape[0]):
        row = z[i]
        kept, ti, vt = _start_grad_row(row, t[i], ignore, c0, bias, cap, raw)
        if not kept:
            continue
        _grad_row(row, m[i], inv_t, coefs[i, 0], coefs[i, 1], cap)
        _add_at_target(row, ti, coefs[i, 2], vt, cap)


def block_stats(z, bias, target, *, c0: int, temperature: float, softcap: float):
    """Prepare the logits block ``z`` in place (bias added, soft cap) and return its rows'
    statistics ``(R, 4)`` float64 (kernel protocol: ``linear_token_logprobs.block_stats``);
    ``target``: the rows' class indices (checked, or ``ignore_index``)."""
    out = np.empty((z.shape[0], len(STATS)))
    _stats_rows(z, bias, float(softcap), target, c0, 1.0 / temperature, out)
    return out


def block_grad(z, bias, target, m, coefs, *, c0: int, raw: bool, ignore_index: int,
               temperature: float, softcap: float) -> None:
    """Overwrite the block ``z`` with ``dL/dz`` (kernel protocol:
    ``linear_token_logprobs.block_grad``): ``m`` the rows' merged max, ``coefs`` their
    ``(R, 3)`` coefficients (:func:`nblosses.backends._linear_token_logprobs.finish`); ``raw``:
    ``z`` holds raw products (prepare first)."""
    _grad_rows(z, bias, float(softcap), raw, target, c0, ignore_index, 1.0 / temperature, m,
               coefs)


class _CpuLinearTokenLogprobs(CpuHead, T.LinearTokenLogprobs):
    """The block kernels' serial builds (between two BLAS products, see :mod:`.lm_head`)."""

    def block_stats(self, z, bias, t, r0: int, c0: int):
        out = np.empty((z.shape[0], len(STATS)))
        _stats_rows.serial(z, bias, self.cap, t, c0, self.inv_t, out)
        return out

    def block_grad(self, z, bias, t, m, coefs, raw: bool, c0: int) -> None:
        _grad_rows.serial(z, bias, self.cap, raw, t, c0, self.ignore, self.inv_t, m, coefs)


@guarded
def linear_token_logprobs(x2, w2, bias, target, *, ignore_index, temperature, softcap,
                          want_entropy, want_grad, grad_output, grad_entropy, chunk_rows=None,
                          chunk_classes=None):
    """``token_logprobs(x2 @ w2.T + bias, target)`` and, with ``want_grad``, the gradients of
    ``x2``, ``w2`` and ``bias``, chunked (kernel protocol in :mod:`nblosses.backends`).

    ``x2`` ``(N, d)``, ``w2`` ``(V, d)``, ``bias`` ``(V,)`` or None, of the compute dtype,
    C-contiguous; ``target`` ``(N,)`` int64 (checked); ``softcap`` 0.0 is off;
    ``grad_output`` / ``grad_entropy``: None (ones / zeros) or ``(N,)`` arrays, read only with
    ``want_grad``. ``chunk_rows`` / ``chunk_classes`` override the block shape
    (:func:`nblosses.backends._lm_head.plan_chunks`).

    Returns ``(logp, entropy, grads)``: ``(N,)`` arrays (``entropy`` None unless
    ``want_entropy``) and ``(grad_x, grad_w, grad_bias or None)`` or None.
    """
    return T.run(_CpuLinearTokenLogprobs, x2, w2, bias, target, ignore_index=ignore_index,
                 temperature=temperature, softcap=softcap, want_entropy=want_entropy,
                 want_grad=want_grad, grad_output=grad_output, grad_entropy=grad_entropy,
                 chunk_rows=chunk_rows, chunk_classes=chunk_classes)


# The block operations of the protocol, reached as attributes of the kernel.
vars(linear_token_logprobs).update(block_stats=guarded(block_stats),
                                   block_grad=guarded(block_grad))
