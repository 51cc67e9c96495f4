// nll_loss on log-probabilities x of shape (N, C, inner), targets t of shape (N, inner).
// nll_fused, one thread per position p = (n, j):
// - want_loss: loss = -w_t x[n, t, j] (0 for ignore_index), summed with its denominator w_t into
//   the single-launch reduction, or stored per position;
// - want_grad: writes -w_t * scale at (n, t, j); the caller zero-fills the gradient first
//   (cudaMemsetAsync on the same stream). With the gradient written into x itself the host runs
//   the loss launch, the memset, then a gradient-only launch (x read before it is cleared).
// A target outside [0, C) that is not ignore_index is never used as an address: loss NaN, the
// position's whole gradient column NaN, recorded in the device error record.

template <typename T>
__global__ void __launch_bounds__(256) nll_fused(NBL_PARAMS_NLL) {
    typedef typename AccT<T>::type A;
    const i64 npos = nrows * inner;
    const i64 stride = (i64)gridDim.x * 256;
    double acc = 0.0, den = 0.0;
    for (i64 p = (i64)blockIdx.x * 256 + threadIdx.x; p < npos; p += stride) {
        const Target tg = load_target(t, p, true, ignore, C, err, true);
        const i64 o = p / inner;
        const i64 j = p - o * inner;
        const i64 at = (o * C + (tg.valid ? tg.t : 0)) * inner + j;
        const A wt = tg.valid ? (w ? to_acc(w[tg.t]) : A(1)) : A(0);
        if (want_loss) {
            const A l = tg.valid ? -wt * to_acc(x[at]) : (tg.bad ? nan_value<A>() : A(0));
            if (loss_out) {
                loss_out[p] = from_acc<T>(l);
            } else {
                acc += (double)l;
                den += (double)wt;
            }
        }
        if (want_grad) {
            if (tg.valid) {
                const A scale = upstream<T, A>(g_rows, p, true, rmode, scal, g_scalar);
                gx[at] = from_acc<T>(-wt * scale);
            } else if (tg.bad) {
                for (i64 c = 0; c < C; ++c) gx[(o * C + c) * inner + j] = from_acc<T>(nan_value<A>());
            }
        }
    }
    if (out) finish_loss<T, 256>(acc, den, NBL_REDUCE);
}
