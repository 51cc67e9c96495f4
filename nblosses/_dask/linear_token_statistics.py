"""Dask plan of linear_token_logprobs: one eager call per block of rows, the whole output layer
in every block (:func:`._blockwise.run_blocks`), when ``linear_weight`` is in one chunk along
the vocabulary; in several, the vocabulary-parallel plan of :mod:`.linear_token_vocab`.

The input's rows are chunked as given (its features gathered into one chunk); the weight and
the bias are gathered into one chunk each and passed whole to every block task, which runs
the op's own :func:`nblosses.ops.linear_token_logprobs.execute` (the chunked LM-head sweep of
the backend) on its rows. The targets and array-valued upstream gradients follow the rows;
each block's targets are checked when computed (``IndexError``) before the kernel reads them.
Per-row results (log-probabilities, entropy, ``grad_input``) are blocks of the rows; the
weight's and the bias's gradients are one partial sum per row block, added in float64.

Honest cost: each task holds the whole ``(V, d)`` weight (and its partial gradient), so this
plan distributes the rows, not the vocabulary (chunk the weight along the vocabulary for
that); the logits are never formed, as in the eager call.
"""

from __future__ import annotations

from typing import Any

from .. import _args
from .._registry import Runtime, resolve_backend
from .._spec import OpSpec
from ..ops._results import at_least_float32, results
from ..ops.linear_ce import LinearCEArgs, LinearCELayout
from ..ops.linear_token_logprobs import check_linear_token_logprobs, execute
from ._blockwise import Result, run_blocks
from ._common import F64, as_dask, backend_for, backend_name, checked_targets, unwrap
from .linear_token_vocab import plan_vocabulary
from .token_statistics import _upstream

#: Blockwise indices: rows, features, vocabulary.
ROWS, FEAT, VOCAB = "r", "f", "v"


def _block(xb: Any, wb: Any, bb: Any, tb: Any, gb: Any, eb: Any, *, backend: str, opts: dict,
           want_entropy: bool, want_grad: bool) -> Any:
    """One block of rows with the whole output layer: ``(logp, entropy?, grad_x?, grad_w?,
    grad_b?)`` (``logp`` alone when it is the only result), the weight's and the bias's
    gradients with a leading axis of 1 (one partial sum per block)."""
    x = unwrap(xb)
    be = resolve_backend(backend, x)
    x = be.asarray(x)
    w = be.asarray(unwrap(wb))
    b = None if unwrap(bb) is None else be.asarray(unwrap(bb))
    cdt = _args.compute_dtype(be, x.dtype)
    n, d = x.shape
    target = be.xp.ascontiguousarray(be.asarray(unwrap(tb))).reshape(n)
    xp = be.xp
    a = LinearCEArgs(xp.ascontiguousarray(_args.to_compute(be, x, cdt)),
                     xp.ascontiguousarray(_args.to_compute(be, w, cdt)),
                     None if b is None else xp.ascontiguousarray(_args.to_compute(be, b, cdt)),
                     target, None,
                     LinearCELayout(False, False, n, d, int(w.shape[0]), ()), x.dtype)
    out = execute(be, a, ignore_index=opts["ignore_index"], temperature=opts["temperature"],
                  softcap=opts["softcap"], want_entropy=want_entropy, want_grad=want_grad,
                  grad_output=unwrap(gb), grad_entropy=unwrap(eb), chunk_rows=opts["options"])
    if want_grad:
        gx, gw, gbias = out.pop()
        out += [gx.astype(x.dtype, copy=False), gw[None]]
        if gbias is not None:
            out.append(gbias[None])
    return tuple(out) if len(out) > 1 else out[0]  # run_blocks: one result is the array


def _sum_rows(part: Any, dtype: Any) -> Any:
    """The partial sums of every row block, added in float64, in ``dtype``."""
    return part.sum(axis=0, dtype=F64).astype(dtype)


def plan_linear_token_logprobs(spec: OpSpec, v: dict, opts: dict) -> Any:
    """``linear_token_logprobs``."""
    name = backend_name(v["backend"])
    x, w, t = (as_dask(v[k]) for k in ("input", "linear_weight", "target"))
    b = None if v["linear_bias"] is None else as_dask(v["linear_bias"])
    be = backend_for(name, x, w, b, t)
    lay = check_linear_token_logprobs(be, spec.name, x, w, t, b)
    cdt = _args.compute_dtype(be, x.dtype)
    grad_output, grad_entropy = v["grad_output"], v["grad_entropy"]
    if lay.squeeze:  # (d,) -> (1, d); the target and per-row gradients () -> (1,)
        x, t = x[None], t[None]
        grad_output, grad_entropy = (
            g[None] if g is not None and getattr(g, "ndim", 0) == 0 and hasattr(g, "shape")
            else g for g in (grad_output, grad_entropy))
    x = x.rechunk({1: -1})
    rows = (x.chunks[0],)
    t = checked_targets(t.rechunk(rows), lay.v, opts["ignore_index"], name)
    want_entropy, want_grad = bool(v["return_entropy"]), bool(v["return_grad"])
    ups = [_upstream(spec.name, what, g, (lay.n,), rows, ROWS) if want_grad else (None, None)
           for what, g in (("grad_output", grad_output), ("grad_entropy", grad_entropy))]
    if len(w.chunks[0]) > 1:  # the vocabulary in chunks: vocabulary-parallel
        stat_out, grads = plan_vocabulary(be, name, x, w, b, t, (ups[0][0], ups[1][0]), opts,
                                          cdt=cdt, want_entropy=want_entropy,
                                          want_grad=want_grad)
    else:
        stat_out, grads = _plan_rows(be, name, x, w, b, t, ups, opts, lay, cdt=cdt,
                                     want_entropy=want_entropy, want_grad=want_grad)
    if lay.squeeze:
        stat_out = [a[0] for a in stat_out]
        grads = None if grads is None else (grads[0][0], *grads[1:])
    return results([*stat_out, *([grads] if want_grad else [])])


def _plan_rows(be: Runtime, name: str, x: Any, w: Any, b: Any, t: Any, ups: list, opts: dict,
               lay: LinearCELayout, *, cdt: Any, want_entropy: bool,
               want_grad: bool) -> tuple[list, tuple | None]:
    """The rows plan: ``([logp, entropy?], grads or None)`` of rows ``x`` ``(N, d)`` (the
    features in one chunk) and their checked targets ``t``, the whole output layer in every
    task; ``ups``: the upstream gradients' blockwise arguments."""
    wc = w.rechunk(-1)
    bc = None if b is None else b.rechunk(-1)
    stats = at_least_float32(cdt)
    res = [Result(ROWS, stats), *([Result(ROWS, stats)] if want_entropy else [])]
    if want_grad:
        res += [Result(ROWS + FEAT, x.dtype, {FEAT: lay.d}),
                Result(ROWS + VOCAB + FEAT, cdt, {VOCAB: lay.v, FEAT: lay.d}, {ROWS: 1})]
        if b is not None:
            res.append(Result(ROWS + VOCAB, cdt, {VOCAB: lay.v}, {ROWS: 1}))
    args = [(x, ROWS + FEAT), (wc, VOCAB + FEAT), (bc, None if bc is None else VOCAB),
            (t, ROWS), *ups]
    out = run_blocks(_block, args, res, be, backend=name, opts=dict(opts),
                     want_entropy=want_entropy, want_grad=want_grad)
    k = 2 if want_entropy else 1
    if not want_grad:
        return out[:k], None
    gb = _sum_rows(out[k + 2], x.dtype) if b is not None else None
    return out[:k], (out[k], _sum_rows(out[k + 1], x.dtype), gb)
