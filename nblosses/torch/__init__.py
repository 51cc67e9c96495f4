"""nblosses inside torch autograd: drop-in ``torch.nn.functional`` losses and softmaxes.

Each function here has torch's signature (plus nblosses' keyword-only extras where they mean
something) and is differentiable by torch autograd. The kernels are nblosses' (Numba on the
CPU, CUDA through CuPy), reached through DLPack without copies. A reduced loss computes its
gradient in the forward pass, in the same sweep over the logits as the loss; the backward pass
only scales that gradient by the upstream gradient, in place when autograd will not need it
again. Peak extra memory of a forward+backward is therefore the gradient itself, where torch
keeps the log-probabilities and then allocates the gradient (twice the logits). An unreduced
loss (``reduction="none"``) gets its gradient in backward, from the same fused sweep given the
per-position upstream gradient.

Every op is a :func:`torch.library.custom_op` (``torch.ops.nblosses.*``) with a fake
(meta) implementation and a registered backward, so ``torch.compile(fullgraph=True)`` keeps
each call as one opaque node instead of breaking the graph.

Where the functions come from: every op spec (:mod:`nblosses.ops`) whose ``autograd`` is
``SOFTMAX`` or ``FUSED_LOSS`` gets its function and custom op generated from the spec
(:mod:`nblosses.torch._generated`, by ``python -m nblosses._codegen``; the mechanism is
:mod:`nblosses.torch._autograd`). ``CUSTOM`` ops are written by hand, one module each, and
imported below: ``linear_cross_entropy`` and ``linear_distillation_loss`` (three gradients
each, the teacher's head frozen), ``token_logprobs`` (two differentiable outputs, whose
backward takes both upstream gradients) and ``linear_token_logprobs`` (both, with the head's
three gradients).

Gradients flow to ``input`` only (and, for ``linear_cross_entropy``,
``linear_distillation_loss`` and ``linear_token_logprobs``, to the (student) head's weight and
bias); ``target``, ``weight``,
``pos_weight`` and the other arrays that require grad raise
``NotImplementedError`` (torch computes no ``weight`` gradient either). There is no double
backward.

Importing this module imports torch; importing :mod:`nblosses` does not.

Examples
--------
>>> import torch
>>> import nblosses.torch as nbt
>>> logits = torch.zeros(2, 3, requires_grad=True)
>>> loss = nbt.cross_entropy(logits, torch.tensor([0, 2]))
>>> loss.backward()
>>> print(round(loss.item(), 4), logits.grad[0])
1.0986 tensor([-0.3333,  0.1667,  0.1667])
"""

from __future__ import annotations

from . import _generated
from ._generated import *  # noqa: F403  (the functions derived from the op specs)

# CUSTOM ops, written by hand: one module each.
from ._linear_ce import linear_cross_entropy
from ._linear_distillation import linear_distillation_loss
from ._linear_token_logprobs import linear_token_logprobs
from ._token_logprobs import token_logprobs

__all__ = ["linear_cross_entropy", "linear_distillation_loss", "linear_token_logprobs",
           "token_logprobs"]
__all__ += _generated.__all__
