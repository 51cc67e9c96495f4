// Cross-entropy with class-index targets, loss and gradient fused in one kernel per call.
//
// Per position (row i of (N, C) when inner == 1, else (n, j) of (N, C, inner)), with
// m = max_c x_c, s = sum_c exp(x_c - m), log-probabilities x_c - m - log(s):
//     loss  = (1 - eps) w_t (log(s) - (x_t - m)) + (eps / C) (W log(s) - sum_c w_c (x_c - m))
//     dL/dx_c = coef exp(x_c - m) - b w_c - [c == t] a,
//         a = scale (1 - eps) w_t,  b = scale eps / C,  coef = (a + b W) / s,
// with W = sum_c w_c (C without weights) and scale = the upstream gradient divided by the
// ``mean`` denominator: g_rows[i] ("none"), *g_dev (a device scalar written by class_denom /
// denom_finalize for "mean": no host round trip) or g_scalar ("sum").
// Positions whose target is ignore_index: loss 0, gradient exactly 0. A target outside [0, C)
// (rejected before any kernel by _args.check_targets) is never used as an address: loss NaN,
// gradient 0.
// The gradient may be written into the logits (gx == x): every logit of a row is read before
// the row's first write (cached: the row is in registers; looped: the write pass follows the
// reduction barrier; cols: each position is one thread's own column).
// Reduced losses: per-position losses accumulate in double per thread, then per block
// (write_partial); loss_finalize divides by the denominator on device.

//: The per-call constants of every cross-entropy kernel: eps, whether smoothing is on,
//: spread = eps / C and W (the summed weights: device value if given, else the host's).
template <typename A> struct CeParams {
    A eps;
    bool smooth;
    A spread;
    A W;
    template <typename I>
    __device__ __forceinline__ CeParams(double eps_, I C, const double* wsum_dev, double wsum_host)
        : eps((A)eps_),
          smooth(eps_ > 0.0),
          spread(eps / (A)C),
          W(wsum_dev ? (A)wsum_dev[0] : (A)wsum_host) {}
};

template <typename A> struct CeCoef {
    A loss, a, b, coef;
};

template <typename T, typename A>
__device__ __forceinline__ CeCoef<A> ce_coef(bool valid, bool ignored, A s, A xtm, A swm, A wt,
                                              const CeParams<A>& P, i64 row, const T* g_rows,
                                              const double* g_dev, double g_scalar,
                                              int want_grad) {
    // s = sum_c exp(x_c - m); xtm = x_t - m; swm = sum_c w_c (x_c - m)
    CeCoef<A> r;
    r.loss = A(0);
    r.a = r.b = r.coef = A(0);
    if (valid) {
        const A logs = nbl_log(s);
        r.loss = (A(1) - P.eps) * wt * (logs - xtm);
        if (P.smooth) r.loss += P.spread * (P.W * logs - swm);
        if (want_grad) {
            const A scale =
                g_rows ? to_acc(g_rows[row]) : (g_dev ? (A)g_dev[0] : (A)g_scalar);
            r.a = scale * (A(1) - P.eps) * wt;
            r.b = scale * P.spread;
            r.coef = (r.a + r.b * P.W) / s;
        }
    } else if (!ignored) {
        r.loss = nan_value<A>();
    }
    return r;
}

//: dL/dx_c of a valid position, from e = exp(x_c - m).
template <typename T, typename A>
__device__ __forceinline__ A ce_grad(const CeCoef<A>& r, const CeParams<A>& P, A e,
                                     const T* w, i64 c, i64 ti) {
    A gv = r.coef * e;
    if (P.smooth) gv -= r.b * (w ? to_acc(w[c]) : A(1));
    if (c == ti) gv -= r.a;
    return gv;
}

template <typename T, int VEC, int G, int NV, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ce_cached(const T* x, const i64* __restrict__ t, i64 nrows, i64 C_, i64 inner,
          const T* __restrict__ w, const double* __restrict__ wsum_dev, double wsum_host,
          i64 ignore, double eps_, int want_grad, const T* __restrict__ g_rows,
          const double* __restrict__ g_dev, double g_scalar, T* gx, T* __restrict__ loss_out,
          double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    constexpr int R = BLOCK / G;
    __shared__ A sbuf[2][4][32];
    Reducer<G, A> red(sbuf);
    const int C = (int)C_;
    const int nvec = C / VEC;
    const int lane = threadIdx.x % G;
    const int grp = threadIdx.x / G;
    const CeParams<A> P(eps_, C, wsum_dev, wsum_host);
    double acc = 0.0;
    for (i64 r0 = (i64)blockIdx.x * R; r0 < nrows; r0 += (i64)gridDim.x * R) {
        const i64 row = r0 + grp;
        const bool active = row < nrows;
        const i64 ti = active ? t[row] : ignore;
        const bool ignored = !active || ti == ignore;
        const bool valid = !ignored && ti >= 0 && ti < (i64)C;
        const i64 off = active ? row * (i64)C : 0;
        A v[NV][VEC];
        A m = load_row_max<T, VEC, G, NV>(x, off, nvec, lane, valid, v);
        m = red.max(m);
        A e3[3] = {A(0), A(0), A(0)};  // s, x_t - m, sum_c w_c (x_c - m)
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * G + lane;
            if (valid && vi < nvec) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const int c = vi * VEC + i;
                    const A d = v[k][i] - m;
                    if (c == ti) e3[1] = d;
                    if (P.smooth) e3[2] += (w ? to_acc(w[c]) : A(1)) * d;
                    const A e = nbl_exp(d);
                    e3[0] += e;
                    v[k][i] = e;
                }
            }
        }
        red.template reduce<3>(e3, OpSum());
        const A wt = valid ? (w ? to_acc(w[ti]) : A(1)) : A(0);
        CeCoef<A> r = ce_coef<T, A>(valid, ignored, e3[0], e3[1], e3[2], wt, P, row,
                                    g_rows, g_dev, g_scalar, want_grad);
        if (active && lane == 0) {
            if (loss_out) loss_out[row] = from_acc<T>(r.loss);
            else acc += (double)r.loss;
        }
        if (want_grad && active) {
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int vi = k * G + lane;
                if (vi < nvec) {
                    Vec<T, VEC> o;
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const int c = vi * VEC + i;
                        const A gv = valid ? ce_grad<T, A>(r, P, v[k][i], w, c, ti) : A(0);
                        o.v[i] = from_acc<T>(gv);
                    }
                    store_vec<T, VEC>(gx + off, vi, o);
                }
            }
        }
    }
    if (loss_part) write_partial<BLOCK>(acc, loss_part);
}

template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
ce_looped(const T* x, const i64* __restrict__ t, i64 nrows, i64 C, i64 inner,
          const T* __restrict__ w, const double* __restrict__ wsum_dev, double wsum_host,
          i64 ignore, double eps_, int want_grad, const T* __restrict__ g_rows,
          const double* __restrict__ g_dev, double g_scalar, T* gx, T* __restrict__ loss_out,
          double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    constexpr int R = BLOCK / G;
    constexpr int U = NBL_UNROLL;
    __shared__ A sbuf[2][4][32];
    Reducer<G, A> red(sbuf);
    const i64 nvec = C / VEC;
    const int lane = threadIdx.x % G;
    const int grp = threadIdx.x / G;
    const i64 chunk = (i64)G * U;
    const i64 nchunk = (nvec + chunk - 1) / chunk;
    const CeParams<A> P(eps_, C, wsum_dev, wsum_host);
    double acc = 0.0;
    for (i64 r0 = (i64)blockIdx.x * R; r0 < nrows; r0 += (i64)gridDim.x * R) {
        const i64 row = r0 + grp;
        const bool active = row < nrows;
        const i64 ti = active ? t[row] : ignore;
        const bool ignored = !active || ti == ignore;
        const bool valid = !ignored && ti >= 0 && ti < C;
        const i64 off = active ? row * C : 0;
        const T* xr = x + off;
        A m = neg_inf<A>(), s = A(0);
        A e2[2] = {A(0), A(0)};  // x_t (lane 0 only), sum_c w_c x_c
        if (valid && lane == 0) e2[0] = to_acc(xr[ti]);  // read before the barrier below
        for (i64 b = valid ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> buf[U];
            load_chunk<T, VEC, G, U>(xr, b, nvec, buf);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const i64 vi = b + (i64)u * G;
                if (vi < nvec) {
                    A a[VEC];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) a[i] = to_acc(buf[u].v[i]);
                    ms_update<VEC>(m, s, a);
                    if (P.smooth) {
#pragma unroll
                        for (int i = 0; i < VEC; ++i)
                            e2[1] += (w ? to_acc(w[vi * VEC + i]) : A(1)) * a[i];
                    }
                }
            }
        }
        red.ms(m, s, e2);
        const A wt = valid ? (w ? to_acc(w[ti]) : A(1)) : A(0);
        // centred: x_t - m and sum_c w_c (x_c - m) = sum_c w_c x_c - W m
        CeCoef<A> r = ce_coef<T, A>(valid, ignored, s, e2[0] - m, e2[1] - P.W * m, wt, P, row,
                                    g_rows, g_dev, g_scalar, want_grad);
        if (active && lane == 0) {
            if (loss_out) loss_out[row] = from_acc<T>(r.loss);
            else acc += (double)r.loss;
        }
        if (want_grad && active) {
            T* gr = gx + off;
            for (i64 k = nchunk - 1; k >= 0; --k) {
                const i64 b = k * chunk + lane;
                Vec<T, VEC> buf[U];
                if (valid) load_chunk<T, VEC, G, U>(xr, b, nvec, buf);
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const i64 vi = b + (i64)u * G;
                    if (vi < nvec) {
                        Vec<T, VEC> o;
#pragma unroll
                        for (int i = 0; i < VEC; ++i) {
                            const i64 c = vi * VEC + i;
                            const A gv =
                                valid ? ce_grad<T, A>(r, P, nbl_exp(to_acc(buf[u].v[i]) - m), w,
                                                      c, ti)
                                      : A(0);
                            o.v[i] = from_acc<T>(gv);
                        }
                        store_vec<T, VEC>(gr, vi, o);
                    }
                }
            }
        }
    }
    if (loss_part) write_partial<BLOCK>(acc, loss_part);
}

template <typename T>
__global__ void __launch_bounds__(256)
ce_cols(const T* x, const i64* __restrict__ t, i64 nrows, i64 C, i64 inner,
        const T* __restrict__ w, const double* __restrict__ wsum_dev, double wsum_host,
        i64 ignore, double eps_, int want_grad, const T* __restrict__ g_rows,
        const double* __restrict__ g_dev, double g_scalar, T* gx, T* __restrict__ loss_out,
        double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    const i64 npos = nrows * inner;
    const i64 plane = C * inner;
    const i64 stride = (i64)gridDim.x * 256;
    const CeParams<A> P(eps_, C, wsum_dev, wsum_host);
    double acc = 0.0;
    for (i64 p = (i64)blockIdx.x * 256 + threadIdx.x; p < npos; p += stride) {
        const i64 o = p / inner;
        const i64 base = o * plane + (p - o * inner);
        const T* xp = x + base;
        const i64 ti = t[p];
        const bool ignored = ti == ignore;
        const bool valid = !ignored && ti >= 0 && ti < C;
        A m = neg_inf<A>(), s = A(0), swx = A(0), xt = A(0);
        if (valid) {
            xt = to_acc(xp[ti * inner]);
            i64 c = 0;
            for (; c + NBL_UNROLL <= C; c += NBL_UNROLL) {
                A a[NBL_UNROLL];
#pragma unroll
                for (int u = 0; u < NBL_UNROLL; ++u) a[u] = to_acc(xp[(c + u) * inner]);
                ms_update<NBL_UNROLL>(m, s, a);
                if (P.smooth) {
#pragma unroll
                    for (int u = 0; u < NBL_UNROLL; ++u)
                        swx += (w ? to_acc(w[c + u]) : A(1)) * a[u];
                }
            }
            for (; c < C; ++c) {
                A a[1] = {to_acc(xp[c * inner])};
                ms_update<1>(m, s, a);
                if (P.smooth) swx += (w ? to_acc(w[c]) : A(1)) * a[0];
            }
        }
        const A wt = valid ? (w ? to_acc(w[ti]) : A(1)) : A(0);
        CeCoef<A> r = ce_coef<T, A>(valid, ignored, s, xt - m, swx - P.W * m, wt, P, p,
                                    g_rows, g_dev, g_scalar, want_grad);
        if (loss_out) loss_out[p] = from_acc<T>(r.loss);
        else acc += (double)r.loss;
        if (want_grad) {
            T* gp = gx + base;
            for (i64 c = 0; c < C; ++c) {
                const A gv =
                    valid ? ce_grad<T, A>(r, P, nbl_exp(to_acc(xp[c * inner]) - m), w, c, ti)
                          : A(0);
                gp[c * inner] = from_acc<T>(gv);
            }
        }
    }
    if (loss_part) write_partial<256>(acc, loss_part);
}
