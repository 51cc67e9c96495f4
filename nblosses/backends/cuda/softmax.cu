// softmax / log_softmax forward over axis 1 of (outer, C, inner).
//
// softmax_cached (inner == 1, row fits in registers): a group of G threads holds a row of up to
// G * NV * VEC elements in registers: one read (16-byte loads when VEC > 1), max, sum of exp, one
// write. G <= 32: BLOCK / G rows per block iteration; G > 32: one row per block iteration.
// softmax_looped (inner == 1, long rows): one block per row; pass 1 reads the row once for the
// online (max, sum) statistics, pass 2 re-reads it in reverse order (the most recently read part
// is the most likely to still be in L2) and writes.
// softmax_split_stats / softmax_split_write (inner == 1, long rows, few rows): see below.
// softmax_cols (inner > 1): one thread per (outer, inner) position, walking C with stride
// ``inner`` (adjacent threads read adjacent addresses): online statistics, then a write pass.
// lse_rows / lse_cols: the logsumexp of each slice, the same statistics without a write pass
// (at the end of the file).
//
// log_mode = 0: y = exp(x - m) / s; log_mode = 1: y = (x - m) - log(s). Arithmetic in A.

template <typename T, int VEC, int G, int NV, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
softmax_cached(NBL_PARAMS_SOFTMAX_ROWS) {
    typedef typename AccT<T>::type A;
    Reducer<G, A> red;
    const int nvec = (int)C / VEC;
    const int lane = threadIdx.x % G;
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const auto [row, off, active] = row_slot<G>(r0, nrows, C);
        RowRegs<T, VEC, NV, false> rr;
        A (&v)[NV][VEC] = rr.v;
        A m = load_row_max<T, VEC, G, NV>(x, off, nvec, lane, active, rr);
        m = red.max(m);
        A s = A(0);
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            if (active && k * G + lane < nvec) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const A e = nbl_exp(v[k][i] - m);
                    s += e;
                    if (!log_mode) v[k][i] = e;
                }
            }
        }
        s = red.sum(s);
        const A logs = nbl_log(s);
        const A inv = A(1) / s;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int vi = k * G + lane;
            if (active && vi < nvec) {
                Vec<T, VEC> o;
#pragma unroll
                for (int i = 0; i < VEC; ++i)
                    o.v[i] = from_acc<T>(log_mode ? (v[k][i] - m) - logs : v[k][i] * inv);
                store_vec<T, VEC>(y + off, vi, o);
            }
        }
    }
}

//: Writes one chunk of (log-)softmax, U vectors of VEC elements STRIDE vectors apart from b
//: (vectors >= vend skipped), from the row's max m, log(s) and 1/s.
template <int VEC, int STRIDE, int U, typename T, typename A>
__device__ __forceinline__ void softmax_write_chunk(const T* xr, T* yr, i64 b, i64 vend, A m,
                                                    A logs, A inv, int log_mode) {
    Vec<T, VEC> buf[U];
    load_chunk<T, VEC, STRIDE, U>(xr, b, vend, buf);
    NBL_CHUNK_VECTORS(u, U, vi, b, STRIDE, vend) {
        Vec<T, VEC> o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const A d = to_acc(buf[u].v[i]) - m;
            o.v[i] = from_acc<T>(log_mode ? d - logs : nbl_exp(d) * inv);
        }
        store_vec<T, VEC>(yr, vi, o);
    }
}

//: A streamed row's (max, sum) over its group of G threads, each from vector b0 (nvec when
//: the lane has no row: it contributes nothing): one read, reduced across the group.
template <int VEC, int G, int U, typename T, typename A>
__device__ __forceinline__ void row_ms(const T* xr, i64 b0, i64 chunk, i64 nvec,
                                       Reducer<G, A>& red, A& m, A& s) {
    m = neg_inf<A>();
    s = A(0);
    ms_range<VEC, G, U, PlainLogits>(xr, b0, chunk, nvec, m, s);
    A none[1] = {A(0)};
    red.ms(m, s, none);
}

//: The row walk of the streamed statistics kernels (softmax_looped, lse_rows): for each of the
//: group's row slots (every thread runs every iteration: row_ms reduces over the group), the
//: row's (max, sum) by row_ms in U-vector chunks, then f(slot, rows, m, s) with ``rows`` the
//: kernel's streamed_rows setup (lane, nvec, chunk, nchunk). A function taking the body as a
//: lambda, unlike the plain row walk of _common.cu: for these two kernels ptxas (sm_90) gives
//: the same registers as the plain loop.
template <typename T, int VEC, int G, int U, int BLOCK, typename F>
__device__ __forceinline__ void for_each_row_ms(const T* x, i64 nrows, i64 C, F f) {
    typedef typename AccT<T>::type A;
    StreamedRows<G, A> rows = streamed_rows<VEC, G, U, A>(C);
    for (i64 r0 = first_row<G, BLOCK>(); r0 < nrows; r0 += row_stride<G, BLOCK>()) {
        const RowSlot slot = row_slot<G>(r0, nrows, C);
        A m, s;
        const i64 b0 = slot.active ? rows.lane : rows.nvec;
        row_ms<VEC, G, U>(x + slot.off, b0, rows.chunk, rows.nvec, rows.red, m, s);
        f(slot, rows, m, s);
    }
}

template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T))
softmax_looped(NBL_PARAMS_SOFTMAX_ROWS) {
    typedef typename AccT<T>::type A;
    constexpr int U = NBL_UNROLL;
    for_each_row_ms<T, VEC, G, U, BLOCK>(
        x, nrows, C, [=](const RowSlot& slot, const StreamedRows<G, A>& rows, A m, A s) {
            const T* xr = x + slot.off;
            T* yr = y + slot.off;
            const A logs = nbl_log(s);
            const A inv = A(1) / s;
            // reverse: the tail is in L2
            for (i64 k = slot.active ? rows.nchunk - 1 : -1; k >= 0; --k) {
                const i64 b = k * rows.chunk + rows.lane;
                softmax_write_chunk<VEC, G, U>(xr, yr, b, rows.nvec, m, logs, inv, log_mode);
            }
        });
}

// Long rows, few of them (fewer rows than resident blocks): each row is split into nsplit chunks
// of chunk_vec vectors, one block per chunk, so that every SM streams. softmax_split_stats writes
// each chunk's online (max, sum) to stats[2 * (row * nsplit + k)]; softmax_split_write combines
// the row's nsplit pairs (a few hundred bytes, from L2) and writes its chunk. Two launches, the
// row read twice (as the looped kernel), with nrows * nsplit blocks instead of nrows.
template <typename T, int VEC, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T))
softmax_split_stats(NBL_PARAMS_SOFTMAX_SPLIT) {
    typedef typename AccT<T>::type A;
    constexpr int U = NBL_UNROLL;
    Reducer<BLOCK, A> red;
    i64 row, v0, v1;
    split_bounds<VEC>(C, nsplit, chunk_vec, row, v0, v1);
    const T* xr = x + row * C;
    A m = neg_inf<A>(), s = A(0);
    ms_range<VEC, BLOCK, U, PlainLogits>(xr, v0 + threadIdx.x, (i64)BLOCK * U, v1, m, s);
    A dummy[1] = {A(0)};
    red.ms(m, s, dummy);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = (double)m;
        stats[2 * blockIdx.x + 1] = (double)s;
    }
}

template <typename T, int VEC, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T))
softmax_split_write(NBL_PARAMS_SOFTMAX_SPLIT) {
    typedef typename AccT<T>::type A;
    constexpr int U = NBL_UNROLL;
    i64 row, v0, v1;
    split_bounds<VEC>(C, nsplit, chunk_vec, row, v0, v1);
    A m = neg_inf<A>(), s = A(0);
    for (i64 k = 0; k < nsplit; ++k)  // same order in every block of the row: same m, s
        ms_combine(m, s, (A)stats[2 * (row * nsplit + k)], (A)stats[2 * (row * nsplit + k) + 1]);
    const A logs = nbl_log(s);
    const A inv = A(1) / s;
    const T* xr = x + row * C;
    T* yr = y + row * C;
    for (i64 b = v0 + threadIdx.x; b < v1; b += (i64)BLOCK * U)
        softmax_write_chunk<VEC, BLOCK, U>(xr, yr, b, v1, m, logs, inv, log_mode);
}

//: Online (max, sum) of one position of the cols kernels: C elements ``inner`` apart from xp.
template <typename T, typename A>
__device__ __forceinline__ void col_ms(const T* xp, i64 C, i64 inner, A& m, A& s) {
    m = neg_inf<A>();
    s = A(0);
    i64 c = 0;
    for (; c + NBL_UNROLL <= C; c += NBL_UNROLL) {
        A a[NBL_UNROLL];
#pragma unroll
        for (int u = 0; u < NBL_UNROLL; ++u) a[u] = to_acc(xp[(c + u) * inner]);
        ms_update<NBL_UNROLL>(m, s, a);
    }
    for (; c < C; ++c) {
        A a[1] = {to_acc(xp[c * inner])};
        ms_update<1>(m, s, a);
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
softmax_cols(NBL_PARAMS_SOFTMAX_COLS) {
    typedef typename AccT<T>::type A;
    for_each_col(outer, inner, C, [=](i64 base) {
        const T* xp = x + base;
        T* yp = y + base;
        A m, s;
        col_ms(xp, C, inner, m, s);
        const A logs = nbl_log(s);
        const A inv = A(1) / s;
        for (i64 c = 0; c < C; ++c) {
            const A d = to_acc(xp[c * inner]) - m;
            yp[c * inner] = from_acc<T>(log_mode ? d - logs : nbl_exp(d) * inv);
        }
    });
}

// ----------------------------------------------------------------------------- logsumexp
// out = m + log(s) over axis 1 of (outer, C, inner), in double (row statistics that callers
// merge across chunks keep every digit): a slice of only -inf gives -inf (m = -inf, s = 0), one
// holding NaN or +inf gives NaN (see ms_update). lse_rows (inner == 1): a group of G threads per
// row, one read (online statistics); lse_cols (inner > 1): a thread per position.

template <typename A> __device__ __forceinline__ double lse_of(A m, A s) {
    return (double)m + log((double)s);
}

template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, NBL_MIN_BLOCKS(BLOCK, T))
lse_rows(NBL_PARAMS_LSE) {
    typedef typename AccT<T>::type A;
    for_each_row_ms<T, VEC, G, NBL_UNROLL, BLOCK>(
        x, outer, C, [=](const RowSlot& slot, const StreamedRows<G, A>& rows, A m, A s) {
            if (slot.active && rows.lane == 0) out[slot.row] = lse_of(m, s);
        });
}

template <typename T>
__global__ void __launch_bounds__(256)
lse_cols(NBL_PARAMS_LSE) {
    typedef typename AccT<T>::type A;
    NBL_FOR_EACH_COL(p, base, outer, inner, C) {
        A m, s;
        col_ms(x + base, C, inner, m, s);
        out[p] = lse_of(m, s);
    }
}
