// nblosses CUDA kernels: definitions shared by every source file.
//
// The loader (_loader.py) compiles each source as
//     [#include <cuda_fp16.h> / <cuda_bf16.h> for half types] + _common.cu + <op>.cu
// with NVRTC, one RawModule per (source, element type), and instantiates the templates listed by
// _kernels.py. NVRTC has no host headers: no INFINITY / NAN macros, no <cmath>; the device math
// functions (expf, logf, log1p, fmaxf, ...) are built in.
//
// Conventions
// - T: element type in memory (__half, __nv_bfloat16, float, double).
// - A = AccT<T>::type: arithmetic type (float for half types and float, double for double).
// - i64 offsets everywhere an index can exceed 2^31 (rows * C, positions, elements).
// - Inputs are (outer, C, inner) row-major; "rows" kernels are for inner == 1.
// - A group of G threads (G a power of two) works on one row. G <= 32: an aligned part of a warp,
//   several rows per block; G > 32: the whole block (blockDim.x == G), one row per iteration.

typedef long long i64;

#define NBL_FULL_MASK 0xffffffffu
//: Loop unrolling (independent 16-byte loads in flight per thread) of the looping kernels that
//: read one array, and of those that read two (register budget: no spills at 512 threads).
#define NBL_UNROLL 4
#define NBL_UNROLL2 2
//: Minimum resident blocks per SM (__launch_bounds__' second argument; 0 = unspecified, ptxas'
//: own choice: 1 would let it take up to 255 registers).
//: Looped row kernels: two blocks of 512 threads = 50% occupancy, a 64-register budget per
//: thread (float64 rows: unspecified, they would spill). Smaller blocks: unspecified (a
//: minimum would only raise their budget, and ptxas fills what it is given).
#define NBL_MIN_BLOCKS(BLOCK, T) ((BLOCK) >= 512 && sizeof(T) < 8 ? 1024 / (BLOCK) : 0)
//: The register-cached float CE kernel (ELEMS = row elements per thread), where ptxas' own
//: choice leaves < 40% occupancy: 128 threads x 32 elements at least 5 blocks per SM (104 -> 77
//: registers), 128 x 16: 8 blocks (69 -> 63), 256 x 32: 3 blocks (103 -> 72); 0 spills at sm_90
//: (tests/test_cuda_compile.py). Other configurations: unspecified.
//: Half-precision rows of more than 32 elements per thread are kept packed (NBL_CE_PACKED):
//: 1024 threads per SM (50% occupancy, 64 registers: 4 rows of 256 threads or 2 of 512 in
//: flight per SM instead of one 1024-thread row).
#define NBL_CE_PACKED(ELEMS, T) (sizeof(T) == 2 && (ELEMS) > 32)
#define NBL_CACHED_MIN_BLOCKS(BLOCK, ELEMS, T) \
    (NBL_CE_PACKED(ELEMS, T) ? 1024 / (BLOCK) \
     : sizeof(T) != 4 ? 0 : (BLOCK) == 128 ? ((ELEMS) >= 32 ? 5 : (ELEMS) == 16 ? 8 : 0) \
                      : (BLOCK) == 256 && (ELEMS) >= 32 ? 3 : 0)
//: Probability-target float rows with 16-byte vectors: 1024 threads per SM (50%
//: occupancy, 64 registers, no spills at sm_90; unbounded: 72). Half rows would spill at 64.
#define NBL_VEC_MIN_BLOCKS(BLOCK, VEC, T) ((VEC) > 1 && sizeof(T) == 4 ? 1024 / (BLOCK) : 0)

// ----------------------------------------------------------------------------- special values
__device__ __forceinline__ float nbl_pos_inf(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double nbl_pos_inf(double) {
    return __longlong_as_double(0x7ff0000000000000LL);
}
__device__ __forceinline__ float nbl_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double nbl_nan(double) {
    return __longlong_as_double(0x7ff8000000000000LL);
}
template <typename A> __device__ __forceinline__ A neg_inf() { return -nbl_pos_inf(A(0)); }
template <typename A> __device__ __forceinline__ A pos_inf() { return nbl_pos_inf(A(0)); }
template <typename A> __device__ __forceinline__ A nan_value() { return nbl_nan(A(0)); }

// ----------------------------------------------------------------------------- types
template <typename T> struct AccT { typedef float type; };
template <> struct AccT<double> { typedef double type; };

//: Type for the logarithms of binary_cross_entropy: double for float (no flush-to-zero of
//: denormal probabilities, as in the CPU backend), float for the half types.
template <typename T> struct WideT { typedef double type; };
#ifdef NBL_HAS_HALF
template <> struct WideT<__half> { typedef float type; };
#endif
#ifdef NBL_HAS_BF16
template <> struct WideT<__nv_bfloat16> { typedef float type; };
#endif

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
#ifdef NBL_HAS_HALF
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
#endif
#ifdef NBL_HAS_BF16
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

template <typename T> struct Cast;
// float <-> double conversions in PTX without .ftz: CuPy compiles with -ftz=true, which turns
// every f32 conversion into its flushing form (a subnormal float input or result becomes 0).
__device__ __forceinline__ double f32_to_f64_exact(float v) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ float f64_to_f32_exact(double v) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(v));
    return r;
}

template <> struct Cast<float> {
    static __device__ __forceinline__ float from(float v) { return v; }
    static __device__ __forceinline__ float from(double v) { return f64_to_f32_exact(v); }
};
template <> struct Cast<double> {
    static __device__ __forceinline__ double from(double v) { return v; }
};
#ifdef NBL_HAS_HALF
template <> struct Cast<__half> {
    static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
    static __device__ __forceinline__ __half from(double v) { return __double2half(v); }
};
#endif
#ifdef NBL_HAS_BF16
template <> struct Cast<__nv_bfloat16> {
    static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
};
#endif
//: Widen<B>::of(v): an accumulator value in the wide type B of WideT, subnormals kept.
template <typename B> struct Widen {
    static __device__ __forceinline__ B of(float v) { return v; }
};
template <> struct Widen<double> {
    static __device__ __forceinline__ double of(float v) { return f32_to_f64_exact(v); }
    static __device__ __forceinline__ double of(double v) { return v; }
};
//: Round an accumulator (or a double) to the element type.
template <typename T, typename V> __device__ __forceinline__ T from_acc(V v) {
    return Cast<T>::from(v);
}

// ----------------------------------------------------------------------------- math
__device__ __forceinline__ float nbl_exp(float x) { return expf(x); }
__device__ __forceinline__ double nbl_exp(double x) { return exp(x); }
__device__ __forceinline__ float nbl_log(float x) { return logf(x); }
__device__ __forceinline__ double nbl_log(double x) { return log(x); }
__device__ __forceinline__ float nbl_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double nbl_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float nbl_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double nbl_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float nbl_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double nbl_min(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float nbl_abs(float a) { return fabsf(a); }
__device__ __forceinline__ double nbl_abs(double a) { return fabs(a); }

struct OpSum {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct OpMax {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const {
        return nbl_max(a, b);
    }
};

// Online softmax statistics: m = running max, s = sum of exp(x - m).
// NaN anywhere makes s NaN; +inf makes s NaN (inf - inf); an all -inf row keeps m = -inf, s = 0
// (the callers' exp(x - m) / s and x - m - log(s) are then NaN, as in torch).
template <typename A> __device__ __forceinline__ A rescale(A from, A to) {
    return from == to ? A(1) : nbl_exp(from - to);  // from == to == -inf must not give NaN
}

template <int N, typename A>
__device__ __forceinline__ void ms_update(A& m, A& s, const A (&a)[N]) {
    A vm = a[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vm = nbl_max(vm, a[i]);
    const A mn = nbl_max(m, vm);
    if (mn != m) {
        s *= nbl_exp(m - mn);
        m = mn;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s += (a[i] == neg_inf<A>()) ? A(0) : nbl_exp(a[i] - m);
}

template <typename A> __device__ __forceinline__ void ms_combine(A& m, A& s, A m2, A s2) {
    const A mn = nbl_max(m, m2);
    s = s * rescale(m, mn) + s2 * rescale(m2, mn);
    m = mn;
}

// ----------------------------------------------------------------------------- vectors
//: N consecutive elements loaded / stored as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, i64 vi) {
    return reinterpret_cast<const Vec<T, N>*>(p)[vi];
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, i64 vi, const Vec<T, N>& v) {
    reinterpret_cast<Vec<T, N>*>(p)[vi] = v;
}

//: The loop over the vectors of one unrolled chunk of a row pass: for each u < U_ whose vector
//: vi = B + u * STRIDE lies below END, the statement that follows runs with u and vi. Every
//: chunked pass has this header; it is a macro (in the manner of CUDA_KERNEL_LOOP) because each
//: function form of it tried, a lambda or functor body, compiled to other PTX and made ptxas
//: use more registers or spill in the row kernels.
#define NBL_CHUNK_VECTORS(u, U_, vi, B, STRIDE, END) \
    _Pragma("unroll") for (int u = 0; u < (U_); ++u) \
        if (const i64 vi = (B) + (i64)u * (STRIDE); vi < (END))

//: One unrolled chunk of a row pass: buf[u] = vector b + u * G of p, for each u with
//: b + u * G < nvec (the others are left unset). U independent loads in flight per thread.
template <typename T, int VEC, int G, int U>
__device__ __forceinline__ void load_chunk(const T* p, i64 b, i64 nvec, Vec<T, VEC> (&buf)[U]) {
    NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) buf[u] = load_vec<T, VEC>(p, vi);
}

//: One unrolled chunk of a streamed gradient pass (the looped and split rows): U vectors of VEC
//: elements, STRIDE vectors apart from vector b (vectors >= vend skipped), read from xr only
//: when ``load`` (false where the gradient needs no logits: an ignored or bad target) and
//: written to gr. grad(xv, c) -> A is an element's gradient, from xv = its value in A (0 when
//: not ``load``) and c = its index in the row; the per-element work is the caller's lambda.
template <int VEC, int STRIDE, int U, typename T, typename F>
__device__ __forceinline__ void grad_chunk(const T* xr, T* gr, i64 b, i64 vend, bool load,
                                           F grad) {
    typedef typename AccT<T>::type A;
    Vec<T, VEC> buf[U];
    if (load) load_chunk<T, VEC, STRIDE, U>(xr, b, vend, buf);
    NBL_CHUNK_VECTORS(u, U, vi, b, STRIDE, vend) {
        Vec<T, VEC> o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const A xv = load ? to_acc(buf[u].v[i]) : A(0);
            o.v[i] = from_acc<T>(grad(xv, vi * VEC + i));
        }
        store_vec<T, VEC>(gr, vi, o);
    }
}

//: load_chunk of two arrays of the same row layout, interleaved; q only when with_q.
template <typename T, int VEC, int G, int U>
__device__ __forceinline__ void load_chunk2(const T* p, const T* q, bool with_q, i64 b, i64 nvec,
                                            Vec<T, VEC> (&pb)[U], Vec<T, VEC> (&qb)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (b + (i64)u * G < nvec) {
            pb[u] = load_vec<T, VEC>(p, b + (i64)u * G);
            if (with_q) qb[u] = load_vec<T, VEC>(q, b + (i64)u * G);
        }
    }
}

//: The first pass of the streamed (looped and split) softmax and cross-entropy rows: online
//: (max, sum) into m, s over the logits of the chunks at b0, b0 + step, ... below vend, each U
//: vectors of VEC elements STRIDE vectors apart. The ops differ only in a policy F of static
//: functions, given the op's own values args... : F::logit(x, args...) is an element's logit (x
//: its value in A), F::add(vi, a, args...) sees vector vi's logits after the update. The args
//: are passed by value (an accumulator as a pointer): passed by reference, or held by a lambda
//: or a functor, they compiled to other PTX (ptxas: more registers in some rows).
template <int VEC, int STRIDE, int U, typename F, typename T, typename A, typename... Args>
__device__ __forceinline__ void ms_range(const T* xr, i64 b0, i64 step, i64 vend, A& m, A& s,
                                         Args... args) {
    for (i64 b = b0; b < vend; b += step) {
        Vec<T, VEC> buf[U];
        load_chunk<T, VEC, STRIDE, U>(xr, b, vend, buf);
        NBL_CHUNK_VECTORS(u, U, vi, b, STRIDE, vend) {
            A a[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) a[i] = F::logit(to_acc(buf[u].v[i]), args...);
            ms_update<VEC>(m, s, a);
            F::add(vi, a, args...);
        }
    }
}

//: ms_range's policy for softmax: the logits are the values; nothing else is summed.
struct PlainLogits {
    template <typename A> static __device__ __forceinline__ A logit(A x) { return x; }
    template <int VEC, typename A>
    static __device__ __forceinline__ void add(i64, const A (&)[VEC]) {}
};

//: A lane's share of a register-cached row: v[k][i] = element i of vector k * G + lane, in A.
template <typename T, int VEC, int NV, bool PACKED> struct RowRegs {
    typedef typename AccT<T>::type A;
    A v[NV][VEC];
    __device__ __forceinline__ void load(const T* x, int k, int vi) {
        const Vec<T, VEC> t = load_vec<T, VEC>(x, vi);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = to_acc(t.v[i]);
    }
    __device__ __forceinline__ void absent(int k) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = neg_inf<A>();
    }
    __device__ __forceinline__ A get(int k, int i) const { return v[k][i]; }
    __device__ __forceinline__ void set(int k, int i, A a) { v[k][i] = a; }
};

//: Two 16-bit elements per 32-bit register as loaded (half the registers of the A form; each
//: use converts again, and set() is unavailable: packed rows recompute).
template <typename T> __device__ __forceinline__ float unpack16(unsigned int w, int hi);
#ifdef NBL_HAS_HALF
template <> __device__ __forceinline__ float unpack16<__half>(unsigned int w, int hi) {
    const __half2 h = *reinterpret_cast<const __half2*>(&w);
    return hi ? __high2float(h) : __low2float(h);
}
#endif
#ifdef NBL_HAS_BF16
template <> __device__ __forceinline__ float unpack16<__nv_bfloat16>(unsigned int w, int hi) {
    return __uint_as_float(hi ? w & 0xffff0000u : w << 16);  // exact, as __bfloat162float
}
#endif
template <typename T, int VEC, int NV> struct RowRegs<T, VEC, NV, true> {
    typedef float A;
    unsigned int w[NV][VEC / 2];
    __device__ __forceinline__ void load(const T* x, int k, int vi) {
        const Vec<unsigned int, VEC / 2> t =
            load_vec<unsigned int, VEC / 2>(reinterpret_cast<const unsigned int*>(x), vi);
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) w[k][i] = t.v[i];
    }
    __device__ __forceinline__ void absent(int k) {
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) w[k][i] = 0u;  // never read: the max skips absent
    }
    __device__ __forceinline__ A get(int k, int i) const { return unpack16<T>(w[k][i / 2], i & 1); }
};

//: Cached kernels: a lane's share of the row at x + off into registers (v.load), absent
//: vectors (!on or past nvec) -inf in the A form. Returns the lane's max.
template <typename T, int VEC, int G, int NV, bool PACKED, typename A = typename AccT<T>::type>
__device__ __forceinline__ A load_row_max(const T* x, i64 off, int nvec, int lane, bool on,
                                          RowRegs<T, VEC, NV, PACKED>& v) {
    A m = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * G + lane;
        if (on && vi < nvec) {
            v.load(x + off, k, vi);
#pragma unroll
            for (int i = 0; i < VEC; ++i) m = nbl_max(m, v.get(k, i));
        } else {
            v.absent(k);
        }
    }
    return m;
}

// ----------------------------------------------------------------------------- column walk
// The walk of the kernels over axis 1 of (outer, C, inner) with inner > 1: a thread per position
// p = o * inner + j, grid-stride in blocks of 256 threads:
//     const i64 npos = outer * inner, plane = C * inner;  // hoisted: ptxas keeps fewer registers
//     for (i64 p = first_pos(); p < npos; p += pos_stride()) {
//         const i64 base = col_base(p, inner, plane);  // element (o, 0, j); class c at + c * inner
__device__ __forceinline__ i64 first_pos() { return (i64)blockIdx.x * 256 + threadIdx.x; }
__device__ __forceinline__ i64 pos_stride() { return (i64)gridDim.x * 256; }
__device__ __forceinline__ i64 col_base(i64 p, i64 inner, i64 plane) {
    const i64 o = p / inner;
    return o * plane + (p - o * inner);
}

//: The column walk as a loop header: the statement that follows runs for each of this thread's
//: positions p, with base its element (o, 0, j); npos and plane hoisted, as above. A macro
//: (like NBL_CHUNK_VECTORS) for the loss kernels, whose per-thread sums a lambda would capture by
//: reference.
#define NBL_FOR_EACH_COL(p, base, OUTER, INNER, C_)                                         \
    for (i64 p = first_pos(), npos_ = (OUTER) * (INNER), plane_ = (C_) * (INNER); p < npos_; \
         p += pos_stride())                                                                  \
        if (const i64 base = col_base(p, (INNER), plane_); true)

//: The column walk as a function, f(base) per position, for the kernels that keep nothing
//: across positions (softmax_cols, softmax_bwd_cols; same registers at sm_90).
template <typename F>
__device__ __forceinline__ void for_each_col(i64 outer, i64 inner, i64 C, F f) {
    NBL_FOR_EACH_COL(p, base, outer, inner, C) f(base);
}

//: The elementwise walk of the LM-head gradient kernels over a (ROWS, COLS) block of logits, one
//: thread per element, grid-stride: the statement that follows runs for each of this thread's
//: elements i = r * COLS + c. A macro, as NBL_FOR_EACH_COL (a body may `continue`).
#define NBL_FOR_EACH_ELEM(i, r, c, ROWS, COLS)                                             \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x, n_ = (ROWS) * (COLS); i < n_; \
         i += (i64)gridDim.x * blockDim.x)                                                  \
        if (const i64 r = i / (COLS), c = i - r * (COLS); true)

// ----------------------------------------------------------------------------- row walk
// The walk every row kernel (inner == 1) shares: groups of G threads (lane = threadIdx.x % G),
// BLOCK / G rows per block iteration, grid-stride over the rows:
//     for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
//         const auto [row, off, active] = row_slot<G>(r0, nrows, C);
// Every thread runs every iteration (the group reductions need all lanes); past the last row
// ``active`` is false and ``off`` (the row's first element) is 0. (A plain loop, not a function
// taking the body as a lambda: the lambda cost softmax_bwd_rows 8 registers at sm_90.)
struct RowSlot {
    i64 row, off;
    bool active;
};

template <int G, int BLOCK> __device__ __forceinline__ i64 first_row() {
    return (i64)blockIdx.x * (BLOCK / G);
}
template <int G, int BLOCK> __device__ __forceinline__ i64 row_stride() {
    return (i64)gridDim.x * (BLOCK / G);
}
template <int G> __device__ __forceinline__ RowSlot row_slot(i64 r0, i64 nrows, i64 C) {
    RowSlot r;
    r.row = r0 + threadIdx.x / G;
    r.active = r.row < nrows;
    r.off = r.active ? r.row * C : 0;
    return r;
}

//: Split rows (few long rows, one block per chunk of chunk_vec vectors): this block's row and
//: its vector range [v0, v1).
template <int VEC>
__device__ __forceinline__ void split_bounds(i64 C, i64 nsplit, i64 chunk_vec, i64& row, i64& v0,
                                             i64& v1) {
    row = blockIdx.x / nsplit;
    v0 = (blockIdx.x - row * nsplit) * chunk_vec;
    v1 = v0 + chunk_vec < C / VEC ? v0 + chunk_vec : C / VEC;
}

// ----------------------------------------------------------------------------- group reductions
// All-reduce over a group of G threads; every thread of the group gets the result. For G <= 32
// this is a butterfly of warp shuffles (all 32 lanes of the warp must execute it: callers never
// branch around a reduction). For G > 32 the group is the whole block: one __syncthreads() per
// call, with two alternating shared buffers so that consecutive calls need no second barrier
// (a thread writes buffer k again only after passing the barrier of the call in between, which
// every thread reaches only after reading buffer k). The buffers are the Reducer's own (a
// __shared__ array of a static member function: one per <G, A>, not declared again by every
// kernel), so a kernel holds one Reducer; with G <= 32 they are never touched and not allocated.
template <int G, typename A> struct Reducer {
    A (*buf)[4][32];
    int ph;

    __device__ __forceinline__ Reducer() : buf(shared_buffers()), ph(0) {}

    static __device__ __forceinline__ A (*shared_buffers())[4][32] {
        __shared__ A b[2][4][32];
        return b;
    }

    template <int K, typename Op> __device__ __forceinline__ void reduce(A (&v)[K], Op op) {
#pragma unroll
        for (int off = (G < 32 ? G : 32) / 2; off > 0; off >>= 1) {
#pragma unroll
            for (int k = 0; k < K; ++k) v[k] = op(v[k], __shfl_xor_sync(NBL_FULL_MASK, v[k], off));
        }
        if (G > 32) {
            constexpr int NW = G > 32 ? G / 32 : 1;
            const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
            if (l == 0) {
#pragma unroll
                for (int k = 0; k < K; ++k) buf[ph][k][w] = v[k];
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < K; ++k) v[k] = buf[ph][k][l & (NW - 1)];
#pragma unroll
            for (int off = NW / 2; off > 0; off >>= 1) {
#pragma unroll
                for (int k = 0; k < K; ++k)
                    v[k] = op(v[k], __shfl_xor_sync(NBL_FULL_MASK, v[k], off));
            }
            ph ^= 1;
        }
    }

    __device__ __forceinline__ A max(A v) {
        A a[1] = {v};
        reduce<1>(a, OpMax());
        return a[0];
    }
    __device__ __forceinline__ A sum(A v) {
        A a[1] = {v};
        reduce<1>(a, OpSum());
        return a[0];
    }

    //: Online (m, s) pairs combined, plus K plain sums, in one round.
    template <int K> __device__ __forceinline__ void ms(A& m, A& s, A (&e)[K]) {
#pragma unroll
        for (int off = (G < 32 ? G : 32) / 2; off > 0; off >>= 1) {
            const A m2 = __shfl_xor_sync(NBL_FULL_MASK, m, off);
            const A s2 = __shfl_xor_sync(NBL_FULL_MASK, s, off);
            ms_combine(m, s, m2, s2);
#pragma unroll
            for (int k = 0; k < K; ++k) e[k] += __shfl_xor_sync(NBL_FULL_MASK, e[k], off);
        }
        if (G > 32) {
            constexpr int NW = G > 32 ? G / 32 : 1;
            const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
            if (l == 0) {
                buf[ph][0][w] = m;
                buf[ph][1][w] = s;
#pragma unroll
                for (int k = 0; k < K; ++k) buf[ph][2 + k][w] = e[k];
            }
            __syncthreads();
            m = buf[ph][0][l & (NW - 1)];
            s = buf[ph][1][l & (NW - 1)];
#pragma unroll
            for (int k = 0; k < K; ++k) e[k] = buf[ph][2 + k][l & (NW - 1)];
#pragma unroll
            for (int off = NW / 2; off > 0; off >>= 1) {
                const A m2 = __shfl_xor_sync(NBL_FULL_MASK, m, off);
                const A s2 = __shfl_xor_sync(NBL_FULL_MASK, s, off);
                ms_combine(m, s, m2, s2);
#pragma unroll
                for (int k = 0; k < K; ++k) e[k] += __shfl_xor_sync(NBL_FULL_MASK, e[k], off);
            }
            ph ^= 1;
        }
    }
};

//: The setup of the streamed row kernels (looped softmax and cross-entropy, probability targets,
//: softmax backward): the group's Reducer and the chunking of a row: nvec vectors of VEC, the
//: thread's lane in its group of G, chunks of U vectors per lane (chunk = G * U vectors) and
//: their count. Bound as
//:     auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
template <int G, typename A> struct StreamedRows {
    Reducer<G, A> red;
    i64 nvec;
    int lane;
    i64 chunk, nchunk;
};
template <int VEC, int G, int U, typename A>
__device__ __forceinline__ StreamedRows<G, A> streamed_rows(i64 C) {
    StreamedRows<G, A> r;
    r.nvec = C / VEC;
    r.lane = threadIdx.x % G;
    r.chunk = (i64)G * U;
    r.nchunk = (r.nvec + r.chunk - 1) / r.chunk;
    return r;
}

//: Sum of one double per thread over a block of BLOCK threads (BLOCK a power of two >= 32);
//: every thread must call it; the result is valid in every thread. One barrier; ``buf`` must
//: not be in use by another reduction that threads may still be reading.
template <int BLOCK>
__device__ __forceinline__ double block_sum_double(double v, double* buf) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(NBL_FULL_MASK, v, off);
    if (BLOCK > 32) {
        constexpr int NW = BLOCK > 32 ? BLOCK / 32 : 1;
        const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
        if (l == 0) buf[w] = v;
        __syncthreads();
        v = buf[l & (NW - 1)];
#pragma unroll
        for (int off = NW / 2; off > 0; off >>= 1) v += __shfl_xor_sync(NBL_FULL_MASK, v, off);
    }
    return v;
}

// ----------------------------------------------------------------------------- single-launch reductions
// Reduced losses finish inside the loss kernel itself: each block writes its (loss, denominator)
// partial, bumps a counter, and the last block to arrive sums the partials in a fixed order
// (deterministic: the grid depends only on shapes and the device), divides, writes the 0-d
// result and resets the counter to 0 so the scratch is ready for the next launch on the stream.
// The host keeps one scratch (partials, counter, prep scalars) per device and stream; launches on
// one stream run in order, so they never share a counter while in flight.
struct Reduce {
    double* part;
    unsigned int* counter;
    void* out;
    int rmode;
    double div;
    const double* scal;
    long long* err;
};

//: The reduction parameters (REDUCE_PARAMS) of a loss kernel, gathered where they are used (at
//: the end: built earlier, the struct would hold registers through the whole kernel).
#define NBL_REDUCE Reduce{part, counter, out, rmode, div, scal, err}

//: Sum of two doubles per thread over the block; the results are valid in every thread.
template <int BLOCK>
__device__ __forceinline__ void block_sum2(double& a, double& b, double (*buf)[32]) {
    a = block_sum_double<BLOCK>(a, buf[0]);
    b = block_sum_double<BLOCK>(b, buf[1]);
}

//: Whether this block is the last of the grid to call it (every thread gets the answer); the
//: partials written before the call are visible to that block.
__device__ __forceinline__ bool last_block(unsigned int* counter) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

//: The last step of every loss kernel with a reduction (R.out non-null). Not inlined: once per
//: block, and inlined its registers would count against the kernel's main loop (ce_cols: 60
//: registers instead of 48, ptxas sm_90). ``acc``: this thread's
//: summed loss; ``den``: its summed ``mean`` denominator (class weights of valid targets).
//: rmode 0: out = sum / div; rmode 1: out = sum / D, D = R.scal[0] when the prep kernel ran,
//: else the summed denominators. 0 / 0 gives NaN (empty or all-ignored ``mean``), as torch.
template <typename T, int BLOCK>
__device__ __noinline__ void finish_loss(double acc, double den, const Reduce R) {
    __shared__ double buf[2][32];
    __syncthreads();  // shared buffers of the kernel body may still be read by slow warps
    block_sum2<BLOCK>(acc, den, buf);
    if (threadIdx.x == 0) {
        R.part[2 * blockIdx.x] = acc;
        R.part[2 * blockIdx.x + 1] = den;
    }
    if (!last_block(R.counter)) return;
    double a = 0.0, d = 0.0;
    for (unsigned int i = threadIdx.x; i < gridDim.x; i += BLOCK) {
        a += __ldcg(R.part + 2 * i);
        d += __ldcg(R.part + 2 * i + 1);
    }
    __syncthreads();
    block_sum2<BLOCK>(a, d, buf);
    if (threadIdx.x == 0) {
        const double D = R.rmode == 0 ? R.div : (R.scal ? R.scal[0] : d);
        static_cast<T*>(R.out)[0] = from_acc<T>(a / D);
        *R.counter = 0u;
    }
}

// ----------------------------------------------------------------------------- class targets
// Device error record (5 x int64, one per device, zeroed once by the host): [state, flat position,
// value, detail, kind]. state 0: clean; 1: being written; 2: complete. kind 0 (NBL_ERR_CLASS): a
// bad class index, value = the target, detail = number of classes; kind 1 (NBL_ERR_PROB): a
// binary_cross_entropy input outside [0, 1] or NaN, value = its bit pattern as a double, detail =
// the element type's width in bits (16 float16, 32 float32, 64 float64; 0 bfloat16) for the
// message; kind 2 (NBL_ERR_LOG_TARGET): a kl_div log-probability target of +inf, value and detail
// 0. The first bad element of any kernel and kind claims it; the host copies it back
// without waiting (see _device_errors.py) and raises at its next call or at synchronize().
#define NBL_ERR_CLASS 0
#define NBL_ERR_PROB 1
#define NBL_ERR_LOG_TARGET 2
__device__ __forceinline__ void record_error(long long* err, int kind, i64 pos, i64 value,
                                             i64 detail) {
    if (!err) return;
    if (atomicCAS(reinterpret_cast<unsigned long long*>(err), 0ull, 1ull) == 0ull) {
        err[1] = pos;
        err[2] = value;
        err[3] = detail;
        err[4] = kind;
        __threadfence();
        atomicExch(reinterpret_cast<unsigned long long*>(err), 2ull);
    }
}

__device__ __forceinline__ void record_bad_target(long long* err, i64 pos, i64 value, i64 C) {
    record_error(err, NBL_ERR_CLASS, pos, value, C);
}

//: A position's class index, read once and classified (the shared prologue of every kernel
//: reading class targets). A target outside [0, C) that is not ignore_index is never used as
//: an address: ``bad`` is set, the position's loss and gradient become NaN, and it is recorded
//: (only once per position: ``record`` is false for the non-leading threads of a row group).
struct Target {
    i64 t;
    bool ignored;  // inactive or ignore_index: loss 0, gradient 0
    bool valid;    // in [0, C)
    bool bad;      // neither: loss NaN, gradient NaN
};

__device__ __forceinline__ Target load_target(const i64* t, i64 pos, bool active, i64 ignore,
                                              i64 C, long long* err, bool record) {
    Target r;
    r.t = active ? t[pos] : ignore;
    r.ignored = !active || r.t == ignore;
    r.valid = !r.ignored && r.t >= 0 && r.t < C;
    r.bad = !r.ignored && !r.valid;
    if (r.bad && record) record_bad_target(err, pos, r.t, C);
    return r;
}

//: The upstream gradient of a position over the ``mean`` denominator: g_rows[pos] ("none"),
//: scal[1] = g / D from class_prep ("mean"), else g_scalar.
template <typename T, typename A>
__device__ __forceinline__ A upstream(const T* g_rows, i64 pos, bool active, int rmode,
                                      const double* scal, double g_scalar) {
    if (g_rows) return active ? to_acc(g_rows[pos]) : A(0);
    return (rmode == 1 && scal) ? (A)scal[1] : (A)g_scalar;
}

//: softcap: c tanh(x / c) (c > 0), and the factor of its derivative from the capped value.
__device__ __forceinline__ float nbl_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double nbl_tanh(double x) { return tanh(x); }
template <typename A> __device__ __forceinline__ A apply_softcap(A x, A c) {
    return c > A(0) ? c * nbl_tanh(x / c) : x;
}
template <typename A> __device__ __forceinline__ A softcap_grad(A xc, A c) {
    if (c > A(0)) {
        const A th = xc / c;
        return A(1) - th * th;
    }
    return A(1);
}

// The prep kernel of nll / cross_entropy with class indices, run only when the main kernel needs
// global scalars before writing gradients: scal = [D, g / D, W] with D the ``mean`` denominator
// (summed weights, or the count, of the targets that are not ignore_index; bad targets skipped),
// g / D (+inf when D is 0, as the CPU backend) and W = sum of the first ``nw`` class weights
// (label smoothing with weights). Grid-stride over the targets, last block finishes.
template <typename T>
__global__ void __launch_bounds__(256) class_prep(NBL_PARAMS_CLASS_PREP) {
    __shared__ double buf[2][32];
    double acc = 0.0, ws = 0.0;
    const i64 stride = (i64)gridDim.x * 256;
    const i64 first = (i64)blockIdx.x * 256 + threadIdx.x;
    for (i64 p = first; p < npos; p += stride) {
        const i64 ti = t[p];
        if (ti != ignore && ti >= 0 && ti < C) acc += w ? (double)to_acc(w[ti]) : 1.0;
    }
    for (i64 c = first; c < nw; c += stride) ws += (double)to_acc(w[c]);
    block_sum2<256>(acc, ws, buf);
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = acc;
        part[2 * blockIdx.x + 1] = ws;
    }
    if (!last_block(counter)) return;
    double d = 0.0, W = 0.0;
    for (unsigned int i = threadIdx.x; i < gridDim.x; i += 256) {
        d += __ldcg(part + 2 * i);
        W += __ldcg(part + 2 * i + 1);
    }
    __syncthreads();
    block_sum2<256>(d, W, buf);
    if (threadIdx.x == 0) {
        scal[0] = d;
        scal[1] = d != 0.0 ? g / d : pos_inf<double>();
        scal[2] = W;
        *counter = 0u;
    }
}
