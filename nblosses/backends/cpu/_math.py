"""Scalar math that LLVM can vectorise, for use inside Numba kernels.

pip's llvmlite has no SVML, so ``np.exp`` in a Numba loop is a call to libm per element and the
loop never vectorises. :func:`fast_exp` is exp written with operations LLVM vectorises: range
reduction ``x = n ln2 + r``, a minimax polynomial for ``e^r`` on ``|r| <= ln2/2``, and ``2^n``
assembled in the exponent bits by bit shifts, with no float-to-int conversion (AVX2 has none
for float64). Measured against float64 ``np.exp`` (tests/test_math.py) it stays within 1 ulp
for float32 and float64; the test allows 2.

Edge behaviour matches what softmax needs: ``exp(-inf) == 0`` exactly, ``exp(+inf) == inf``,
NaN propagates. Results below ~1e-37 (float32) / ~1e-307 (float64) flush to 0 rather than
becoming denormal.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

#: Flags for kernels: reassociation lets LLVM vectorise sums; no nnan/ninf, since NaN and inf
#: inputs must give torch's results (max-reductions use :func:`fmax`, which needs neither).
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

JIT = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
#: For loops that form ``(x - m) - log s`` and reduce nothing: without "reassoc", LLVM may not
#: rewrite it as ``x - (m + log s)``, which rounds away the low bits of large logits.
JIT_EXACT = dict(JIT, fastmath={"contract", "arcp", "nsz"})


# float type -> (integer type of its width, LLVM float type, LLVM integer type, mantissa bits)
_LAYOUT = {
    types.float32: (types.int32, ir.FloatType(), ir.IntType(32), 23),
    types.float64: (types.int64, ir.DoubleType(), ir.IntType(64), 52),
}
_FLOAT_OF_INT = {layout[0]: ftype for ftype, layout in _LAYOUT.items()}


def _layout(ftype, name: str):
    try:
        return _LAYOUT[ftype]
    except KeyError:
        raise TypingError(f"{name} takes float32 or float64") from None


@intrinsic
def _bitcast(typingctx, bits):
    """Reinterpret an int32 (int64) as float32 (float64), bit for bit."""
    if bits not in _FLOAT_OF_INT:
        raise TypingError("_bitcast takes int32 or int64")
    target = _FLOAT_OF_INT[bits]
    llfloat = _LAYOUT[target][1]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llfloat)

    return target(bits), codegen


@intrinsic
def _bits(typingctx, value):
    """Reinterpret a float32 (float64) as int32 (int64), bit for bit."""
    itype, _, llint, _ = _layout(value, "_bits")

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llint)

    return itype(value), codegen


@intrinsic
def _exponent_from_low_bits(typingctx, value):
    """float32 (float64) whose bits are ``value``'s shifted left by 23 (52): the low mantissa
    bits become the exponent field. Written in LLVM IR so the shift stays 32-bit for float32
    (Numba widens int32 arithmetic to int64, which halves the vector width)."""
    _, llfloat, llint, shift = _layout(value, "_exponent_from_low_bits")

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], llint)
        return builder.bitcast(builder.shl(bits, ir.Constant(llint, shift)), llfloat)

    return value(value), codegen


@intrinsic
def fmax(typingctx, a, b):
    """``max(a, b)`` of two float32 (float64) values as LLVM's ``llvm.maximum``: NaN when either
    is NaN, ``+inf`` wins over any number.

    Numba's ``max()`` lowers to a compare and a branch that LLVM 22 neither if-converts into a
    vector max nor recognises as a reduction (not even with ``nnan``): ``row_max`` compiled to
    scalar ``vmaxss``, 8x slower than the exp pass after it. ``llvm.maximum`` is vectorised
    both elementwise and as a loop reduction (``vmaxps`` plus a NaN blend on AVX2, ``vmaxps``
    with a mask on AVX-512), and its NaN propagation is exact, so no ``nnan`` flag is needed.
    """
    if a != b:
        raise TypingError("fmax takes two values of one float type")
    _layout(a, "fmax")

    def codegen(context, builder, signature, args):
        lltype = args[0].type
        suffix = "f32" if lltype == ir.FloatType() else "f64"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lltype, [lltype] * 2),
                                            f"llvm.maximum.{suffix}")
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def _prefetch(typingctx, array, offset):
    """Hint the CPU to load the cache line holding element ``offset`` of ``array``, counted in
    memory order from its first element (``llvm.prefetch``: read, keep in L1). A prefetch never
    faults, and does nothing on CPUs without one."""
    if not isinstance(array, types.Array) or not isinstance(offset, types.Integer):
        raise TypingError("_prefetch takes an array and an integer offset")

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0")
        address = builder.bitcast(builder.gep(data, [offset]), i8p)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, offset), codegen


#: Rows up to this many bytes are prefetched whole; longer ones stream well enough through the
#: hardware prefetcher, and a whole long row requested at once would push the current one out
#: of L1.
PREFETCH_BYTES = 16 << 10


@njit(**JIT)
def prefetch_next_row(a, i):
    """Start loading row ``i + 1`` of the C-contiguous 2-D ``a`` into L1, if it exists and is
    at most :data:`PREFETCH_BYTES` long.

    For the cross-entropy row kernels, called before computing row ``i``: a row of a few KB
    is computed from L1 in a few hundred ns, while the memory system would otherwise idle.
    Measured (2-core Zen 5, float32, 4096x[1000], fastest of 3 processes of 40 interleaved
    calls): cross_entropy 0.73 -> 0.62 ms, with its gradient 0.94 -> 0.79 ms.
    Kernels that write a row as long as the one they read do not use it: softmax float32
    8192x[1024] ran 1.8 ms with it, 1.3-1.4 ms without (two processes of 40 interleaved
    calls; log_softmax and 4096x[1000] equal within the noise), and the backwards, which read
    two arrays per row, got slower too.
    """
    if i + 1 < a.shape[0] and a.shape[1] * a.itemsize <= PREFETCH_BYTES:
        row = a[i + 1]
        for k in range(0, row.size, max(1, 64 // a.itemsize)):
            _prefetch(row, k)


def _horner(coeffs, ftype):
    """A Numba function ``r -> sum(coeffs[k] * r**k)`` by Horner's rule, coefficients as literals.

    Generated per coefficient tuple: a loop over a tuple does not vectorise, and zero padding
    to share one unrolled expression between precisions is not free (without ``nnan`` LLVM may
    not fold ``0 + r * 0``).
    """
    consts = {f"c{k}": ftype(c) for k, c in enumerate(coeffs)}
    expr = f"c{len(coeffs) - 1}"
    for k in reversed(range(len(coeffs) - 1)):
        expr = f"c{k} + r * ({expr})"
    exec(f"def horner(r):\n    return {expr}\n", consts)
    # Not inline="always": Numba-level inlining would compile it under the caller's flags
    # (reassociation would reorder Horner's rule); LLVM still inlines it, keeping these flags.
    return njit(fastmath={"contract"}, error_model="numpy")(consts["horner"])


def _precision(x: Any, k32: Any, k64: Any) -> tuple[Any, Any] | None:
    """An overload's constants and NumPy type for the Numba type ``x``: ``(k32, float32)``,
    ``(k64, float64)``, or None for other types (the overload then does not apply)."""
    if x == types.float32:
        return k32, np.float32
    if x == types.float64:
        return k64, np.float64
    return None


def fast_exp(x):  # pragma: no cover - replaced by the overload inside Numba code
    """exp(x) for float32/float64 inside Numba kernels (vectorisable)."""
    return math.exp(x)


# e^r on |r| <= ln2/2 as 2 * p(r): near-minimax polynomials (mpmath.chebyfit of exp, then doubled),
# degree 6 for float32 (2.8e-9 relative) and 11 for float64 (4.5e-18), two and one term(s) fewer
# than Taylor series of the same accuracy. The 2 lets the scale be 2^(n-1), whose biased exponent
# stays in range for the largest n.
_EXP_POLY32 = (2.0, 2.000000075432428, 1.0000000094235515, 0.33332831029306553,
               0.08333270579355032, 0.01675025279630667, 0.002788221686794535)
_EXP_POLY64 = (2.0, 2.0, 1.0000000000000038, 0.3333333333333336, 0.0833333333329762,
               0.016666666666639202, 0.002777777790462955, 0.00039682539780094226,
               4.960297096465699e-05, 5.511448183715794e-06, 5.526527927808206e-07,
               5.0220075211927554e-08)
# lo/hi: clamps keeping n in [-125, 128] (float32) / [-1020, 1024] (float64), so that the biased
# exponent n - 1 + bias of the scale stays in [1, 2 bias]. shifter: 1.5 * 2^(mantissa bits) plus
# that bias (see impl).
_EXP32 = dict(lo=-86.5, hi=88.72283, ln2_hi=0.693359375, ln2_lo=-2.12194440e-4,
              shifter=1.5 * 2.0**23 + 126, poly=_EXP_POLY32)
_EXP64 = dict(lo=-707.0, hi=709.782712893384, ln2_hi=0.6931471803691238,
              ln2_lo=1.9082149292705877e-10, shifter=1.5 * 2.0**52 + 1022, poly=_EXP_POLY64)


def fast_exp_nonpos(x):  # pragma: no cover - replaced by the overload inside Numba code
    """exp(x) for ``x <= 0`` (a logit minus its row's maximum or logsumexp), ``-inf`` or NaN
    inside Numba kernels: :func:`fast_exp` without its overflow branch, which costs two vector
    instructions per exp and two constants in registers that the exp-bound loops lack (their
    constants were re-broadcast from memory every iteration). A positive ``x`` (a fused
    ``x * (1 / T) - max`` may come out a rounding error above 0) gives 1."""
    return math.exp(min(x, 0.0))


def _exp_impl(x: Any, nonpos: bool) -> Any:
    """The overload of :func:`fast_exp` (``nonpos`` False) or :func:`fast_exp_nonpos`."""
    picked = _precision(x, _EXP32, _EXP64)
    if picked is None:
        return None
    k, ftype = picked
    lo, ln2_hi, ln2_lo, shifter = (ftype(k[name]) for name in
                                   ("lo", "ln2_hi", "ln2_lo", "shifter"))
    log2e, zero, inf = ftype(1.4426950408889634), ftype(0.0), ftype(np.inf)
    hi = zero if nonpos else ftype(k["hi"])
    poly = _horner(k["poly"], ftype)

    def impl(x):
        xc = hi if x > hi else x  # NaN falls through both clamps
        xc = lo if xc < lo else xc
        # Adding 1.5 * 2^m + bias rounds x log2(e) to an integer and leaves n + bias in the low
        # mantissa bits: n as a float by subtracting the shifter again, 2^(n-1) by shifting
        # those bits into the exponent field (the 1.5 * 2^m bits fall off the top). No float ->
        # int conversion: AVX2 has none for float64, and the loop stays vectorised.
        kd = xc * log2e + shifter
        n = kd - shifter
        r = (xc - n * ln2_hi) - n * ln2_lo
        res = poly(r) * _exponent_from_low_bits(kd)
        res = zero if x < lo else res
        if nonpos:  # a compile-time constant: the branch is pruned
            return res
        return inf if x > hi else res

    return impl


# Only "contract" (FMA): reassociation would fold the two-constant (Cody-Waite) range reduction
# into one multiply and lose ~7 bits, and would cancel the shifter's add and subtract.
@overload(fast_exp, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _fast_exp_overload(x):
    return _exp_impl(x, False)


@overload(fast_exp_nonpos, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _fast_exp_nonpos_overload(x):
    return _exp_impl(x, True)


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
    picked = _precision(x, _LOG32, _LOG64)
    if picked is None:
        return None
    k, ftype = picked
    if ftype is np.float32:
        itype, shift, bias, mant, exp_one = np.int32, 23, 127, 0x7FFFFF, 0x3F800000
    else:
        itype, shift, bias, mant = np.int64, 52, 1023, 0xFFFFFFFFFFFFF
        exp_one = 0x3FF0000000000000
    sqrt2, ln2, one, half, inf = k["sqrt2"], k["ln2"], k["one"], k["half"], k["inf"]
    shift_i, bias_i, mant_i, exp_one_i = itype(shift), itype(bias), itype(mant), itype(exp_one)
    series = _horner(k["c"], ftype)

    def impl(x):
        ix = _bits(x)
        e = itype((ix >> shift_i) - bias_i)
        m = _bitcast(itype((ix & mant_i) | exp_one_i))  # mantissa in [1, 2)
        big = m > sqrt2
        m = m * half if big else m
        ef = ftype(e) + (one if big else one - one)
        z = (m - one) / (m + one)
        w = z * z
        res = ef * ln2 + z * series(w)
        return x if not x < inf else res

    return impl


def fast_log1p(x):  # pragma: no cover - replaced by the overload inside Numba code
    """log(1 + x) for float32/float64 ``x > -1`` inside Numba kernels (vectorisable), accurate
    where ``1 + x`` rounds: while ``1 + x`` is in ``[sqrt(1/2), sqrt(2))``, :func:`fast_log`'s
    series in ``z = x / (2 + x)`` (computed from ``x`` itself, so nothing cancels), else
    ``fast_log(1 + x)``, whose rounding is then below a fifth of an ulp of the result.

    The usual ``log(u) * x / (u - 1)``, ``u = 1 + x``, does not survive the kernels' fast-math
    reassociation: LLVM folds ``u - 1`` to ``x``.
    """
    return math.log1p(x)


# inline="always": as a call, its float64 body was not inlined by LLVM and the BCE-with-logits
# loop ran scalar; nothing here depends on the order of operations, so the caller's flags do.
@overload(fast_log1p, inline="always",
          jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _fast_log1p_overload(x):
    picked = _precision(x, _LOG32, _LOG64)
    if picked is None:
        return None
    k, ftype = picked
    series = _horner(k["c"], ftype)
    one, two = ftype(1.0), ftype(2.0)
    lo, hi = ftype(math.sqrt(0.5) - 1.0), ftype(math.sqrt(2.0) - 1.0)

    def impl(x):
        z = x / (two + x)
        near = z * series(z * z)
        return near if x > lo and x < hi else fast_log(one + x)

    return impl


def like(value, ref):  # pragma: no cover - replaced by the overload inside Numba code
    """``value`` as a scalar of ``ref``'s float dtype (``ref`` a scalar or an array).

    Numba types a Python literal as float64/int64, and one such literal in a float32 expression
    promotes the whole loop to float64; this keeps kernels in their input's precision.
    """
    return value


@overload(like)
def _like_overload(value, ref):
    picked = _precision(ref.dtype if isinstance(ref, types.Array) else ref, None, None)
    if picked is None:
        return None
    cast = picked[1]

    def impl(value, ref):
        return cast(value)

    return impl


@njit(**JIT)
def row_max(row):
    """Maximum of a non-empty 1-D float array, in its dtype (NaN if any is NaN); vectorised."""
    m = row[0]
    for i in range(1, row.size):
        m = fmax(m, row[i])
    return m


#: Elements summed in the input's precision before the partial sum joins a float64 total.
SUM_BLOCK = 1024


# The blocks are slices, indexed from 0: a loop ``for c in range(b0, b1)`` over ``row[c]`` keeps
# a per-element wraparound check and ran at a quarter of the slice loop's speed (2.2 against
# 7.9 G exp/s, float32).
@njit(**JIT)
def sum_exp(row, m):
    """``sum(exp(row - m))`` in float64, vectorised: float-precision blocks, float64 total."""
    total = 0.0
    for b0 in range(0, row.size, SUM_BLOCK):
        blk = row[b0:b0 + SUM_BLOCK]
        s = like(0, row)
        for c in range(blk.size):
            s += fast_exp_nonpos(blk[c] - m)
        total += s
    return total


@njit(**JIT)
def sum_exp_store(row, out, m, shifted=False):
    """``out = exp(row - m)``, or ``row - m`` when ``shifted``; returns ``sum(exp(row - m))``
    in float64 (float-precision blocks).

    ``shifted`` is log_softmax's form: its last pass is then ``out -= log s`` over the one
    array while the row is in L1, rather than ``out = (row - m) - log s`` reading the row
    again; the output is written during the exp pass, where the stores overlap the arithmetic
    (float64 8192x[1024], 2-core Zen 5: 4.5 -> 3.5 ms).
    ``out`` may be ``row``: that case runs a loop over the one array, since LLVM vectorises a
    two-array loop only behind a runtime overlap check, which identical arrays fail (the loop
    would run scalar, ~6x slower).
    """
    total = 0.0
    same = out.ctypes.data == row.ctypes.data
    for b0 in range(0, row.size, SUM_BLOCK):
        ob = out[b0:b0 + SUM_BLOCK]
        s = like(0, row)
        if same:
            for c in range(ob.size):
                d = ob[c] - m
                e = fast_exp_nonpos(d)
                ob[c] = d if shifted else e
                s += e
        else:
            rb = row[b0:b0 + SUM_BLOCK]
            for c in range(ob.size):
                d = rb[c] - m
                e = fast_exp_nonpos(d)
                ob[c] = d if shifted else e
                s += e
        total += s
    return total


# tanh's odd Taylor series to y^13: below |y| = 1/16 its first omitted term is < 1e-19 relative.
_TANH_SERIES = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075)


def fast_tanh(y):  # pragma: no cover - replaced by the overload inside Numba code
    """tanh(y) for float32/float64 inside Numba kernels (vectorisable).

    ``(1 - e) / (1 + e)`` with ``e = exp(-2|y|)`` (no overflow; +-inf give +-1, NaN stays NaN),
    and the series near 0, where ``1 - e`` would cancel: within 3 ulp of float64 ``np.tanh``
    (tests/test_math.py; the worst just above the switch), and vectorised, unlike libm's.
    """
    return math.tanh(y)


@overload(fast_tanh, jit_options=dict(fastmath={"contract"}, error_model="numpy"))
def _fast_tanh_overload(y):
    if y not in _LAYOUT:
        return None
    ftype = np.float32 if y == types.float32 else np.float64
    series = _horner(_TANH_SERIES, ftype)
    one, switch = ftype(1.0), ftype(0.0625)

    def impl(y):
        a = abs(y)
        e = fast_exp_nonpos(-(a + a))
        far = (one - e) / (one + e)
        far = far if y >= 0 else -far
        y2 = y * y
        near = y + y * y2 * series(y2)
        return near if a < switch else far

    return impl


@njit(**JIT)
def softcapped(v, cap):
    """``cap * tanh(v / cap)`` (the logit soft cap), or ``v`` itself when ``cap`` is None
    (compile-time: the branch is pruned)."""
    if cap is None:
        return v
    c = like(cap, v)
    return c * fast_tanh(v / c)


@njit(**JIT)
def softcap_slope(v, cap):
    """``d softcapped(v) / dv = 1 - tanh(v / cap)**2`` for the original logit ``v``."""
    c = like(cap, v)
    t = fast_tanh(v / c)
    return like(1, v) - t * t
