// Cross-entropy with class-index targets, loss and gradient fused in one kernel per call.
//
// Per position (row i of (N, C) when inner == 1, else (n, j) of (N, C, inner)), with the logits
// x'_c = softcap(x_c) (EXT and softcap > 0, else x_c), m = max_c x'_c, s = sum_c exp(x'_c - m),
// lse = m + log(s):
//     loss  = (1 - eps) w_t (log(s) - (x'_t - m)) + (eps / C) (W log(s) - sum_c w_c (x'_c - m))
//             + z lse^2                                      (z-loss: EXT only)
//     dL/dx'_c = coef exp(x'_c - m) - b w_c - [c == t] a,
//         a = scale (1 - eps) w_t,  b = scale eps / C,  coef = (a + b W + 2 scale z lse) / s,
//     dL/dx_c = dL/dx'_c (1 - (x'_c / cap)^2)                 (softcap: EXT only)
// with W = sum_c w_c (C without weights; scal[2] from class_prep with weights and smoothing) and
// scale = the upstream gradient over the ``mean`` denominator: g_rows[i] ("none"), scal[1]
// (written by class_prep for "mean": no host round trip) or g_scalar ("sum").
// Positions whose target is ignore_index: loss 0, gradient exactly 0. A target outside [0, C)
// is never used as an address: loss NaN, gradient NaN, recorded in the device error record.
// lse_out (EXT): lse of every position, ignored ones included.
// The gradient may be written into the logits (gx == x): every logit of a row is read before
// the row's first write (cached: the row is in registers; looped: the write pass follows the
// reduction barrier; cols: each position is one thread's own column).
// Reduced losses: per-position losses and denominators accumulate in double per thread, then per
// block, and the last block writes the 0-d result (finish_loss): one launch.

//: The per-call constants of every cross-entropy kernel.
template <typename A> struct CeParams {
    A eps, spread, W, z, cap;
    bool smooth;
    template <typename T>
    __device__ __forceinline__ CeParams(double eps_, i64 C, const T* w, double wsum,
                                        const double* scal, double z_, double cap_)
        : eps((A)eps_),
          spread((A)eps_ / (A)C),
          W((w && eps_ > 0.0 && scal) ? (A)scal[2] : (A)wsum),
          z((A)z_),
          cap((A)cap_),
          smooth(eps_ > 0.0) {}
};

template <typename A> struct CeCoef {
    A loss, a, b, coef;
};

template <int EXT, typename A>
__device__ __forceinline__ CeCoef<A> ce_coef(const Target& tg, A s, A xtm, A swm, A wt, A lse,
                                              const CeParams<A>& P, A scale, int want_grad) {
    // s = sum_c exp(x'_c - m); xtm = x'_t - m; swm = sum_c w_c (x'_c - m)
    CeCoef<A> r;
    r.loss = r.a = r.b = r.coef = A(0);
    if (tg.valid) {
        const A logs = nbl_log(s);
        r.loss = (A(1) - P.eps) * wt * (logs - xtm);
        if (P.smooth) r.loss += P.spread * (P.W * logs - swm);
        A zc = A(0);
        if (EXT) {
            r.loss += P.z * lse * lse;
            zc = A(2) * P.z * lse;
        }
        if (want_grad) {
            r.a = scale * (A(1) - P.eps) * wt;
            r.b = scale * P.spread;
            r.coef = (r.a + r.b * P.W + scale * zc) / s;
        }
    } else if (tg.bad) {
        r.loss = nan_value<A>();
    }
    return r;
}

//: dL/dx_c from e = exp(x'_c - m) and the capped logit xc (0 for ignored, NaN for bad targets).
template <int EXT, typename T, typename A>
__device__ __forceinline__ A ce_grad(const Target& tg, const CeCoef<A>& r, const CeParams<A>& P,
                                     A e, A xc, const T* w, i64 c) {
    if (!tg.valid) return tg.bad ? nan_value<A>() : A(0);
    A gv = r.coef * e;
    if (P.smooth) gv -= r.b * (w ? to_acc(w[c]) : A(1));
    if (c == tg.t) gv -= r.a;
    if (EXT) gv *= softcap_grad(xc, P.cap);
    return gv;
}

//: ms_range's policy for cross-entropy: the logits x' (softcapped with EXT) and, with label
//: smoothing, swx += sum_c w_c x'_c.
template <int EXT> struct CeLogits {
    template <typename A, typename T>
    static __device__ __forceinline__ A logit(A x, const CeParams<A>& P, const T*, A*) {
        return EXT ? apply_softcap(x, P.cap) : x;
    }
    template <int VEC, typename A, typename T>
    static __device__ __forceinline__ void add(i64 vi, const A (&a)[VEC], const CeParams<A>& P,
                                               const T* w, A* swx) {
        if (P.smooth) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) *swx += (w ? to_acc(w[vi * VEC + i]) : A(1)) * a[i];
        }
    }
};

//: One unrolled chunk of the streamed gradient pass (grad_chunk): U vectors of VEC logits,
//: STRIDE vectors apart from vector b, re-read (valid targets only) and written as dL/dx; vectors
//: >= vend skipped.
template <int EXT, int VEC, int STRIDE, int U, typename T, typename A>
__device__ __forceinline__ void ce_grad_chunk(const T* xr, T* gr, i64 b, i64 vend, const Target& tg,
                                              const CeCoef<A>& r, const CeParams<A>& P, A m,
                                              const T* w) {
    grad_chunk<VEC, STRIDE, U>(xr, gr, b, vend, tg.valid, [&](A xv, i64 c) {
        A xc = A(0), e = A(0);
        if (tg.valid) {
            xc = xv;
            if (EXT) xc = apply_softcap(xc, P.cap);
            e = nbl_exp(xc - m);
        }
        return ce_grad<EXT>(tg, r, P, e, xc, w, c);
    });
}

//: The row epilogue shared by the three kernels: loss (or partial and denominator) and lse of a
//: position, written by one thread of its group.
template <int EXT, typename T, typename A>
__device__ __forceinline__ void ce_store(bool leader, i64 pos, const CeCoef<A>& r, A wt, A lse,
                                         T* loss_out, T* lse_out, double& acc, A& den) {
    if (!leader) return;
    if (loss_out) {
        loss_out[pos] = from_acc<T>(r.loss);
    } else {
        acc += (double)r.loss;
        den += wt;
    }
    if (EXT && lse_out) lse_out[pos] = from_acc<T>(lse);
}

#define NBL_CE_PROLOGUE                                                                   \
    typedef typename AccT<T>::type A;                                                     \
    const CeParams<A> P(eps, C, w, wsum, scal, z_loss, softcap);                          \
    const bool ext_lse = EXT && lse_out != nullptr;                                       \
    double acc = 0.0;                                                                     \
    A den = A(0)  /* a few rows per thread: the accumulator type is enough */

template <typename T, int EXT, int VEC, int G, int NV, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_CACHED_MIN_BLOCKS(BLOCK, NV * VEC, T)) ce_cached(NBL_PARAMS_CE) {
    NBL_CE_PROLOGUE;
    // packed rows keep the loaded T and recompute x' and exp(x' - m) in the gradient pass
    constexpr bool PACKED = NBL_CE_PACKED(NV * VEC, T);
    Reducer<G, A> red;
    const int nvec = (int)C / VEC;
    const int lane = threadIdx.x % G;
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const Target tg = load_target(t, row, active, ignore, C, err, lane == 0);
        const bool load = tg.valid || (ext_lse && active);
        RowRegs<T, VEC, NV, PACKED> v;
        A m = load_row_max<T, VEC, G, NV>(x, off, nvec, lane, load, v);
        m = red.max(m);
        if (EXT) m = apply_softcap(m, P.cap);  // monotonic: the max of the capped logits
        A e3[3] = {A(0), A(0), A(0)};  // s, x'_t - m, sum_c w_c (x'_c - m)
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * G + lane;
            if (load && vi < nvec) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const int c = vi * VEC + i;
                    const A xc = EXT ? apply_softcap(v.get(k, i), P.cap) : v.get(k, i);
                    const A d = xc - m;
                    if (c == tg.t) e3[1] = d;
                    if (P.smooth) e3[2] += (w ? to_acc(w[c]) : A(1)) * d;
                    const A e = nbl_exp(d);
                    e3[0] += e;
                    if constexpr (!PACKED) v.set(k, i, EXT ? xc : e);  // EXT: x' (softcap')
                }
            }
        }
        red.template reduce<3>(e3, OpSum());
        const A lse = m + nbl_log(e3[0]);
        const A wt = tg.valid ? (w ? to_acc(w[tg.t]) : A(1)) : A(0);
        const A scale = want_grad ? upstream<T, A>(g_rows, row, active, rmode, scal, g_scalar)
                                  : A(0);
        const CeCoef<A> r = ce_coef<EXT>(tg, e3[0], e3[1], e3[2], wt, lse, P, scale, want_grad);
        ce_store<EXT>(active && lane == 0, row, r, wt, lse, loss_out, lse_out, acc, den);
        if (want_grad && active) {
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int vi = k * G + lane;
                if (vi < nvec) {
                    Vec<T, VEC> o;
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const A kept = v.get(k, i);
                        const A xc = PACKED && EXT ? apply_softcap(kept, P.cap) : kept;
                        const A e = EXT || PACKED ? nbl_exp(xc - m) : kept;
                        o.v[i] = from_acc<T>(ce_grad<EXT>(tg, r, P, e, xc, w, vi * VEC + i));
                    }
                    store_vec<T, VEC>(gx + off, vi, o);
                }
            }
        }
    }
    if (out) finish_loss<T, BLOCK>(acc, (double)den, NBL_REDUCE);
}

template <typename T, int EXT, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T)) ce_looped(NBL_PARAMS_CE) {
    NBL_CE_PROLOGUE;
    constexpr int U = NBL_UNROLL2;  // 64-register budget (NBL_MIN_BLOCKS)
    auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const Target tg = load_target(t, row, active, ignore, C, err, lane == 0);
        const bool load = tg.valid || (ext_lse && active);
        const T* xr = x + off;
        A m = neg_inf<A>(), s = A(0);
        A e2[2] = {A(0), A(0)};  // x'_t (lane 0 only), sum_c w_c x'_c
        if (tg.valid && lane == 0) {  // read before the barrier below
            const A xt = to_acc(xr[tg.t]);
            e2[0] = EXT ? apply_softcap(xt, P.cap) : xt;
        }
        const i64 b0 = load ? lane : nvec;
        ms_range<VEC, G, U, CeLogits<EXT>>(xr, b0, chunk, nvec, m, s, P, w, &e2[1]);
        red.ms(m, s, e2);
        const A lse = m + nbl_log(s);
        const A wt = tg.valid ? (w ? to_acc(w[tg.t]) : A(1)) : A(0);
        const A scale = want_grad ? upstream<T, A>(g_rows, row, active, rmode, scal, g_scalar)
                                  : A(0);
        // centred: x'_t - m and sum_c w_c (x'_c - m) = sum_c w_c x'_c - W m
        const CeCoef<A> r =
            ce_coef<EXT>(tg, s, e2[0] - m, e2[1] - P.W * m, wt, lse, P, scale, want_grad);
        ce_store<EXT>(active && lane == 0, row, r, wt, lse, loss_out, lse_out, acc, den);
        if (want_grad && active) {
            T* gr = gx + off;
            for (i64 k = nchunk - 1; k >= 0; --k) {  // reverse: the row's tail is still in L2
                ce_grad_chunk<EXT, VEC, G, U>(xr, gr, k * chunk + lane, nvec, tg, r, P, m, w);
            }
        }
    }
    if (out) finish_loss<T, BLOCK>(acc, (double)den, NBL_REDUCE);
}

template <typename T, int EXT>
__global__ void __launch_bounds__(256) ce_cols(NBL_PARAMS_CE) {
    NBL_CE_PROLOGUE;
    NBL_FOR_EACH_COL(p, base, nrows, inner, C) {
        const T* xp = x + base;
        const Target tg = load_target(t, p, true, ignore, C, err, true);
        const bool load = tg.valid || ext_lse;
        A m = neg_inf<A>(), s = A(0), swx = A(0), xt = A(0);
        if (load) {
            if (tg.valid) xt = to_acc(xp[tg.t * inner]);
            if (EXT) xt = apply_softcap(xt, P.cap);
            i64 c = 0;
            for (; c + NBL_UNROLL <= C; c += NBL_UNROLL) {
                A a[NBL_UNROLL];
#pragma unroll
                for (int u = 0; u < NBL_UNROLL; ++u) {
                    a[u] = to_acc(xp[(c + u) * inner]);
                    if (EXT) a[u] = apply_softcap(a[u], P.cap);
                }
                ms_update<NBL_UNROLL>(m, s, a);
                if (P.smooth) {
#pragma unroll
                    for (int u = 0; u < NBL_UNROLL; ++u)
                        swx += (w ? to_acc(w[c + u]) : A(1)) * a[u];
                }
            }
            for (; c < C; ++c) {
                A a[1] = {to_acc(xp[c * inner])};
                if (EXT) a[0] = apply_softcap(a[0], P.cap);
                ms_update<1>(m, s, a);
                if (P.smooth) swx += (w ? to_acc(w[c]) : A(1)) * a[0];
            }
        }
        const A lse = m + nbl_log(s);
        const A wt = tg.valid ? (w ? to_acc(w[tg.t]) : A(1)) : A(0);
        const A scale =
            want_grad ? upstream<T, A>(g_rows, p, true, rmode, scal, g_scalar) : A(0);
        const CeCoef<A> r =
            ce_coef<EXT>(tg, s, xt - m, swx - P.W * m, wt, lse, P, scale, want_grad);
        ce_store<EXT>(true, p, r, wt, lse, loss_out, lse_out, acc, den);
        if (want_grad) {
            T* gp = gx + base;
            for (i64 c = 0; c < C; ++c) {
                A xc = A(0), e = A(0);
                if (tg.valid) {
                    xc = to_acc(xp[c * inner]);
                    if (EXT) xc = apply_softcap(xc, P.cap);
                    e = nbl_exp(xc - m);
                }
                gp[c * inner] = from_acc<T>(ce_grad<EXT>(tg, r, P, e, xc, w, c));
            }
        }
    }
    if (out) finish_loss<T, 256>(acc, (double)den, NBL_REDUCE);
}

// Few long rows (fewer rows than resident blocks): each row split into nsplit chunks of chunk_vec
// vectors, one block per chunk, in two launches. ce_split_stats writes per chunk
// stats[4 * (row * nsplit + k) + 0..3] = online max m, sum of exp(x' - m), sum_c w_c x'_c
// (label smoothing) and x'_t (the chunk holding the target; else 0). ce_split_finish combines the
// row's chunks in a fixed order (every block of the row gets the same statistics), the row's
// first block stores its loss / lse and adds to the reduction, and each block writes its chunk
// of the gradient. The target logit comes from the statistics, so the gradient may be written
// into the logits: a block only overwrites the chunk it reads.
template <typename T, int EXT, int VEC, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T)) ce_split_stats(NBL_PARAMS_CE_SPLIT) {
    NBL_CE_PROLOGUE;
    constexpr int U = NBL_UNROLL;
    Reducer<BLOCK, A> red;
    i64 row, v0, v1;
    split_bounds<VEC>(C, nsplit, chunk_vec, row, v0, v1);
    const Target tg = load_target(t, row, true, ignore, C, err, false);
    const bool load = tg.valid || ext_lse;
    const T* xr = x + row * C;
    A m = neg_inf<A>(), s = A(0);
    A e2[2] = {A(0), A(0)};  // sum_c w_c x'_c, x'_t
    if (tg.valid && threadIdx.x == 0 && tg.t >= v0 * VEC && tg.t < v1 * VEC) {
        const A xt = to_acc(xr[tg.t]);
        e2[1] = EXT ? apply_softcap(xt, P.cap) : xt;
    }
    const i64 b0 = load ? v0 + threadIdx.x : v1;
    ms_range<VEC, BLOCK, U, CeLogits<EXT>>(xr, b0, (i64)BLOCK * U, v1, m, s, P, w, &e2[0]);
    red.ms(m, s, e2);
    if (threadIdx.x == 0) {
        double* st = stats + 4 * (i64)blockIdx.x;
        st[0] = (double)m;
        st[1] = (double)s;
        st[2] = (double)e2[0];
        st[3] = (double)e2[1];
    }
}

template <typename T, int EXT, int VEC, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T)) ce_split_finish(NBL_PARAMS_CE_SPLIT) {
    NBL_CE_PROLOGUE;
    constexpr int U = NBL_UNROLL;
    i64 row, v0, v1;
    split_bounds<VEC>(C, nsplit, chunk_vec, row, v0, v1);
    const bool first = v0 == 0;
    const Target tg = load_target(t, row, true, ignore, C, err, first && threadIdx.x == 0);
    A m = neg_inf<A>(), s = A(0), swx = A(0), xt = A(0);
    for (i64 k = 0; k < nsplit; ++k) {  // same order in every block of the row
        const double* st = stats + 4 * (row * nsplit + k);
        ms_combine(m, s, (A)st[0], (A)st[1]);
        swx += (A)st[2];
        xt += (A)st[3];
    }
    const A lse = m + nbl_log(s);
    const A wt = tg.valid ? (w ? to_acc(w[tg.t]) : A(1)) : A(0);
    const A scale = want_grad ? upstream<T, A>(g_rows, row, true, rmode, scal, g_scalar) : A(0);
    const CeCoef<A> r = ce_coef<EXT>(tg, s, xt - m, swx - P.W * m, wt, lse, P, scale, want_grad);
    ce_store<EXT>(first && threadIdx.x == 0, row, r, wt, lse, loss_out, lse_out, acc, den);
    if (want_grad) {
        const T* xr = x + row * C;
        T* gr = gx + row * C;
        for (i64 b = v0 + threadIdx.x; b < v1; b += (i64)BLOCK * U)
            ce_grad_chunk<EXT, VEC, BLOCK, U>(xr, gr, b, v1, tg, r, P, m, w);
    }
    if (out) finish_loss<T, BLOCK>(acc, (double)den, NBL_REDUCE);
}
