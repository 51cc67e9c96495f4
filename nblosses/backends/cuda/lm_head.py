"""The CUDA hooks of the chunked LM-head driver (:mod:`nblosses.backends._lm_head`) that every
loss on it shares: cuBLAS products (``cupy.cublas.gemm``, ``beta = 1`` for the accumulated
gradients) and the bias gradient's column sums (``lce_col_sums`` of ``linear_ce.cu``).

No read back inside a call: the driver's scalars stay 0-d device arrays (``host_scalars =
False``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import cupy

from .. import _lm_head as H
from . import _kernels as K
from . import _loader as L

#: The source of the column sums (the linear cross-entropy's: the first head on the driver).
SOURCE = "linear_ce.cu"


class CudaHead(H.ChunkedHead):
    """CuPy arrays, cuBLAS products, a column-sum kernel."""

    xp: ClassVar[Any] = cupy
    host_scalars: ClassVar[bool] = False

    def gemm(self, a, b, c, beta: float) -> None:
        from cupy import cublas  # loads libcublas: not at import (CI has no CUDA libraries)

        cublas.gemm("N", "N", a, b, out=c, beta=beta)

    def col_sums(self, z, out) -> None:
        rows, cols = z.shape
        L.launch(SOURCE, z.dtype, K.lce("lce_col_sums", K.ctype_of(z.dtype.name)),
                 L.grid_for(cols, K.COL_BLOCK, K.COL_BLOCK), K.COL_BLOCK,
                 K.pack("lce_col_sums", z=z, rows=rows, cols=cols, out=out))
