"""Scalar math that LLVM can vectorise, for use inside Numba kernels.

pip's llvmlite has no SVML, so ``np.exp`` in a Numba loop is a call to libm per element and the
loop never vectorises. :func:`fast_exp` is exp written with operations LLVM vectorises: range
reduction ``x = n ln2 + r``, a Taylor polynomial for ``e^r`` on ``|r| <= ln2/2``, and ``2^n``
assembled in the exponent bits by an integer-to-float bit cast (:func:`_bitcast`). Measured
against float64 ``np.exp`` (tests/test_math.py) it stays within 2 ulp for float32 and float64.

Edge behaviour matches what softmax needs: ``exp(-inf) == 0`` exactly, ``exp(+inf) == inf``,
NaN propagates. Results below ~1e-37 (float32) / ~1e-307 (float64) flush to 0 rather than
becoming denormal.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

#: Flags for kernels: reassociation lets LLVM vectorise sums; no nnan/ninf, since NaN and inf
#: inputs must give torch's results.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
#: For max-reductions only: LLVM vectorises a float max only when it may assume no NaN. Safe here
#: because every caller also sums exp(x - max), which turns a NaN input into a NaN result anyway.
FASTMATH_MAX = FASTMATH | {"nnan"}

JIT = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")


@intrinsic
def _bitcast(typingctx, bits):
    """Reinterpret an int32 (int64) as float32 (float64), bit for bit."""
    if bits == types.int32:
        target, llty = types.float32, ir.FloatType()
    elif bits == types.int64:
        target, llty = types.float64, ir.DoubleType()
    else:
        raise TypingError("_bitcast takes int32 or int64")

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llty)

    return target(bits), codegen


def fast_exp(x):  # pragma: no cover - replaced by the overload inside Numba code
    """exp(x) for float32/float64 inside Numba kernels (vectorisable)."""
    return math.exp(x)


# float32: 2^(n-1) * 2 e^r with n in [-125, 128] so the biased exponent n + 126 stays in [1, 254].
_F32 = dict(
    lo=np.float32(-86.5), hi=np.float32(88.72283), log2e=np.float32(1.4426950408889634),
    ln2_hi=np.float32(0.693359375), ln2_lo=np.float32(-2.12194440e-4),
    c=tuple(np.float32(2.0 / math.factorial(k)) for k in range(8)),  # 2/k!: folds the 2 in
    zero=np.float32(0.0), inf=np.float32(np.inf), half=np.float32(0.5),
)
# float64: same with n in [-1021, 1024], biased exponent n + 1022 in [1, 2046].
_F64 = dict(
    lo=-707.0, hi=709.782712893384, log2e=1.4426950408889634,
    ln2_hi=0.6931471803691238, ln2_lo=1.9082149292705877e-10,
    c=tuple(2.0 / math.factorial(k) for k in range(14)),
    zero=0.0, inf=np.inf, half=0.5,
)


# Only "contract" (FMA): reassociation would fold the two-constant (Cody-Waite) range reduction
# into one multiply and lose ~7 bits.
@overload(fast_exp, jit_options=dict(fastmath={"contract"}))
def _fast_exp_overload(x):
    if x == types.float32:
        k = _F32
        lo, hi, log2e, ln2_hi, ln2_lo = k["lo"], k["hi"], k["log2e"], k["ln2_hi"], k["ln2_lo"]
        c0, c1, c2, c3, c4, c5, c6, c7 = k["c"]
        zero, inf, half = k["zero"], k["inf"], k["half"]

        def impl(x):
            xc = hi if x > hi else x  # NaN falls through both clamps
            xc = lo if xc < lo else xc
            n = np.floor(xc * log2e + half)
            r = (xc - n * ln2_hi) - n * ln2_lo
            p = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
            scale = _bitcast(np.int32((np.int32(n) + np.int32(126)) << np.int32(23)))
            res = p * scale
            res = zero if x < lo else res
            return inf if x > hi else res

        return impl
    if x == types.float64:
        k = _F64
        lo, hi, log2e, ln2_hi, ln2_lo = k["lo"], k["hi"], k["log2e"], k["ln2_hi"], k["ln2_lo"]
        c = k["c"]
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = c
        zero, inf, half = k["zero"], k["inf"], k["half"]

        def impl(x):
            xc = hi if x > hi else x
            xc = lo if xc < lo else xc
            n = np.floor(xc * log2e + half)
            r = (xc - n * ln2_hi) - n * ln2_lo
            p = c13
            p = c12 + r * p
            p = c11 + r * p
            p = c10 + r * p
            p = c9 + r * p
            p = c8 + r * p
            p = c7 + r * p
            p = c6 + r * p
            p = c5 + r * p
            p = c4 + r * p
            p = c3 + r * p
            p = c2 + r * p
            p = c1 + r * p
            p = c0 + r * p
            scale = _bitcast(np.int64((np.int64(n) + np.int64(1022)) << np.int64(52)))
            res = p * scale
            res = zero if x < lo else res
            return inf if x > hi else res

        return impl
    return None


def like(value, ref):  # pragma: no cover - replaced by the overload inside Numba code
    """``value`` as a scalar of ``ref``'s float dtype (``ref`` a scalar or an array).

    Numba types a Python literal as float64/int64, and one such literal in a float32 expression
    promotes the whole loop to float64; this keeps kernels in their input's precision.
    """
    return value


@overload(like)
def _like_overload(value, ref):
    dtype = ref.dtype if isinstance(ref, types.Array) else ref
    if dtype == types.float32:
        cast = np.float32
    elif dtype == types.float64:
        cast = np.float64
    else:
        return None

    def impl(value, ref):
        return cast(value)

    return impl


@njit(fastmath=FASTMATH_MAX, cache=True, nogil=True)
def row_max(row):
    """Maximum of a non-empty 1-D float array, in its dtype; vectorised, NaN-oblivious."""
    m = row[0]
    for i in range(1, row.size):
        m = max(m, row[i])
    return m


#: Elements summed in the input's precision before the partial sum joins a float64 total.
SUM_BLOCK = 1024


@njit(**JIT)
def sum_exp(row, m):
    """``sum(exp(row - m))`` in float64, vectorised: float-precision blocks, float64 total."""
    total = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        s = like(0, row)
        for c in range(b0, min(row.size, b0 + SUM_BLOCK)):
            s += fast_exp(row[c] - m)
        total += s
    return total


@njit(**JIT)
def exp_array(x):
    """Elementwise :func:`fast_exp` of an array (for accuracy tests)."""
    out = np.empty_like(x)
    flat_in = x.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(flat_in.size):
        flat_out[i] = fast_exp(flat_in[i])
    return out
