// token_logprobs: each position's log-probability of its target and the entropy of
// softmax(cap(x) / T), the logits' gradient fused (same formulas as the CPU backend,
// nblosses/backends/cpu/token_logprobs.py).
//
// Per position, with y = cap(x) (softcap c > 0: c tanh(x / c), else x), M = max_c y,
// d_c = (y_c - M) / T, e_c = exp(d_c), s = sum_c e_c, q = sum_c e_c d_c:
//     logp = d_t - log(s)              (clamped to <= 0)
//     H    = log(s) - q / s            (clamped to [0, log C])
//     dL/dx_c = (e_c (a + b d_c) + [c == t] go / T) cap'(x_c),
//         a = -(go - ge q / s) / (s T),  b = -ge / (s T)
// for L = go logp + ge H, go = grad_output[pos] (1 when null), ge = grad_entropy[pos] (0 when
// null). d comes from y - M, not y / T - M / T (no rounding of large scaled logits). A logit of
// -inf (a masked token) adds nothing to s and q (0 log 0 = 0): d is clamped at TLP_D_MIN, where
// e is 0. Statistics (logp, entropy, upstream gradients) are in A (float for the half types);
// the gradient in T.
// Positions whose target is ignore_index: logp 0, entropy 0, gradient 0. A target outside
// [0, C) is never used as an address: logp, entropy and gradient NaN, recorded in the device
// error record. The gradient may be written into the logits (gx == x): every element is read,
// in the statistics pass, by the thread that later writes it, and y_t travels in the group
// reduction rather than being read again.
//
// tlp_rows (inner == 1): a group of G threads per row; pass 1 keeps per thread an online
// (M, s, q), rebased when its max grows; the group reduces the max, each thread rebases to it,
// then (s, q, y_t) are summed; pass 2 (gradient only) re-reads the row, last chunk first (its
// tail is still in L2). tlp_cols (inner > 1): a thread per position.

#define TLP_D_MIN (-1000)
//: Minimum resident blocks of tlp_rows: NBL_MIN_BLOCKS (two blocks of 512 for the 16- and
//: 32-bit types, a 64-register budget), and 1 for double, where ptxas' own choice at 512
//: threads was 64 registers and a spill.
#define TLP_MIN_BLOCKS(BLOCK, T) (sizeof(T) == 8 ? 1 : NBL_MIN_BLOCKS(BLOCK, T))

//: d = (y - M) / T, clamped at TLP_D_MIN (exp is 0 there in float and double); NaN stays NaN.
template <typename A> __device__ __forceinline__ A tlp_shift(A y, A M, A inv) {
    const A d = (y - M) * inv;
    return d < A(TLP_D_MIN) ? A(TLP_D_MIN) : d;
}

//: A running (m, s, q) rebased to the max m2 >= m (nothing to rescale while s is 0).
template <typename A> __device__ __forceinline__ void msq_rebase(A& m, A& s, A& q, A m2, A inv) {
    if (s > A(0) && m2 != m) {
        const A dm = tlp_shift(m, m2, inv);
        const A r = nbl_exp(dm);
        q = r * (q + dm * s);
        s *= r;
    }
    m = m2;
}

//: The logits a[0..N) added to a running (m, s, q); -inf logits add nothing (m may still be
//: -inf then, and (-inf) - (-inf) would be NaN).
template <int N, typename A>
__device__ __forceinline__ void msq_update(A& m, A& s, A& q, const A (&a)[N], A inv) {
    A vm = a[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vm = nbl_max(vm, a[i]);
    if (vm > m) msq_rebase(m, s, q, vm, inv);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (a[i] != neg_inf<A>()) {
            const A d = tlp_shift(a[i], m, inv);
            const A e = nbl_exp(d);
            s += e;
            q += e * d;
        }
    }
}

//: The logit y of a value: soft-capped with CAP (a template parameter: the tanh would take
//: registers from the plain path's loop).
template <int CAP, typename A> __device__ __forceinline__ A tlp_logit(A x, A cap) {
    return CAP ? apply_softcap(x, cap) : x;
}

//: The per-call constants.
template <typename A> struct TlpParams {
    A inv, cap, log_c;
    __device__ __forceinline__ TlpParams(double inv_t, double cap_, i64 C)
        : inv((A)inv_t), cap((A)cap_), log_c(nbl_log((A)C)) {}
};

//: A position's gradient coefficients (a, b, the target's addend go / T).
template <typename A> struct TlpCoef {
    A a, b, at;
};

//: logp and entropy of a position (written when ``leader``) and its gradient coefficients.
template <typename A>
__device__ __forceinline__ TlpCoef<A> tlp_finish(bool leader, i64 pos, const Target& tg, A M,
                                                  A s, A q, A yt, const TlpParams<A>& P,
                                                  const A* go, const A* ge, A* logp, A* ent) {
    TlpCoef<A> r;
    r.a = r.b = r.at = A(0);
    if (tg.valid) {
        const A ls = nbl_log(s);
        if (leader) {  // clamps by comparison: NaN passes (fminf / fmaxf would drop it)
            const A lp = (yt - M) * P.inv - ls, h = ls - q / s;
            logp[pos] = lp > A(0) ? A(0) : lp;
            if (ent) ent[pos] = h < A(0) ? A(0) : (h > P.log_c ? P.log_c : h);
        }
        const A gor = go ? go[pos] : A(1);
        const A ger = ge ? ge[pos] : A(0);
        r.a = -(gor - ger * q / s) / s * P.inv;
        r.b = -ger / s * P.inv;
        r.at = gor * P.inv;
    } else if (leader) {
        const A v = tg.bad ? nan_value<A>() : A(0);
        logp[pos] = v;
        if (ent) ent[pos] = v;
    }
    return r;
}

//: dL/dx of element c from its value x (0 at ignored positions, NaN at bad ones).
template <int CAP, typename A>
__device__ __forceinline__ A tlp_grad(const Target& tg, const TlpCoef<A>& r,
                                      const TlpParams<A>& P, A M, A x, i64 c) {
    if (!tg.valid) return tg.bad ? nan_value<A>() : A(0);
    const A y = tlp_logit<CAP>(x, P.cap);
    const A d = tlp_shift(y, M, P.inv);
    A g = nbl_exp(d) * (r.a + r.b * d);
    if (c == tg.t) g += r.at;
    return CAP ? g * softcap_grad(y, P.cap) : g;
}

template <typename T, int CAP, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, TLP_MIN_BLOCKS(BLOCK, T)) tlp_rows(NBL_PARAMS_TLP) {
    typedef typename AccT<T>::type A;
    const TlpParams<A> P(inv_t, cap, C);
    constexpr int U = NBL_UNROLL2;  // 64-register budget (NBL_MIN_BLOCKS)
    auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const Target tg = load_target(t, row, active, ignore, C, err, lane == 0);
        const T* xr = x + off;
        A m = neg_inf<A>(), sqt[3] = {A(0), A(0), A(0)};  // s, q, y_t (from its owner)
        for (i64 b = tg.valid ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> buf[U];
            load_chunk<T, VEC, G, U>(xr, b, nvec, buf);
            NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                A a[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    a[i] = tlp_logit<CAP>(to_acc(buf[u].v[i]), P.cap);
                    if (vi * VEC + i == tg.t) sqt[2] = a[i];
                }
                msq_update<VEC>(m, sqt[0], sqt[1], a, P.inv);
            }
        }
        const A M = red.max(m);
        msq_rebase(m, sqt[0], sqt[1], M, P.inv);
        red.template reduce<3>(sqt, OpSum());
        const TlpCoef<A> r = tlp_finish(active && lane == 0, row, tg, M, sqt[0], sqt[1], sqt[2],
                                        P, go, ge, logp, ent);
        if (gx && active) {
            T* gr = gx + off;
            for (i64 k = nchunk - 1; k >= 0; --k) {  // reverse: the row's tail is still in L2
                grad_chunk<VEC, G, U>(xr, gr, k * chunk + lane, nvec, tg.valid, [&](A xv, i64 c) {
                    return tlp_grad<CAP>(tg, r, P, M, xv, c);
                });
            }
        }
    }
}

template <typename T, int CAP>
__global__ void __launch_bounds__(256) tlp_cols(NBL_PARAMS_TLP) {
    typedef typename AccT<T>::type A;
    const TlpParams<A> P(inv_t, cap, C);
    NBL_FOR_EACH_COL(p, base, nrows, inner, C) {
        const T* xp = x + base;
        const Target tg = load_target(t, p, true, ignore, C, err, true);
        A m = neg_inf<A>(), s = A(0), q = A(0), yt = A(0);
        if (tg.valid) {
            yt = tlp_logit<CAP>(to_acc(xp[tg.t * inner]), P.cap);
            for (i64 c = 0; c < C; ++c) {
                const A a[1] = {tlp_logit<CAP>(to_acc(xp[c * inner]), P.cap)};
                msq_update<1>(m, s, q, a, P.inv);
            }
        }
        const TlpCoef<A> r = tlp_finish(true, p, tg, m, s, q, yt, P, go, ge, logp, ent);
        if (gx) {
            T* gp = gx + base;
            for (i64 c = 0; c < C; ++c) {
                const A xv = tg.valid ? to_acc(xp[c * inner]) : A(0);
                gp[c * inner] = from_acc<T>(tlp_grad<CAP>(tg, r, P, m, xv, c));
            }
        }
    }
}
