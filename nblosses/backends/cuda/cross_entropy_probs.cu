// Cross-entropy with class-probability targets p (same shape as the logits x).
//     y'_c = p_c (1 - eps) + eps / C,  A = sum_c w_c y'_c,  B = sum_c w_c y'_c x_c
//     loss = A (m + log(s)) - B                       (= -sum_c w_c y'_c log_softmax(x)_c)
//     dL/dx_c = scale (A exp(x_c - m) / s - w_c y'_c)
// scale = g_rows[i] ("none") or g_scalar (the host knows the ``mean`` denominator N * inner).
// probs_rows (inner == 1): a group of G threads per row, pass 1 online (m, s) with A and B,
// pass 2 (gradient only) re-reads x and p and writes. probs_cols (inner > 1): a thread per
// position. The gradient may be written into the logits (gx == x): each element is read by the
// thread that writes it, before writing it, and after the row's reduction.

//: w_c y'_c of one element: the class weight (1 without weights) times the smoothed target.
template <typename T, typename A>
__device__ __forceinline__ A probs_wy(const T* w, i64 c, A pc, A keep, A spread) {
    return (w ? to_acc(w[c]) : A(1)) * (pc * keep + spread);
}

template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
probs_rows(const T* x, const T* __restrict__ p, i64 nrows, i64 C, i64 inner,
           const T* __restrict__ w, double eps_, int want_grad, const T* __restrict__ g_rows,
           double g_scalar, T* gx, T* __restrict__ loss_out, double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    constexpr int R = BLOCK / G;
    constexpr int U = NBL_UNROLL2;
    __shared__ A sbuf[2][4][32];
    Reducer<G, A> red(sbuf);
    const i64 nvec = C / VEC;
    const int lane = threadIdx.x % G;
    const int grp = threadIdx.x / G;
    const i64 chunk = (i64)G * U;
    const A keep = A(1) - (A)eps_;
    const A spread = (A)eps_ / (A)C;
    double acc = 0.0;
    for (i64 r0 = (i64)blockIdx.x * R; r0 < nrows; r0 += (i64)gridDim.x * R) {
        const i64 row = r0 + grp;
        const bool active = row < nrows;
        const i64 off = active ? row * C : 0;
        const T* xr = x + off;
        const T* pr = p + off;
        A m = neg_inf<A>(), s = A(0);
        A ab[2] = {A(0), A(0)};
        for (i64 b = active ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> xb[U], pb[U];
            load_chunk2<T, VEC, G, U>(xr, pr, true, b, nvec, xb, pb);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const i64 vi = b + (i64)u * G;
                if (vi < nvec) {
                    A a[VEC];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        a[i] = to_acc(xb[u].v[i]);
                        const A wy =
                            probs_wy<T, A>(w, vi * VEC + i, to_acc(pb[u].v[i]), keep, spread);
                        ab[0] += wy;
                        ab[1] += wy * a[i];
                    }
                    ms_update<VEC>(m, s, a);
                }
            }
        }
        red.ms(m, s, ab);
        const A loss = ab[0] * (m + nbl_log(s)) - ab[1];
        if (active && lane == 0) {
            if (loss_out) loss_out[row] = from_acc<T>(loss);
            else acc += (double)loss;
        }
        if (want_grad && active) {
            const A scale = g_rows ? to_acc(g_rows[row]) : (A)g_scalar;
            const A coef = scale * ab[0] / s;
            T* gr = gx + off;
            for (i64 b = lane; b < nvec; b += chunk) {
                Vec<T, VEC> xb[U], pb[U];
                load_chunk2<T, VEC, G, U>(xr, pr, true, b, nvec, xb, pb);
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const i64 vi = b + (i64)u * G;
                    if (vi < nvec) {
                        Vec<T, VEC> o;
#pragma unroll
                        for (int i = 0; i < VEC; ++i) {
                            const A wy =
                                probs_wy<T, A>(w, vi * VEC + i, to_acc(pb[u].v[i]), keep, spread);
                            o.v[i] = from_acc<T>(coef * nbl_exp(to_acc(xb[u].v[i]) - m) -
                                                 scale * wy);
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
probs_cols(const T* x, const T* __restrict__ p, i64 nrows, i64 C, i64 inner,
           const T* __restrict__ w, double eps_, int want_grad, const T* __restrict__ g_rows,
           double g_scalar, T* gx, T* __restrict__ loss_out, double* __restrict__ loss_part) {
    typedef typename AccT<T>::type A;
    const i64 npos = nrows * inner;
    const i64 plane = C * inner;
    const i64 stride = (i64)gridDim.x * 256;
    const A keep = A(1) - (A)eps_;
    const A spread = (A)eps_ / (A)C;
    double acc = 0.0;
    for (i64 q = (i64)blockIdx.x * 256 + threadIdx.x; q < npos; q += stride) {
        const i64 o = q / inner;
        const i64 base = o * plane + (q - o * inner);
        A m = neg_inf<A>(), s = A(0), sa = A(0), sb = A(0);
        for (i64 c = 0; c < C; ++c) {
            const i64 e = base + c * inner;
            A a[1] = {to_acc(x[e])};
            const A wy = probs_wy<T, A>(w, c, to_acc(p[e]), keep, spread);
            sa += wy;
            sb += wy * a[0];
            ms_update<1>(m, s, a);
        }
        const A loss = sa * (m + nbl_log(s)) - sb;
        if (loss_out) loss_out[q] = from_acc<T>(loss);
        else acc += (double)loss;
        if (want_grad) {
            const A scale = g_rows ? to_acc(g_rows[q]) : (A)g_scalar;
            const A coef = scale * sa / s;
            for (i64 c = 0; c < C; ++c) {
                const i64 e = base + c * inner;
                const A wy = probs_wy<T, A>(w, c, to_acc(p[e]), keep, spread);
                gx[e] = from_acc<T>(coef * nbl_exp(to_acc(x[e]) - m) - scale * wy);
            }
        }
    }
    if (loss_part) write_partial<256>(acc, loss_part);
}
