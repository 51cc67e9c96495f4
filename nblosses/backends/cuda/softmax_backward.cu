// Backward of softmax / log_softmax over axis 1 of (outer, C, inner), given the forward output y
// and the upstream gradient g:
//     softmax:     gx = y * (g - sum_C(g * y))          (log_mode = 0)
//     log_softmax: gx = g - exp(y) * sum_C(g)           (log_mode = 1)
// softmax_bwd_rows (inner == 1): a group of G threads per row; pass 1 sums, pass 2 re-reads g and
// y (short rows: from L1/L2) and writes. softmax_bwd_cols (inner > 1): a thread per position.

template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T))
softmax_bwd_rows(NBL_PARAMS_SOFTMAX_BWD) {  // inner == 1: outer rows
    const i64 nrows = outer;
    typedef typename AccT<T>::type A;
    constexpr int U = NBL_UNROLL2;
    auto [red, nvec, lane, chunk, nchunk] = streamed_rows<VEC, G, U, A>(C);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        const T *gr = g + off, *yr = y + off;
        T* gxr = gx + off;
        A s = A(0);
        for (i64 b = active ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> gb[U], yb[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (b + (i64)u * G < nvec) {
                    gb[u] = load_vec<T, VEC>(gr, b + (i64)u * G);
                    if (!log_mode) yb[u] = load_vec<T, VEC>(yr, b + (i64)u * G);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (b + (i64)u * G < nvec) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i)
                        s += log_mode ? to_acc(gb[u].v[i])
                                      : to_acc(gb[u].v[i]) * to_acc(yb[u].v[i]);
                }
            }
        }
        s = red.sum(s);
        for (i64 b = active ? lane : nvec; b < nvec; b += chunk) {
            Vec<T, VEC> gb[U], yb[U];
            load_chunk2<T, VEC, G, U>(gr, yr, true, b, nvec, gb, yb);
            NBL_CHUNK_VECTORS(u, U, vi, b, G, nvec) {
                Vec<T, VEC> o;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const A gv = to_acc(gb[u].v[i]), yv = to_acc(yb[u].v[i]);
                    o.v[i] = from_acc<T>(log_mode ? gv - nbl_exp(yv) * s : yv * (gv - s));
                }
                store_vec<T, VEC>(gxr, vi, o);
            }
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
softmax_bwd_cols(NBL_PARAMS_SOFTMAX_BWD) {
    typedef typename AccT<T>::type A;
    for_each_col(outer, inner, C, [=](i64 base) {
        A s = A(0);
#pragma unroll 4
        for (i64 c = 0; c < C; ++c) {
            const i64 e = base + c * inner;
            s += log_mode ? to_acc(g[e]) : to_acc(g[e]) * to_acc(y[e]);
        }
#pragma unroll 4
        for (i64 c = 0; c < C; ++c) {
            const i64 e = base + c * inner;
            const A gv = to_acc(g[e]), yv = to_acc(y[e]);
            gx[e] = from_acc<T>(log_mode ? gv - nbl_exp(yv) * s : yv * (gv - s));
        }
    });
}
