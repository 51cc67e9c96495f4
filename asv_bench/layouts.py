"""One benchmark per CPU kernel path (select with ``-b '^layouts\\.'``): the cases of the
``layouts`` group (softmax, log_softmax, cross_entropy and its fused gradient) on contiguous
long rows, contiguous short rows (C < 24), a middle reduced axis (inner > 1) and tiny rows
(C = 2), float32 and float64.

Each path vectorises differently (rows, transposed tiles, inner blocks), so a regression in
one shows up in its own row. The shapes are in :data:`.common.LAYOUTS`; ``gate.Gate`` runs the
float32 half with fewer samples, for CI and history runs.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

from .common import LAYOUTS, CaseBenchmark, cases

#: The cases whose spec puts them in the ``layouts`` group.
LAYOUT_OPS = cases.case_names(group="layouts")


class Layouts(CaseBenchmark):
    """nblosses on the CPU; ``layout`` names a shape of :data:`.common.LAYOUTS`."""

    params = [LAYOUT_OPS, list(LAYOUTS), ["float32", "float64"]]
    param_names = ["op", "layout", "dtype"]

    def setup(self, op, layout, dtype):
        super().setup(op, "cpu", LAYOUTS[layout], dtype)

    def time_layout(self, op, layout, dtype):
        self.run()
