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

from ._host import LossCall, ignore_value
from ._linear_ce import _kept, mean_denominator, mean_of
from ._lm_head import ChunkedHead, Head, Plan, param_grads, plan_chunks

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
    if target is None:  # every row counts
        kept, bad = xp.ones(rows, bool), xp.zeros(rows, bool)
    else:
        kept, bad = _kept(xp, target, opts.ignore_index, n_classes)
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
    loss = xp.where(bad, math.nan, xp.where(kept, loss, 0.0))
    if not want_grad:
        return loss, None
    sc = xp.where(kept, scale, 0.0)  # ignored rows: no gradient (and no inf * 0)
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
    coefs = xp.where(kept[:, None], coefs, 0.0)
    return loss, xp.where(bad[:, None], math.nan, coefs)


# ----------------------------------------------------------------------------- the loss
class LinearDistillation(ChunkedHead):
    """One call on the chunked LM-head driver (:mod:`._lm_head`): the student's head first
    (differentiated), the teacher's second; its statistics, outputs and per-row finish. A
    backend's class adds the block kernels (:meth:`block_stats`, :meth:`block_jsd`,
    :meth:`block_grad`) and the driver's backend hooks.

    ``scale``: the upstream gradient (a float or 0-d array over the ``mean`` denominator, or
    the rows' ``(N,)`` array for ``"none"``); ``losses``: the ``(N,)`` array receiving each
    row's loss, or None. :attr:`total` sums the losses (float64; a 0-d array on a device).
    """

    def __init__(self, student: Head, teacher: Head, target: Any, opts: DistillOptions,
                 plan: Plan, *, scale: Any, want_grad: bool, losses: Any) -> None:
        super().__init__((student, teacher), plan)
        self.target, self.opts = target, opts
        self.scale, self.want_grad, self.losses = scale, want_grad, losses
        self.total: Any = 0.0

    # -- the backend's block kernels -----------------------------------------------------
    def block_stats(self, zs: Any, zt: Any, bs: Any, bt: Any, target: Any, c0: int,
                    r0: int) -> Any:
        """Prepare the blocks in place; their rows' statistics ``(R, 7)``."""
        raise NotImplementedError

    def block_jsd(self, zs: Any, zt: Any, bs: Any, bt: Any, lse: Any, out: Any,
                  raw: bool) -> None:
        """``out += (J, K)`` of the blocks' rows."""
        raise NotImplementedError

    def block_grad(self, zs: Any, zt: Any, bs: Any, bt: Any, target: Any, coefs: Any, c0: int,
                   raw: bool) -> None:
        """Overwrite ``zs`` with ``dL/ds``."""
        raise NotImplementedError

    # -- the driver's loss hooks ---------------------------------------------------------
    def _rows(self, r0: int, r1: int) -> Any:
        return None if self.target is None else self.target[r0:r1]

    def _biases(self, c0: int, c1: int) -> tuple[Any, Any]:
        return self.bias_slice(0, c0, c1), self.bias_slice(1, c0, c1)

    def start_rows(self, r0: int, r1: int) -> list:
        """``[statistics, JSD sums or None, the rows' (lse_s, lse_t) once known]``."""
        jsd = self.xp.zeros((r1 - r0, len(JSD_SUMS)), self.xp.float64) \
            if self.opts.mode == JSD else None
        return [new_stats(self.xp, r1 - r0), jsd, None]

    def merge(self, step: int, zs: tuple, raw: bool, st: list, r0: int, r1: int, c0: int,
              c1: int) -> None:
        """Pass 0: the statistics; pass 1 (the JSD's): its sums, given the logsumexps."""
        zs_, zt_ = zs
        bs, bt = self._biases(c0, c1)
        if step == 0:
            merge(self.xp, st[0], self.block_stats(zs_, zt_, bs, bt, self._rows(r0, r1), c0, r0),
                  self.opts)
            return
        if st[2] is None:
            st[2] = self.xp.stack(log_sums(self.xp, st[0], self.opts), axis=1)
        self.block_jsd(zs_, zt_, bs, bt, st[2], st[1], raw)

    def finish_rows(self, st: list, r0: int, r1: int) -> Any:
        """The rows' losses recorded; returns their gradient coefficients (None without a
        gradient)."""
        scale = self.scale
        sc = scale if getattr(scale, "ndim", 0) == 0 else self.xp.asarray(scale[r0:r1],
                                                                          self.xp.float64)
        loss, coefs = finish(self.xp, st[0], st[1], self._rows(r0, r1), self.v, self.opts, sc,
                             self.want_grad)
        self.total = self.total + loss.sum()  # stays on the device for CuPy
        if self.losses is not None:
            self.losses[r0:r1] = loss
        return coefs

    def gradient_block(self, zs: tuple, raw: bool, st: list, coefs: Any, r0: int, r1: int,
                       c0: int, c1: int) -> None:
        zs_, zt_ = zs
        bs, bt = self._biases(c0, c1)
        self.block_grad(zs_, zt_, bs, bt, self._rows(r0, r1), coefs, c0, raw)


#: Each backend class -> its JSD subclass (made once).
_JSD_CLASSES: dict[type[LinearDistillation], type[LinearDistillation]] = {}


def _two_passes(cls: type[LinearDistillation]) -> type[LinearDistillation]:
    """``cls`` for the JSD: a second statistics pass (its sums need the logsumexps)."""
    if cls not in _JSD_CLASSES:
        _JSD_CLASSES[cls] = type(f"{cls.__name__}JSD", (cls,), {"passes": 2})
    return _JSD_CLASSES[cls]


def run(cls: type[LinearDistillation], x2, w2, bias, tx2, tw2, tbias, target, *, beta,
        temperature, ignore_index, hard_weight, softcap, reduction, want_grad, grad_output,
        chunk_rows=None, chunk_classes=None):
    """The kernel protocol's ``linear_distillation_loss`` with the backend class ``cls``:
    ``(loss, grads)``, ``grads`` the student's ``(grad_x, grad_W, grad_b or None)`` or None."""
    xp = cls.xp
    n, d = x2.shape
    v = w2.shape[0]
    opts = DistillOptions(float(beta), float(temperature), float(hard_weight), float(softcap),
                          ignore_value(ignore_index))
    denom = 1.0
    if reduction == "mean":
        denom = float(n) if target is None else mean_denominator(
            xp, target, None, opts.ignore_index, to_host=cls.host_scalars)
    host = LossCall(xp, (n, d), (n,), x2.dtype, reduction=reduction, want_grad=want_grad,
                    grad_output=grad_output, denom=denom)
    student, teacher = Head(x2, w2, bias), Head(tx2, tw2, tbias)
    grads = param_grads(xp, student, host.grad) if want_grad else None
    total: Any = 0.0
    if n == 0 or v == 0:
        host.fill_empty()
    else:
        plan = plan_chunks(n, v, d, chunk_rows, chunk_classes, heads=2)
        kind = _two_passes(cls) if opts.mode == JSD else cls
        call = kind(student, teacher, target, opts, plan,
                    scale=host.g_scalar if host.g_rows is None else host.g_rows,
                    want_grad=want_grad, losses=host.losses)
        call.sweep(grads)
        total = call.total
    if reduction == "none":
        return host.losses, grads
    if reduction == "mean":
        total = mean_of(xp, total, denom)
    return xp.asarray(total, dtype=x2.dtype), grads
