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
template <> struct Cast<float> {
    static __device__ __forceinline__ float from(float v) { return v; }
    static __device__ __forceinline__ float from(double v) { return (float)v; }
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

//: One unrolled chunk of a row pass: buf[u] = vector b + u * G of p, for each u with
//: b + u * G < nvec (the others are left unset). U independent loads in flight per thread.
template <typename T, int VEC, int G, int U>
__device__ __forceinline__ void load_chunk(const T* p, i64 b, i64 nvec, Vec<T, VEC> (&buf)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u)
        if (b + (i64)u * G < nvec) buf[u] = load_vec<T, VEC>(p, b + (i64)u * G);
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

//: Cached kernels: a lane's share of the row at x + off into registers, v[k] = vector
//: k * G + lane (in A), -inf where absent (!on or past nvec). Returns the lane's max.
template <typename T, int VEC, int G, int NV, typename A>
__device__ __forceinline__ A load_row_max(const T* x, i64 off, int nvec, int lane, bool on,
                                          A (&v)[NV][VEC]) {
    A m = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int vi = k * G + lane;
        if (on && vi < nvec) {
            const Vec<T, VEC> t = load_vec<T, VEC>(x + off, vi);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                v[k][i] = to_acc(t.v[i]);
                m = nbl_max(m, v[k][i]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[k][i] = neg_inf<A>();
        }
    }
    return m;
}

// ----------------------------------------------------------------------------- group reductions
// All-reduce over a group of G threads; every thread of the group gets the result. For G <= 32
// this is a butterfly of warp shuffles (all 32 lanes of the warp must execute it: callers never
// branch around a reduction). For G > 32 the group is the whole block: one __syncthreads() per
// call, with two alternating shared buffers so that consecutive calls need no second barrier
// (a thread writes buffer k again only after passing the barrier of the call in between, which
// every thread reaches only after reading buffer k).
template <int G, typename A> struct Reducer {
    A (*buf)[4][32];
    int ph;

    __device__ __forceinline__ explicit Reducer(A (*b)[4][32]) : buf(b), ph(0) {}

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

//: Per-block partial of a reduced loss: the last step of every loss kernel. Deterministic: the
//: grid depends only on shapes and the device, and the finalize kernel sums in a fixed order.
template <int BLOCK>
__device__ __forceinline__ void write_partial(double acc, double* part) {
    __shared__ double pbuf[32];
    __syncthreads();  // shared buffers of the kernel body may still be read by slow warps
    acc = block_sum_double<BLOCK>(acc, pbuf);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

// ----------------------------------------------------------------------------- reductions
// The ``mean`` denominator of nll / cross_entropy with class indices: the summed weights (or the
// count) of the targets that are not ignore_index. Targets outside [0, C) are skipped (never used
// as an address; _args.check_targets rejects them before any kernel runs). With one block, the
// result goes straight to scal: scal[0] = denominator, scal[1] = g / denominator (+inf when the
// denominator is 0, as in the CPU backend); else per-block partials for denom_finalize.
template <typename T>
__global__ void __launch_bounds__(256)
class_denom(const i64* __restrict__ t, i64 npos, i64 C, i64 ignore, const T* __restrict__ w,
            double g, double* __restrict__ part, double* __restrict__ scal) {
    __shared__ double buf[32];
    double acc = 0.0;
    const i64 stride = (i64)gridDim.x * 256;
    for (i64 p = (i64)blockIdx.x * 256 + threadIdx.x; p < npos; p += stride) {
        const i64 ti = t[p];
        if (ti != ignore && ti >= 0 && ti < C) acc += w ? (double)to_acc(w[ti]) : 1.0;
    }
    acc = block_sum_double<256>(acc, buf);
    if (threadIdx.x == 0) {
        if (gridDim.x == 1) {
            scal[0] = acc;
            scal[1] = acc != 0.0 ? g / acc : pos_inf<double>();
        } else {
            part[blockIdx.x] = acc;
        }
    }
}

//: One block of 1024 threads: scal[0] = sum(part[:n]), scal[1] = g / scal[0] (+inf for 0).
__global__ void __launch_bounds__(1024)
denom_finalize(const double* __restrict__ part, int n, double g, double* __restrict__ scal) {
    __shared__ double buf[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += 1024) acc += part[i];
    acc = block_sum_double<1024>(acc, buf);
    if (threadIdx.x == 0) {
        scal[0] = acc;
        scal[1] = acc != 0.0 ? g / acc : pos_inf<double>();
    }
}

//: One block of 1024 threads: out[0] = sum(part[:n]) / d with d = scal[0] if scal else div.
//: 0 / 0 gives NaN (empty or all-ignored ``mean``), as torch.
template <typename T>
__global__ void __launch_bounds__(1024)
loss_finalize(const double* __restrict__ part, int n, const double* __restrict__ scal, double div,
              T* __restrict__ out) {
    __shared__ double buf[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += 1024) acc += part[i];
    acc = block_sum_double<1024>(acc, buf);
    if (threadIdx.x == 0) {
        const double d = scal ? scal[0] : div;
        out[0] = from_acc<T>(acc / d);
    }
}
