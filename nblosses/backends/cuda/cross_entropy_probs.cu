// Cross-entropy with class-probability targets p (same shape as the logits x).
//     x'_c = softcap(x_c) (EXT and softcap > 0, else x_c),  lse = m + log(s) over x',
//     y'_c = p_c (1 - eps) + eps / C,  A = sum_c w_c y'_c,  B = sum_c w_c y'_c x'_c
//     loss = A lse - B + z lse^2          (= -sum_c w_c y'_c log_softmax(x')_c + z-loss)
//     dL/dx'_c = scale ((A + 2 z lse) exp(x'_c - m) / s - w_c y'_c),
//     dL/dx_c = dL/dx'_c (1 - (x'_c / cap)^2)
// scale = g_rows[i] ("none") or g_scalar (the host knows the ``mean`` denominator N * inner).
// probs_rows (inner == 1): a group of G threads per row, pass 1 online (m, s) with A and B,
// pass 2 (gradient only) re-reads x and p and writes. probs_cols (inner > 1): a thread per
// position. The gradient may be written into the logits (gx == x): each element is read by the
// thread that writes it, before writing it, and after the row's reduction. Reduced losses end
// in the same launch (finish_loss). lse_out (EXT): lse of every position.

//: w_c y'_c of one element: the class weight (1 without weights) times the smoothed target.
template <typename T, typename A>
__device__ __forceinline__ A probs_wy(const T* w, i64 c, A pc, A keep, A spread) {
    return (w ? to_acc(w[c]) : A(1)) * (pc * keep + spread);
}

//: dL/dx of element c of a row or column: scale ((A + 2 z lse) exp(x'_c - m) / s - w_c y'_c)
//: (coef is scale (A + 2 z lse) / s), times the softcap's slope with EXT.
template <int EXT, typename T, typename A>
__device__ __forceinline__ A probs_grad(T xv, T pv, const T* w, i64 c, A keep, A spread, A cap,
                                        A m, A coef, A scale) {
    const A wy = probs_wy<T, A>(w, c, to_acc(pv), keep, spread);
    const A xc = EXT ? apply_softcap(to_acc(xv), cap) : to_acc(xv);
    A gv = coef * nbl_exp(xc - m) - scale * wy;
    if (EXT) gv *= softcap_grad(xc, cap);
    return gv;
}

//: Loss and gradient coefficient of one position from A, B and the row statistics; stores the
//: loss (or adds it to the partial) and lse when ``leader``.
template <int EXT, typename T, typename A>
__device__ __forceinline__ A probs_finish_row(bool leader, i64 pos, A sa, A sb, A m, A s, A z,
                                              A scale, T* loss_out, T* lse_out, double& acc) {
    const A lse = m + nbl_log(s);
    A loss = sa * lse - sb;
    A zc = A(0);
    if (EXT) {
        loss += z * lse * lse;
        zc = A(2) * z * lse;
    }
    if (leader) {
        if (loss_out) loss_out[pos] = from_acc<T>(loss);
        else acc += (double)loss;
        if (EXT && lse_out) lse_out[pos] = from_acc<T>(lse);
    }
    return scale * (sa + zc) / s;
}

#define NBL_PROBS_PROLOGUE                                                              \
    typedef typename AccT<T>::type A;                                                   \
    const A keep = A(1) - (A)eps;                                                       \
    const A spread = (A)eps / (A)C;                                                     \
    const A cap = (A)softcap, z = (A)z_loss;                                            \
    double acc = 0.0

template <typename T, int EXT, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_VEC_MIN_BLOCKS(BLOCK, VEC, T)) probs_rows(NBL_PARAMS_PROBS) {
    NBL_PROBS_PROLOGUE;
    constexpr int U = NBL_UNROLL2;
    auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const T* xr = x + off;
        const T* pr = p + off;
        A m = neg_inf<A>(), s = A(0);
        A ab[2] = {A(0), A(0)};
        for (i64 b = active ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> xb[U], pb[U];
            load_chunk2<T, VEC, G, U>(xr, pr, true, b, nvec, xb, pb);
            NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                A a[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    a[i] = to_acc(xb[u].v[i]);
                    if (EXT) a[i] = apply_softcap(a[i], cap);
                    const A wy =
                        probs_wy<T, A>(w, vi * VEC + i, to_acc(pb[u].v[i]), keep, spread);
                    ab[0] += wy;
                    ab[1] += wy * a[i];
                }
                ms_update<VEC>(m, s, a);
            }
        }
        red.ms(m, s, ab);
        const A scale = want_grad ? upstream<T, A>(g_rows, row, active, 0, nullptr, g_scalar)
                                  : A(0);
        const A coef = probs_finish_row<EXT>(active && lane == 0, row, ab[0], ab[1], m, s, z,
                                             scale, loss_out, lse_out, acc);
        if (want_grad && active) {
            T* gr = gx + off;
            for (i64 b = lane; b < nvec; b += chunk) {
                Vec<T, VEC> xb[U], pb[U];
                load_chunk2<T, VEC, G, U>(xr, pr, true, b, nvec, xb, pb);
                NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                    Vec<T, VEC> o;
#pragma unroll
                    for (int i = 0; i < VEC; ++i)
                        o.v[i] = from_acc<T>(probs_grad<EXT>(xb[u].v[i], pb[u].v[i], w,
                                                             vi * VEC + i, keep, spread, cap, m,
                                                             coef, scale));
                    store_vec<T, VEC>(gr, vi, o);
                }
            }
        }
    }
    if (out) finish_loss<T, BLOCK>(acc, 0.0, NBL_REDUCE);
}

template <typename T, int EXT>
__global__ void __launch_bounds__(256) probs_cols(NBL_PARAMS_PROBS) {
    NBL_PROBS_PROLOGUE;
    NBL_FOR_EACH_COL(q, base, nrows, inner, C) {
        A m = neg_inf<A>(), s = A(0), sa = A(0), sb = A(0);
        for (i64 c = 0; c < C; ++c) {
            const i64 e = base + c * inner;
            A a[1] = {to_acc(x[e])};
            if (EXT) a[0] = apply_softcap(a[0], cap);
            const A wy = probs_wy<T, A>(w, c, to_acc(p[e]), keep, spread);
            sa += wy;
            sb += wy * a[0];
            ms_update<1>(m, s, a);
        }
        const A scale =
            want_grad ? upstream<T, A>(g_rows, q, true, 0, nullptr, g_scalar) : A(0);
        const A coef =
            probs_finish_row<EXT>(true, q, sa, sb, m, s, z, scale, loss_out, lse_out, acc);
        if (want_grad) {
            for (i64 c = 0; c < C; ++c) {
                const i64 e = base + c * inner;
                gx[e] = from_acc<T>(
                    probs_grad<EXT>(x[e], p[e], w, c, keep, spread, cap, m, coef, scale));
            }
        }
    }
    if (out) finish_loss<T, 256>(acc, 0.0, NBL_REDUCE);
}
