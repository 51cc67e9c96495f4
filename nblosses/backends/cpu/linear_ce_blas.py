"""``C = A @ B + beta * C`` on NumPy arrays, through the BLAS NumPy itself uses.

The chunked linear cross-entropy accumulates a gradient over chunks (``grad_W += g.T @ x``).
``numpy.matmul`` has no accumulate form, and a temporary plus an add would read and write the
whole gradient once more per chunk, outside the matrix product. BLAS ``gemm`` with
``beta = 1`` folds the add into the product's own pass over ``C``. NumPy does not expose
``gemm``, so this module calls the CBLAS entry points of the OpenBLAS that NumPy's wheels load
(same library, same thread pool: no second pool competing for the cores). Where that library
is not found (other NumPy builds), :func:`gemm` falls back to ``numpy.matmul`` into a
cache-sized temporary added block by block: same results, slower accumulation.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import Any

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: ILP64 CBLAS symbols (64-bit integer arguments) of NumPy's OpenBLAS builds, newest first.
_SYMBOLS = {np.dtype(np.float32): ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
            np.dtype(np.float64): ("scipy_cblas_dgemm64_", "cblas_dgemm64_")}
_CTYPE = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
#: Rows of the fallback's temporary (times the columns of C): a few MB, cache-resident.
_FALLBACK_ROWS = 512


def _library_candidates() -> list[str]:
    """OpenBLAS shared libraries shipped next to NumPy (``numpy.libs``, ``numpy/.dylibs``)."""
    root = os.path.dirname(np.__file__)
    pattern = "*openblas*"
    return sorted(glob.glob(os.path.join(root + ".libs", pattern))
                  + glob.glob(os.path.join(root, ".dylibs", pattern)))


@functools.cache
def _cblas_gemm(dtype: np.dtype) -> Any:
    """The ctypes function for ``dtype``'s ILP64 ``cblas_?gemm``, or None."""
    lib = _openblas()
    for symbol in _SYMBOLS[dtype] if lib is not None else ():
        fn = getattr(lib, symbol, None)
        if fn is not None:
            real, i64 = _CTYPE[dtype], ctypes.c_int64
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real,
                           ctypes.c_void_p, i64, ctypes.c_void_p, i64, real,
                           ctypes.c_void_p, i64]
            return fn
    return None


@functools.cache
def _openblas() -> ctypes.CDLL | None:
    """The first OpenBLAS next to NumPy that loads and exports an ILP64 ``gemm``, or None."""
    symbols = [name for names in _SYMBOLS.values() for name in names]
    for path in _library_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if any(hasattr(lib, name) for name in symbols):
            return lib
    return None


def blas_facts() -> dict[str, str | None]:
    """The BLAS the products run on: ``blas`` (OpenBLAS' build string) and ``blas_core`` (the
    kernel family it chose, e.g. ``SkylakeX`` or ``Haswell``), None where not found.

    A report prints them because they decide the speed of the linear cross-entropy: the
    ``OPENBLAS_CORETYPE`` environment variable can force an older kernel family than the CPU
    has (measured at 1024 x 1024 x 4747 float32 on an AVX-512 CPU: ``Haswell`` ran each
    product at about half the speed of the kernel OpenBLAS picks itself).
    """
    lib = _openblas()
    facts: dict[str, str | None] = {"blas": None, "blas_core": None}
    if lib is None:
        return facts
    for key, symbol in (("blas", "get_config"), ("blas_core", "get_corename")):
        for name in (f"scipy_openblas_{symbol}64_", f"openblas_{symbol}64_", f"openblas_{symbol}"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                fn.argtypes = []
                value = fn()
                facts[key] = value.decode(errors="replace").strip() if value else None
                break
    return facts


def has_cblas(dtype: Any) -> bool:
    """Whether :func:`gemm` calls BLAS directly for ``dtype`` (else the NumPy fallback)."""
    return _cblas_gemm(np.dtype(dtype)) is not None


def _operand(a: np.ndarray) -> tuple[int, int]:
    """``(transpose flag, leading dimension)`` of a 2-D operand in row-major CBLAS terms:
    row-contiguous arrays (rows may be strided) pass as they are, column-contiguous ones
    (a transposed view) as the transpose of their base."""
    item = a.itemsize
    r, c = a.shape
    # An axis of length 1 is never stepped along: its stride (NumPy gives x[None] a 0 one)
    # is whatever the layout needs.
    s0, s1 = a.strides
    if (c <= 1 or s1 == item) and (r <= 1 or s0 >= max(1, c) * item):
        return _NO_TRANS, (s0 // item if r > 1 else max(1, c))
    if (r <= 1 or s0 == item) and (c <= 1 or s1 >= max(1, r) * item):
        return _TRANS, (s1 // item if c > 1 else max(1, r))
    raise ValueError("gemm operands must be contiguous along one axis")


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float,
         use_cblas: bool = True) -> None:
    """``c[...] = a @ b + beta * c`` (``beta`` 0 or 1), ``c`` row-contiguous.

    ``a`` and ``b`` may be transposed views (``x.T``) or row slices (``g[:, c0:c1]``) of
    contiguous arrays: no copies are made. ``beta == 0`` never reads ``c`` (it may hold
    garbage). ``use_cblas=False`` forces the NumPy fallback (tests).
    """
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    fn = _cblas_gemm(c.dtype) if use_cblas else None
    if k == 0 or fn is None:
        _gemm_numpy(a, b, c, beta)
        return
    ta, lda = _operand(a)
    tb, ldb = _operand(b)
    tc, ldc = _operand(c)
    if tc != _NO_TRANS:
        raise ValueError("gemm output must be row-contiguous")
    real = _CTYPE[c.dtype]
    fn(_ROW_MAJOR, ta, tb, m, n, k, real(1.0), a.ctypes.data, lda, b.ctypes.data, ldb,
       real(beta), c.ctypes.data, ldc)


def _gemm_numpy(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float) -> None:
    if beta == 0:
        np.matmul(a, b, out=c)
        return
    rows = min(c.shape[0], _FALLBACK_ROWS)
    tmp = np.empty((rows, c.shape[1]), c.dtype)
    for r0 in range(0, c.shape[0], rows):
        r1 = min(c.shape[0], r0 + rows)
        np.matmul(a[r0:r1], b, out=tmp[:r1 - r0])
        c[r0:r1] += tmp[:r1 - r0]
