"""linear_token_logprobs on the chunked LM-head driver (:mod:`._lm_head`): the per-row
statistics of a logits block, their exact merge over vocabulary blocks, each row's
log-probability, entropy and gradient coefficients, and the call (:func:`run`) every backend
runs with its block kernels.

The distribution is ``token_logprobs``' (:mod:`nblosses.backends.cpu.token_logprobs`): with
``y = cap(x @ W.T + b)`` (``cap(v) = c tanh(v / c)``, or none), ``M`` a row's max of ``y``,
``d_c = (y_c - M) / T`` (clamped at :data:`D_MIN`), ``e_c = exp(d_c)``, a block of columns
reduces each row to the float64 statistics :data:`STATS`::

    m   the block's max of y
    s   sum_c e_c,  q = sum_c e_c d_c   (relative to the block's own max m)
    yt  y at the row's target, where the block holds it (0 elsewhere: exactly one block does)

Blocks ``k`` merge exactly (:func:`merge`): ``M = max_k m_k``, ``dm_k = (m_k - M) / T``,
``r_k = exp(dm_k)``, ``s = sum_k r_k s_k``, ``q = sum_k r_k (q_k + dm_k s_k)``, ``yt = sum_k
yt_k``; a block with ``s = 0`` (only ``-inf`` logits) adds nothing. From the merged row
(:func:`finish`)::

    logp = (yt - M) / T - log s          (clamped to <= 0)
    H    = log s - q / s                 (clamped to [0, log V])
    dL/dy_c = e_c (a + b d_c) + [c == t] go / T,  a = -(go - ge q / s) / (s T),  b = -ge / (s T)

for ``L = go logp + ge H`` (``go``, ``ge`` the rows' upstream gradients), times the soft cap's
slope ``1 - (y_c / c)^2``; the block kernels apply it with :data:`COEFS` ``(a, b, go / T)``.
Rows whose target is ``ignore_index``: logp 0, entropy 0, gradient 0; a target outside
``[0, V)`` (possible only where a device checks them in its kernels): NaN.

Pure array arithmetic over ``xp`` (NumPy, CuPy, and Dask's blocks): the LM-head driver of each
backend and the vocabulary-parallel Dask plan of ``linear_token_logprobs``
(:mod:`nblosses._dask.linear_token_vocab`) merge and finish with these functions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._host import ignore_value
from ._lm_head import ChunkedHead, Head, Plan, param_grads, plan_chunks

#: The row statistics of a block (the last axis of a float64 array).
STATS = ("m", "s", "q", "yt")
#: The gradient's per-row coefficients (columns of a float64 ``(R, 3)`` array).
COEFS = ("a", "b", "gt")
#: The clamp of ``d`` (the kernels' ``D_MIN`` / ``TLP_D_MIN``): ``exp`` is 0 below it, so a
#: ``-inf`` logit adds ``e d = 0`` rather than NaN.
D_MIN = -1000.0


def new_stats(xp: Any, rows: int) -> Any:
    """Statistics of no logits yet: ``m = -inf``, sums 0."""
    st = xp.zeros((rows, len(STATS)), xp.float64)
    st[:, 0] = -math.inf
    return st


def merge(xp: Any, st: Any, axis: int, inv_t: float, keepdims: bool = False) -> Any:
    """The exact merge of statistics ``st`` (``(..., 4)``) over ``axis`` (the blocks).

    ``inv_t``: ``1 / T``. A row of a block with ``s == 0`` adds nothing; NaN in a block's ``m``
    or ``s`` makes the row NaN.
    """
    m, s, q, yt = (st[..., k] for k in range(len(STATS)))
    has = s != 0
    with np.errstate(invalid="ignore", over="ignore"):  # rows of only -inf: discarded below
        big = xp.where(has, m, -math.inf).max(axis=axis, keepdims=True)
        dm = xp.maximum((m - big) * inv_t, D_MIN)
        r = xp.where(has, xp.exp(dm), 0.0)
        s_all = (r * s).sum(axis=axis, keepdims=True)
        q_all = xp.where(has, r * (q + dm * s), 0.0).sum(axis=axis, keepdims=True)
    out = xp.stack([big, s_all, q_all, yt.sum(axis=axis, keepdims=True)], axis=-1)
    return out if keepdims else out.squeeze(axis=axis)


def finish(xp: Any, st: Any, target: Any, ignore_index: int, n_classes: int, inv_t: float,
           go: Any, ge: Any, want_grad: bool) -> tuple[Any, Any, Any]:
    """``(logp, entropy, coefs)`` float64 of rows from their merged statistics ``st``
    ``(R, 4)``: ``coefs`` ``(R, 3)`` (:data:`COEFS`) or None without a gradient. ``go`` /
    ``ge``: the rows' upstream gradients (arrays ``(R,)``, or None: ones / zeros)."""
    m, s, q, yt = (st[:, k] for k in range(len(STATS)))
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= n_classes))

    def nan_or(a: Any) -> Any:
        return xp.where(bad, math.nan, xp.where(valid, a, 0.0))

    with np.errstate(divide="ignore", invalid="ignore"):  # NaN / -inf rows give NaN, as torch
        ls = xp.log(s)
        qs = q / s
        logp = nan_or(xp.minimum((yt - m) * inv_t - ls, 0.0))
        ent = nan_or(xp.clip(ls - qs, 0.0, math.log(n_classes)))
        if not want_grad:
            return logp, ent, None
        g = xp.ones(s.shape, xp.float64) if go is None else go.astype(xp.float64)
        h = xp.zeros(s.shape, xp.float64) if ge is None else ge.astype(xp.float64)
        a = -(g - h * qs) / s * inv_t
        b = -h / s * inv_t
    coefs = xp.stack([a, b, g * inv_t], axis=-1)
    return logp, ent, xp.where(bad[:, None], math.nan, xp.where(valid[:, None], coefs, 0.0))


class LinearTokenLogprobs(ChunkedHead):
    """One ``linear_token_logprobs`` call on the driver; a backend's class adds the driver's
    backend hooks and the block kernels (:meth:`block_stats`, :meth:`block_grad`).

    ``logp`` / ``ent``: the ``(N,)`` arrays receiving the rows' results; ``go`` / ``ge``: the
    rows' upstream gradients or None.
    """

    def __init__(self, x2, w2, bias, target, *, ignore_index: int, temperature: float,
                 softcap: float, go: Any, ge: Any, want_grad: bool, plan: Plan, logp: Any,
                 ent: Any) -> None:
        super().__init__((Head(x2, w2, bias),), plan)
        self.target, self.ignore = target, ignore_index
        self.temperature, self.inv_t, self.cap = temperature, 1.0 / temperature, softcap
        self.go, self.ge, self.want_grad = go, ge, want_grad
        self.logp, self.ent = logp, ent
        self.acc = self.xp.empty((plan.rows, len(STATS)), self.xp.float64)

    # -- block kernels (backend) ---------------------------------------------------------
    def block_stats(self, z, bias, t, r0: int, c0: int) -> Any:
        """Prepare ``z`` in place; its rows' :data:`STATS` ``(R, 4)``."""
        raise NotImplementedError

    def block_grad(self, z, bias, t, m, coefs, raw: bool, c0: int) -> None:
        """Overwrite ``z`` with ``dL/dz`` given the rows' merged max ``m`` and ``coefs``."""
        raise NotImplementedError

    # -- loss hooks ----------------------------------------------------------------------
    def start_rows(self, r0: int, r1: int) -> Any:
        st = self.acc[:r1 - r0]
        st[:, 0] = -math.inf
        st[:, 1:] = 0.0
        return st

    def merge(self, step: int, zs: tuple, raw: bool, st: Any, r0: int, r1: int, c0: int,
              c1: int) -> None:
        blk = self.block_stats(zs[0], self.bias_slice(0, c0, c1), self.target[r0:r1], r0, c0)
        st[...] = merge(self.xp, self.xp.stack([st, blk]), 0, self.inv_t)

    def finish_rows(self, st: Any, r0: int, r1: int) -> Any:
        go = None if self.go is None else self.go[r0:r1]
        ge = None if self.ge is None else self.ge[r0:r1]
        logp, ent, coefs = finish(self.xp, st, self.target[r0:r1], self.ignore, self.v,
                                  self.inv_t, go, ge, self.want_grad)
        self.logp[r0:r1] = logp
        self.ent[r0:r1] = ent
        return coefs

    def gradient_block(self, zs: tuple, raw: bool, st: Any, coefs: Any, r0: int, r1: int,
                       c0: int, c1: int) -> None:
        self.block_grad(zs[0], self.bias_slice(0, c0, c1), self.target[r0:r1],
                        self.xp.ascontiguousarray(st[:, 0]), coefs, raw, c0)


def run(cls: type[LinearTokenLogprobs], x2, w2, bias, target, *, ignore_index, temperature,
        softcap, want_entropy, want_grad, grad_output, grad_entropy, chunk_rows=None,
        chunk_classes=None):
    """The kernel protocol's ``linear_token_logprobs`` with the backend class ``cls``."""
    xp = cls.xp
    n, d = x2.shape
    v = w2.shape[0]
    logp, ent = xp.zeros(n, x2.dtype), xp.zeros(n, x2.dtype)
    grads = param_grads(xp, Head(x2, w2, bias)) if want_grad else None
    if n and v:
        call = cls(x2, w2, bias, target, ignore_index=ignore_value(ignore_index),
                   temperature=float(temperature), softcap=float(softcap or 0.0),
                   go=grad_output if want_grad else None,
                   ge=grad_entropy if want_grad else None, want_grad=want_grad,
                   plan=plan_chunks(n, v, d, chunk_rows, chunk_classes), logp=logp, ent=ent)
        call.sweep(grads)
    elif grads is not None:  # no logits: every row is ignored (others fail the target check)
        grads[0][...] = 0
    return logp, (ent if want_entropy else None), grads
