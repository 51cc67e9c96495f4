// linear_distillation_loss: the student's and the teacher's logits blocks (see
// nblosses/backends/_linear_distillation.py for the per-row algebra and
// nblosses/backends/cuda/linear_distillation.py for the host side). Compiled by the loader like
// every source (_common.cu and the NBL_PARAMS_* macros first). T: float or double (half inputs
// are computed in float32 by the host); A = AccT<T>. A block pair zs, zt is (rows, cols),
// C-contiguous: rows row0:row0+rows of the batch, columns c0:c0+cols of the vocabulary.
//
// mode: 0 forward KL, 1 reverse KL, 2 JSD (beta); sep: the hard loss has its own (untempered)
// softmax. With sc = cap(s) (cap > 0) and zs = sc * inv_t (likewise the teacher):
//   ld_stats  prepares both blocks in place (bias, soft cap) and writes each row's statistics
//             relative to the block's maxima: out[r] = (xs, ss, xt, st, w, sh, xst), xst NaN
//             where the block does not hold the row's target; the first vocabulary block
//             records a bad class index (outside [0, n_classes), not ignore) in the error
//             record (never used as an address).
//   ld_jsd    out[r] += (J, K), the JSD's sums given lse[r] = (lse_s, lse_t).
//   ld_grad   overwrites zs with dL/ds from the rows' coefficients (ms, mt, hm, a, b, c, h, k,
//             lse_s, lse_t, onehot); rows whose target is ignore become zero.
// Zero probabilities contribute 0 (xlogy), as in distillation.cu.

#define NBL_LD_FORWARD 0
#define NBL_LD_REVERSE 1
#define NBL_LD_JSD 2
#define NBL_LD_NSTATS 7
#define NBL_LD_NCOEFS 11

//: Bias, then soft cap: the loss's logit from a raw product.
template <typename T, typename A>
__device__ __forceinline__ A ld_prepare(T v, const T* bias, i64 c, A cap) {
    A x = to_acc(v);
    if (bias) x += to_acc(bias[c]);
    return apply_softcap(x, cap);
}

//: A class's JSD pieces: p_s and log(p_s / m) (0 where p_s or m is 0), and its term
//: beta p_t log(p_t / m) + (1 - beta) p_s log(p_s / m).
template <typename A>
__device__ __forceinline__ void ld_jsd_point(A zs, A zt, A lse_s, A lse_t, A beta, A& ps, A& ds,
                                             A& term) {
    const A lps = zs - lse_s, lpt = zt - lse_t;
    ps = nbl_exp(lps);
    const A pt = nbl_exp(lpt);
    const A m = beta * pt + (A(1) - beta) * ps;
    const bool ok = m > A(0);
    const A lm = nbl_log(ok ? m : A(1));
    ds = ok && ps > A(0) ? lps - lm : A(0);
    const A dt = ok && pt > A(0) ? lpt - lm : A(0);
    term = beta * (pt * dt) + (A(1) - beta) * (ps * ds);
}

// One block per row (grid-stride over rows).
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) ld_stats(NBL_PARAMS_LD_STATS) {
    typedef typename AccT<T>::type A;
    Reducer<BLOCK, double> red;
    const A it = A(inv_t), cp = A(cap);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        T* sr = zs + r * cols;
        T* tr = zt + r * cols;
        const i64 tg = t ? t[r] : ignore;
        const bool has_t = t && tg != ignore;  // the row has a target (ignore: none)
        if (c0 == 0 && threadIdx.x == 0 && has_t && (tg < 0 || tg >= n_classes))
            record_bad_target(err, row0 + r, tg, n_classes);
        double mx[2] = {-nbl_pos_inf(0.0), -nbl_pos_inf(0.0)};
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
            const A a = ld_prepare(sr[c], bs, c, cp), b = ld_prepare(tr[c], bt, c, cp);
            sr[c] = from_acc<T>(a);
            tr[c] = from_acc<T>(b);
            mx[0] = fmax(mx[0], double(a));
            mx[1] = fmax(mx[1], double(b));
            if (has_t && c0 + c == tg) out[r * NBL_LD_NSTATS + 6] = double(a);
        }
        red.template reduce<2>(mx, OpMax());
        const A xs = A(mx[0]), ms = xs * it, mt = A(mx[1]) * it;
        double sums[4] = {0.0, 0.0, 0.0, 0.0};  // ss, st, w, sh
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
            const A sc = to_acc(sr[c]), zs_ = sc * it, zt_ = to_acc(tr[c]) * it;
            const A es = nbl_exp(zs_ - ms), et = nbl_exp(zt_ - mt);
            sums[0] += double(es);
            sums[1] += double(et);
            if (mode == NBL_LD_FORWARD && et > A(0)) sums[2] += double(et * (zt_ - zs_));
            if (mode == NBL_LD_REVERSE && es > A(0)) sums[2] += double(es * (zs_ - zt_));
            if (sep) sums[3] += double(nbl_exp(sc - xs));
        }
        red.template reduce<4>(sums, OpSum());
        if (threadIdx.x == 0) {
            double* o = out + r * NBL_LD_NSTATS;
            o[0] = mx[0];
            o[1] = sums[0];
            o[2] = mx[1];
            o[3] = sums[1];
            o[4] = sums[2];
            o[5] = sums[3];
            if (!(has_t && c0 <= tg && tg < c0 + cols)) o[6] = nbl_nan(0.0);
        }
    }
}

// One block per row (grid-stride over rows); raw: the blocks hold products to prepare.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) ld_jsd(NBL_PARAMS_LD_JSD) {
    typedef typename AccT<T>::type A;
    Reducer<BLOCK, double> red;
    const A it = A(inv_t), cp = A(cap), bt_ = A(beta);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* sr = zs + r * cols;
        const T* tr = zt + r * cols;
        const A lse_s = A(lse[2 * r]), lse_t = A(lse[2 * r + 1]);
        double jk[2] = {0.0, 0.0};
        for (i64 c = threadIdx.x; c < cols; c += BLOCK) {
            const A a = raw ? ld_prepare(sr[c], bs, c, cp) : to_acc(sr[c]);
            const A b = raw ? ld_prepare(tr[c], bt, c, cp) : to_acc(tr[c]);
            A ps, ds, term;
            ld_jsd_point(a * it, b * it, lse_s, lse_t, bt_, ps, ds, term);
            jk[0] += double(term);
            jk[1] += double(ps * ds);
        }
        red.template reduce<2>(jk, OpSum());
        if (threadIdx.x == 0) {
            out[2 * r] += jk[0];
            out[2 * r + 1] += jk[1];
        }
    }
}

// dL/ds over the block, elementwise (grid-stride).
template <typename T>
__global__ void __launch_bounds__(256) ld_grad(NBL_PARAMS_LD_GRAD) {
    typedef typename AccT<T>::type A;
    const A it = A(inv_t), cp = A(cap), bt_ = A(beta);
    NBL_FOR_EACH_ELEM(i, r, c, rows, cols) {
        if (t && t[r] == ignore) {
            zs[i] = T(0);
            continue;
        }
        const double* k = coefs + r * NBL_LD_NCOEFS;
        const A sc = raw ? ld_prepare(zs[i], bs, c, cp) : to_acc(zs[i]);
        const A tc = raw ? ld_prepare(zt[i], bt, c, cp) : to_acc(zt[i]);
        const A s_ = sc * it, t_ = tc * it;
        const A es = nbl_exp(s_ - A(k[0])), a = A(k[3]), h = A(k[6]), kk = A(k[7]);
        A v;
        if (mode == NBL_LD_FORWARD) {
            v = es * (a + h) - A(k[4]) * nbl_exp(t_ - A(k[1]));
        } else if (mode == NBL_LD_REVERSE) {
            v = es > A(0) ? es * (a * (s_ - t_ - kk) + h) : A(0);
        } else {
            A ps, ds, term;
            ld_jsd_point(s_, t_, A(k[8]), A(k[9]), bt_, ps, ds, term);
            v = es * ((ps > A(0) ? a * (ds - kk) : A(0)) + h);
        }
        if (sep) v += A(k[5]) * nbl_exp(sc - A(k[2]));
        if (t && c0 + c == t[r]) v -= A(k[10]);
        zs[i] = from_acc<T>(v * softcap_grad(sc, cp));
    }
}
