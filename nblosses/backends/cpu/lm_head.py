"""The CPU hooks of the chunked LM-head driver (:mod:`nblosses.backends._lm_head`) that every
loss on it shares: products by the BLAS NumPy itself loads (:mod:`.linear_ce_blas`, OpenBLAS
threads) and the bias gradient's column sums (a Numba kernel).

The Numba passes of a head run between two OpenBLAS products, so they take their kernels'
serial builds: in a process that imported torch first, a Numba parallel region runs on torch's
OpenMP pool, whose threads spin for milliseconds after it on the cores OpenBLAS's threads need
for the next product (:mod:`._parallel`; measured on a shared 2-core Zen 4, torch imported
first, linear_cross_entropy 256x128x[4096] fwd+grad: 1450-1610 ms with parallel passes, 48 ms
serial). The passes are O(N V) against the products' O(N V d).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .. import _lm_head as H
from . import linear_ce_kernels as K
from .linear_ce_blas import gemm


class CpuHead(H.ChunkedHead):
    """NumPy arrays, BLAS products, Numba column sums."""

    xp: ClassVar[Any] = np

    def gemm(self, a, b, c, beta: float) -> None:
        gemm(a, b, c, beta)

    def col_sums(self, z, out) -> None:
        K.add_col_sums.serial(z, out)
