// nll_loss on log-probabilities x of shape (N, C, inner), targets t of shape (N, inner).
// nll_fwd: per position p = (n, j): loss = -w_t x[n, t, j] (0 for ignore_index, NaN for a target
// outside [0, C), which _args.check_targets rejects before any kernel; never used as an address).
// nll_grad: writes -w_t * scale at (n, t, j) for the valid positions; the caller zero-fills the
// gradient first (cudaMemsetAsync on the same stream), after nll_fwd has read x, so the gradient
// may be written into x itself.

template <typename T>
__global__ void __launch_bounds__(256)
nll_fwd(const T* x, const i64* __restrict__ t, i64 nrows, i64 C, i64 inner,
        const T* __restrict__ w, i64 ignore, T* __restrict__ loss_out,
        double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    const i64 npos = nrows * inner;
    const i64 stride = (i64)gridDim.x * 256;
    double acc = 0.0;
    for (i64 p = (i64)blockIdx.x * 256 + threadIdx.x; p < npos; p += stride) {
        const i64 ti = t[p];
        A l = A(0);
        if (ti != ignore) {
            if (ti >= 0 && ti < C) {
                const i64 o = p / inner;
                const A xt = to_acc(x[(o * C + ti) * inner + (p - o * inner)]);
                l = -(w ? to_acc(w[ti]) : A(1)) * xt;
            } else {
                l = nan_value<A>();
            }
        }
        if (loss_out) loss_out[p] = from_acc<T>(l);
        else acc += (double)l;
    }
    if (loss_part) write_partial<256>(acc, loss_part);
}

template <typename T>
__global__ void __launch_bounds__(256)
nll_grad(const i64* __restrict__ t, i64 nrows, i64 C, i64 inner, const T* __restrict__ w,
         i64 ignore, const T* __restrict__ g_rows, const double* __restrict__ g_dev,
         double g_scalar, T* __restrict__ gx) {
    typedef typename AccT<T>::type A;
    const i64 npos = nrows * inner;
    const i64 stride = (i64)gridDim.x * 256;
    for (i64 p = (i64)blockIdx.x * 256 + threadIdx.x; p < npos; p += stride) {
        const i64 ti = t[p];
        if (ti == ignore || ti < 0 || ti >= C) continue;
        const A scale = g_rows ? to_acc(g_rows[p]) : (g_dev ? (A)g_dev[0] : (A)g_scalar);
        const i64 o = p / inner;
        gx[(o * C + ti) * inner + (p - o * inner)] =
            from_acc<T>(-(w ? to_acc(w[ti]) : A(1)) * scale);
    }
}
