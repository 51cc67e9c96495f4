"""Built-in backends and the kernel protocol every backend implements.

Importing this package registers the built-in backends (:class:`CpuBackend`, :class:`CudaBackend`)
by name only; their kernel packages are imported on first use (:meth:`Backend.build`).

Kernel protocol
---------------
Kernels receive *canonical* arguments, already validated by :mod:`nblosses._args`: arrays of the
backend's own type, C-contiguous, of one of the backend's ``native_dtypes`` (the "compute
dtype"); targets as int64. Kernels allocate their outputs (unless given ``grad_buffer``), never
write to their inputs, and return arrays of the compute dtype. ``reduction`` is one of
``"none"``, ``"mean"``, ``"sum"``. Reduced losses are 0-d arrays.

The built-in backends write the host side of a loss once, in :mod:`nblosses.backends._host`
(:class:`~nblosses.backends._host.LossCall`: outputs, the upstream gradient over the ``mean``
denominator, empty inputs, the reduced result), and the cross-entropy's per-position algebra
once, in :mod:`nblosses.backends._formulas`; a third-party backend may use them too.

Softmax family (``x3`` is the input viewed as ``(outer, C, inner)``, reduction over ``C``)::

    softmax(x3) -> y3
    log_softmax(x3) -> y3
    softmax_backward(g3, y3) -> gx3        # y * (g - sum_C(g * y))
    log_softmax_backward(g3, y3) -> gx3    # g - exp(y) * sum_C(g)
    sigmoid(x1) -> y1                      # flat arrays
    sigmoid_backward(g1, y1) -> gx1
    logsumexp(x3, out=None) -> lse2        # log(sum_C(exp(x))), shape (outer, inner)

``logsumexp`` is the row statistic that plans merge across chunks (Dask's softmax along a
chunked ``dim``): computed as ``m + log(sum_C(exp(x - m)))`` with ``m`` the slice's max; a slice
of only ``-inf`` (or of no element) gives ``-inf``, one holding NaN or ``+inf`` gives NaN, as
softmax makes such a slice NaN (``torch.logsumexp`` gives ``+inf`` there). ``out``, a float64
``(outer, inner)`` array, receives the result in float64 instead of the compute dtype
(statistics merged later keep every digit).

Class losses (``x3`` is ``(N, C, inner)``; a ``(C,)`` input arrives as ``(1, C, 1)``)::

    nll_loss(x3, t2, weight, *, ignore_index, reduction, want_grad, grad_output, grad_buffer)
    cross_entropy(x3, t2, weight, *, ignore_index, label_smoothing, reduction, want_grad,
                  grad_output, grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None)
    cross_entropy_probs(x3, p3, weight, *, label_smoothing, reduction, want_grad, grad_output,
                        grad_buffer, z_loss=0.0, softcap=0.0, lse_out=None)

``t2`` is ``(N, inner)`` int64; every value is in ``[0, C)`` or equal to ``ignore_index``, unless
the runtime's ``kernel_checks`` holds ``"class_index"``: then its kernels meet unchecked
values, must never use one as an address, give that position a NaN loss and gradient, and
record it for the runtime's ``poll_errors`` / ``synchronize``. ``p3`` holds class
probabilities, same shape and dtype as ``x3``. ``weight`` is ``(C,)`` or ``None``.
``grad_output`` is ``None`` unless ``want_grad``; then a Python float for reduced losses, an
``(N, inner)`` array for ``"none"``.
``grad_buffer`` is ``None`` or an ``(N, C, inner)`` array the gradient is written into; it may
be ``x3`` itself (the kernel must then read each logit before overwriting it). The options
beyond torch are passed only when not at their defaults: ``softcap`` ``c > 0`` replaces each
logit by ``c * tanh(x / c)`` first; ``z_loss`` ``z`` adds ``z * lse**2`` to each non-ignored
position's loss (not class-weighted, reduced like the loss); ``lse_out``, an ``(N, inner)``
array of the compute dtype, receives every position's logsumexp. Return ``(loss, grad)``:
``loss`` 0-d or ``(N, inner)``; ``grad`` ``(N, C, inner)`` or ``None``.

Token log-probabilities (``x3``, ``t2`` as for the class losses, indices checked likewise)::

    token_logprobs(x3, t2, *, ignore_index, temperature, softcap, want_entropy, want_grad,
                   grad_output, grad_entropy, grad_buffer)

Per position, with ``z = cap(x) / temperature`` (``softcap`` ``c > 0``: ``cap(x) = c tanh(x /
c)``; 0.0: none) and ``p = softmax(z)`` over ``C``: ``logp = log p_t`` (at most 0) and
``entropy = -sum_c p_c log p_c`` (in ``[0, log C]``; a logit of ``-inf`` adds 0); both 0 where
the target is ``ignore_index``, NaN where a device kernel meets a bad index. ``grad_output`` /
``grad_entropy`` are ``None`` (ones / zeros) or ``(N, inner)`` arrays of the statistics' dtype,
read only with ``want_grad``; the gradient is that of ``sum(grad_output * logp + grad_entropy *
entropy)``, into ``grad_buffer`` as above (it may be ``x3``). Return ``(logp, entropy, grad)``:
``logp`` ``(N, inner)`` in the compute dtype, float32 for half-precision inputs; ``entropy``
likewise, or ``None`` unless ``want_entropy``; ``grad`` ``(N, C, inner)`` or ``None``.

Linear layer + cross-entropy (``x2`` ``(N, d)``, ``w2`` ``(V, d)``, never forming ``(N, V)``)::

    linear_cross_entropy(x2, w2, bias, target, weight, *, ignore_index, label_smoothing,
                         reduction, z_loss, softcap, want_grad, grad_output, want_lse,
                         chunk_rows=None)

``target`` is ``(N,)`` int64 (checked as above) or ``(N, V)`` probabilities. Return
``(loss, lse, grads)``: ``lse`` ``(N,)`` or ``None``; ``grads`` ``(grad_x, grad_w, grad_bias)``
(``grad_bias`` ``None`` without a bias) or ``None``.

Its block operations, attributes of the ``linear_cross_entropy`` kernel, serve plans that hold
blocks of logits themselves (Dask's cross-entropy with the class axis in chunks, its linear
cross-entropy) with the kernel's own statement of the statistics and of the gradient::

    linear_cross_entropy.block_stats(z, bias, target, weight, stats, *, c0, ignore_index,
                                     n_classes, label_smoothing, softcap)
    linear_cross_entropy.block_grad(z, bias, target, weight, m, coefs, *, c0, raw,
                                    ignore_index, n_classes, label_smoothing, softcap)

``z`` is a C-contiguous ``(R, Vc)`` block (float32 or float64) of the classes ``c0:c0+Vc`` of
``n_classes``: raw products (``x @ W.T``, no bias) or logits; ``bias`` / ``weight`` its
``(Vc,)`` slices or ``None``; ``target`` the rows' ``(R,)`` class indices (checked) or the
block's ``(R, Vc)`` probabilities. ``block_stats`` turns ``z`` into the loss's logits in place
(bias added, then ``softcap``) and merges each row's statistics into ``stats``, float64 ``(R,)``
arrays by name: ``m`` (running max), ``s`` (sum of ``exp(z - m)``), then ``xt`` (the target's
logit, where the block holds it) and ``swx`` (``sum_c w_c z_c``, with label smoothing) for
class indices, ``a_sum`` / ``b_sum`` (``sum_c w_c y'_c`` / ``sum_c w_c y'_c z_c``,
``y' = y (1 - eps) + eps / V``) for probabilities. ``block_grad`` overwrites ``z`` (``raw``:
still raw products) with ``dL/dz`` given the rows' merged max ``m`` and ``coefs = (coef, b, a)``
of :func:`nblosses.backends._linear_ce.finish_class` / ``finish_probs`` (``a`` unused for
probabilities); rows whose target is ``ignore_index`` become zero. A backend without them
serves every call but dask arrays split along the class axis.

Binary losses (flat arrays of equal length; ``weight`` / ``pos_weight`` flat of that length or
``None``)::

    binary_cross_entropy(x, y, weight, *, reduction, want_grad, grad_output)
    binary_cross_entropy_with_logits(x, y, weight, pos_weight, *, reduction, want_grad,
                                     grad_output)

Both return ``(loss, grad)`` with ``loss`` 0-d or flat, ``grad`` flat or ``None``.

KL divergence (flat arrays of equal length: the target already broadcast to the input's)::

    kl_div(x, t, *, log_target, reduction, want_grad, grad_output, grad_buffer)

torch's elementwise ``xlogy(t, t) - t x`` (``log_target``: ``exp(t) (t - x)``); the front end
turns ``"batchmean"`` into ``"sum"`` and its division. ``grad_buffer`` is ``None`` or flat of
``x``'s length, and may be ``x``. A ``+inf`` log-target has no meaning: a host kernel raises
``ValueError`` after its pass; a device kernel gives it a NaN loss and gradient and records it
(error-record kind 2) for ``poll_errors`` / ``synchronize``. Returns ``(loss, grad)`` as the
binary losses.

Distillation (``x3`` the student logits ``(N, C, inner)``; ``t2`` ``(N, inner)`` int64 class
indices or ``None``)::

    distillation(x3, teacher3, t2, *, beta, temperature, ignore_index, hard_weight, softcap,
                 reduction, want_grad, grad_output, grad_buffer)
    distillation_topk(x3, idx3, lp3, t2, *, temperature, ignore_index, hard_weight, softcap,
                      reduction, want_grad, grad_output, grad_buffer)

``teacher3`` the teacher logits (``x3``'s shape and dtype); ``idx3`` ``(N, k, inner)`` int64 and
``lp3`` ``(N, k, inner)`` of ``x3``'s dtype, the top-k teacher. ``beta`` in ``[0, 1]`` (0
forward KL, 1 reverse KL, else the JSD), ``temperature > 0``, ``hard_weight`` in ``[0, 1]``
(``> 0`` only with ``t2``), ``softcap`` 0.0 (off) or ``> 0``. ``mean`` divides by the positions
whose target is not ``ignore_index`` (every position without ``t2``). Targets that are neither
ignored nor in ``[0, C)``, and top-k indices outside ``[0, C)``, are checked as the class
losses' (eagerly, or by the kernels when ``kernel_checks`` holds ``"class_index"``).
``grad_buffer`` as the class losses' (it may be ``x3``). Return ``(loss, grad)``: ``loss`` 0-d or
``(N, inner)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .._registry import Backend, Runtime, register_backend
from ..errors import BackendUnavailableError
from ..ops import kernel_modules

__all__ = ["KERNEL_MODULES", "CpuBackend", "CudaBackend", "collect_kernels"]

#: Each kernel of the protocol -> the module, in every built-in backend package, that defines
#: a function of that name (from the op specs: each names its kernels and their module).
KERNEL_MODULES = kernel_modules()


def collect_kernels(package: str) -> dict[str, Callable[..., Any]]:
    """The kernels of a built-in backend package, by name (imports its kernel modules)."""
    return {op: getattr(importlib.import_module(f"{package}.{module}"), op)
            for op, module in KERNEL_MODULES.items()}


class CpuBackend(Backend):
    """NumPy arrays, Numba kernels (``parallel=True``, compiled on first use, cached on disk)."""

    name = "cpu"
    array_modules = ("numpy",)
    fallback = True  # lists, scalars and unknown array-likes become NumPy arrays
    install_hint = "pip install numba"

    def build(self) -> Runtime:
        from . import cpu

        return cpu.runtime(self)


class CudaBackend(Backend):
    """CuPy arrays, CUDA C++ kernels compiled by NVRTC on first use."""

    name = "cuda"
    array_modules = ("cupy",)
    native_dtypes = ("float16", "bfloat16", "float32", "float64")
    install_hint = "pip install 'nblosses[cuda12]' or 'nblosses[cuda13]' (matching your driver)"

    def check(self) -> None:
        """Fail early, with the extra to install, when CuPy, a driver or a device is missing."""
        try:
            import cupy
        except ImportError as exc:
            raise BackendUnavailableError(
                f"backend 'cuda' needs CuPy: {self.install_hint}") from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError when no driver is present
            raise BackendUnavailableError(
                f"backend 'cuda': no CUDA device or driver was found (CuPy says: {exc})") from exc
        if count < 1:
            raise BackendUnavailableError("backend 'cuda': no CUDA device or driver was found")

    def build(self) -> Runtime:
        from . import cuda

        return cuda.runtime(self)


register_backend(CpuBackend())
register_backend(CudaBackend())
