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
#: For loops that form ``(x - m) - log s`` and reduce nothing: without "reassoc", LLVM may not
#: rewrite it as ``x - (m + log s)``, which rounds away the low bits of large logits.
JIT_EXACT = dict(JIT, fastmath={"contract", "arcp", "nsz"})


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


@intrinsic
def _bits(typingctx, value):
    """Reinterpret a float32 (float64) as int32 (int64), bit for bit."""
    if value == types.float32:
        target, llty = types.int32, ir.IntType(32)
    elif value == types.float64:
        target, llty = types.int64, ir.IntType(64)
    else:
        raise TypingError("_bits takes float32 or float64")

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llty)

    return target(value), codegen


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
@overload(fast_exp, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
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


def fast_log(x):  # pragma: no cover - replaced by the overload inside Numba code
    """log(x) for positive normal float32/float64 inside Numba kernels (vectorisable).

    ``x = 2^e * m`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` read from the bits, then
    ``log(m) = 2 atanh(z)``, ``z = (m-1)/(m+1)``, by its odd series (``|z| < 0.172``). NaN and
    ``+inf`` pass through; zero, negative and subnormal inputs are not handled (callers pass
    sums of exponentials, which are >= 1).
    """
    return math.log(x)


def _log_series(n_terms, cast):
    return tuple(cast(2.0 / (2 * k + 1)) for k in range(n_terms))


_LOG32 = dict(c=_log_series(6, np.float32), sqrt2=np.float32(math.sqrt(2.0)),
              ln2=np.float32(math.log(2.0)), one=np.float32(1.0), half=np.float32(0.5),
              inf=np.float32(np.inf))
_LOG64 = dict(c=_log_series(12, np.float64), sqrt2=math.sqrt(2.0), ln2=math.log(2.0), one=1.0,
              half=0.5, inf=np.inf)


@overload(fast_log, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _fast_log_overload(x):
    if x == types.float32:
        k, itype, ftype = _LOG32, np.int32, np.float32
        shift, bias, mant, exp_one = 23, 127, 0x7FFFFF, 0x3F800000
    elif x == types.float64:
        k, itype, ftype = _LOG64, np.int64, np.float64
        shift, bias, mant, exp_one = 52, 1023, 0xFFFFFFFFFFFFF, 0x3FF0000000000000
    else:
        return None
    sqrt2, ln2, one, half, inf = k["sqrt2"], k["ln2"], k["one"], k["half"], k["inf"]
    shift_i, bias_i, mant_i, exp_one_i = itype(shift), itype(bias), itype(mant), itype(exp_one)
    # Series coefficients padded to 12 terms with zeros: the unrolled Horner below is shared by
    # both precisions (a loop over a tuple would not vectorise); float32's zero terms fold away.
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 = k["c"] + (ftype(0),) * (12 - len(k["c"]))

    def impl(x):
        ix = _bits(x)
        e = itype((ix >> shift_i) - bias_i)
        m = _bitcast(itype((ix & mant_i) | exp_one_i))  # mantissa in [1, 2)
        big = m > sqrt2
        m = m * half if big else m
        ef = ftype(e) + (one if big else one - one)
        z = (m - one) / (m + one)
        w = z * z
        p = c9 + w * (c10 + w * c11)
        p = c5 + w * (c6 + w * (c7 + w * (c8 + w * p)))
        p = c0 + w * (c1 + w * (c2 + w * (c3 + w * (c4 + w * p))))
        res = ef * ln2 + z * p
        return x if not x < inf else res

    return impl


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
def sum_exp_store(row, out, m):
    """``out = exp(row - m)``; returns the sum in float64 (float-precision blocks)."""
    total = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        s = like(0, row)
        for c in range(b0, min(row.size, b0 + SUM_BLOCK)):
            e = fast_exp(row[c] - m)
            out[c] = e
            s += e
        total += s
    return total


# ----------------------------------------------------------------------------- vector primitives
# Small loops over contiguous 1-D slices: the middle-axis kernels call them once per class with
# slices of one inner block. Indexing 3-D arrays with ``j0 + j`` instead would keep Numba's
# negative-index wraparound in the loop and stop it vectorising.
@njit(fastmath=FASTMATH_MAX, cache=True, nogil=True)
def vmax(m, xc):
    """``m = max(m, xc)`` elementwise."""
    for j in range(m.size):
        m[j] = max(m[j], xc[j])


@njit(**JIT)
def vsum_exp(s, xc, m):
    """``s += exp(xc - m)``."""
    for j in range(s.size):
        s[j] += fast_exp(xc[j] - m[j])


@njit(**JIT)
def vsum_exp_store(s, xc, m, out):
    """``out = exp(xc - m); s += out``."""
    for j in range(s.size):
        e = fast_exp(xc[j] - m[j])
        out[j] = e
        s[j] += e


@njit(**JIT_EXACT)
def vlog(s):
    """``s = log(s)`` in place.

    Kernels keep a log-sum-exp as the pair ``(m, log s)`` and form ``(x - m) - log s``: adding
    ``m + log s`` first would round away the low bits of ``x`` when ``|x|`` is large (float32
    logits near 1e4 lost three digits that way).
    """
    for j in range(s.size):
        s[j] = fast_log(s[j])


@njit(fastmath=FASTMATH_MAX, cache=True, nogil=True)
def vmax2(m, a, b):
    """``m = max(m, a, b)`` elementwise (two classes per pass: half the loads/stores of m)."""
    for j in range(m.size):
        m[j] = max(m[j], max(a[j], b[j]))


@njit(**JIT)
def vsum_exp2(s, a, b, m):
    """``s += exp(a - m) + exp(b - m)``."""
    for j in range(s.size):
        s[j] += fast_exp(a[j] - m[j]) + fast_exp(b[j] - m[j])


@njit(**JIT)
def block_stats(xo, j0, w, m, s):
    """Max and sum of exponentials over axis 0 of ``xo[:, j0:j0+w]`` into ``m``, ``s``.

    Classes are taken two at a time, so the running ``m`` and ``s`` are loaded and stored half
    as often (10% faster at C = 21).
    """
    n_classes = xo.shape[0]
    m[:] = xo[0, j0:j0 + w]
    c = 1
    while c + 1 < n_classes:
        vmax2(m, xo[c, j0:j0 + w], xo[c + 1, j0:j0 + w])
        c += 2
    if c < n_classes:
        vmax(m, xo[c, j0:j0 + w])
    s[:] = 0
    c = 0
    while c + 1 < n_classes:
        vsum_exp2(s, xo[c, j0:j0 + w], xo[c + 1, j0:j0 + w], m)
        c += 2
    if c < n_classes:
        vsum_exp(s, xo[c, j0:j0 + w], m)


def block_width(outer: int, inner: int, threads: int, widest: int = 2048) -> int:
    """Inner positions per task: wide for long vector loops, narrow enough for all threads."""
    width = widest
    while width > 256 and outer * -(-inner // width) < 4 * threads:
        width //= 2
    return min(width, inner)
