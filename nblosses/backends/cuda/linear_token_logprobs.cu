// linear_token_logprobs: the block kernels of the chunked LM head (host side
// nblosses/backends/cuda/linear_token_logprobs.py; the algebra and its merge over vocabulary
// blocks nblosses/backends/_linear_token_logprobs.py). Compiled by the loader like every source
// (_common.cu and the NBL_PARAMS_* macros first). T: float or double (half inputs are computed
// in float32 by the host). A block z is (rows, cols), C-contiguous, rows row0:row0+rows of the
// batch and columns c0:c0+cols of the vocabulary; statistics and coefficients are double.
//
// With y = cap(z + bias) (softcap c > 0: c tanh(v / c)), M the max of y over the block's row,
// d_c = (y_c - M) / T clamped at LTLP_D_MIN (exp is 0 there: a -inf logit adds nothing), e_c =
// exp(d_c): ltlp_stats writes each row's (M, sum e, sum e d, y at the target) and ltlp_grad
// overwrites the block with (e_c (a + b d_c) + [c == t] gt) * cap'(y_c), given the rows'
// merged max m and coefficients (a, b, gt). Class indices are never used as addresses (only
// compared with column numbers); the first vocabulary block (c0 == 0) records a target outside
// [0, n_classes) that is not ignore in the device error record (its row is made NaN by the
// host's per-row algebra).

#define LTLP_D_MIN (-1000)

template <typename T> __device__ __forceinline__ T ltlp_shift(T y, T m, T inv) {
    const T d = (y - m) * inv;
    return d < T(LTLP_D_MIN) ? T(LTLP_D_MIN) : d;  // NaN stays NaN
}

//: The loss's logit of a raw product: bias, then the soft cap.
template <typename T> __device__ __forceinline__ T ltlp_logit(T v, const T* bias, i64 c, T cap) {
    if (bias) v += bias[c];
    return apply_softcap(v, cap);
}

// One block per row (grid-stride over rows): the row prepared in place and its max reduced; then
// the sums of e and e d (both skipped for a row of only -inf: s = 0 adds nothing to the merge)
// and the target's logit, which travels in the same reduction (0 where the block lacks it).
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) ltlp_stats(NBL_PARAMS_LTLP_STATS) {
    Reducer<BLOCK, double> red;
    const T inv = T(inv_t), capt = T(cap);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        T* row = z + r * cols;
        const i64 tr = t[r];
        if (err && c0 == 0 && threadIdx.x == 0 && tr != ignore && (tr < 0 || tr >= n_classes))
            record_bad_target(err, row0 + r, tr, n_classes);
        const i64 tc = tr - c0;
        double lmax = neg_inf<double>(), sums[3] = {0.0, 0.0, 0.0};
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
            const T v = ltlp_logit(row[c], bias, c, capt);
            row[c] = v;
            lmax = fmax(lmax, double(v));
            if (c == tc) sums[2] = double(v);
        }
        const double big = red.max(lmax);
        if (big != neg_inf<double>()) {
            const T mt = T(big);
            for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
                const T d = ltlp_shift(row[c], mt, inv);
                const T e = nbl_exp(d);
                sums[0] += double(e);
                sums[1] += double(e * d);
            }
        }
        red.template reduce<3>(sums, OpSum());
        if (threadIdx.x == 0) {
            double* o = out + r * 4;
            o[0] = big;
            o[1] = sums[0];
            o[2] = sums[1];
            o[3] = sums[2];
        }
    }
}

// dL/dz over the block, elementwise (grid-stride); rows whose target is ignore become zero. raw:
// z holds products not yet prepared.
template <typename T>
__global__ void __launch_bounds__(256) ltlp_grad(NBL_PARAMS_LTLP_GRAD) {
    const T inv = T(inv_t), capt = T(cap);
    NBL_FOR_EACH_ELEM(i, r, c, rows, cols) {
        const i64 tr = t[r];
        if (tr == ignore) {
            z[i] = T(0);
            continue;
        }
        const T v = raw ? ltlp_logit(z[i], bias, c, capt) : z[i];
        const T d = ltlp_shift(v, T(m[r]), inv);
        T g = nbl_exp(d) * (T(coefs[3 * r]) + T(coefs[3 * r + 1]) * d);
        if (c0 + c == tr) g += T(coefs[3 * r + 2]);
        z[i] = g * softcap_grad(v, capt);
    }
}
