// Elementwise ops on flat arrays of n elements: sigmoid, its backward, binary_cross_entropy and
// binary_cross_entropy_with_logits (loss and gradient fused; weight / pos_weight already
// broadcast to n elements by _args, or null).
// Grid-stride loops over 16-byte vectors (VEC elements; the host picks VEC = 1 unless every
// pointer is 16-byte aligned), then a scalar tail for the last n % VEC elements. Reduced losses:
// double per thread, then per block; the last block writes the 0-d result (finish_loss).

template <int VEC, typename F>
__device__ __forceinline__ void ew_loop(i64 n, F& f) {
    const i64 nvec = n / VEC;
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = tid; v < nvec; v += stride) f.template apply<VEC>(v);
    if (VEC > 1) {
        for (i64 i = nvec * VEC + tid; i < n; i += stride) f.template apply<1>(i);
    }
}

template <typename T> struct SigmoidF {
    const T* x;
    T* y;
    template <int N> __device__ __forceinline__ void apply(i64 vi) {
        typedef typename AccT<T>::type A;
        const Vec<T, N> a = load_vec<T, N>(x, vi);
        Vec<T, N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(A(1) / (A(1) + nbl_exp(-to_acc(a.v[i]))));
        store_vec<T, N>(y, vi, o);
    }
};

template <typename T> struct SigmoidBwdF {
    const T* g;
    const T* y;
    T* gx;
    template <int N> __device__ __forceinline__ void apply(i64 vi) {
        typedef typename AccT<T>::type A;
        const Vec<T, N> gv = load_vec<T, N>(g, vi), yv = load_vec<T, N>(y, vi);
        Vec<T, N> o;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const A yi = to_acc(yv.v[i]);
            o.v[i] = from_acc<T>(to_acc(gv.v[i]) * yi * (A(1) - yi));
        }
        store_vec<T, N>(gx, vi, o);
    }
};

//: binary_cross_entropy: l = -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100)),
//: dl/dx = g w (x - y) / max(x (1 - x), eps); logs in WideT (double for float, widened exactly:
//: -ftz would flush a subnormal probability to 0 and give 100 instead of torch's 92.1 for 1e-40,
//: see Widen in _common.cu). eps is torch's
//: EPSILON, the float 1e-12f (9.99999996e-13), also for float64, as torch computes it.
//: x outside [0, 1] or NaN (the front end does not read the input: "probability_range" in the
//: runtime's kernel_checks): loss and gradient NaN, and the first such element recorded
//: (NBL_ERR_PROB; the host raises ValueError later, see _device_errors.py).
template <typename T> struct WidthBits { enum { value = int(sizeof(T)) * 8 }; };
#ifdef NBL_HAS_BF16
template <> struct WidthBits<__nv_bfloat16> { enum { value = 0 }; };  // 16 means float16
#endif

//: Record a probability outside [0, 1] (rare: kept out of line, off the loop's registers).
template <typename T>
__device__ __noinline__ void record_bad_probability(long long* err, i64 pos, double v) {
    record_error(err, NBL_ERR_PROB, pos, __double_as_longlong(v), WidthBits<T>::value);
}

//: The two binary losses, one functor (LOGITS picks the element function): x, y: inputs and
//: targets; w, pw, g: per-element weights, pos_weight (logits only) and upstream gradients, or
//: null (1, 1, g_scalar); gx: the gradient and out: per-element losses, or null (not wanted; the
//: losses are then summed into acc); err: the device error record (probabilities only), or null.
template <typename T, bool LOGITS> struct BinaryLossF {
    const T* x;
    const T* y;
    const T* w;
    const T* pw;
    const T* g;
    double g_scalar;
    T* gx;
    T* out;
    long long* err;
    double acc;
    template <int N> __device__ __forceinline__ void apply(i64 vi) {
        if constexpr (LOGITS) logits<N>(vi);
        else probabilities<N>(vi);
    }

    //: binary_cross_entropy (see above).
    template <int N> __device__ __forceinline__ void probabilities(i64 vi) {
        typedef typename WideT<T>::type B;
        const Vec<T, N> xv = load_vec<T, N>(x, vi), yv = load_vec<T, N>(y, vi);
        Vec<T, N> wv, gv, ov, gxv;
        if (w) wv = load_vec<T, N>(w, vi);
        if (g) gv = load_vec<T, N>(g, vi);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const B xi = Widen<B>::of(to_acc(xv.v[i])), yi = Widen<B>::of(to_acc(yv.v[i]));
            const B wi = w ? Widen<B>::of(to_acc(wv.v[i])) : B(1);
            const bool bad = !(xi >= B(0) && xi <= B(1));  // NaN included
            if (bad) record_bad_probability<T>(err, vi * N + i, Widen<double>::of(xi));
            const B lx = nbl_max(nbl_log(xi), B(-100));
            const B l1x = nbl_max(nbl_log1p(-xi), B(-100));
            const B l = bad ? nan_value<B>() : -wi * (yi * lx + (B(1) - yi) * l1x);
            if (out) ov.v[i] = from_acc<T>(l);
            else acc += (double)l;
            if (gx) {
                const B gi = g ? Widen<B>::of(to_acc(gv.v[i])) : (B)g_scalar;
                const B gr = gi * wi * (xi - yi) / nbl_max(xi * (B(1) - xi), (B)1e-12f);
                gxv.v[i] = from_acc<T>(bad ? nan_value<B>() : gr);
            }
        }
        if (out) store_vec<T, N>(out, vi, ov);
        if (gx) store_vec<T, N>(gx, vi, gxv);
    }

    //: binary_cross_entropy_with_logits: l = w ((1 - y) x - (1 + (pw - 1) y) logsigmoid(x)),
    //: logsigmoid(x) = min(x, 0) - log1p(exp(-|x|));
    //: dl/dx = g w ((1 + (pw - 1) y) sigmoid(x) - pw y).
    template <int N> __device__ __forceinline__ void logits(i64 vi) {
        typedef typename AccT<T>::type A;
        const Vec<T, N> xv = load_vec<T, N>(x, vi), yv = load_vec<T, N>(y, vi);
        Vec<T, N> wv, pv, gv, ov, gxv;
        if (w) wv = load_vec<T, N>(w, vi);
        if (pw) pv = load_vec<T, N>(pw, vi);
        if (g) gv = load_vec<T, N>(g, vi);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const A xi = to_acc(xv.v[i]), yi = to_acc(yv.v[i]);
            const A wi = w ? to_acc(wv.v[i]) : A(1);
            const A pwi = pw ? to_acc(pv.v[i]) : A(1);
            const A e = nbl_exp(-nbl_abs(xi));  // in (0, 1]: no overflow
            const A log_sig = nbl_min(xi, A(0)) - nbl_log1p(e);
            const A lw = A(1) + (pwi - A(1)) * yi;
            const A l = wi * ((A(1) - yi) * xi - lw * log_sig);
            if (out) ov.v[i] = from_acc<T>(l);
            else acc += (double)l;
            if (gx) {
                const A gi = g ? to_acc(gv.v[i]) : (A)g_scalar;
                const A sig = xi >= A(0) ? A(1) / (A(1) + e) : e / (A(1) + e);
                gxv.v[i] = from_acc<T>(gi * wi * (lw * sig - pwi * yi));
            }
        }
        if (out) store_vec<T, N>(out, vi, ov);
        if (gx) store_vec<T, N>(gx, vi, gxv);
    }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(256) sigmoid_fwd(NBL_PARAMS_EW1) {
    SigmoidF<T> f{x, y};
    ew_loop<VEC>(n, f);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) sigmoid_bwd(NBL_PARAMS_EW2) {
    SigmoidBwdF<T> f{g, y, gx};
    ew_loop<VEC>(n, f);
}

//: BCE on probabilities (``pw`` unused: one parameter list for both binary losses; ``err``: the
//: device error record for inputs outside [0, 1], or null) and on logits (``err`` unused).
template <typename T, int VEC>
__global__ void __launch_bounds__(256) bce_fwd(NBL_PARAMS_BCE) {
    BinaryLossF<T, false> f{x, y, w, pw, g_rows, g_scalar, gx, loss_out, err, 0.0};
    ew_loop<VEC>(n, f);
    if (out) finish_loss<T, 256>(f.acc, 0.0, NBL_REDUCE);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) bce_logits_fwd(NBL_PARAMS_BCE) {
    BinaryLossF<T, true> f{x, y, w, pw, g_rows, g_scalar, gx, loss_out, err, 0.0};
    ew_loop<VEC>(n, f);
    if (out) finish_loss<T, 256>(f.acc, 0.0, NBL_REDUCE);
}
