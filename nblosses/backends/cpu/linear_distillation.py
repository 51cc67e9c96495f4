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
from ._parallel import parallel_kernel
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


def block_stats(zs, zt, bias_s, bias_t, target, opts: LD.DistillOptions, *, c0: int):
    """Prepare the logits blocks ``zs``, ``zt`` in place; their rows' statistics ``(R, 7)``
    float64 (kernel protocol: ``linear_distillation_loss.block_stats``). ``bias_s``,
    ``bias_t``: the blocks' slices of the biases, or None; ``target`` the rows' class indices
    (checked) or None."""
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
