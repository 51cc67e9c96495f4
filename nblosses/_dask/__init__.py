"""Dask arrays for every op: lazy, chunked, exact.

:mod:`nblosses._dispatch` sends a call that has a dask array among its arrays to :func:`call`
with the op's spec, the caller's arguments and the checked options (lazily: ``import
nblosses`` never imports dask). :func:`call` runs the plan the spec names (``spec.dask``, a
:data:`nblosses._spec.DaskPlan`): the same metadata checks as the eager call, at once, then a
graph of tasks, returned as lazy dask arrays. The tasks run the backend's kernels on canonical
blocks (``resolve_backend`` then ``be.kernel``, through the op family's ``execute``), never the
public functions: nothing is validated again per block, except values, which only the blocks
hold (class indices, probabilities in [0, 1]).

How chunks are computed
-----------------------
* The backend is fixed when the graph is built: the call's ``backend=``, else the current
  default (:func:`nblosses.use_backend` is context-local, so it is read here, not in the
  worker threads or processes that run the tasks). ``"auto"`` then picks per chunk by array
  type (NumPy -> ``cpu``, CuPy -> ``cuda``).
* Arrays are chunked like the input; targets, weights, ``grad_output`` are rechunked to match
  it (they are at most as large as the input), the input never is.
* Class axis (or ``dim``) in one chunk: one kernel call per block, unreduced, then a tree
  reduction (:mod:`._blockwise`, the generic plan).
* Class axis in several chunks (vocabulary-parallel): no row is gathered; per-chunk row
  statistics are merged exactly over the class chunks (:mod:`._stats`), then outputs and
  gradients are written block by block.
* ``mean`` / ``sum`` are float64 tree reductions; the ``mean`` denominator is its own reduction
  over the targets, so the gradient pass never waits for the logits' pass. Out-of-range class
  indices raise ``IndexError`` when the chunk is computed.

Adding a plan
-------------
A plan is ``plan(spec, values, options) -> result`` in a module of this package, listed in
:data:`PLANS` under its :data:`~nblosses._spec.DaskPlan` name. An op whose blocks can be
computed on their own reuses the generic plan: :func:`._blockwise.loss_plan` with a block task
that calls its family's ``execute``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._spec import DaskPlan, OpSpec
from . import (
    activations,
    binary_losses,
    class_losses,
    distillation,
    kl_divergence,
    linear_ce,
    linear_distillation,
    linear_token_statistics,
    token_statistics,
)

__all__ = ["call"]

Plan = Callable[[OpSpec, dict, dict], Any]

#: Each Dask plan name (an op spec's ``dask``) -> the function that builds its graph.
PLANS: dict[DaskPlan, Plan] = {
    "softmax": activations.plan_softmax,
    "softmax_backward": activations.plan_softmax_backward,
    "elementwise": activations.plan_elementwise,
    "class_loss": class_losses.plan_class_loss,
    "binary_loss": binary_losses.plan_binary_loss,
    "linear_ce": linear_ce.plan_linear_ce,
    "kl_div": kl_divergence.plan_kl_div,
    "distillation": distillation.plan_distillation,
    "token_logprobs": token_statistics.plan_token_logprobs,
    "linear_distillation": linear_distillation.plan_linear_distillation,
    "linear_token_logprobs": linear_token_statistics.plan_linear_token_logprobs,
}


def call(spec: OpSpec, values: dict, opts: dict) -> Any:
    """Run ``spec``'s op lazily on dask arrays (other arrays among ``values`` become one
    chunk); ``opts``: the checked options."""
    plan = PLANS.get(spec.dask) if spec.dask is not None else None
    if plan is None:
        raise NotImplementedError(f"{spec.name} does not take dask arrays yet")
    return plan(spec, values, opts)
