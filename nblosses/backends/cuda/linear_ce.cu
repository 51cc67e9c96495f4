// Chunked linear cross-entropy: statistics and gradient of one logits block (see
// nblosses/backends/_linear_ce.py for the algorithm and nblosses/backends/cuda/linear_ce.py for
// the host side). Compiled by the loader like every source (_common.cu and the NBL_PARAMS_*
// macros of _kernels.PARAMS come first). T: float or double (half inputs are computed in float32
// by the host). A block z is (rows, cols), C-contiguous, rows row0:row0+rows of the batch and
// columns c0:c0+cols of the vocabulary; per-row running statistics are double.
//
// Class indices are never used as addresses here (only compared with column numbers); a target
// outside [0, n_classes) that is not ignore is recorded in the device error record by lce_stats
// (its row's loss and gradient are made NaN by the host's per-row algebra).

__device__ __forceinline__ float lce_exp(float x) { return expf(x); }
__device__ __forceinline__ double lce_exp(double x) { return exp(x); }
__device__ __forceinline__ float lce_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double lce_tanh(double x) { return tanh(x); }

//: Bias, then softcap: the loss's logit from a raw product.
template <typename T>
__device__ __forceinline__ T lce_prepare(T v, const T* bias, i64 c, double cap) {
    if (bias) v += bias[c];
    if (cap > 0) v = T(cap) * lce_tanh(v / T(cap));
    return v;
}

//: Block-wide reduction of one double (BLOCK a power of two, >= 32); valid in every thread.
template <int BLOCK, bool MAX>
__device__ __forceinline__ double lce_block_reduce(double v, double* buf) {
    for (int off = 16; off > 0; off >>= 1) {
        const double o = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? fmax(v, o) : v + o;
    }
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();  // buf may still be read by the previous reduction
    if (l == 0) buf[w] = v;
    __syncthreads();
    v = buf[0];
    for (int k = 1; k < BLOCK / 32; ++k) v = MAX ? fmax(v, buf[k]) : v + buf[k];
    return v;
}

// One block per row (grid-stride over rows): prepare the row in place, then merge its max, sum
// of exponentials, target logit (t != null), smoothing sum (smoothing) or probability sums
// (y != null, row stride ldy) into m, s, xt, sa (swx or a_sum), sb (b_sum).
// The first vocabulary block (c0 == 0) records a bad class index of each row.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) lce_stats(NBL_PARAMS_LCE_STATS) {
    __shared__ double buf[BLOCK / 32];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        T* row = z + r * cols;
        const i64 tr = t ? t[r] : ignore;
        if (c0 == 0 && threadIdx.x == 0 && tr != ignore && (tr < 0 || tr >= n_classes))
            record_bad_target(err, row0 + r, tr, n_classes);
        const i64 tc = t ? tr - c0 : -1;
        double lmax = -__longlong_as_double(0x7ff0000000000000LL), wsum = 0.0, pa = 0.0, pb = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
            const T v = lce_prepare(row[c], bias, c, cap);
            row[c] = v;
            lmax = fmax(lmax, double(v));
            const double wc = w ? double(w[c]) : 1.0;
            if (c == tc) xt[r] = double(v);
            if (smoothing) wsum += wc * double(v);
            if (y) {
                const double wy = wc * (double(y[r * ldy + c]) * keep + spread);
                pa += wy;
                pb += wy * double(v);
            }
        }
        const double bmax = lce_block_reduce<BLOCK, true>(lmax, buf);
        const T mt = T(bmax);
        double se = 0.0;
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) se += double(lce_exp(row[c] - mt));
        se = lce_block_reduce<BLOCK, false>(se, buf);
        if (smoothing) wsum = lce_block_reduce<BLOCK, false>(wsum, buf);
        if (y) {
            pa = lce_block_reduce<BLOCK, false>(pa, buf);
            pb = lce_block_reduce<BLOCK, false>(pb, buf);
        }
        if (threadIdx.x == 0) {
            const double mo = m[r], mn = fmax(mo, double(mt));
            s[r] = s[r] * exp(mo - mn) + se * exp(double(mt) - mn);
            m[r] = mn;
            if (smoothing) sa[r] += wsum;
            if (y) {
                sa[r] += pa;
                sb[r] += pb;
            }
        }
    }
}

// dL/dz over the block, elementwise (grid-stride): coef * exp(z - m) - b * w_c * y'_c, minus a
// at the target, times the softcap's derivative 1 - (z / cap)^2; rows whose target is ignore
// become zero. raw: z holds products not yet prepared.
template <typename T>
__global__ void __launch_bounds__(256) lce_grad(NBL_PARAMS_LCE_GRAD) {
    NBL_FOR_EACH_ELEM(i, r, c, rows, cols) {
        if (t && t[r] == ignore) {
            z[i] = T(0);
            continue;
        }
        T v = z[i];
        if (raw) v = lce_prepare(v, bias, c, cap);
        double wy = w ? double(w[c]) : 1.0;
        if (y) wy *= double(y[r * ldy + c]) * keep + spread;
        T g = T(coef[r]) * lce_exp(v - T(m[r])) - T(b[r] * wy);
        if (t && c0 + c == t[r]) g -= T(a[r]);
        if (cap > 0) {
            const T u = v / T(cap);
            g *= T(1) - u * u;
        }
        z[i] = g;
    }
}

// out[c] += sum_r z[r, c], one thread per column (coalesced across the warp), double sums.
template <typename T>
__global__ void __launch_bounds__(256) lce_col_sums(NBL_PARAMS_LCE_COL_SUMS) {
    for (i64 c = blockIdx.x * (i64)blockDim.x + threadIdx.x; c < cols;
         c += (i64)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (i64 r = 0; r < rows; ++r) acc += double(z[r * cols + c]);
        out[c] = T(double(out[c]) + acc);
    }
}
