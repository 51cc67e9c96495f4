"""linear_distillation_loss on the CPU: the block kernels of the student's and the teacher's
logits blocks.

A block pair is ``zs = x[rows] @ W[cols].T`` and ``zt = tx[rows] @ TW[cols].T`` (C-contiguous
``(R, Vc)``, vocabulary columns ``c0:c0+Vc``), written by BLAS. Three passes, each over the rows
of the pair, each row while it is in cache, the per-class arithmetic ``distillation_loss``'s
own (:mod:`.distillation`: its maxima, sums, JSD terms and gradient point, inlined here):

- :func:`block_stats`: prepare both blocks in place (bias, soft cap) and reduce each row to
  its statistics relative to the block's maxima (:data:`nblosses.backends._linear_distillation.
  STATS`), merged over blocks by :func:`nblosses.backends._linear_distillation.merge`;
- :func:`block_jsd`: the JSD only: its two sums given the rows' logsumexps, added over blocks;
- :func:`block_grad`: overwrite the student block with ``dL/ds`` from the rows' coefficients
  (:data:`~nblosses.backends._linear_distillation.COEFS`), ready for the gradient products.

Each pass runs its kernel's serial build: in the head they alternate with OpenBLAS products,
and a Numba parallel region between two products leaves OpenMP threads spinning on the cores
BLAS needs (:mod:`.linear_ce`, which measured it).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import _linear_distillation as LD
from ._math import JIT, like
from ._parallel import guarded, parallel_kernel
from .distillation import (
    FORWARD,
    JSD,
    REVERSE,
    SEPARATE,
    SHARED,
    RowCoef,
    _grad_pass,
    _jsd_sums,
    _max2,
    _pair_sums,
    _slope,
)
from .linear_ce_kernels import _prepare_row
from .lm_head import CpuHead

#: The divergences' compile-time tokens (:mod:`.distillation`).
MODE_TOKENS = {LD.FORWARD: FORWARD, LD.REVERSE: REVERSE, LD.JSD: JSD}


@njit(**JIT)
def _prepare(row, bias, cap):
    """``row += bias`` (when given), then the soft cap (``cap`` None: none)."""
    if cap is None:
        _prepare_row(row, bias, 0.0)
    else:
        _prepare_row(row, bias, cap)


@parallel_kernel(**JIT)
def _stats_rows(zs, zt, bs, bt, cap, inv_t, t, c0, mode, sep, out):
    """Prepare the blocks and write each row's block statistics into ``out`` ``(R, 7)``
    (``xst`` NaN where the block does not hold the row's target; ``t`` None: no target)."""
    nc = zs.shape[1]
    for i in prange(zs.shape[0]):
        s, tr = zs[i], zt[i]
        _prepare(s, bs, cap)
        _prepare(tr, bt, cap)
        it = like(inv_t, s)
        xs, xt = _max2(s, tr)
        ss, st, w, sh = _pair_sums(s, tr, it, xs * it, xt * it, mode, sep, xs)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = xs, ss, xt, st
        out[i, 4], out[i, 5] = w, sh
        ti = -1 if t is None else t[i] - c0
        out[i, 6] = s[ti] if 0 <= ti < nc else math.nan


@parallel_kernel(**JIT)
def _jsd_rows(zs, zt, raw, bs, bt, cap, inv_t, beta, lse, out):
    """``out[i] += (J, K)`` of each row's block (:func:`.distillation._jsd_sums`) given its
    logsumexps ``lse[i] = (lse_s, lse_t)``; ``raw``: the blocks hold products to prepare."""
    for i in prange(zs.shape[0]):
        s, tr = zs[i], zt[i]
        if raw:
            _prepare(s, bs, cap)
            _prepare(tr, bt, cap)
        j, k = _jsd_sums(s, tr, like(inv_t, s), like(lse[i, 0], s), like(lse[i, 1], s),
                         like(beta, s))
        out[i, 0] += j
        out[i, 1] += k


@parallel_kernel(**JIT)
def _grad_rows(zs, zt, raw, bs, bt, cap, inv_t, beta, t, c0, ignore, coefs, mode, sep):
    """Overwrite ``zs`` with ``dL/ds`` (soft cap's slope included) from the rows'
    coefficients ``coefs`` ``(R, 11)``; ignored rows become zero."""
    nc = zs.shape[1]
    for i in prange(zs.shape[0]):
        s = zs[i]
        if t is not None and t[i] == ignore:
            s[:] = 0
            continue
        tr = zt[i]
        if raw:
            _prepare(s, bs, cap)
            _prepare(tr, bt, cap)
        c = coefs[i]
        r = RowCoef(like(c[0], s), like(c[1], s), like(c[2], s), like(c[3], s), like(c[4], s),
                    like(c[5], s), like(c[6], s), like(c[7], s), like(c[8], s), like(c[9], s),
                    like(beta, s))
        ti = -1 if t is None else t[i] - c0
        at_target = 0 <= ti < nc and c[10] != 0
        vt = np.float64(s[ti]) if at_target else 0.0  # read before the pass overwrites it
        _grad_pass(s, s, tr, like(inv_t, s), r, mode, sep, cap)
        if at_target:
            s[ti] -= like(c[10] * _slope(vt, cap), s)


def _cap(opts: LD.DistillOptions) -> float | None:
    return opts.softcap if opts.softcap else None


def _sep(opts: LD.DistillOptions) -> tuple[int, ...]:
    return SEPARATE if opts.separate else SHARED


def block_stats(zs, zt, bias_s, bias_t, target, opts: LD.DistillOptions, *, c0: int,
                n_classes: int):
    """Prepare the logits blocks ``zs``, ``zt`` in place; their rows' statistics ``(R, 7)``
    float64 (kernel protocol: ``linear_distillation_loss.block_stats``). ``bias_s``,
    ``bias_t``: the blocks' slices of the biases, or None; ``target`` the rows' class indices
    or None; ``n_classes``: unused here (the front end checks class indices before the
    call)."""
    out = np.empty((zs.shape[0], len(LD.STATS)))
    _stats_rows.serial(zs, zt, bias_s, bias_t, _cap(opts), opts.inv_t, target, c0,
                       MODE_TOKENS[opts.mode], _sep(opts), out)
    return out


def block_jsd(zs, zt, bias_s, bias_t, lse, out, opts: LD.DistillOptions, *, raw: bool) -> None:
    """``out += (J, K)`` of the blocks' rows (the JSD's second pass; ``lse`` ``(R, 2)`` the
    rows' ``(lse_s, lse_t)``; ``raw``: prepare the blocks first)."""
    _jsd_rows.serial(zs, zt, raw, bias_s, bias_t, _cap(opts), opts.inv_t, opts.beta, lse, out)


def block_grad(zs, zt, bias_s, bias_t, target, coefs, opts: LD.DistillOptions, *, c0: int,
               raw: bool) -> None:
    """Overwrite the student block ``zs`` with ``dL/ds`` (kernel protocol:
    ``linear_distillation_loss.block_grad``); ``coefs`` ``(R, 11)`` from
    :func:`nblosses.backends._linear_distillation.finish`."""
    _grad_rows.serial(zs, zt, raw, bias_s, bias_t, _cap(opts), opts.inv_t, opts.beta, target,
                      c0, opts.ignore_index, coefs, MODE_TOKENS[opts.mode], _sep(opts))


class _CpuLinearDistillation(CpuHead, LD.LinearDistillation):
    """The driver's CPU hooks and the loss's block kernels."""

    def block_stats(self, zs, zt, bs, bt, target, c0: int, r0: int):
        return block_stats(zs, zt, bs, bt, target, self.opts, c0=c0, n_classes=self.v)

    def block_jsd(self, zs, zt, bs, bt, lse, out, raw: bool) -> None:
        block_jsd(zs, zt, bs, bt, lse, out, self.opts, raw=raw)

    def block_grad(self, zs, zt, bs, bt, target, coefs, c0: int, raw: bool) -> None:
        block_grad(zs, zt, bs, bt, target, coefs, self.opts, c0=c0, raw=raw)


@guarded
def linear_distillation_loss(x2, w2, bias, tx2, tw2, tbias, target, *, beta, temperature,
                             ignore_index, hard_weight, softcap, reduction, want_grad,
                             grad_output, chunk_rows=None, chunk_classes=None):
    """``distillation_loss(x2 @ w2.T + bias, tx2 @ tw2.T + tbias, target)`` and the student's
    gradients, chunked (neither logits array is formed).

    Kernel protocol: the student's ``x2`` ``(N, d)``, ``w2`` ``(V, d)``, ``bias`` ``(V,)`` or
    None and the teacher's ``tx2`` ``(N, d_t)``, ``tw2`` ``(V, d_t)``, ``tbias``, all of the
    compute dtype and C-contiguous; ``target`` ``(N,)`` int64 class indices (each in
    ``[0, V)`` or ``ignore_index``) or None. Options as ``distillation``'s (``softcap`` 0.0
    is off); ``grad_output`` None unless ``want_grad``, a float for reduced losses, ``(N,)``
    for ``"none"``; ``chunk_rows`` / ``chunk_classes`` override the block shape
    (:func:`nblosses.backends._lm_head.plan_chunks`).

    Returns ``(loss, grads)``: ``loss`` 0-d or ``(N,)``; ``grads`` ``(grad_x, grad_w,
    grad_bias or None)`` or None. The block operations ``block_stats``, ``block_jsd`` and
    ``block_grad`` (above) are attributes of this function, for plans that hold the logits
    blocks themselves (Dask's).
    """
    return LD.run(_CpuLinearDistillation, x2, w2, bias, tx2, tw2, tbias, target, beta=beta,
                  temperature=temperature, ignore_index=ignore_index, hard_weight=hard_weight,
                  softcap=softcap, reduction=reduction, want_grad=want_grad,
                  grad_output=grad_output, chunk_rows=chunk_rows, chunk_classes=chunk_classes)


# The block operations of the protocol, reached as attributes of the kernel (each guarded
# itself; the call above uses the unguarded functions inside its own guarded call).
vars(linear_distillation_loss).update(block_stats=guarded(block_stats),
                                      block_jsd=guarded(block_jsd),
                                      block_grad=guarded(block_grad))
