"""The chunked language-model head, written once for every loss on it: block planning, the
loop over row blocks and vocabulary blocks, the reused block buffers and the gradient products.

A loss of ``z = x @ W.T + b`` (``x`` ``(N, d)``, ``W`` ``(V, d)``) never forms the ``(N, V)``
logits: per row block,

1. the products ``z = x[rows] @ W[cols].T`` of every head of the call (``gemm``) into reused
   buffers, one per head (a loss may have several linear layers, e.g. a student's and a
   teacher's; the first is the one differentiated);
2. ``merge``: prepare the blocks in place (bias, soft cap...) and fold their rows' statistics
   into the row block's state, one vocabulary block after another (online softmax). A loss may
   take several such passes over the vocabulary (``passes``), e.g. sums that need the first
   pass's logsumexp;
3. ``finish_rows``: the rows' outputs from their merged statistics, and the gradient's per-row
   coefficients;
4. with a gradient, per vocabulary block ``gradient_block`` overwrites the first head's block
   with ``dL/dz``, then ``grad_x[rows] (+)= g @ W[cols]``, ``grad_W[cols] (+)= g.T @ x[rows]``
   (``beta = 1``: the accumulation inside the product) and ``grad_b[cols] += g.sum(0)``.

With the whole vocabulary in one block (the usual plan) the products are computed once per row
block: the blocks stay in the buffers, prepared, from the first pass to the gradient. With
vocabulary blocks (:class:`Plan` ``split``) every pass and the gradient compute them again
(``raw``: the hooks then receive raw products to prepare), except the last vocabulary block:
the gradient takes it first, as the last pass left it. So no hook but ``gradient_block`` may
overwrite a prepared block.

What a loss supplies (:class:`ChunkedHead`'s loss hooks): its statistics merge, its per-row
finish and its block gradient, the first and last by kernels of each backend; a backend
supplies ``gemm`` and ``col_sums`` (:mod:`.cpu.lm_head`, :mod:`.cuda.lm_head`). A call is one
instance: ``LossClass(...)`` then :meth:`ChunkedHead.sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

#: Extra memory of one call: at most 5% of one N x V logits array; blocks take 90% of that,
#: the rest is left to O(rows) statistics and temporaries, ...
BUDGET_FRACTION = 0.045
#: ... and at most this many elements (64 MiB of float32) for large problems, ...
MAX_BLOCK = 1 << 24
#: ... but blocks of at least this many elements for small ones (BLAS calls of a few rows
#: cost more in overhead than the memory saved).
MIN_BLOCK = 1 << 16
#: Fewer rows of the whole vocabulary than this per block: split the vocabulary instead ...
SPLIT_BELOW_ROWS = 128
#: ... into blocks of at most this many rows ...
SPLIT_ROWS = 1024
#: ... and at least this many columns (fewer rows for a very wide ``d``).
MIN_SPLIT_COLS = 1024


@dataclass(frozen=True)
class Plan:
    """Block shape: ``rows`` batch rows times ``cols`` vocabulary columns; ``split``: the
    vocabulary takes more than one block (the logits are computed once per pass)."""

    rows: int
    cols: int
    split: bool


def plan_chunks(n: int, v: int, d: int = 0, chunk_rows: int | None = None,
                chunk_classes: int | None = None, heads: int = 1) -> Plan:
    """The block shape for ``n`` rows, ``v`` classes and ``d`` features of the differentiated
    head, with ``heads`` logits blocks per block row (a row of the block costs ``heads * cols
    + d`` elements: its logits and its transposed ``grad_x``).

    Policy: the whole vocabulary per block (one product per logit: the three matrix products
    of the unchunked computation and no more) whenever ``SPLIT_BELOW_ROWS`` rows of it (or
    all ``n``) fit the budget ``clip(BUDGET_FRACTION * n * v, MIN_BLOCK, MAX_BLOCK)``
    elements; then as many rows as fit. Otherwise ``SPLIT_ROWS`` rows (at most) and vocabulary
    chunks: the logits are computed twice (statistics pass, gradient pass), but each product
    has many rows and ``W`` / ``grad_W`` are streamed once per pass instead of once per small
    row block. Measured (float32, 2 threads, OpenBLAS): at ``n=1024, d=1024, v=128256``
    (45 rows of the whole vocabulary fit) 1024 rows x 4747 columns took 5.95 s against 8.34 s
    for 45 rows x the whole vocabulary; at ``n=4096, d=1024, v=32000`` (178 rows fit) the
    whole vocabulary per block is within 1.1x of torch's unchunked reference. Explicit
    ``chunk_rows`` / ``chunk_classes`` override either choice (clipped to ``[1, n]`` /
    ``[1, v]``); ``chunk_rows`` alone means blocks of that many rows of the whole vocabulary,
    as torch's ``batch_chunk_size`` does (the budget is then the caller's: fewer products, at
    ``n=2048, d=256, v=32000`` 512 rows took 0.58 s against 0.74 s for the split plan).
    """
    n1, v1 = max(1, n), max(1, v)
    budget = max(MIN_BLOCK, min(int(BUDGET_FRACTION * n1 * v1), MAX_BLOCK))
    if chunk_classes is not None:
        cols = min(v1, max(1, int(chunk_classes)))
    elif chunk_rows is not None or budget // (heads * v1 + d) >= min(n1, SPLIT_BELOW_ROWS):
        cols = v1
    else:
        # Few rows of the whole vocabulary fit: every row block would stream all of W (and
        # read and write all of grad_W) once more. Many rows and vocabulary chunks instead.
        rows = min(n1, SPLIT_ROWS, max(1, budget // (d + heads * MIN_SPLIT_COLS)))
        cols = min(v1, max(1, (budget // rows - d) // heads))
        if chunk_rows is None:
            return Plan(rows, cols, cols < v1)
    rows = chunk_rows if chunk_rows is not None else budget // (heads * cols + d)
    rows = min(n1, max(1, int(rows)))
    return Plan(rows, cols, cols < v1)


@dataclass(frozen=True)
class Head:
    """One linear layer of a call: ``x`` ``(N, d)``, ``w`` ``(V, d)``, ``bias`` ``(V,)`` or
    None, C-contiguous, of one dtype."""

    x: Any
    w: Any
    bias: Any = None


def param_grads(xp: Any, head: Head, grad_x: Any = None) -> tuple[Any, Any, Any]:
    """The three gradient outputs of ``head`` ``(grad_x, grad_W, grad_b)``: ``grad_x`` the given
    array or a new one; ``grad_W`` is written (``beta = 0``) by the first row block, so zeros
    only when there is none; ``grad_b`` (None without a bias) is accumulated block by block."""
    n, d = head.x.shape
    v = head.w.shape[0]
    dt = head.x.dtype
    gx = xp.empty((n, d), dt) if grad_x is None else grad_x
    gw = xp.zeros((v, d), dt) if n == 0 else xp.empty((v, d), dt)
    return gx, gw, (xp.zeros(v, dt) if head.bias is not None else None)


class ChunkedHead:
    """One call of a chunked LM-head loss: heads, plan, reused buffers and the block loop.

    Backends subclass it with their array namespace ``xp`` and the backend hooks; a loss
    subclasses it with the loss hooks (and its own outputs); a backend's loss class derives
    from both.

    Parameters
    ----------
    heads : sequence of Head
        The call's linear layers, of one ``N`` and ``V``; the first is differentiated.
    plan : Plan
        The block shape (:func:`plan_chunks`).
    """

    xp: ClassVar[Any] = None
    #: Whether the call's scalars are read back as floats (CPU) or stay 0-d arrays of ``xp``
    #: (a device backend: no synchronisation).
    host_scalars: ClassVar[bool] = True
    #: Statistics passes over the vocabulary before the rows are finished.
    passes: ClassVar[int] = 1

    def __init__(self, heads: Sequence[Head], plan: Plan) -> None:
        xp = self.xp
        self.heads = tuple(heads)
        self.plan = plan
        self.v, self.d = self.heads[0].w.shape
        self.buffers = tuple(xp.empty(plan.rows * plan.cols, h.x.dtype) for h in self.heads)
        self.gx_t: Any = None

    # -- backend hooks -------------------------------------------------------------------
    def gemm(self, a, b, c, beta: float) -> None:
        """``c[...] = a @ b + beta * c`` (``a``, ``b`` may be transposed views)."""
        raise NotImplementedError

    def col_sums(self, z, out) -> None:
        """``out += z.sum(0)``."""
        raise NotImplementedError

    # -- loss hooks ----------------------------------------------------------------------
    def start_rows(self, r0: int, r1: int) -> Any:
        """The statistics of rows ``r0:r1`` before any vocabulary block."""
        raise NotImplementedError

    def merge(self, step: int, zs: tuple, raw: bool, st: Any, r0: int, r1: int, c0: int,
              c1: int) -> None:
        """Pass ``step``: fold the blocks ``zs`` (one per head, columns ``c0:c1``) into ``st``.
        ``raw``: they hold raw products, to prepare in place (always in pass 0); else they
        hold the logits a previous pass prepared."""
        raise NotImplementedError

    def finish_rows(self, st: Any, r0: int, r1: int) -> Any:
        """Record rows ``r0:r1``'s outputs from their merged statistics; return the gradient's
        per-row coefficients (anything ``gradient_block`` takes; unused without one)."""
        raise NotImplementedError

    def gradient_block(self, zs: tuple, raw: bool, st: Any, coefs: Any, r0: int, r1: int,
                       c0: int, c1: int) -> None:
        """Overwrite ``zs[0]`` with ``dL/dz`` (``raw`` as for :meth:`merge`)."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------
    def cols(self) -> list[tuple[int, int]]:
        """``(c0, c1)`` of each vocabulary block."""
        step = self.plan.cols
        return [(c0, min(self.v, c0 + step)) for c0 in range(0, self.v, step)]

    def views(self, r0: int, r1: int, c0: int, c1: int) -> tuple:
        """The buffers as C-contiguous ``(r1 - r0, c1 - c0)`` blocks."""
        size = (r1 - r0) * (c1 - c0)
        return tuple(buf[:size].reshape(r1 - r0, c1 - c0) for buf in self.buffers)

    def products(self, r0: int, r1: int, c0: int, c1: int) -> tuple:
        """The blocks ``x[r0:r1] @ W[c0:c1].T`` of every head (raw products)."""
        zs = self.views(r0, r1, c0, c1)
        for h, z in zip(self.heads, zs):
            self.gemm(h.x[r0:r1], h.w[c0:c1].T, z, 0.0)
        return zs

    def bias_slice(self, k: int, c0: int, c1: int) -> Any:
        """Head ``k``'s bias over the columns ``c0:c1``, or None."""
        bias = self.heads[k].bias
        return None if bias is None else bias[c0:c1]

    def sweep(self, grads: tuple | None = None) -> None:
        """Every row block: its statistics passes, its outputs and, with ``grads`` (the first
        head's ``(grad_x, grad_W, grad_b)``, see :func:`param_grads`), its gradients."""
        n, rows = self.heads[0].x.shape[0], self.plan.rows
        whole = not self.plan.split
        last = n - (n - 1) // rows * rows  # the smallest row block
        if grads is not None and self.d > last:  # some row block's grad_x goes transposed
            self.gx_t = self.xp.empty(rows * self.d, grads[0].dtype)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            st = self.start_rows(r0, r1)
            for step in range(self.passes):
                for c0, c1 in self.cols():
                    # One vocabulary block: the first pass left its prepared logits in place.
                    raw = step == 0 or not whole
                    zs = self.products(r0, r1, c0, c1) if raw else self.views(r0, r1, c0, c1)
                    self.merge(step, zs, raw, st, r0, r1, c0, c1)
            coefs = self.finish_rows(st, r0, r1)
            if grads is not None:
                self.backward(r0, r1, st, coefs, grads)

    def backward(self, r0: int, r1: int, st: Any, coefs: Any, grads: tuple) -> None:
        """Rows ``r0:r1``'s share of the three gradients (``grads`` = gx, gw, gb)."""
        gx, gw, gb = grads
        head = self.heads[0]
        xr = head.x[r0:r1]
        # grad_x of the rows transposed when the rows are fewer than the features: OpenBLAS
        # then runs (d, V) @ (V, rows) 5-10x faster than (rows, V) @ (V, d) (measured at
        # d = 1024, rows 51-512); the other way round for fewer features than rows.
        transposed = self.d > r1 - r0
        gxr = self.gx_t[:self.d * (r1 - r0)].reshape(self.d, r1 - r0) if transposed \
            else gx[r0:r1]
        # The vocabulary blocks last to first: the statistics passes left the last one in the
        # buffers, prepared, so with a split vocabulary its products are not computed again
        # (one block in ``ceil(V / cols)`` of the gradient pass's recomputation saved).
        for k, (c0, c1) in enumerate(reversed(self.cols())):
            raw = self.plan.split and k > 0
            zs = self.products(r0, r1, c0, c1) if raw else self.views(r0, r1, c0, c1)
            self.gradient_block(zs, raw, st, coefs, r0, r1, c0, c1)
            g = zs[0]
            beta = 0.0 if k == 0 else 1.0
            if transposed:
                self.gemm(head.w[c0:c1].T, g.T, gxr, beta)
            else:
                self.gemm(g, head.w[c0:c1], gxr, beta)
            self.gemm(g.T, xr, gw[c0:c1], 0.0 if r0 == 0 else 1.0)
            if gb is not None:
                self.col_sums(g, gb[c0:c1])
        if transposed:
            gx[r0:r1] = gxr.T
