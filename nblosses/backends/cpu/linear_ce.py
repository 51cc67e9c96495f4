"""Linear cross-entropy (a language-model head: ``cross_entropy(x @ W.T + b, target)``) on the
CPU, with all three gradients, never materialising the ``(N, V)`` logits.

The block loop is :mod:`nblosses.backends._lm_head`'s, the loss's host side
:mod:`nblosses.backends._linear_ce`'s; here are its CPU block operations: per-block passes by
Numba kernels (:mod:`.linear_ce_kernels`, in place on the block buffer) between the products
of :mod:`.lm_head` (OpenBLAS threads), each pass on the kernel's serial build: no OpenMP
parallel region opens between two products. In a process that imported torch first, Numba's
regions run on torch's OpenMP pool, whose threads spin for milliseconds after each region
(:mod:`._parallel`), on the cores OpenBLAS's threads need for the next product. Measured on a
shared 2-core Zen 4, min of 20 calls, fwd+grad, a process per case: 256x128x[4096] torch-free
28 ms with parallel passes, 27 ms serial; torch imported first 1450-1610 ms parallel, 48 ms
serial. At 2048x256x[32000] (3 processes each, 3 calls, min): torch-free 3.1-3.5 s parallel,
2.6-3.2 s serial; torch first 4.2-4.4 s parallel, 2.6-4.4 s serial (the machine was loaded:
these take ~0.8 s on an idle one). The passes are a few percent of the call (the products are
O(N V d), the passes O(N V)), so their second core was not worth a pool that competes with
BLAS.

The per-block passes are also the kernel's block operations (:func:`block_stats`,
:func:`block_grad`: see the protocol in :mod:`nblosses.backends`), which plans holding logits
blocks themselves (Dask's) call through ``linear_cross_entropy.block_stats`` / ``.block_grad``.
"""

from __future__ import annotations

from .. import _linear_ce as G
from . import linear_ce_kernels as K
from ._parallel import guarded
from .lm_head import CpuHead


def block_stats(z, bias, target, weight, stats: dict, *, c0: int, ignore_index: int,
                n_classes: int, label_smoothing: float, softcap: float) -> None:
    """Prepare the logits block ``z`` in place and merge its row statistics into ``stats``
    (kernel protocol: ``linear_cross_entropy.block_stats``). ``ignore_index``: unused here (the
    front end checks class indices before the call)."""
    eps = label_smoothing
    if target.ndim == 2:
        K.stats_probs.serial(z, bias, softcap, target, weight, 1.0 - eps, eps / n_classes,
                             stats["m"], stats["s"], stats["a_sum"], stats["b_sum"])
    else:
        K.stats_class.serial(z, bias, softcap, target, c0, weight, eps > 0, stats["m"],
                             stats["s"], stats["xt"], stats["swx"])


def block_grad(z, bias, target, weight, m, coefs: tuple, *, c0: int, raw: bool,
               ignore_index: int, n_classes: int, label_smoothing: float,
               softcap: float) -> None:
    """Overwrite the block ``z`` with ``dL/dz`` (kernel protocol:
    ``linear_cross_entropy.block_grad``)."""
    coef, b, a = coefs
    eps = label_smoothing
    if target.ndim == 2:
        K.grad_probs.serial(z, bias, softcap, raw, target, weight, 1.0 - eps, eps / n_classes, m,
                            coef, b)
    else:
        K.grad_class.serial(z, bias, softcap, raw, target, c0, ignore_index, weight, m, coef, b,
                            a)


class _CpuLinearCE(CpuHead, G.LinearCE):
    """The loss's block operations on the CPU."""

    def merge(self, step: int, zs: tuple, raw: bool, st: dict, r0: int, r1: int, c0: int,
              c1: int) -> None:
        bias, t, w, kw = self.block_args(r0, r1, c0, c1)
        block_stats(zs[0], bias, t, w, st, **kw)

    def gradient_block(self, zs: tuple, raw: bool, st: dict, coefs, r0: int, r1: int, c0: int,
                       c1: int) -> None:
        bias, t, w, kw = self.block_args(r0, r1, c0, c1)
        block_grad(zs[0], bias, t, w, st["m"], coefs, raw=raw, **kw)


@guarded
def linear_cross_entropy(x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse,
                         chunk_rows=None, chunk_classes=None):
    """``cross_entropy(x2 @ w2.T + bias, target)`` and its gradients, chunked.

    Kernel protocol: ``x2`` ``(N, d)``, ``w2`` ``(V, d)``, ``bias`` ``(V,)`` or None, all of
    the compute dtype and C-contiguous; ``target`` ``(N,)`` int64 class indices (each in
    ``[0, V)`` or ``ignore_index``) or ``(N, V)`` probabilities; ``weight`` ``(V,)`` or None.
    ``softcap`` 0.0 is off; ``z_loss`` adds ``z_loss * lse**2`` per kept row.
    ``grad_output``: None unless ``want_grad``; a float for reduced losses, ``(N,)`` for
    ``"none"``. ``chunk_rows`` / ``chunk_classes`` override the block shape
    (:func:`nblosses.backends._lm_head.plan_chunks`).

    Returns ``(loss, lse, grads)``: ``loss`` 0-d or ``(N,)``, ``lse`` ``(N,)`` (every row) or
    None, ``grads`` ``(grad_x, grad_w, grad_bias or None)`` or None.
    """
    return G.run(_CpuLinearCE, x2, w2, bias, target, weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
                 softcap=softcap, want_grad=want_grad, grad_output=grad_output,
                 want_lse=want_lse, chunk_rows=chunk_rows, chunk_classes=chunk_classes)


# The block operations of the protocol, reached as attributes of the kernel (each guarded
# itself; the driver above calls the unguarded functions inside its own guarded call).
vars(linear_cross_entropy).update(block_stats=guarded(block_stats),
                                  block_grad=guarded(block_grad))
