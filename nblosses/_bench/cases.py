"""Benchmark cases: the ops and shapes shared by ``nblosses bench`` and ``asv_bench/``.

This module imports only NumPy at import time and nblosses' *public* API inside functions, and
uses no relative imports, so it can be loaded on its own from a file path: asv loads it from the
working tree (``asv_bench/common.py``) even when it benchmarks an older installed commit, and the
first-call worker loads it in a fresh process without importing anything else.

Shapes are written as labels with the reduced axis in brackets: ``"4096x[1000]"`` is a
``(4096, 1000)`` array reduced along dim 1, ``"32x[21]x4096"`` reduces the middle axis,
``"8x1024x[1024]"`` the last one.

How each op family uses a shape:

- softmax family: the array has the shape, reduced along the bracketed axis;
- class losses (cross_entropy, nll_loss): the bracketed axis is the class axis. torch's class
  axis is dim 1, so a shape whose class axis is the last of three or more dims is flattened to
  ``(-1, C)`` (``8x1024x[1024]`` -> logits ``(8192, 1024)``, targets ``(8192,)``);
  ``32x[21]x4096`` -> logits ``(32, 21, 4096)``, targets ``(32, 4096)``;
- elementwise ops (sigmoid, binary losses): only the size matters;
- linear cross-entropy (``kind="linear"``): ``NxDx[V]`` is ``N`` rows of ``D`` features and a
  vocabulary of ``V`` classes (input ``(N, D)``, linear weight ``(V, D)``, targets ``(N,)``).
  These ops take seconds per call on a laptop CPU, so they are :data:`SLOW_OPS`: in no group,
  run only when named, always on their own shapes (``Op.shapes`` / ``Op.quick_shapes``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "OPS",
    "QUICK_SHAPES",
    "SHAPES",
    "SLOW_OPS",
    "Inputs",
    "Op",
    "Shape",
    "lookup_op",
    "make_inputs",
    "nblosses_callable",
    "parse_ops",
    "parse_shape",
]


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """An array shape plus the axis that is reduced (softmax dim / class axis)."""

    dims: tuple[int, ...]
    dim: int

    def __post_init__(self) -> None:
        if not self.dims:
            raise ValueError("benchmark shapes need at least one dimension")
        if not -len(self.dims) <= self.dim < len(self.dims):
            raise ValueError(f"dim {self.dim} out of range for shape {self.dims}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "dim", self.dim % len(self.dims))  # one spelling per axis

    @property
    def axis(self) -> int:
        """The reduced axis as a non-negative index."""
        return self.dim % len(self.dims)

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def label(self) -> str:
        return "x".join(f"[{d}]" if i == self.axis else str(d) for i, d in enumerate(self.dims))

    def __str__(self) -> str:
        return self.label

    def class_layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(logits shape, target shape)`` for class losses (class axis moved to dim 1)."""
        d, a = self.dims, self.axis
        if len(d) == 1:
            return (d[0],), ()
        if a == 1:
            return d, (d[0], *d[2:])
        if a == len(d) - 1:
            n = math.prod(d[:-1])
            return (n, d[-1]), (n,)
        raise ValueError(
            f"class losses need the class axis at dim 1 or last, got {self.label}")


_LABEL = re.compile(r"^\s*(\[?\d+\]?)(\s*[x,]\s*\[?\d+\]?)*\s*$")


def parse_shape(text: str | Shape) -> Shape:
    """``"4096x[1000]"`` -> ``Shape((4096, 1000), 1)``.

    The bracketed axis is the reduced one; without brackets the last axis is reduced. A
    ``":dim"`` suffix also sets it (``"8x1024x1024:-1"``). ``,`` may replace ``x``.
    """
    if isinstance(text, Shape):
        return text
    body, _, dim_text = str(text).partition(":")
    if not _LABEL.match(body):
        raise ValueError(f"bad shape {text!r}; write e.g. 4096x[1000] or 32x[21]x4096")
    parts = [p.strip() for p in re.split(r"[x,]", body)]
    dims = tuple(int(p.strip("[]")) for p in parts)
    marked = [i for i, p in enumerate(parts) if p.startswith("[")]
    if len(marked) > 1:
        raise ValueError(f"bad shape {text!r}: only one axis may be bracketed")
    if dim_text:
        dim = int(dim_text)
    elif marked:
        dim = marked[0]
    else:
        dim = len(dims) - 1
    return Shape(dims, dim)


#: The six shapes the performance targets are stated on (targets.json).
SHAPES: tuple[Shape, ...] = tuple(map(parse_shape, (
    "4096x[1000]", "512x[32000]", "64x[128256]", "65536x[10]", "8x1024x[1024]", "32x[21]x4096")))
#: Same layouts, 8-60x smaller: for ``--quick`` runs and CI.
QUICK_SHAPES: tuple[Shape, ...] = tuple(map(parse_shape, (
    "256x[1000]", "32x[32000]", "4x[128256]", "4096x[10]", "2x128x[1024]", "4x[21]x1024")))
#: The smallest shape of each layout: for dry runs in tests.
TINY_SHAPES: tuple[Shape, ...] = (Shape((8, 10), 1), Shape((2, 3, 5), 1))

DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class Op:
    """One benchmarked operation.

    ``kind`` is ``"softmax"`` (reduces along the shape's axis), ``"class"`` (class-index
    losses), ``"linear"`` (linear layer + cross-entropy) or ``"elementwise"``. ``grad`` marks
    forward+gradient ops (``return_grad=True``, compared with torch forward+backward) and the
    explicit backward functions. ``shapes`` / ``quick_shapes``, when set, replace the run's
    shapes for this op (its inputs are not arrays of one shape).
    """

    name: str
    kind: str
    grad: bool
    title: str
    #: Name of the torch function the op is compared with (for the docs and the table).
    torch_ref: str
    scipy: bool = False
    tags: tuple[str, ...] = field(default=())
    shapes: tuple[Shape, ...] = field(default=())
    quick_shapes: tuple[Shape, ...] = field(default=())

    def own_shapes(self, quick: bool) -> tuple[Shape, ...]:
        """The op's own shapes (``()``: the op runs on the run's shapes)."""
        return self.quick_shapes if quick and self.quick_shapes else self.shapes


OPS: dict[str, Op] = {op.name: op for op in (
    Op("softmax", "softmax", False, "softmax", "F.softmax", scipy=True),
    Op("log_softmax", "softmax", False, "log_softmax", "F.log_softmax", scipy=True),
    Op("sigmoid", "elementwise", False, "sigmoid", "torch.sigmoid", scipy=True),
    Op("softmax_backward", "softmax", True, "softmax backward", "aten._softmax_backward_data"),
    Op("log_softmax_backward", "softmax", True, "log_softmax backward",
       "aten._log_softmax_backward_data"),
    Op("sigmoid_backward", "elementwise", True, "sigmoid backward", "aten.sigmoid_backward"),
    Op("cross_entropy", "class", False, "cross_entropy fwd (mean)", "F.cross_entropy"),
    Op("cross_entropy_grad", "class", True, "cross_entropy fwd+grad (mean)",
       "F.cross_entropy + autograd.grad"),
    Op("nll_loss", "class", False, "nll_loss fwd (mean)", "F.nll_loss"),
    Op("nll_loss_grad", "class", True, "nll_loss fwd+grad (mean)", "F.nll_loss + autograd.grad"),
    Op("bce", "elementwise", False, "binary_cross_entropy fwd (mean)", "F.binary_cross_entropy"),
    Op("bce_grad", "elementwise", True, "binary_cross_entropy fwd+grad",
       "F.binary_cross_entropy + autograd.grad"),
    Op("bce_with_logits", "elementwise", False, "bce_with_logits fwd (mean)",
       "F.binary_cross_entropy_with_logits"),
    Op("bce_with_logits_grad", "elementwise", True, "bce_with_logits fwd+grad",
       "F.binary_cross_entropy_with_logits + autograd.grad"),
)}

#: Ops run only when named in ``--ops`` (in no group): each call takes seconds.
SLOW_OPS: dict[str, Op] = {op.name: op for op in (
    Op("linear_cross_entropy_grad", "linear", True,
       "linear_cross_entropy fwd+grad (mean)", "F.linear + F.cross_entropy + autograd.grad",
       shapes=(Shape((4096, 1024, 32000), 2), Shape((1024, 1024, 128256), 2)),
       quick_shapes=(Shape((256, 128, 4096), 2),)),
)}


def lookup_op(name: str) -> Op:
    """The :class:`Op` called ``name``, default or slow (``KeyError`` when there is none)."""
    return OPS[name] if name in OPS else SLOW_OPS[name]


#: Named groups accepted by ``--ops`` besides single op names.
OP_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(OPS),
    "forward": tuple(n for n, o in OPS.items() if not o.grad),
    "grad": tuple(n for n, o in OPS.items() if o.grad),
    "softmax_family": ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward"),
    "losses": ("cross_entropy", "cross_entropy_grad", "nll_loss", "nll_loss_grad", "bce",
               "bce_grad", "bce_with_logits", "bce_with_logits_grad"),
    # The ops the performance targets (targets.json) measure, backwards included.
    "targets": ("softmax", "log_softmax", "cross_entropy", "cross_entropy_grad",
                "softmax_backward", "log_softmax_backward"),
}


def parse_ops(text: str | None) -> list[str]:
    """Comma-separated op names and groups (``all``, ``forward``, ``grad``, ``losses``...)."""
    if not text:
        return list(OPS)
    out: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        names = OP_GROUPS.get(item, (item,))
        for name in names:
            if name not in OPS and name not in SLOW_OPS:
                raise ValueError(f"unknown op {name!r}; choose from {', '.join(OPS)}, "
                                 f"{', '.join(SLOW_OPS)} (slow: only when named) or "
                                 f"the groups {', '.join(OP_GROUPS)}")
            if name not in out:
                out.append(name)
    return out


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Arrays of one case (NumPy, or CuPy after :meth:`to`), plus what the timing needs."""

    op: Op
    shape: Shape
    dtype: str
    arrays: dict[str, Any]
    dim: int
    #: Bytes an ideal kernel must move (reads + writes), for effective GB/s.
    nbytes_moved: int
    #: Bytes of the main input (logits / probabilities): the base of memory percentages.
    nbytes_input: int

    def to(self, xp: Any) -> Inputs:
        """A copy whose arrays live in ``xp`` (``cupy`` for the cuda backend)."""
        if xp is np:
            return self
        arrays = {k: xp.asarray(v) for k, v in self.arrays.items()}
        return Inputs(self.op, self.shape, self.dtype, arrays, self.dim, self.nbytes_moved,
                      self.nbytes_input)


def _log_softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z


def make_inputs(op: str | Op, shape: str | Shape, dtype: str = "float32",
                seed: int = 0) -> Inputs:
    """Deterministic NumPy inputs for ``op`` on ``shape``."""
    op = lookup_op(op) if isinstance(op, str) else op
    shape = parse_shape(shape)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    item = dt.itemsize

    def normal(dims: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
        a = rng.standard_normal(dims, dtype=dt if dt.kind == "f" and item >= 4 else np.float32)
        a *= scale
        return a.astype(dt, copy=False)

    if op.kind == "softmax":
        x = normal(shape.dims)
        n = x.nbytes
        if not op.grad:
            return Inputs(op, shape, dtype, {"x": x}, shape.axis, 2 * n, n)
        if op.name == "softmax_backward":
            y = np.exp(_log_softmax_np(x, shape.axis))
        else:
            y = _log_softmax_np(x, shape.axis)
        g = normal(shape.dims, 1.0)
        return Inputs(op, shape, dtype, {"g": g, "y": y.astype(dt, copy=False)}, shape.axis,
                      3 * n, n)

    if op.kind == "linear":
        return _linear_inputs(op, shape, dtype, normal, rng)

    if op.kind == "class":
        xshape, tshape = shape.class_layout()
        x = normal(xshape)
        n_classes = xshape[1] if len(xshape) > 1 else xshape[0]
        t = rng.integers(0, n_classes, size=tshape, dtype=np.int64)
        rows = max(t.size, 1)
        if op.name.startswith("nll_loss"):
            x = _log_softmax_np(x, 1 if x.ndim > 1 else 0).astype(dt, copy=False)
            moved = t.nbytes + rows * item  # the gathered log-probabilities
        else:
            moved = x.nbytes + t.nbytes
        if op.grad:
            moved += x.nbytes  # the gradient is written once
        return Inputs(op, shape, dtype, {"x": x, "t": t}, 1, moved, x.nbytes)

    # elementwise
    x = normal(shape.dims)
    n = x.nbytes
    if op.name == "sigmoid":
        return Inputs(op, shape, dtype, {"x": x}, -1, 2 * n, n)
    if op.name == "sigmoid_backward":
        y = (1.0 / (1.0 + np.exp(-x))).astype(dt, copy=False)
        g = normal(shape.dims, 1.0)
        return Inputs(op, shape, dtype, {"g": g, "y": y}, -1, 3 * n, n)
    y = (rng.random(shape.dims) < 0.5).astype(dt)
    if op.name.startswith("bce_with_logits"):
        arrays = {"x": x, "y": y}
    else:  # probabilities strictly inside (0, 1)
        p = rng.uniform(0.01, 0.99, size=shape.dims).astype(dt)
        arrays = {"x": p, "y": y}
    moved = 2 * n + (n if op.grad else 0)
    return Inputs(op, shape, dtype, arrays, -1, moved, n)


def _linear_inputs(op: Op, shape: Shape, dtype: str, normal: Callable[..., np.ndarray],
                   rng: np.random.Generator) -> Inputs:
    """``N x D x [V]``: input ``(N, D)``, linear weight ``(V, D)``, class indices ``(N,)``."""
    if len(shape.dims) != 3 or shape.axis != 2:
        raise ValueError(f"linear cross-entropy shapes are NxDx[V], got {shape.label}")
    n, d, v = shape.dims
    x = normal((n, d), 1.0)
    w = normal((v, d), 1.0 / math.sqrt(d))  # logits of unit scale, as after a trained layer
    t = rng.integers(0, v, size=(n,), dtype=np.int64)
    item = x.itemsize
    # An ideal kernel reads input, weight and targets and writes both gradients once; the
    # N x V logits it never stores are the base of the memory percentages.
    moved = 2 * (x.nbytes + w.nbytes) + t.nbytes
    return Inputs(op, shape, dtype, {"x": x, "w": w, "t": t}, 1, moved, n * v * item)


# ----------------------------------------------------------------------------- nblosses calls
def nblosses_callable(inputs: Inputs, backend: str = "cpu") -> Callable[[], Any]:
    """A zero-argument function that runs the op once with nblosses (public API only)."""
    from nblosses import functional as F

    a, d, name = inputs.arrays, inputs.dim, inputs.op.name
    b = backend
    table: dict[str, Callable[[], Any]] = {
        "softmax": lambda: F.softmax(a["x"], d, backend=b),
        "log_softmax": lambda: F.log_softmax(a["x"], d, backend=b),
        "sigmoid": lambda: F.sigmoid(a["x"], backend=b),
        "softmax_backward": lambda: F.softmax_backward(a["g"], a["y"], d, backend=b),
        "log_softmax_backward": lambda: F.log_softmax_backward(a["g"], a["y"], d, backend=b),
        "sigmoid_backward": lambda: F.sigmoid_backward(a["g"], a["y"], backend=b),
        "cross_entropy": lambda: F.cross_entropy(a["x"], a["t"], backend=b),
        "cross_entropy_grad": lambda: F.cross_entropy(a["x"], a["t"], return_grad=True, backend=b),
        "nll_loss": lambda: F.nll_loss(a["x"], a["t"], backend=b),
        "nll_loss_grad": lambda: F.nll_loss(a["x"], a["t"], return_grad=True, backend=b),
        "bce": lambda: F.binary_cross_entropy(a["x"], a["y"], backend=b),
        "bce_grad": lambda: F.binary_cross_entropy(a["x"], a["y"], return_grad=True, backend=b),
        "bce_with_logits": lambda: F.binary_cross_entropy_with_logits(a["x"], a["y"], backend=b),
        "bce_with_logits_grad": lambda: F.binary_cross_entropy_with_logits(
            a["x"], a["y"], return_grad=True, backend=b),
        "linear_cross_entropy_grad": lambda: F.linear_cross_entropy(
            a["x"], a["w"], a["t"], return_grad=True, backend=b),
    }
    return table[name]
