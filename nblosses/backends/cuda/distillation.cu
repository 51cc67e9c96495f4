// Distillation losses: student logits x against teacher logits (MODE 0 forward KL, 1 reverse
// KL, 2 generalised JSD) or a top-k teacher (MODE 3: indices idx and log-probabilities lp, k per
// position), with the hard cross-entropy mixed in; loss and student gradient in one launch.
//
// With xc = softcap(x) (softcap > 0, else x), zs = xc it (it = 1 / T), likewise zt for the
// teacher, p_s = softmax(zs), p_t = softmax(zt), per position (a row of (N, C) when inner == 1,
// else (n, j) of (N, C, inner)):
//     soft: MODE 0  KL(p_t || p_s)      MODE 1  KL(p_s || p_t)
//           MODE 2  beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
//           MODE 3  sum_j q_j (lp_j - log p_s[idx_j]),  q_j = exp(lp_j), Q = sum_j q_j
//     hard: CE(xc, t) = log sum_c exp(xc_c) - xc_t   (not tempered)
//     loss = (1 - hard) soft + hard CE
//     dL/dzs (soft): MODE 0 p_s - p_t;  MODE 1 p_s (zs - zt - sum p_s (zs - zt));
//                    MODE 2 (1 - beta) p_s (log(p_s / m) - KL(p_s || m));  MODE 3 Q p_s - q at idx
//     dL/dx = ((1 - hard) it dL/dzs + hard (softmax(xc) - onehot(t))) softcap'(x)
// times the upstream gradient (g_rows, or g_scalar / scal[1] over the mean denominator).
// softmax(xc) is p_s itself when T == 1 (sep = 0); with sep = 1 it has its own sums.
// Zero probabilities contribute 0 to every sum (xlogy: a -inf teacher logit is a masked class).
//
// distill_rows (inner == 1): a group of G threads per row; pass 1 keeps online statistics of
// both rows per thread (running max of the capped logits, sums of exponentials relative to it,
// the divergence's own sum, rescaled as the max grows), combined over the group: group max,
// each thread's sums rescaled to it, then summed. MODE 2 re-reads the rows once for its log m
// sums; MODE 3 gathers the k teacher entries (lanes j = lane, lane + G, ...). The gradient pass
// re-reads the rows (mostly from L2) and writes the gradient once; the top-k entries' -q terms
// are then applied by the group's first lane after a barrier (duplicates each count). The hard
// loss's -1 at the target is applied inline by the thread writing that element.
// distill_cols (inner > 1): a thread per position, the same passes down the column.
// Targets: ignore_index -> loss 0, gradient 0, not in the mean denominator; outside [0, C) ->
// NaN loss and gradient and the device error record (as the class losses); likewise a top-k
// index outside [0, C) for its position. The gradient may be written into the student's logits
// (gx == x) except with MODE 3 and a soft cap (the host gives that case a fresh gradient): every
// logit is read before the group's reduction barriers that precede the gradient pass.

#define NBL_DIST_FORWARD 0
#define NBL_DIST_REVERSE 1
#define NBL_DIST_JSD 2
#define NBL_DIST_TOPK 3

//: The per-call constants (the accumulator type's).
template <typename A> struct DistParams {
    A it, beta, soft, hard, cap;
    bool sep;
    __device__ __forceinline__ DistParams(double inv_t, double beta_, double hard_, int sep_,
                                          double cap_)
        : it((A)inv_t), beta((A)beta_), soft(A(1) - (A)hard_), hard((A)hard_), cap((A)cap_),
          sep(sep_ != 0) {}
};

//: Online statistics of one array's capped logits xc: the running max xm, s = sum exp(xc it -
//: xm it), h = sum exp(xc - xm) (the hard loss's own softmax, student with sep) and w (the
//: divergence's sum, relative to the same max as s).
template <typename A> struct Online {
    A xm = neg_inf<A>(), s = A(0), h = A(0), w = A(0);

    //: Raise the running max to vm (NaN never raises it: it reaches the sums through exp).
    __device__ __forceinline__ void raise(A vm, const DistParams<A>& P) {
        if (vm > xm) {
            const A r = nbl_exp((xm - vm) * P.it);  // 0 from -inf
            s *= r;
            w *= r;
            if (P.sep) h *= nbl_exp(xm - vm);
            xm = vm;
        }
    }
    //: The sums relative to the group's max M (>= xm).
    __device__ __forceinline__ void to(A M, const DistParams<A>& P) {
        const A r = rescale(xm * P.it, M * P.it);
        s *= r;
        w *= r;
        if (P.sep) h *= rescale(xm, M);
        xm = M;
    }
};

//: exp(z - m), 0 for z = -inf whatever m (a masked class of a masked row is not NaN).
template <typename A> __device__ __forceinline__ A exp_rel(A z, A m) {
    return z == neg_inf<A>() ? A(0) : nbl_exp(z - m);
}

//: Pass 1 on N capped logits of the student (a) and the teacher (b; not read by MODE 3).
template <int MODE, int N, typename A>
__device__ __forceinline__ void dist_add(Online<A>& S, Online<A>& R, const A (&a)[N],
                                         const A (&b)[N], const DistParams<A>& P) {
    A vs = a[0], vt = b[0];
#pragma unroll
    for (int i = 1; i < N; ++i) {
        vs = nbl_max(vs, a[i]);
        vt = nbl_max(vt, b[i]);
    }
    S.raise(vs, P);
    if (MODE != NBL_DIST_TOPK) R.raise(vt, P);
    const A ms = S.xm * P.it, mt = R.xm * P.it;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const A zs = a[i] * P.it;
        const A es = exp_rel(zs, ms);
        S.s += es;
        if (P.sep) S.h += exp_rel(a[i], S.xm);
        if (MODE != NBL_DIST_TOPK) {
            const A zt = b[i] * P.it;
            const A et = exp_rel(zt, mt);
            R.s += et;
            if (MODE == NBL_DIST_FORWARD && et > A(0)) R.w += et * (zt - zs);
            if (MODE == NBL_DIST_REVERSE && es > A(0)) S.w += es * (zs - zt);
        }
    }
}

//: A row's (or column's) statistics once pass 1 is complete.
template <typename A> struct DistStats {
    A xm, ms, mt, ss, st, w, sh, lse_s, lse_t;
    __device__ __forceinline__ DistStats(const Online<A>& S, const Online<A>& R, A w_,
                                         const DistParams<A>& P)
        : xm(S.xm), ms(S.xm * P.it), mt(R.xm * P.it), ss(S.s), st(R.s), w(w_), sh(S.h),
          lse_s(ms + nbl_log(S.s)), lse_t(mt + nbl_log(R.s)) {}
};

//: One class of the JSD: p_s, log(p_s / m) and the class's term of the divergence (0 where a
//: probability, or m, is 0).
template <typename A> struct JsdPoint {
    A ps, ds, term;
};
template <typename A>
__device__ __forceinline__ JsdPoint<A> jsd_point(A zs, A zt, const DistStats<A>& st, A beta) {
    const A lps = zs - st.lse_s, lpt = zt - st.lse_t;
    const A ps = nbl_exp(lps), pt = nbl_exp(lpt);
    const A m = beta * pt + (A(1) - beta) * ps;
    const bool ok = m > A(0);
    const A lm = nbl_log(ok ? m : A(1));
    JsdPoint<A> r;
    r.ps = ps;
    r.ds = ok && ps > A(0) ? lps - lm : A(0);
    const A dt = ok && pt > A(0) ? lpt - lm : A(0);
    r.term = beta * (pt * dt) + (A(1) - beta) * (ps * r.ds);
    return r;
}

//: A position's gradient coefficients: dL/dx_c = (es (a [* (zs - zt - k) | (log(p_s / m) - k)]
//: + h) - b et + c eh - [c == t] onehot) softcap'(x_c), es = exp(zs - ms), et = exp(zt - mt),
//: eh = exp(xc - xm); NaN for a bad position, 0 for an ignored one.
template <typename A> struct DistCoef {
    A a, b, c, h, k, onehot;
    bool on, bad;
};

template <int MODE, typename A>
__device__ __forceinline__ DistCoef<A> dist_coef(const DistStats<A>& st, A kk, A mass, A scale,
                                                 const DistParams<A>& P, bool on, bool bad) {
    DistCoef<A> r;
    const A g = scale * P.soft * P.it;
    r.a = g * mass / st.ss * (MODE == NBL_DIST_JSD ? A(1) - P.beta : A(1));
    r.b = MODE == NBL_DIST_FORWARD ? g / st.st : A(0);
    r.c = P.sep ? scale * P.hard / st.sh : A(0);
    r.h = P.sep ? A(0) : scale * P.hard / st.ss;
    r.k = kk;
    r.onehot = scale * P.hard;
    r.on = on;
    r.bad = bad;
    return r;
}

//: dL/dx of class c from its capped student (xc) and teacher (tc) logits.
template <int MODE, typename A>
__device__ __forceinline__ A dist_grad(A xc, A tc, i64 c, i64 t, const DistStats<A>& st,
                                       const DistCoef<A>& r, const DistParams<A>& P) {
    if (r.bad) return nan_value<A>();
    if (!r.on) return A(0);
    const A zs = xc * P.it, zt = tc * P.it;
    const A es = exp_rel(zs, st.ms);
    A v;
    if (MODE == NBL_DIST_FORWARD) {
        v = es * (r.a + r.h) - r.b * exp_rel(zt, st.mt);
    } else if (MODE == NBL_DIST_REVERSE) {
        v = es > A(0) ? es * (r.a * (zs - zt - r.k) + r.h) : A(0);
    } else if (MODE == NBL_DIST_JSD) {
        const JsdPoint<A> p = jsd_point(zs, zt, st, P.beta);
        v = es * ((p.ps > A(0) ? r.a * (p.ds - r.k) : A(0)) + r.h);
    } else {
        v = es * (r.a + r.h);
    }
    if (P.sep) v += r.c * exp_rel(xc, st.xm);
    if (c == t) v -= r.onehot;
    return v * softcap_grad(xc, P.cap);
}

//: The position's loss from its statistics: (1 - hard) soft + hard CE (xct: the capped target
//: logit); NaN for a bad position.
template <typename A>
__device__ __forceinline__ A dist_loss(const DistStats<A>& st, A soft, A xct,
                                       const DistParams<A>& P, bool bad) {
    if (bad) return nan_value<A>();
    A loss = P.soft * soft;
    if (P.hard > A(0)) loss += P.hard * ((P.sep ? st.xm + nbl_log(st.sh) : st.lse_s) - xct);
    return loss;
}

//: A position's loss (dist_loss; 0 when ignored) written to loss_out[pos], or, reduced (no
//: loss_out), added to the kernel's sum acc and its denominator den: a bad position adds NaN to
//: the sum and nothing to the count. The epilogue of distill_rows (its group's first lane) and
//: distill_cols.
template <typename T, typename A>
__device__ __forceinline__ void dist_store(i64 pos, const DistStats<A>& st, A soft, A xct,
                                           const DistParams<A>& P, bool valid, bool bad,
                                           T* loss_out, double& acc, A& den) {
    const A loss = valid || bad ? dist_loss(st, soft, xct, P, bad) : A(0);
    if (loss_out) {
        loss_out[pos] = from_acc<T>(loss);
    } else if (valid || bad) {
        acc += (double)loss;
        den += valid ? A(1) : A(0);
    }
}

//: The soft loss of MODE 0 / 1 from the statistics (MODE 2 / 3 sum theirs in another pass);
//: kk: MODE 1's sum p_s (zs - zt).
template <int MODE, typename A>
__device__ __forceinline__ A pair_soft(const DistStats<A>& st, A& kk) {
    if (MODE == NBL_DIST_FORWARD) return st.w / st.st - st.lse_t + st.lse_s;
    kk = st.w / st.ss;
    return kk - st.lse_s + st.lse_t;
}

//: A top-k entry: its weight q and its term q (lp - log p_s[idx]) (0, 0 for q = 0); bad when
//: the index is outside [0, C) (recorded, never used as an address).
template <typename T, typename A>
__device__ __forceinline__ void topk_entry(const T* xr, i64 stride, const long long* idx,
                                           const T* lp, i64 e, i64 C, const DistStats<A>& st,
                                           const DistParams<A>& P, long long* err, A& soft,
                                           A& mass, A& bad) {
    const i64 ij = idx[e];
    if (ij < 0 || ij >= C) {
        record_bad_target(err, e, ij, C);
        bad += A(1);
        return;
    }
    const A lpj = to_acc(lp[e]);
    const A q = nbl_exp(lpj);
    if (q > A(0)) {
        soft += q * (lpj - (apply_softcap(to_acc(xr[ij * stride]), P.cap) * P.it - st.lse_s));
        mass += q;
    }
}

//: The top-k entries' -q terms of a position's gradient, after its gradient pass: each entry's
//: q times the soft coefficient and the soft cap's slope, subtracted where it points. Not
//: inlined: one thread per position runs it, and inlined its registers count against the
//: kernel's main loop (as finish_loss).
template <typename T, typename A>
__device__ __noinline__ void topk_scatter(const T* xr, T* gr, i64 stride, const long long* idx,
                                             const T* lp, i64 e0, i64 estride, i64 k, A scale,
                                             const DistParams<A>& P) {
    const A g = scale * P.soft * P.it;
    for (i64 j = 0; j < k; ++j) {
        const i64 e = e0 + j * estride;
        const A q = nbl_exp(to_acc(lp[e]));
        if (q > A(0)) {
            const i64 c = idx[e] * stride;
            const A slope = softcap_grad(apply_softcap(to_acc(xr[c]), P.cap), P.cap);
            gr[c] = from_acc<T>(to_acc(gr[c]) - g * q * slope);
        }
    }
}

//: A position's class target: load_target's, or (no targets) every active position kept.
__device__ __forceinline__ Target dist_target(const i64* t, i64 pos, bool active, i64 ignore,
                                              i64 C, long long* err, bool record) {
    if (t) return load_target(t, pos, active, ignore, C, err, record);
    Target r;
    r.t = -1;
    r.ignored = !active;
    r.valid = active;
    r.bad = false;
    return r;
}

template <typename T, int MODE, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T)) distill_rows(NBL_PARAMS_DISTILL) {
    typedef typename AccT<T>::type A;
    const DistParams<A> P(inv_t, beta, hard, sep, softcap);
    constexpr bool PAIR = MODE != NBL_DIST_TOPK;
    // one vector of each row in flight per chunk (two arrays: two loads); with more, the
    // 512-thread rows spilled at 64 registers (ptxas sm_90)
    constexpr int U = 1;
    constexpr int SUB = VEC < 4 ? VEC : 4;
    auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
    double acc = 0.0;
    A den = A(0);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const Target tg = dist_target(t, row, active, ignore, C, err, lane == 0);
        const T* xr = x + off;
        const T* tr = PAIR ? teacher + off : nullptr;
        A xct = A(0);  // the capped target logit, read before the barriers below
        if (tg.valid && P.hard > A(0) && lane == 0) xct = apply_softcap(to_acc(xr[tg.t]), P.cap);
        Online<A> S, R;
        for (i64 b = tg.valid ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> xb[U], tb[U];
            load_chunk2<T, VEC, G, U>(xr, tr, PAIR, b, nvec, xb, tb);
            NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                // four classes at a time: eight of each row at once (16-bit vectors) spilled
#pragma unroll
                for (int i0 = 0; i0 < VEC; i0 += SUB) {
                    A a[SUB], c2[SUB];
#pragma unroll
                    for (int i = 0; i < SUB; ++i) {
                        a[i] = apply_softcap(to_acc(xb[u].v[i0 + i]), P.cap);
                        c2[i] = PAIR ? apply_softcap(to_acc(tb[u].v[i0 + i]), P.cap) : A(0);
                    }
                    dist_add<MODE, SUB>(S, R, a, c2, P);
                }
            }
        }
        A mx[2] = {S.xm, R.xm};
        red.template reduce<2>(mx, OpMax());
        S.to(mx[0], P);
        R.to(mx[1], P);
        A sums[4] = {S.s, R.s, S.w + R.w, S.h};
        red.template reduce<4>(sums, OpSum());
        S.s = sums[0];
        R.s = sums[1];
        S.h = sums[3];
        const DistStats<A> st(S, R, sums[2], P);
        A ex[3] = {A(0), A(0), A(0)};  // MODE 2: J, KL(p_s || m); MODE 3: soft, Q, bad entries
        if (MODE == NBL_DIST_JSD) {
            for (i64 b = tg.valid ? lane : nvec; b < nvec; b += chunk) {
                Vec<T, VEC> xb[U], tb[U];
                load_chunk2<T, VEC, G, U>(xr, tr, true, b, nvec, xb, tb);
                NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const JsdPoint<A> p = jsd_point(
                            apply_softcap(to_acc(xb[u].v[i]), P.cap) * P.it,
                            apply_softcap(to_acc(tb[u].v[i]), P.cap) * P.it, st, P.beta);
                        ex[0] += p.term;
                        ex[1] += p.ps * p.ds;
                    }
                }
            }
        }
        if (MODE == NBL_DIST_TOPK && tg.valid) {
            for (i64 j = lane; j < k; j += G)
                topk_entry(xr, 1, idx, lp, row * k + j, C, st, P, err, ex[0], ex[1], ex[2]);
        }
        if (MODE == NBL_DIST_JSD || MODE == NBL_DIST_TOPK) red.template reduce<3>(ex, OpSum());
        A kk = MODE == NBL_DIST_JSD ? ex[1] : A(0);
        const A soft = PAIR && MODE != NBL_DIST_JSD ? pair_soft<MODE>(st, kk) : ex[0];
        const bool bad = tg.bad || (MODE == NBL_DIST_TOPK && ex[2] > A(0));
        if (active && lane == 0)
            dist_store(row, st, soft, xct, P, tg.valid, bad, loss_out, acc, den);
        const A scale = want_grad ? upstream<T, A>(g_rows, row, active, rmode, scal, g_scalar)
                                  : A(0);
        const DistCoef<A> r = dist_coef<MODE>(st, kk, MODE == NBL_DIST_TOPK ? ex[1] : A(1),
                                              scale, P, tg.valid, bad);
        if (want_grad && active) {
            T* gr = gx + off;
            for (i64 b = lane; b < nvec; b += chunk) {
                Vec<T, VEC> xb[U], tb[U];
                if (tg.valid) load_chunk2<T, VEC, G, U>(xr, tr, PAIR, b, nvec, xb, tb);
                NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                    Vec<T, VEC> o;
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const A xc = tg.valid ? apply_softcap(to_acc(xb[u].v[i]), P.cap) : A(0);
                        const A tc = PAIR && tg.valid ? apply_softcap(to_acc(tb[u].v[i]), P.cap)
                                                      : A(0);
                        o.v[i] = from_acc<T>(dist_grad<MODE>(xc, tc, vi * VEC + i, tg.t, st, r,
                                                             P));
                    }
                    store_vec<T, VEC>(gr, vi, o);
                }
            }
        }
        if (MODE == NBL_DIST_TOPK && want_grad) {
            if (G > 32) __syncthreads();
            else __syncwarp();
            if (active && lane == 0 && tg.valid && !bad)
                topk_scatter(xr, gx + off, 1, idx, lp, row * k, 1, k, scale, P);
        }
    }
    if (out) finish_loss<T, BLOCK>(acc, (double)den, NBL_REDUCE);
}

template <typename T, int MODE>
__global__ void __launch_bounds__(256) distill_cols(NBL_PARAMS_DISTILL) {
    typedef typename AccT<T>::type A;
    const DistParams<A> P(inv_t, beta, hard, sep, softcap);
    constexpr bool PAIR = MODE != NBL_DIST_TOPK;
    double acc = 0.0;
    A den = A(0);
    NBL_FOR_EACH_COL(p, base, nrows, inner, C) {
        const Target tg = dist_target(t, p, true, ignore, C, err, true);
        const T* xp = x + base;
        const T* tp = PAIR ? teacher + base : nullptr;
        const i64 kbase = col_base(p, inner, k * inner);  // entry (o, 0, j) of idx and lp
        A xct = A(0);
        if (tg.valid && P.hard > A(0)) xct = apply_softcap(to_acc(xp[tg.t * inner]), P.cap);
        Online<A> S, R;
        for (i64 c = 0; tg.valid && c < C; ++c) {
            const A a[1] = {apply_softcap(to_acc(xp[c * inner]), P.cap)};
            const A b[1] = {PAIR ? apply_softcap(to_acc(tp[c * inner]), P.cap) : A(0)};
            dist_add<MODE, 1>(S, R, a, b, P);
        }
        const DistStats<A> st(S, R, S.w + R.w, P);
        A ex[3] = {A(0), A(0), A(0)};
        if (MODE == NBL_DIST_JSD) {
            for (i64 c = 0; tg.valid && c < C; ++c) {
                const JsdPoint<A> q =
                    jsd_point(apply_softcap(to_acc(xp[c * inner]), P.cap) * P.it,
                              apply_softcap(to_acc(tp[c * inner]), P.cap) * P.it, st, P.beta);
                ex[0] += q.term;
                ex[1] += q.ps * q.ds;
            }
        }
        if (MODE == NBL_DIST_TOPK) {
            for (i64 j = 0; tg.valid && j < k; ++j)
                topk_entry(xp, inner, idx, lp, kbase + j * inner, C, st, P, err, ex[0], ex[1],
                           ex[2]);
        }
        A kk = MODE == NBL_DIST_JSD ? ex[1] : A(0);
        const A soft = PAIR && MODE != NBL_DIST_JSD ? pair_soft<MODE>(st, kk) : ex[0];
        const bool bad = tg.bad || (MODE == NBL_DIST_TOPK && ex[2] > A(0));
        dist_store(p, st, soft, xct, P, tg.valid, bad, loss_out, acc, den);
        if (want_grad) {
            const A scale = upstream<T, A>(g_rows, p, true, rmode, scal, g_scalar);
            const DistCoef<A> r = dist_coef<MODE>(st, kk, MODE == NBL_DIST_TOPK ? ex[1] : A(1),
                                                  scale, P, tg.valid, bad);
            T* gp = gx + base;
            for (i64 c = 0; c < C; ++c) {
                const A xc = tg.valid ? apply_softcap(to_acc(xp[c * inner]), P.cap) : A(0);
                const A tc = PAIR && tg.valid ? apply_softcap(to_acc(tp[c * inner]), P.cap)
                                              : A(0);
                gp[c * inner] = from_acc<T>(dist_grad<MODE>(xc, tc, c, tg.t, st, r, P));
            }
            if (MODE == NBL_DIST_TOPK && tg.valid && !bad)
                topk_scatter(xp, gp, inner, idx, lp, kbase, inner, k, scale, P);
        }
    }
    if (out) finish_loss<T, 256>(acc, (double)den, NBL_REDUCE);
}
