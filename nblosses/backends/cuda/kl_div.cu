// torch's kl_div, elementwise over flat arrays of n elements (x the input, a log-probability;
// t the target, already broadcast to x's length by the front end):
//     LOG = 0:  l = xlogy(t, t) - t x,  dl/dx = -t g   (xlogy: 0 at t == 0, NaN for t < 0 or NaN)
//     LOG = 1:  l = exp(t) (t - x),     dl/dx = -exp(t) g
// in the accumulator type (float for the half types), with g = g_rows[i] ("none") or g_scalar.
// A log-target of +inf (LOG = 1) has no meaning: its loss and gradient are NaN and the first one
// is recorded in the device error record (NBL_ERR_LOG_TARGET; the host raises ValueError later).
// CuPy compiles with -ftz=true: a float32 subnormal target counts as 0 here (torch keeps its
// t log t, below 1e-36 in size).
// One grid-stride walk over n / VEC 16-byte vectors and then the n % VEC tail elements, as one
// sequence of units (the host picks VEC = 1 unless every pointer is 16-byte aligned). Reduced
// losses: double per thread, then per block; the last block writes the 0-d result (finish_loss).

//: Record a +inf log-target (rare: kept out of line, off the loop's registers).
__device__ __noinline__ void record_infinite_log_target(long long* err, i64 pos) {
    record_error(err, NBL_ERR_LOG_TARGET, pos, 0, 0);
}

//: torch's xlogy(t, t).
template <typename A> __device__ __forceinline__ A xlogx(A t) {
    return t > A(0) ? t * nbl_log(t) : (t == A(0) ? A(0) : nan_value<A>());
}

//: N elements from element i0 (N = VEC: a vector, i0 a multiple of VEC; N = 1: a tail element).
template <typename T, int LOG, int N>
__device__ __forceinline__ void kl_elements(const T* x, const T* t, i64 i0, const T* g_rows,
                                            double g_scalar, T* gx, T* loss_out, long long* err,
                                            double& acc) {
    typedef typename AccT<T>::type A;
    const Vec<T, N> xv = load_vec<T, N>(x + i0, 0), tv = load_vec<T, N>(t + i0, 0);
    Vec<T, N> gv, lv, ov;
    if (g_rows) gv = load_vec<T, N>(g_rows + i0, 0);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const A xi = to_acc(xv.v[i]), ti = to_acc(tv.v[i]);
        A l, coef;
        if (LOG) {
            coef = nbl_exp(ti);
            l = coef * (ti - xi);
            if (ti == pos_inf<A>()) {
                record_infinite_log_target(err, i0 + i);
                l = coef = nan_value<A>();
            }
        } else {
            coef = ti;
            l = xlogx(ti) - ti * xi;
        }
        if (loss_out) lv.v[i] = from_acc<T>(l);
        else acc += (double)l;
        if (gx) ov.v[i] = from_acc<T>(-(coef * (g_rows ? to_acc(gv.v[i]) : (A)g_scalar)));
    }
    if (loss_out) store_vec<T, N>(loss_out + i0, 0, lv);
    if (gx) store_vec<T, N>(gx + i0, 0, ov);
}

template <typename T, int VEC, int LOG>
__global__ void __launch_bounds__(256) kl_div_fwd(NBL_PARAMS_KL) {
    double acc = 0.0;
    const i64 nvec = n / VEC, units = nvec + n % VEC;
    for (i64 u = (i64)blockIdx.x * 256 + threadIdx.x; u < units; u += (i64)gridDim.x * 256) {
        if (u < nvec) kl_elements<T, LOG, VEC>(x, t, u * VEC, g_rows, g_scalar, gx, loss_out,
                                               err, acc);
        else kl_elements<T, LOG, 1>(x, t, nvec * VEC + (u - nvec), g_rows, g_scalar, gx,
                                    loss_out, err, acc);
    }
    if (out) finish_loss<T, 256>(acc, 0.0, NBL_REDUCE);
}
