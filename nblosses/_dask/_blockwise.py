"""The generic plan: one kernel call per block, per-position results, then a tree reduction.

It serves every op whose blocks can be computed on their own: the class axis (if any) in one
chunk, elementwise losses, per-token outputs. A plan module that uses it supplies

- its checks and rechunking, run once when the graph is built (metadata only);
- a *block task* ``task(*blocks, g, **options) -> tuple of arrays``: it builds canonical arrays
  from its blocks (reshapes and casts, no validation) and calls its family's ``execute``
  (one kernel call) with ``reduction="none"``, ``g`` being the block of the upstream gradient
  (``None``: ones; a float: a reduced loss's ``grad_output / denominator``, see
  :func:`._common.grad_arg`);
- a :class:`Result` per array the task returns, the per-position loss first.

:func:`loss_plan` then returns ``[loss, *others]``: the loss cast (``"none"``) or summed in
float64 and divided (``"mean"``), the others as the tasks made them (a gradient, a logsumexp).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from .._registry import Runtime
from ._common import ABSENT, meta, pick, reduce_loss


@dataclass(frozen=True)
class Result:
    """One array a block task returns: its blockwise index and dtype, the lengths of the axes
    of that index that no argument has (``new_axes``) and the block lengths along axes where
    they differ from the arguments' (``chunks``, as blockwise's ``adjust_chunks``: a task's
    partial result along a chunked axis is 1 long)."""

    index: str
    dtype: Any
    new_axes: Mapping[str, int] = field(default_factory=dict)
    chunks: Mapping[str, Any] = field(default_factory=dict)


def run_blocks(task: Callable[..., Any], args: Sequence[tuple[Any, Any]],
               results: Sequence[Result], be: Runtime, **options: Any) -> list[Any]:
    """``task(*blocks, **options)`` once per block of ``args`` (blockwise ``(array, index)``
    pairs; :data:`._common.ABSENT` passes ``None``): one dask array per :class:`Result`.
    ``options`` must not use the names of blockwise's own keywords (``name``, ``dtype``,
    ``meta``...).

    The tasks are keyed by the first result's index; an axis of an argument missing from it
    (a class axis in one chunk) reaches the task as a list of one block (see
    :func:`._common.unwrap`).
    """
    flat = [v for a in args for v in a]
    first = results[0]
    if len(results) == 1:
        return [da.blockwise(task, first.index, *flat, new_axes=dict(first.new_axes),
                             adjust_chunks=dict(first.chunks), concatenate=False,
                             align_arrays=False, meta=meta(be, len(first.index), first.dtype),
                             **options)]
    tup = da.blockwise(task, first.index, *flat, new_axes=dict(first.new_axes),
                       concatenate=False, align_arrays=False,
                       meta=np.empty((0,) * len(first.index), dtype=object), **options)
    return [da.blockwise(pick, r.index, tup, first.index, i, None,
                         new_axes={k: n for k, n in r.new_axes.items() if k not in first.index},
                         adjust_chunks=dict(r.chunks), meta=meta(be, len(r.index), r.dtype))
            for i, r in enumerate(results)]


def loss_plan(task: Callable[..., Any], args: Sequence[tuple[Any, Any]], *, be: Runtime,
              loss: Result, others: Sequence[Result] = (), reduction: str, denom: Any,
              dtype: Any, grad: tuple[Any, Any] | None = None, **options: Any) -> list[Any]:
    """The generic plan (see the module docstring): ``[loss, *others]`` as dask arrays.

    ``args``: the task's array arguments; ``grad``: the upstream gradient's blockwise argument
    (:func:`._common.grad_arg`), passed last (``None``: no gradient, the task gets ``None``);
    ``denom``: the ``mean`` denominator (a float or a 0-d dask array); ``dtype``: the loss's.
    """
    out = run_blocks(task, [*args, grad or ABSENT], [loss, *others], be, **options)
    return [reduce_loss(out[0], reduction, denom, dtype, be), *out[1:]]
