"""linear_distillation_loss's per-row algebra, written once for every backend: the row
statistics of the student's and the teacher's logits blocks, their merge over vocabulary
blocks, and each row's loss and gradient coefficients.

Pure array arithmetic over a namespace ``xp`` (NumPy or CuPy, and Dask's blocks): the CPU and
CUDA heads and the Dask plan call it on float64 vectors of rows; the block kernels
(``backends/<cpu|cuda>/linear_distillation``) produce the statistics and apply the
coefficients along the rows. The divergences and their gradient identities are
``distillation_loss``'s (:mod:`nblosses.backends.cpu.distillation`): with ``sc = cap(s)``,
``zs = sc / T`` (likewise ``zt`` of the teacher), ``p_s``, ``p_t`` their softmaxes, a block
reduces each row to, relative to the block's own maxima (:data:`STATS`)::

    xs, xt  the maxima of the capped logits (the tempered maxima are xs / T, xt / T)
    ss, st  sum exp(zs - xs / T), sum exp(zt - xt / T)
    w       the divergence's own sum: forward KL sum e_t (zt - zs) (relative to xt),
            reverse KL sum e_s (zs - zt) (relative to xs); 0 for the JSD
    sh      sum exp(sc - xs): the hard cross-entropy's untempered softmax, when T != 1
    xst     the capped student logit at the row's target (where the block holds it)

and the JSD, which needs both normalised distributions per element, sums in a second pass
over the logits (given ``lse_s``, ``lse_t``) ``j = sum_c beta p_t log(p_t / m) + (1 - beta)
p_s log(p_s / m)`` and ``k = KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``.

:func:`finish` turns a row's merged sums into its loss and :data:`COEFS`, the per-row
coefficients of the gradient the block kernels apply (``distillation``'s ``RowCoef``, plus
``onehot``, the hard loss's weight at the target)::

    dL/ds_c = (es (a [* (zs - zt - k) | * (log(p_s / m) - k)] + h) - b et + c eh
               - onehot [c == target]) (1 - (sc_c / cap)^2)

with ``es = exp(zs - ms)``, ``et = exp(zt - mt)``, ``eh = exp(sc - hm)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: The row statistics of a block (columns of a float64 ``(R, 7)`` array).
STATS = ("xs", "ss", "xt", "st", "w", "sh", "xst")
XS, SS, XT, ST, W, SH, XST = range(len(STATS))
#: The JSD's second-pass sums (columns of a float64 ``(R, 2)`` array), added over blocks.
JSD_SUMS = ("j", "k")
#: The gradient's per-row coefficients (columns of a float64 ``(R, 11)`` array).
COEFS = ("ms", "mt", "hm", "a", "b", "c", "h", "k", "lse_s", "lse_t", "onehot")
#: The divergences, as ``beta`` picks them.
FORWARD, REVERSE, JSD = "forward", "reverse", "jsd"


@dataclass(frozen=True)
class DistillOptions:
    """A call's checked options, as the per-row algebra and the block kernels take them."""

    beta: float
    temperature: float
    hard_weight: float
    softcap: float  # 0.0: off
    ignore_index: int

    @property
    def mode(self) -> str:
        """:data:`FORWARD` (``beta == 0``), :data:`REVERSE` (``beta == 1``) or :data:`JSD`."""
        return FORWARD if self.beta == 0 else REVERSE if self.beta == 1 else JSD

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature

    @property
    def separate(self) -> bool:
        """Whether the hard loss needs its own softmax (it is on and ``T != 1``)."""
        return self.hard_weight > 0 and self.temperature != 1.0


def new_stats(xp: Any, rows: int) -> Any:
    """Statistics of no logits yet: maxima ``-inf``, sums 0."""
    st = xp.zeros((rows, len(STATS)), xp.float64)
    st[:, XS] = st[:, XT] = -math.inf
    return st


def _factor(xp: Any, m: Any, new: Any, scale: float) -> Any:
    """``exp((m - new) scale)``, 0 where ``m`` is ``-inf`` (no logits yet: no NaN from
    ``-inf - -inf``)."""
    with_logits = m > -math.inf
    return xp.where(with_logits, xp.exp(xp.where(with_logits, m - new, 0.0) * scale), 0.0)


def merge(xp: Any, acc: Any, blk: Any, opts: DistillOptions) -> None:
    """Fold a block's statistics ``blk`` into the running ``acc`` (both ``(R, 7)``), in
    place: each sum rescaled to the larger maximum (online softmax). ``xst`` is taken from the
    block where the block holds the target (:func:`nblosses.backends.cpu.linear_distillation`
    leaves it NaN elsewhere)."""
    it = opts.inv_t
    xs = xp.fmax(acc[:, XS], blk[:, XS])
    xt = xp.fmax(acc[:, XT], blk[:, XT])
    fs_old, fs_new = _factor(xp, acc[:, XS], xs, it), _factor(xp, blk[:, XS], xs, it)
    ft_old, ft_new = _factor(xp, acc[:, XT], xt, it), _factor(xp, blk[:, XT], xt, it)
    acc[:, SS] = acc[:, SS] * fs_old + blk[:, SS] * fs_new
    acc[:, ST] = acc[:, ST] * ft_old + blk[:, ST] * ft_new
    if opts.mode == FORWARD:
        acc[:, W] = acc[:, W] * ft_old + blk[:, W] * ft_new
    elif opts.mode == REVERSE:
        acc[:, W] = acc[:, W] * fs_old + blk[:, W] * fs_new
    if opts.separate:
        acc[:, SH] = (acc[:, SH] * _factor(xp, acc[:, XS], xs, 1.0)
                      + blk[:, SH] * _factor(xp, blk[:, XS], xs, 1.0))
    acc[:, XST] = xp.where(xp.isnan(blk[:, XST]), acc[:, XST], blk[:, XST])
    acc[:, XS] = xs
    acc[:, XT] = xt


def log_sums(xp: Any, st: Any, opts: DistillOptions) -> tuple[Any, Any]:
    """``(lse_s, lse_t)``: the logsumexps of the tempered logits, from merged statistics."""
    it = opts.inv_t
    return st[:, XS] * it + xp.log(st[:, SS]), st[:, XT] * it + xp.log(st[:, ST])


def kept_rows(xp: Any, target: Any, rows: int, ignore_index: int) -> Any:
    """Rows that count (float64 1/0): those whose target is not ``ignore_index``; every row
    without a target."""
    if target is None:
        return xp.ones(rows, xp.float64)
    return (target != ignore_index).astype(xp.float64)


def finish(xp: Any, st: Any, jsd: Any, target: Any, n_classes: int, opts: DistillOptions,
           scale: Any, want_grad: bool) -> tuple[Any, Any]:
    """``(loss, coefs)`` of a row chunk from its merged statistics ``st`` ``(R, 7)`` and, for
    the JSD, its summed ``jsd`` ``(R, 2)`` (else ``None``): ``loss`` float64 ``(R,)``, 0 on
    ignored rows; ``coefs`` ``(R, 11)`` (:data:`COEFS`, zero on ignored rows) or ``None``
    without a gradient. ``scale``: the rows' upstream gradient (over the ``mean``
    denominator), a scalar or ``(R,)``. A target outside ``[0, n_classes)`` that is not
    ``ignore_index`` (possible only where a device checks them in its kernels) gives its row a
    NaN loss and NaN coefficients."""
    rows = st.shape[0]
    kept = kept_rows(xp, target, rows, opts.ignore_index)
    bad = (xp.zeros(rows, bool) if target is None
           else (kept > 0) & ((target < 0) | (target >= n_classes)))
    it, hard, soft_w = opts.inv_t, opts.hard_weight, 1.0 - opts.hard_weight
    lse_s, lse_t = log_sums(xp, st, opts)
    kk = xp.zeros(rows, xp.float64)
    if opts.mode == FORWARD:
        soft = st[:, W] / st[:, ST] - lse_t + lse_s
    elif opts.mode == REVERSE:
        kk = st[:, W] / st[:, SS]
        soft = kk - lse_s + lse_t
    else:
        soft, kk = jsd[:, 0], jsd[:, 1]
    loss = soft_w * soft
    if hard > 0:
        lse_h = st[:, XS] + xp.log(st[:, SH]) if opts.separate else lse_s
        loss = loss + hard * (lse_h - st[:, XST])
    loss = xp.where(bad, math.nan, xp.where(kept > 0, loss, 0.0))
    if not want_grad:
        return loss, None
    sc = kept * scale  # ignored rows: no gradient (and no inf * 0)
    g = sc * soft_w * it
    coefs = xp.zeros((rows, len(COEFS)), xp.float64)
    coefs[:, 0], coefs[:, 1], coefs[:, 2] = st[:, XS] * it, st[:, XT] * it, st[:, XS]
    coefs[:, 3] = g / st[:, SS] * ((1.0 - opts.beta) if opts.mode == JSD else 1.0)
    coefs[:, 4] = g / st[:, ST]
    if opts.separate:
        coefs[:, 5] = sc * hard / st[:, SH]
    else:
        coefs[:, 6] = sc * hard / st[:, SS]
    coefs[:, 7], coefs[:, 8], coefs[:, 9] = kk, lse_s, lse_t
    coefs[:, 10] = sc * hard
    coefs = xp.where(kept[:, None] > 0, coefs, 0.0)
    return loss, xp.where(bad[:, None], math.nan, coefs)
