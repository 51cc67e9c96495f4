"""nblosses inside JAX: the softmax family, the fused losses and the token statistics under
``jax.jit``, ``jax.grad`` and ``jax.vmap``.

Every op spec (:mod:`nblosses.ops`) whose ``autograd`` is ``SOFTMAX`` or ``FUSED_LOSS`` gets a
function here, generated from the spec (:mod:`nblosses.jax._generated`, by
``python -m nblosses._codegen``): torch's signature without its legacy arguments, plus
nblosses' keyword-only extras that mean something under differentiation (``z_loss``,
``softcap``...). The ``CUSTOM`` ones are written by hand: :func:`token_logprobs`, per-token
log-probabilities and entropies with both outputs differentiable (its backward runs the fused
kernel once with both cotangents; :mod:`nblosses.jax._token_logprobs`), and the language-model
heads :func:`linear_cross_entropy`, :func:`linear_distillation_loss` and
:func:`linear_token_logprobs`, differentiable with respect to ``input``, ``linear_weight`` and
``linear_bias`` without ever forming the ``(N, V)`` logits (the reduced losses compute the
three gradients in the loss's chunked sweep; :mod:`nblosses.jax._lm_heads`).

Each call is one XLA custom call into nblosses' CPU kernels that reads XLA's buffers in place
and writes its results into XLA's output buffers (:mod:`nblosses.jax._bridge`: an FFI target,
not :func:`jax.pure_callback`, whose copies cost ~15x the kernel at 512x[32000]). Reduced
losses compute their gradient in the same pass as the loss and keep it as the residual, so
``value_and_grad`` costs one sweep over the logits; unreduced losses get their gradient in
backward from the same fused sweep given the cotangents; the softmaxes keep their output and
call nblosses' gradient ops (:mod:`nblosses.jax._autodiff`).

Conventions are torch's, as everywhere in nblosses: the class axis is axis 1 of an
``(N, C, d1, ...)`` input (axis 0 of a ``(C,)`` one), class-index targets are integers,
``reduction`` is ``"mean"``, ``"sum"`` or ``"none"`` (``"batchmean"`` too for ``kl_div``).
Options are static (Python values); gradients flow to ``input`` only (and the LM heads'
``linear_weight`` and ``linear_bias``; none to targets, class weights or a teacher); no higher
derivatives. Under ``jax.vmap`` the call runs once per batch element.

Scope: the kernels run on the host. On a GPU backend the call goes through
:func:`jax.pure_callback` instead (the arrays travel to the host and back); outside ``jit``,
JAX GPU arrays can go straight to :mod:`nblosses.functional` (DLPack, the ``"cuda"`` backend,
no copies).

Importing this module imports JAX; importing :mod:`nblosses` does not.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> import nblosses.jax as nbj
>>> x = jnp.zeros((2, 3))
>>> t = jnp.array([0, 2])
>>> loss, grad = jax.jit(jax.value_and_grad(nbj.cross_entropy))(x, t)
>>> import numpy as np
>>> print(round(float(loss), 4), np.asarray(grad[0]).round(4))
1.0986 [-0.3333  0.1667  0.1667]
"""

from __future__ import annotations

from . import _generated
from ._generated import *  # noqa: F403  (the functions derived from the op specs)
from ._lm_heads import linear_cross_entropy, linear_distillation_loss, linear_token_logprobs
from ._token_logprobs import token_logprobs

__all__ = [*_generated.__all__, "linear_cross_entropy", "linear_distillation_loss",
           "linear_token_logprobs", "token_logprobs"]
