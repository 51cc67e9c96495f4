"""Benchmark cases: the op specs' :class:`~nblosses._spec.BenchCase` entries and the shapes
shared by ``nblosses bench``, ``asv_bench/`` and ``scripts/gpu_bench.py``.

The case table is read from :data:`nblosses.ops.SPECS` (each spec's ``bench``), so a new op's
cases reach the CLI table, asv and the GPU script without an edit here. Groups of ``--ops`` come
from the cases' ``groups``: ``all`` is every case not marked ``slow``; a slow case (seconds per
call) runs only when named, on its own shapes (``BenchCase.shapes`` / ``quick_shapes``).

This module imports only NumPy at import time and nblosses (its public API and the specs of
:mod:`nblosses.ops`) inside functions, and uses no relative imports, so it can be loaded on its
own from a file path: asv loads it from the working tree (``asv_bench/common.py``) while it
benchmarks the installed nblosses, and the first-call worker loads it in a fresh process.

Shapes are written as labels with the reduced axis in brackets: ``"4096x[1000]"`` is a
``(4096, 1000)`` array reduced along dim 1, ``"32x[21]x4096"`` reduces the middle axis,
``"8x1024x[1024]"`` the last one.

What each layout makes of a shape (:func:`make_inputs`; then the case's ``prepare``), keys in
brackets:

- ``softmax``: ``x`` of the shape, reduced along the bracketed axis;
- ``class``: logits ``x`` and class indices ``t``; the bracketed axis is the class axis, moved
  to dim 1 as torch wants it: a class axis last of three or more dims is flattened to
  ``(-1, C)`` (``8x1024x[1024]`` -> ``x (8192, 1024)``, ``t (8192,)``), ``32x[21]x4096`` ->
  ``x (32, 21, 4096)``, ``t (32, 4096)``;
- ``elementwise``: ``x`` of the shape and binary targets ``y`` (0 or 1) of the same shape; only
  the size matters;
- ``pair``: two arrays of the shape, reduced along the bracketed axis: ``x`` (student logits,
  or an input) and ``y`` (teacher logits, or a target);
- ``topk``: student logits ``x`` and a top-k teacher: ``top_index`` (int64) and ``top_logp``
  (the teacher's log-probabilities there), shaped as ``x`` with ``min(C, TOPK)`` entries on
  the bracketed axis;
- ``linear``: ``NxDx[V]`` is ``N`` rows of ``D`` features and ``V`` classes: input ``x (N, D)``,
  linear weight ``w (V, D)``, class indices ``t (N,)``;
- ``linear_pair``: ``linear``'s arrays for the student and ``tx (N, D)``, ``tw (V, D)`` for the
  teacher's LM head.

The bytes an ideal kernel moves (for GB/s): every array the case reads, once (or the case's
``moved``), plus, for a case that ``writes``, its output: an array of the main input's size, or
the student's input and weight gradients for the linear layouts. Memory percentages are of the
main input (``x``; the ``N x V`` logits for the linear layouts).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the installed package's spec type; never imported at run time here
    from nblosses._spec import BenchCase

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "QUICK_SHAPES",
    "SHAPES",
    "SLOW",
    "TINY_SHAPES",
    "TOPK",
    "Inputs",
    "Shape",
    "case_groups",
    "case_names",
    "case_table",
    "is_slow",
    "lookup",
    "make_inputs",
    "nblosses_callable",
    "own_shapes",
    "parse_cases",
    "parse_shape",
    "tiny_shape",
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


# ----------------------------------------------------------------------------- the table
#: The group that marks a case run only when named.
SLOW = "slow"


@functools.cache
def case_table() -> Mapping[str, BenchCase]:
    """Every benchmark case of every op spec, by case name, in the specs' order."""
    from nblosses.ops import SPECS

    table: dict[str, BenchCase] = {}
    for spec in SPECS.values():
        for case in spec.bench:
            if case.name in table:
                raise ValueError(f"two benchmark cases are called {case.name!r}")
            table[case.name] = case
    return MappingProxyType(table)


def lookup(name: str | BenchCase) -> BenchCase:
    """The case called ``name`` (a case is returned as it is); ``ValueError`` when unknown."""
    if not isinstance(name, str):
        return name
    try:
        return case_table()[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; choose from {', '.join(case_table())} or the "
                         f"groups {', '.join(case_groups())}") from None


def is_slow(case: str | BenchCase) -> bool:
    """Whether the case runs only when named (seconds per call)."""
    return SLOW in lookup(case).groups


def case_names(*, layouts: tuple[str, ...] | None = None, grad: bool | None = None,
               group: str | None = None, slow: bool | None = False) -> list[str]:
    """Case names in table order: those of ``layouts``, with ``grad``, in ``group``; the slow
    cases instead of the others with ``slow=True``, both with ``slow=None``."""
    return [n for n, c in case_table().items()
            if (slow is None or is_slow(c) == slow) and (layouts is None or c.layout in layouts)
            and (grad is None or c.grad == grad) and (group is None or group in c.groups)]


def case_groups() -> dict[str, tuple[str, ...]]:
    """The groups ``--ops`` accepts besides single names: ``all`` (every case not slow), each
    group a case names, its slow members left out, and ``slow`` (the slow cases)."""
    groups: dict[str, list[str]] = {"all": case_names()}
    for name, case in case_table().items():
        for group in case.groups:
            if group != SLOW:
                groups.setdefault(group, []).extend([] if is_slow(case) else [name])
    groups[SLOW] = case_names(slow=True)
    return {g: tuple(names) for g, names in groups.items()}


def parse_cases(text: str | None = None) -> list[str]:
    """Comma-separated case names and groups (``all``, ``forward``, ``grad``, ``losses``...);
    ``None`` or empty: ``all``."""
    groups = case_groups()
    out: list[str] = []
    for item in (s.strip() for s in (text or "all").split(",")):
        for name in groups.get(item, (item,) if item else ()):
            lookup(name)  # ValueError for an unknown name
            if name not in out:
                out.append(name)
    return out


def own_shapes(case: str | BenchCase, quick: bool) -> tuple[Shape, ...]:
    """The case's own shapes (``()``: it runs on the run's shapes)."""
    c = lookup(case)
    return tuple(map(parse_shape, c.quick_shapes if quick and c.quick_shapes else c.shapes))


#: Tiny shapes of the linear layouts (``NxDx[V]``), for dry runs.
_TINY_LINEAR = Shape((8, 4, 10), 2)


def tiny_shape(case: str | BenchCase) -> Shape:
    """The smallest shape the case's layout takes: for dry runs in tests."""
    return _TINY_LINEAR if lookup(case).layout in ("linear", "linear_pair") else TINY_SHAPES[0]


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Arrays of one case (NumPy, or CuPy after :meth:`to`), plus what the timing needs."""

    case: BenchCase
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
        return Inputs(self.case, self.shape, self.dtype, arrays, self.dim, self.nbytes_moved,
                      self.nbytes_input)


#: At most this many teacher entries per row in the ``topk`` layout.
TOPK = 64


class _Maker:
    """Deterministic arrays of one dtype from one seed."""

    def __init__(self, dtype: str, seed: int) -> None:
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)

    def normal(self, dims: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
        # NumPy draws float32 and float64 only: narrower dtypes are drawn in float32
        drawn = self.dtype if self.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        a = self.rng.standard_normal(dims, dtype=drawn)
        a *= scale
        return a.astype(self.dtype, copy=False)

    def classes(self, n_classes: int, dims: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(0, n_classes, size=dims, dtype=np.int64)


# A layout: (maker, shape) -> (arrays, dim, bytes of the main input, bytes a writing case
# writes). The byte counts are taken before the case's ``prepare`` replaces the arrays.
_Built = tuple[dict[str, np.ndarray], int, int, int]


def _softmax(m: _Maker, shape: Shape) -> _Built:
    x = m.normal(shape.dims)
    return {"x": x}, shape.axis, x.nbytes, x.nbytes


def _class(m: _Maker, shape: Shape) -> _Built:
    xshape, tshape = shape.class_layout()
    x = m.normal(xshape)
    t = m.classes(xshape[1] if len(xshape) > 1 else xshape[0], tshape)
    return {"x": x, "t": t}, 1, x.nbytes, x.nbytes


def _elementwise(m: _Maker, shape: Shape) -> _Built:
    x = m.normal(shape.dims)
    y = (m.rng.random(shape.dims) < 0.5).astype(m.dtype)
    return {"x": x, "y": y}, shape.axis, x.nbytes, x.nbytes


def _pair(m: _Maker, shape: Shape) -> _Built:
    x, y = m.normal(shape.dims), m.normal(shape.dims)
    return {"x": x, "y": y}, shape.axis, x.nbytes, x.nbytes


def _topk(m: _Maker, shape: Shape) -> _Built:
    axis, k = shape.axis, min(shape.dims[shape.axis], TOPK)
    x, teacher = m.normal(shape.dims), m.normal(shape.dims).astype(np.float64)
    index = np.argpartition(-teacher, k - 1, axis=axis).take(range(k), axis=axis)
    top = np.take_along_axis(teacher, index, axis=axis)
    peak = teacher.max(axis=axis, keepdims=True)
    logp = top - peak - np.log(np.exp(teacher - peak).sum(axis=axis, keepdims=True))
    arrays = {"x": x, "top_index": index.astype(np.int64),
              "top_logp": logp.astype(m.dtype)}
    return arrays, axis, x.nbytes, x.nbytes


def _linear_head(m: _Maker, shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    if len(shape.dims) != 3 or shape.axis != 2:
        raise ValueError(f"linear layouts take NxDx[V] shapes, got {shape.label}")
    n, d, v = shape.dims
    # logits of unit scale, as after a trained layer
    return m.normal((n, d), 1.0), m.normal((v, d), 1.0 / math.sqrt(d))


def _linear(m: _Maker, shape: Shape) -> _Built:
    x, w = _linear_head(m, shape)
    n, _, v = shape.dims
    # The N x V logits, never stored, are the base of the memory percentages.
    return ({"x": x, "w": w, "t": m.classes(v, (n,))}, 1, n * v * x.itemsize,
            x.nbytes + w.nbytes)


def _linear_pair(m: _Maker, shape: Shape) -> _Built:
    arrays, dim, logits, grads = _linear(m, shape)
    arrays["tx"], arrays["tw"] = _linear_head(m, shape)
    return arrays, dim, logits, grads


#: Each layout's builder (the keys: the :data:`nblosses._spec.Layout` values).
LAYOUTS: dict[str, Callable[[_Maker, Shape], _Built]] = {
    "softmax": _softmax, "class": _class, "elementwise": _elementwise, "pair": _pair,
    "topk": _topk, "linear": _linear, "linear_pair": _linear_pair,
}


def make_inputs(case: str | BenchCase, shape: str | Shape, dtype: str = "float32",
                seed: int = 0) -> Inputs:
    """Deterministic NumPy inputs of ``case`` on ``shape``: its layout's arrays, then its
    ``prepare``."""
    case, shape = lookup(case), parse_shape(shape)
    maker = _Maker(dtype, seed)
    arrays, dim, main_bytes, written = LAYOUTS[case.layout](maker, shape)
    if case.prepare is not None:
        arrays = case.prepare(arrays, dim, maker.rng)
    read = case.moved(arrays) if case.moved else sum(a.nbytes for a in arrays.values())
    return Inputs(case, shape, dtype, arrays, dim, read + (written if case.writes else 0),
                  main_bytes)


def nblosses_callable(inputs: Inputs, backend: str = "cpu") -> Callable[[], Any]:
    """A zero-argument function that runs the case once with nblosses (public API only)."""
    from nblosses import functional as F

    run, arrays, dim = inputs.case.run, inputs.arrays, inputs.dim
    return lambda: run(F, arrays, dim, backend)
