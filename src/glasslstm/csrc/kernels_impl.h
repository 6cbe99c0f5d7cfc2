// The kernels of kernels.h. kernels.cpp includes this file once per instruction-set level,
// each time inside its own namespace under `#pragma GCC target`, after the headers it needs:
// the same source becomes AVX-512, AVX2 and baseline code, and the CPU picks at load time.
// (No #include here: everything is inlined into the target-specific functions.)
//
// exp is our own (Cephes-style range reduction + polynomial, ~2 ulp in float) so that loops
// vectorise without -ffast-math; NaN and Inf propagate (a diverging run must see its NaN).

#define GL_RESTRICT __restrict__
// The math functions must be inlined into the loops for those to vectorise (left to its
// heuristics, gcc kept exp out of line under the target pragmas: a scalar call per value).
#define GL_INLINE inline __attribute__((always_inline))

// ---- exp, sigmoid, tanh that the compiler vectorises ---------------------------------------

static GL_INLINE float exp_(float x) {
    // exp(x) = 2^n exp(r), r = x - n ln2 in [-ln2/2, ln2/2]
    float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
    xc = xc < -87.3365447504f ? -87.3365447504f : xc;  // NaN fails both tests: kept
    float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &e, sizeof scale);
    float y = p * scale;
    // past the clamps the true result is 0 or inf; NaN stays NaN
    y = x < -87.3365447504f ? 0.0f : y;
    y = x > 88.3762626647949f ? __builtin_inff() : y;
    return y;
}

static GL_INLINE double exp_(double x) {
    double xc = x > 709.0 ? 709.0 : x;
    xc = xc < -708.0 ? -708.0 : xc;
    double n = __builtin_floor(xc * 1.4426950408889634 + 0.5);
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    // Taylor to degree 13: |r| <= 0.347, relative error < 1e-17
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    int64_t e = ((int64_t)n + 1023) << 52;
    double scale;
    __builtin_memcpy(&scale, &e, sizeof scale);
    double y = p * scale;
    y = x < -708.0 ? 0.0 : y;
    y = x > 709.0 ? __builtin_inf() : y;
    return y;
}

template <typename T>
static GL_INLINE T sigmoid_(T x) {
    return T(1) / (T(1) + exp_(-x));
}
// tanh(x) = 2 sigmoid(2x) - 1: one exp and one division, exact at +-inf, NaN in NaN out; near 0
// the absolute error is one rounding of a value of size 1 (what the tests bound).
template <typename T>
static GL_INLINE T tanh_(T x) {
    return T(2) / (T(1) + exp_(T(-2) * x)) - T(1);
}

// ---- the cell, pointwise ---------------------------------------------------------------
// forward: a (n rows, stride lda >= 4H) holds the pre-activations on entry (bias, when given,
// is added as they are read) and the activated gates i, f, g, o on exit; c = f c_prev + i g;
// tc = tanh(c) (null: not kept); out = o tanh(c).
template <typename T>
static void cell_forward(int64_t n, int64_t H, T *GL_RESTRICT a, int64_t lda,
                         const T *GL_RESTRICT bias, const T *c_prev, int64_t ldp, T *c,
                         int64_t ldc, T *GL_RESTRICT tc, int64_t ldt, T *GL_RESTRICT out,
                         int64_t ldo) {
    for (int64_t b = 0; b < n; b++) {
        T *GL_RESTRICT ai = a + b * lda;
        T *GL_RESTRICT af = ai + H;
        T *GL_RESTRICT ag = ai + 2 * H;
        T *GL_RESTRICT ao = ai + 3 * H;
        const T *cp = c_prev + b * ldp;
        T *cb = c + b * ldc;
        T *GL_RESTRICT ob = out + b * ldo;
        if (bias) {
#pragma GCC ivdep
            for (int64_t j = 0; j < 4 * H; j++) ai[j] += bias[j];
        }
        if (tc) {
            T *GL_RESTRICT tb = tc + b * ldt;
#pragma GCC ivdep
            for (int64_t j = 0; j < H; j++) {
                T i = sigmoid_(ai[j]), f = sigmoid_(af[j]);
                T g = tanh_(ag[j]), o = sigmoid_(ao[j]);
                T cn = f * cp[j] + i * g;
                T t = tanh_(cn);
                ai[j] = i;
                af[j] = f;
                ag[j] = g;
                ao[j] = o;
                cb[j] = cn;
                tb[j] = t;
                ob[j] = o * t;
            }
        } else {
#pragma GCC ivdep
            for (int64_t j = 0; j < H; j++) {
                T i = sigmoid_(ai[j]), f = sigmoid_(af[j]);
                T g = tanh_(ag[j]), o = sigmoid_(ao[j]);
                T cn = f * cp[j] + i * g;
                ai[j] = i;
                af[j] = f;
                ag[j] = g;
                ao[j] = o;
                cb[j] = cn;
                ob[j] = o * tanh_(cn);
            }
        }
    }
}

// backward of one step: a holds the activated gates (stride lda); dh the gradient reaching
// o tanh(c) (stride ldh), dy (nullable, stride ldh) added to it; dc (stride ldc) the gradient
// reaching c from later steps on entry and dL/dc_prev on exit; d (stride lda) gets the
// pre-activation gradients di, df, dg, do.
template <typename T>
static void cell_backward(int64_t n, int64_t H, const T *GL_RESTRICT a, int64_t lda,
                          const T *GL_RESTRICT c_prev, int64_t ldp, const T *GL_RESTRICT tc,
                          int64_t ldt, const T *GL_RESTRICT dh, const T *GL_RESTRICT dy,
                          int64_t ldh, T *GL_RESTRICT dc, int64_t ldc, T *GL_RESTRICT d) {
    for (int64_t b = 0; b < n; b++) {
        const T *ai = a + b * lda, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;
        const T *cp = c_prev + b * ldp, *tb = tc + b * ldt, *hb = dh + b * ldh;
        const T *yb = dy ? dy + b * ldh : nullptr;
        T *cb = dc + b * ldc;
        T *di = d + b * lda, *df = di + H, *dg = di + 2 * H, *dO = di + 3 * H;
#pragma GCC ivdep
        for (int64_t j = 0; j < H; j++) {
            T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tb[j];
            T dr = yb ? hb[j] + yb[j] : hb[j];
            T dcn = cb[j] + dr * o * (1 - t * t);
            di[j] = dcn * g * i * (1 - i);
            df[j] = dcn * cp[j] * f * (1 - f);
            dg[j] = dcn * i * (1 - g * g);
            dO[j] = dr * t * o * (1 - o);
            cb[j] = dcn * f;
        }
    }
}

// the same with the rows shared by the OpenMP threads when there is enough work and the
// caller is not in a parallel region already (the large-weight loops, whose GEMMs are threaded)
constexpr int64_t kCellSplitMin = 8192;
static inline int cell_threads(int64_t n, int64_t H) {
    if (n >= 2 && n * H >= kCellSplitMin && !omp_in_parallel()) return omp_get_max_threads();
    return 1;
}

// body(b) for the rows b in [r0, e), each `width` values wide: shared over the threads where a
// loop runs threaded products (threads == 0, not already one thread's share of the rows) and
// there is enough work, as the gate math is
template <typename F>
static void each_row(int64_t r0, int64_t e, int64_t width, int threads, F &&body) {
    const int nt = threads == 0 ? cell_threads(e - r0, width) : 1;
    if (nt <= 1) {
        for (int64_t b = r0; b < e; b++) body(b);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = r0; b < e; b++) body(b);
}

template <typename T>
static void cell_forward_par(int64_t n, int64_t H, T *a, int64_t lda, const T *bias,
                             const T *cp, int64_t ldp, T *c, int64_t ldc, T *tc, int64_t ldt,
                             T *out, int64_t ldo) {
    int nt = cell_threads(n, H);
    if (nt <= 1) {
        cell_forward(n, H, a, lda, bias, cp, ldp, c, ldc, tc, ldt, out, ldo);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t r0 = n * id / k, r1 = n * (id + 1) / k;
        if (r0 < r1)
            cell_forward(r1 - r0, H, a + r0 * lda, lda, bias, cp + r0 * ldp, ldp, c + r0 * ldc,
                         ldc, tc ? tc + r0 * ldt : nullptr, ldt, out + r0 * ldo, ldo);
    }
}

template <typename T>
static void cell_backward_par(int64_t n, int64_t H, const T *a, int64_t lda, const T *cp,
                              int64_t ldp, const T *tc, int64_t ldt, const T *dh, const T *dy,
                              int64_t ldh, T *dc, int64_t ldc, T *d) {
    int nt = cell_threads(n, H);
    if (nt <= 1) {
        cell_backward(n, H, a, lda, cp, ldp, tc, ldt, dh, dy, ldh, dc, ldc, d);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t r0 = n * id / k, r1 = n * (id + 1) / k;
        if (r0 < r1)
            cell_backward(r1 - r0, H, a + r0 * lda, lda, cp + r0 * ldp, ldp, tc + r0 * ldt, ldt,
                          dh + r0 * ldh, dy ? dy + r0 * ldh : nullptr, ldh, dc + r0 * ldc, ldc,
                          d + r0 * lda);
    }
}

// ---- the regularised family (VariantArgs in kernels.h), pointwise ------------------------------
// Written as short passes over a row, each a loop the compiler vectorises (the row is in L1):
// a member that is off costs nothing but the test that skips its pass.

// zoneout's blend of the new value a and the previous b, b with weight k in [0, 1], as
// torch.lerp computes it: exactly b where k = 1 (a unit that keeps its value keeps it bit for
// bit), exactly a where k = 0
template <typename T>
static GL_INLINE T lerp_(T a, T b, T k) {
    return k < T(0.5) ? a + k * (b - a) : b - (b - a) * (T(1) - k);
}

static GL_INLINE float sqrt_(float x) { return __builtin_sqrtf(x); }
static GL_INLINE double sqrt_(double x) { return __builtin_sqrt(x); }

// sums in kLanes independent partial sums (vectorised without reassociating: the same bits on
// every run), then added in a fixed order
constexpr int kLanes = 16;
template <typename T>
static GL_INLINE T sum_(int64_t n, const T *GL_RESTRICT x) {
    T acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int k = 0; k < kLanes; k++) acc[k] += x[j + k];
    T s = 0;
    for (; j < n; j++) s += x[j];
    for (int k = 0; k < kLanes; k++) s += acc[k];
    return s;
}
// sum of (x - mu)^2
template <typename T>
static GL_INLINE T sumsq_(int64_t n, const T *GL_RESTRICT x, T mu) {
    T acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int k = 0; k < kLanes; k++) acc[k] += (x[j + k] - mu) * (x[j + k] - mu);
    T s = 0;
    for (; j < n; j++) s += (x[j] - mu) * (x[j] - mu);
    for (int k = 0; k < kLanes; k++) s += acc[k];
    return s;
}
// sum of x y z (z may be null: x y)
template <typename T>
static GL_INLINE T dot_(int64_t n, const T *GL_RESTRICT x, const T *GL_RESTRICT y,
                        const T *GL_RESTRICT z) {
    T acc[kLanes] = {};
    int64_t j = 0;
    T s = 0;
    if (z) {
        for (; j + kLanes <= n; j += kLanes)
            for (int k = 0; k < kLanes; k++) acc[k] += x[j + k] * y[j + k] * z[j + k];
        for (; j < n; j++) s += x[j] * y[j] * z[j];
    } else {
        for (; j + kLanes <= n; j += kLanes)
            for (int k = 0; k < kLanes; k++) acc[k] += x[j + k] * y[j + k];
        for (; j < n; j++) s += x[j] * y[j];
    }
    for (int k = 0; k < kLanes; k++) s += acc[k];
    return s;
}

// layer normalisation of one row: zhat = (z - mean) / sqrt(var + eps) (zhat may be z); the
// 1/sqrt(var + eps) is returned
template <typename T>
static GL_INLINE T ln_row(int64_t n, const T *z, T *zhat) {
    const T mu = sum_(n, z) / T(n);
    const T rstd = T(1) / sqrt_(sumsq_(n, z, mu) / T(n) + T(kLnEps));
    for (int64_t j = 0; j < n; j++) zhat[j] = (z[j] - mu) * rstd;
    return rstd;
}
// its backward: dz = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat)), where dzhat = dy g
// (g the gain); dz may be dy
template <typename T>
static GL_INLINE void ln_row_backward(int64_t n, const T *dy, const T *GL_RESTRICT g,
                                      const T *GL_RESTRICT zhat, T rstd, T *dz) {
    const T m1 = dot_(n, dy, g, (const T *)nullptr) / T(n);
    const T m2 = dot_(n, dy, g, zhat) / T(n);
    for (int64_t j = 0; j < n; j++) dz[j] = rstd * (dy[j] * g[j] - m1 - zhat[j] * m2);
}

// forward of one step's rows: cell_forward's contract, plus the family. On entry the rows of
// `a` hold the pre-activations (x U^T, normalised and scaled when ln_ih, plus H_{t-1} W^T
// unless ln_hh: then that product is in aux's r^ section); aux (stride V.K) and kc (stride H)
// point at these rows' entries, or are null.
template <typename T>
static void cell_forward_v(int64_t n, int64_t H, T *GL_RESTRICT a, int64_t lda,
                           const T *GL_RESTRICT bias, const T *cp, int64_t ldp, T *c,
                           int64_t ldc, T *GL_RESTRICT tc, int64_t ldt, T *GL_RESTRICT out,
                           int64_t ldo, const VariantArgs<T> &V, T *aux, const T *kc) {
    const int64_t H4 = 4 * H;
    const T *pi = V.peep, *po = V.peep ? V.peep + H : nullptr, *pf = V.peep ? V.peep + 2 * H : nullptr;
    const T v = V.clip;
    for (int64_t b = 0; b < n; b++) {
        T *GL_RESTRICT ai = a + b * lda;
        T *GL_RESTRICT af = ai + H;
        T *GL_RESTRICT ag = ai + 2 * H;
        T *GL_RESTRICT ao = ai + 3 * H;
        const T *GL_RESTRICT cpb = cp + b * ldp;
        T *GL_RESTRICT cb = c + b * ldc;
        T *GL_RESTRICT ob = out + b * ldo;
        T *xb = aux ? aux + b * V.K : nullptr;
        if (V.ln_hh) {  // a += g_hh LN(H_{t-1} W^T); r^ kept
            T *GL_RESTRICT rn = xb + V.o_rn;
            xb[V.o_rstd + 1] = ln_row(H4, rn, rn);
            for (int64_t j = 0; j < H4; j++) ai[j] += V.ln_hh[j] * rn[j];
        }
        if (bias)
            for (int64_t j = 0; j < H4; j++) ai[j] += bias[j];
        if (pi)  // i and f see C_{t-1}
            for (int64_t j = 0; j < H; j++) {
                ai[j] += pi[j] * cpb[j];
                af[j] += pf[j] * cpb[j];
            }
        for (int64_t j = 0; j < H; j++) {
            T i = sigmoid_(ai[j]), f = sigmoid_(af[j]), g = tanh_(ag[j]);
            ai[j] = i;
            af[j] = f;
            ag[j] = g;
            cb[j] = f * cpb[j] + i * g;  // C~
        }
        if (V.o_cnew >= 0) __builtin_memcpy(xb + V.o_cnew, cb, (size_t)H * sizeof(T));
        if (v > 0)
            for (int64_t j = 0; j < H; j++) {  // NaN passes
                T x = cb[j] > v ? v : cb[j];
                cb[j] = x < -v ? -v : x;
            }
        if (po)  // o sees C~
            for (int64_t j = 0; j < H; j++) ao[j] += po[j] * cb[j];
        for (int64_t j = 0; j < H; j++) ao[j] = sigmoid_(ao[j]);
        if (V.ln_c) {  // ob <- g_c LN(C~) + b_c (c^ kept)
            T *GL_RESTRICT ch = xb + V.o_cn;
            xb[V.o_rstd + 2] = ln_row(H, (const T *)cb, ch);
            for (int64_t j = 0; j < H; j++) ob[j] = V.ln_c[j] * ch[j] + V.ln_c_b[j];
        } else {
            __builtin_memcpy(ob, cb, (size_t)H * sizeof(T));
        }
        if (tc) {
            T *GL_RESTRICT tb = tc + b * ldt;
            for (int64_t j = 0; j < H; j++) {
                T t = tanh_(ob[j]);
                tb[j] = t;
                ob[j] = ao[j] * t;
            }
        } else {
            for (int64_t j = 0; j < H; j++) ob[j] = ao[j] * tanh_(ob[j]);
        }
        if (kc) {  // zoneout: C_t = C~ + k (C_{t-1} - C~)
            const T *GL_RESTRICT kb = kc + b * H;
            for (int64_t j = 0; j < H; j++) cb[j] = lerp_(cb[j], cpb[j], kb[j]);
        }
    }
}

// backward of one step's rows: cell_backward's contract (dh already split by zoneout on h:
// the gradient reaching H~), plus the family: cs (stride ldc) the rows' C_t (= C~ when it is
// not kept in aux); dhw (stride 4H, or null) gets dL/d(H_{t-1} W^T) under ln_hh. The i slice
// of d holds dL/dn (n = the input of the output tanh) on the way.
template <typename T>
static void cell_backward_v(int64_t n, int64_t H, const T *GL_RESTRICT a, int64_t lda,
                            const T *GL_RESTRICT cp, int64_t ldp, const T *GL_RESTRICT tc,
                            int64_t ldt, const T *GL_RESTRICT dh, const T *GL_RESTRICT dy,
                            int64_t ldh, T *GL_RESTRICT dc, int64_t ldc, T *GL_RESTRICT d,
                            const VariantArgs<T> &V, const T *aux, const T *kc, T *dhw) {
    const int64_t H4 = 4 * H;
    const T *pi = V.peep, *po = V.peep ? V.peep + H : nullptr, *pf = V.peep ? V.peep + 2 * H : nullptr;
    const T v = V.clip;
    for (int64_t b = 0; b < n; b++) {
        const T *ai = a + b * lda, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;
        const T *cpb = cp + b * ldp, *tb = tc + b * ldt, *hb = dh + b * ldh;
        const T *yb = dy ? dy + b * ldh : nullptr;
        const T *xb = aux ? aux + b * V.K : nullptr;
        T *cb = dc + b * ldc;
        T *di = d + b * lda, *df = di + H, *dg = di + 2 * H, *dO = di + 3 * H;
        for (int64_t j = 0; j < H; j++) {  // through H~ = o tanh(n)
            T o = ao[j], t = tb[j];
            T dr = yb ? hb[j] + yb[j] : hb[j];
            dO[j] = dr * t * o * (1 - o);
            di[j] = dr * o * (1 - t * t);  // dL/dn
        }
        if (V.ln_c)  // dL/dC~ through n = g_c LN(C~) + b_c
            ln_row_backward(H, (const T *)di, V.ln_c, xb + V.o_cn, xb[V.o_rstd + 2], di);
        if (po)
            for (int64_t j = 0; j < H; j++) di[j] += po[j] * dO[j];
        if (kc) {  // C_t = C~ + k (C_{t-1} - C~): (1 - k) to C~, k straight to C_{t-1}
            const T *GL_RESTRICT kb = kc + b * H;
            for (int64_t j = 0; j < H; j++) {
                T g = cb[j];
                di[j] += (1 - kb[j]) * g;
                cb[j] = kb[j] * g;
            }
        } else {
            for (int64_t j = 0; j < H; j++) {
                di[j] += cb[j];
                cb[j] = 0;
            }
        }
        if (v > 0) {  // no gradient through a clipped entry (NaN passes)
            const T *GL_RESTRICT cn = xb + V.o_cnew;
            for (int64_t j = 0; j < H; j++) di[j] = (cn[j] > v || cn[j] < -v) ? T(0) : di[j];
        }
        for (int64_t j = 0; j < H; j++) {  // through C~ = f C_{t-1} + i g
            T i = ai[j], f = af[j], g = ag[j], dcn = di[j];
            di[j] = dcn * g * i * (1 - i);
            df[j] = dcn * cpb[j] * f * (1 - f);
            dg[j] = dcn * i * (1 - g * g);
            cb[j] += dcn * f;
        }
        if (pi)
            for (int64_t j = 0; j < H; j++) cb[j] += pi[j] * di[j] + pf[j] * df[j];
        if (V.ln_hh)
            ln_row_backward(H4, (const T *)di, V.ln_hh, xb + V.o_rn, xb[V.o_rstd + 1],
                            dhw + b * H4);
    }
}

// acc += what one step's rows give the family's parameters (BackwardArgs::dv's layout):
// d the pre-activation gradients (stride 4H), g (+ gy) the gradient reaching H~ (stride ldg),
// c~ the rows' new cells after clipping (from aux, else cs), cp the previous cells
template <typename T>
static void variant_sums(int64_t n, int64_t H, const T *d, const T *gates, const T *tc,
                         const T *g, const T *gy, int64_t ldg, const T *cp, int64_t ldp,
                         const T *cs, const VariantArgs<T> &V, const T *aux, T *GL_RESTRICT acc) {
    const int64_t H4 = 4 * H;
    T *GL_RESTRICT a_ih = acc, *GL_RESTRICT a_hh = acc + H4, *GL_RESTRICT a_p = acc + 2 * H4;
    T *GL_RESTRICT a_gc = a_p + 3 * H, *GL_RESTRICT a_bc = a_gc + H;
    for (int64_t b = 0; b < n; b++) {
        const T *GL_RESTRICT db = d + b * H4;
        const T *xb = aux ? aux + b * V.K : nullptr;
        if (V.ln_ih)
            for (int64_t j = 0; j < H4; j++) a_ih[j] += db[j] * xb[V.o_xn + j];
        if (V.ln_hh)
            for (int64_t j = 0; j < H4; j++) a_hh[j] += db[j] * xb[V.o_rn + j];
        if (V.peep) {  // p_i, p_o, p_f
            const T *GL_RESTRICT cpb = cp + b * ldp;
            const T *GL_RESTRICT cnb = V.o_cnew >= 0 ? xb + V.o_cnew : cs + b * H;
            const T v = V.clip;
            for (int64_t j = 0; j < H; j++) {
                T cn = cnb[j];
                if (v > 0) cn = cn > v ? v : (cn < -v ? -v : cn);
                a_p[j] += db[j] * cpb[j];
                a_p[H + j] += db[3 * H + j] * cn;
                a_p[2 * H + j] += db[H + j] * cpb[j];
            }
        }
        if (V.ln_c) {  // dL/dn = (g + gy) o (1 - tanh(n)^2), recomputed
            const T *GL_RESTRICT ob = gates + b * H4 + 3 * H, *GL_RESTRICT tb = tc + b * H;
            const T *GL_RESTRICT gb = g + b * ldg, *GL_RESTRICT yb = gy ? gy + b * ldg : nullptr;
            const T *GL_RESTRICT ch = xb + V.o_cn;
            for (int64_t j = 0; j < H; j++) {
                T dn = (yb ? gb[j] + yb[j] : gb[j]) * ob[j] * (1 - tb[j] * tb[j]);
                a_gc[j] += dn * ch[j];
                a_bc[j] += dn;
            }
        }
    }
}

template <typename T>
static void cell_forward_v_par(int64_t n, int64_t H, T *a, int64_t lda, const T *bias,
                               const T *cp, int64_t ldp, T *c, int64_t ldc, T *tc, int64_t ldt,
                               T *out, int64_t ldo, const VariantArgs<T> &V, T *aux,
                               const T *kc) {
    int nt = cell_threads(n, H);
    if (nt <= 1) {
        cell_forward_v(n, H, a, lda, bias, cp, ldp, c, ldc, tc, ldt, out, ldo, V, aux, kc);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t r0 = n * id / k, r1 = n * (id + 1) / k;
        if (r0 < r1)
            cell_forward_v(r1 - r0, H, a + r0 * lda, lda, bias, cp + r0 * ldp, ldp,
                           c + r0 * ldc, ldc, tc ? tc + r0 * ldt : nullptr, ldt, out + r0 * ldo,
                           ldo, V, aux ? aux + r0 * V.K : nullptr, kc ? kc + r0 * H : nullptr);
    }
}

template <typename T>
static void cell_backward_v_par(int64_t n, int64_t H, const T *a, int64_t lda, const T *cp,
                                int64_t ldp, const T *tc, int64_t ldt, const T *dh,
                                const T *dy, int64_t ldh, T *dc, int64_t ldc, T *d,
                                const VariantArgs<T> &V, const T *aux, const T *kc, T *dhw) {
    int nt = cell_threads(n, H);
    if (nt <= 1) {
        cell_backward_v(n, H, a, lda, cp, ldp, tc, ldt, dh, dy, ldh, dc, ldc, d, V, aux, kc, dhw);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t r0 = n * id / k, r1 = n * (id + 1) / k;
        if (r0 < r1)
            cell_backward_v(r1 - r0, H, a + r0 * lda, lda, cp + r0 * ldp, ldp, tc + r0 * ldt,
                            ldt, dh + r0 * ldh, dy ? dy + r0 * ldh : nullptr, ldh,
                            dc + r0 * ldc, ldc, d + r0 * lda, V,
                            aux ? aux + r0 * V.K : nullptr, kc ? kc + r0 * H : nullptr,
                            dhw ? dhw + r0 * 4 * H : nullptr);
    }
}

// ---- denormals ----------------------------------------------------------------------------
// Flushed to zero for the duration of a time loop. Gradients that vanish along a long
// sequence (the vanishing gradient itself) pass through float32's denormal range, where x86
// arithmetic is one to two orders of magnitude slower: a T = 1000 backward ran 13x slower
// without this. FTZ writes such results as zero, DAZ reads such inputs as zero. Set on the
// calling thread and, for loops of kFtzPoolSteps steps or more, on the OpenMP pool's threads
// (the GEMMs' threads), and restored on each of them on the way out.
constexpr int64_t kFtzPoolSteps = 32;
constexpr int kFtzMaxThreads = 256;
struct FtzState {
    unsigned int saved[kFtzMaxThreads];
    bool pool;
};
#if defined(__x86_64__) || defined(__i386__)
static inline void fp_begin(unsigned int *saved) {
    *saved = _mm_getcsr();
    _mm_setcsr(*saved | 0x8040u);
}
static inline void fp_end(unsigned int saved) { _mm_setcsr(saved); }
#else
static inline void fp_begin(unsigned int *saved) { *saved = 0; }
static inline void fp_end(unsigned int saved) { (void)saved; }
#endif
static void ftz_begin(FtzState &st, int64_t steps) {
    st.pool = steps >= kFtzPoolSteps;
    if (st.pool) {
#pragma omp parallel
        {
            int id = omp_get_thread_num();
            if (id < kFtzMaxThreads) fp_begin(&st.saved[id]);
        }
    } else {
        fp_begin(&st.saved[0]);
    }
}
static void ftz_end(FtzState &st) {
    if (st.pool) {
#pragma omp parallel
        {
            int id = omp_get_thread_num();
            if (id < kFtzMaxThreads) fp_end(st.saved[id]);
        }
    } else {
        fp_end(st.saved[0]);
    }
}
// ftz_begin .. ftz_end over a scope, restored however the scope is left
struct FtzScope {
    FtzState st;
    explicit FtzScope(int64_t steps) { ftz_begin(st, steps); }
    ~FtzScope() { ftz_end(st); }
    FtzScope(const FtzScope &) = delete;
    FtzScope &operator=(const FtzScope &) = delete;
};

// ---- batch-row split of whole time loops ---------------------------------------------------
// Rows of a batch never meet in an LSTM (row b's state depends on row b alone), so threads
// that own disjoint rows run whole loops without a single barrier, each multiplying its rows
// by the weight with one-thread GEMMs. For weights up to kRowSplitMaxBytes (beyond, each
// thread reading all of W for its few rows loses to threaded GEMMs over the columns, each
// thread keeping its part of W in its own cache): from kRowSplitMinSmall rows a thread for
// weights up to half that size, else from kRowSplitMin.
constexpr int64_t kRowSplitMin = 8;
constexpr int64_t kRowSplitMinSmall = 2;
constexpr size_t kRowSplitMaxBytes = size_t(1) << 20;
static inline int row_threads(int64_t B, size_t weight_bytes) {
    int64_t nt = omp_get_max_threads();
    if (omp_in_parallel() || weight_bytes > kRowSplitMaxBytes) return 1;
    int64_t min_rows = weight_bytes <= kRowSplitMaxBytes / 2 ? kRowSplitMinSmall : kRowSplitMin;
    if (nt > B / min_rows) nt = B / min_rows;
    return nt < 1 ? 1 : (int)nt;
}

// float32 -> bfloat16, rounded to nearest even (torch's .to(torch.bfloat16)); NaN stays NaN
static inline uint16_t bf16_of(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static void to_bf16(int64_t n, const float *GL_RESTRICT src, uint16_t *GL_RESTRICT dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_of(src[i]);
}

template <typename T>
static inline gemm_fn<T> gemm_of(const Gemms &g);
template <>
inline gemm_fn<float> gemm_of<float>(const Gemms &g) {
    return g.f32;
}
template <>
inline gemm_fn<double> gemm_of<double>(const Gemms &g) {
    return g.f64;
}

// ---- whole time loops ------------------------------------------------------------------------
// Ragged batches (batch_sizes): rows are sorted longest first, so in the forward direction the
// rows active at step t were active at t - 1, and a row that ends stays ended; in the reverse
// direction rows start (from h0, c0) at their last step and stay active down to step 0. The
// state a row starts a step from is therefore the previous step's output, or h0 and c0 for the
// rows starting now: `Prev` gives the two row blocks.
struct Prev {
    int64_t split;  // rows [r0, split) continue from the previous step, [split, e) start anew
};

// Packed copies of a loop's weights (PackedGemm), made once per call where the provider has a
// packed layout; null members: the loop multiplies by the weights as they are.
struct Packed {
    const float *w = nullptr, *whr = nullptr;
    float *storage = nullptr;
    void *hw = nullptr, *hwhr = nullptr;  // the provider's own handles (PackedGemm::make)
    void (*free_handle)(void *) = nullptr;
    const uint16_t *w16 = nullptr;  // the bf16 weight packed (PackedGemmBf16), or null
    uint16_t *storage16 = nullptr;
    Packed() = default;
    Packed(const Packed &) = delete;
    Packed &operator=(const Packed &) = delete;
    ~Packed() {
        delete[] storage;
        delete[] storage16;
        if (free_handle) {
            if (hw) free_handle(hw);
            if (hwhr) free_handle(hwhr);
        }
    }
};

// pack the bf16 weight w16 (k x n) where the provider has a layout for it and it fits
static void pack_weight_bf16(const Gemms &G, Packed &P, int64_t k, int64_t n, const uint16_t *w16) {
    if (!w16 || !G.packed16.gemm_packed || !G.packed16.fits(k, n)) return;
    P.storage16 = new uint16_t[(size_t)G.packed16.packed_size(k, n)];
    G.packed16.pack(k, n, w16, n, P.storage16);
    P.w16 = P.storage16;
}

// C (m x n) = A B + beta C in bf16 x bf16 -> float32, B being w16 (k x n) or its packed copy
static inline void product_bf16(const Gemms &G, const uint16_t *wp, int64_t m, int64_t n,
                                int64_t k, const uint16_t *A, int64_t lda, const uint16_t *w16,
                                float beta, float *C, int64_t ldc, int threads) {
    if (wp)
        G.packed16.gemm_packed(m, n, k, A, lda, wp, beta, C, ldc, threads);
    else
        G.bf16(m, n, k, A, lda, w16, n, beta, C, ldc, threads);
}

// C (m x n) = A B + beta C where B is `w` (k x n, ldb), its packed copy `wp` or the
// provider's handle `wh`
template <typename T>
static inline void product(const Gemms &G, const float *wp, void *wh, int64_t m, int64_t n,
                           int64_t k, const T *A, int64_t lda, const T *w, int64_t ldb, T beta,
                           T *C, int64_t ldc, int threads) {
    if constexpr (std::is_same<T, float>::value) {
        if (wp) {
            G.packed.gemm_packed(m, n, k, A, lda, wp, beta, C, ldc, threads);
            return;
        }
        if (wh) {
            G.packed.gemm_handle(m, n, k, A, lda, wh, beta, C, ldc, threads);
            return;
        }
    }
    gemm_of<T>(G)(m, n, k, A, lda, w, ldb, beta, C, ldc, threads);
}

// pack w1 (k1 x n1) and w2 (k2 x n2, nullable) where the provider has a packed layout; with
// torch_layout, w1 and w2 are given as torch stores the weights (n1 x k1, n2 x k2) and are
// packed straight from that (PackedGemm::pack_t; packs_weights in kernels.h)
template <typename T>
static void pack_weights(const Gemms &G, Packed &P, int64_t k1, int64_t n1, const T *w1,
                         int64_t k2, int64_t n2, const T *w2, bool torch_layout = false) {
    if constexpr (std::is_same<T, float>::value) {
        if (G.packed.make && !torch_layout) {
            P.free_handle = G.packed.free_handle;
            P.hw = G.packed.make(k1, n1, w1, n1);
            if (w2) P.hwhr = G.packed.make(k2, n2, w2, n2);
            return;
        }
        if (!G.packed.gemm_packed) return;
        auto pack = [&](int64_t k, int64_t n, const float *w, float *out) {
            if (torch_layout)
                G.packed.pack_t(k, n, w, k, out);
            else
                G.packed.pack(k, n, w, n, out);
        };
        const int64_t s1 = G.packed.packed_size(k1, n1), s2 = w2 ? G.packed.packed_size(k2, n2) : 0;
        P.storage = new float[(size_t)(s1 + s2)];
        pack(k1, n1, w1, P.storage);
        P.w = P.storage;
        if (w2) {
            pack(k2, n2, w2, P.storage + s1);
            P.whr = P.storage + s1;
        }
    }
}

// the time step t of processing step s (t = s forward, T - 1 - s in reverse)
static inline int64_t time_of(bool reverse, int64_t Tn, int64_t s) { return reverse ? Tn - 1 - s : s; }

// steps [s0, s1) of the loop (in processing order) for the rows [r0, r1), the gates of step t
// at row t - t_base of A.gates
template <typename T>
static void forward_rows(const ForwardArgs<T> &A, const Gemms &G, const Packed &PK, int64_t r0,
                         int64_t r1, int threads, int64_t s0, int64_t s1, int64_t t_base) {
    const int64_t Tn = A.T_, B = A.B, H = A.H, P = A.P, H4 = 4 * H;
    const bool bf16 = A.w_t16 != nullptr && sizeof(T) == sizeof(float);
    uint16_t *h16 = bf16 ? new uint16_t[(size_t)((r1 - r0) * P)] : nullptr;
    const VariantArgs<T> *V = A.v;
    const int64_t K = V ? V->K : 0;
    T *hm = V && V->hmask ? new T[(size_t)((r1 - r0) * P)] : nullptr;  // H_{t-1} m_h
    // rows active at the previous step (in processing order)
    int64_t active_before = s0 == 0 ? 0 : (A.batch_sizes ? A.batch_sizes[time_of(A.reverse, Tn, s0 - 1)] : B);
    for (int64_t s = s0; s < s1; s++) {
        const int64_t t = time_of(A.reverse, Tn, s);
        const int64_t nb = A.batch_sizes ? A.batch_sizes[t] : B;
        const int64_t e = nb < r1 ? nb : r1, n = e - r0;  // active rows of this share: [r0, e)
        T *a = A.gates + (t - t_base) * B * H4;
        T *yt = A.y + t * B * P;
        T *ct = A.cs + (A.cs_ring ? (s & 1) : t) * B * H;
        const T *yp = s == 0 ? nullptr : A.y + (A.reverse ? t + 1 : t - 1) * B * P;
        const T *cp = s == 0 ? nullptr : A.cs + (A.cs_ring ? ((s - 1) & 1) : (A.reverse ? t + 1 : t - 1)) * B * H;
        const int64_t split = s == 0 ? r0 : (active_before < r0 ? r0 : (active_before > e ? e : active_before));
        active_before = nb;
        if (e < r1) {  // rows past their end (or before their start): zero output and gates
            int64_t k0 = e > r0 ? e : r0;
            __builtin_memset(yt + k0 * P, 0, (size_t)((r1 - k0) * P) * sizeof(T));
            __builtin_memset(a + k0 * H4, 0, (size_t)((r1 - k0) * H4) * sizeof(T));
            if (!A.cs_ring) __builtin_memset(ct + k0 * H, 0, (size_t)((r1 - k0) * H) * sizeof(T));
        }
        if (n <= 0) continue;
        T *auxt = V && V->aux ? V->aux + (V->aux_ring ? 0 : t) * B * K : nullptr;
        if (V && V->ln_ih)  // a = g_ih LN(x U^T), x^ kept
            each_row(r0, e, H4, threads, [&](int64_t b) {
                T *ab = a + b * H4, *xn = auxt + b * K + V->o_xn;
                auxt[b * K + V->o_rstd] = ln_row(H4, (const T *)ab, xn);
                for (int64_t j = 0; j < H4; j++) ab[j] = V->ln_ih[j] * xn[j];
            });
        // a[rows] += H_{t-1} W^T (with ln_hh: into aux, normalised by the cell), in up to two
        // row blocks: continuing rows, starting rows
        for (int blk = 0; blk < 2; blk++) {
            const int64_t b0 = blk == 0 ? r0 : split, b1 = blk == 0 ? split : e;
            if (b1 <= b0) continue;
            const T *hp = blk == 0 ? yp + b0 * P : A.h0 + b0 * P;
            if (hm) {  // recurrent dropout: H_{t-1} m_h
                for (int64_t k = 0; k < (b1 - b0) * P; k++) hm[k] = hp[k] * V->hmask[b0 * P + k];
                hp = hm;
            }
            const bool sep = V && V->ln_hh;
            T *dst = sep ? auxt + b0 * K + V->o_rn : a + b0 * H4;
            const int64_t ldd = sep ? K : H4;
            if (bf16) {
                to_bf16((b1 - b0) * P, (const float *)hp, h16);
                product_bf16(G, PK.w16, b1 - b0, H4, P, h16, P, A.w_t16, sep ? 0.0f : 1.0f,
                             (float *)dst, ldd, threads);
            } else {
                product(G, PK.w, PK.hw, b1 - b0, H4, P, hp, P, A.w_t, H4, T(sep ? 0 : 1), dst, ldd,
                        threads);
            }
        }
        // the gate math; H_t into y (or o tanh(C_t) into rs, then H_t = that W_hr^T)
        T *tc = A.tanh_c ? A.tanh_c + t * B * H : nullptr;
        T *dst = A.rs ? A.rs + (A.rs_ring ? 0 : t * B * H) : yt;
        const int64_t ldo = A.rs ? H : P;
        for (int blk = 0; blk < 2; blk++) {
            const int64_t b0 = blk == 0 ? r0 : split, b1 = blk == 0 ? split : e;
            if (b1 <= b0) continue;
            const T *cpb = blk == 0 ? cp + b0 * H : A.c0 + b0 * H;
            if (V) {
                auto cell = threads == 1 ? cell_forward_v<T> : cell_forward_v_par<T>;
                cell(b1 - b0, H, a + b0 * H4, H4, A.bias, cpb, H, ct + b0 * H, H,
                     tc ? tc + b0 * H : nullptr, H, dst + b0 * ldo, ldo, *V,
                     auxt ? auxt + b0 * K : nullptr, V->zc ? V->zc + (t * B + b0) * H : nullptr);
            } else {
                auto cell = threads == 1 ? cell_forward<T> : cell_forward_par<T>;
                cell(b1 - b0, H, a + b0 * H4, H4, A.bias, cpb, H, ct + b0 * H, H,
                     tc ? tc + b0 * H : nullptr, H, dst + b0 * ldo, ldo);
            }
        }
        if (A.rs)
            product(G, PK.whr, PK.hwhr, n, P, H, dst + r0 * H, H, A.whr_t, P, T(0), yt + r0 * P, P,
                    threads);
        if (V && V->zh)  // zoneout: H_t = H~ + k (H_{t-1} - H~)
            for (int blk = 0; blk < 2; blk++) {
                const int64_t b0 = blk == 0 ? r0 : split, b1 = blk == 0 ? split : e;
                if (b1 <= b0) continue;
                const T *hp = blk == 0 ? yp + b0 * P : A.h0 + b0 * P;
                const T *kb = V->zh + (t * B + b0) * P;
                T *yb = yt + b0 * P;
                for (int64_t k = 0; k < (b1 - b0) * P; k++) yb[k] = lerp_(yb[k], hp[k], kb[k]);
            }
        // rows whose last step this is: their final state
        const int64_t next = s + 1 < Tn ? (A.batch_sizes ? A.batch_sizes[A.reverse ? t - 1 : t + 1] : B) : 0;
        const int64_t f0 = A.reverse ? r0 : (next > r0 ? (next < e ? next : e) : r0);
        const int64_t f1 = A.reverse ? (s + 1 == Tn ? e : r0) : e;
        if (f1 > f0) {
            __builtin_memcpy(A.h_n + f0 * P, yt + f0 * P, (size_t)((f1 - f0) * P) * sizeof(T));
            __builtin_memcpy(A.c_n + f0 * H, ct + f0 * H, (size_t)((f1 - f0) * H) * sizeof(T));
        }
    }
    delete[] h16;
    delete[] hm;
}

template <typename T>
static void layer_forward(const ForwardArgs<T> &A, const Gemms &G) {
    const int64_t B = A.B;
    Packed PK;  // W^T (P x 4H) and W_hr^T (H x P), packed once for all steps
    if (!A.w_t16 && A.T_ > 1) {
        // straight from W where the provider can (the caller then made no W^T)
        const bool from_w = std::is_same<T, float>::value && packs_weights(G, A.T_, false);
        pack_weights(G, PK, A.P, 4 * A.H, from_w ? A.w : A.w_t, A.H, A.P,
                     A.rs ? (from_w ? A.whr : A.whr_t) : nullptr, from_w);
    }
    if (A.T_ > 1) pack_weight_bf16(G, PK, A.P, 4 * A.H, A.w_t16);
    // (the rings of inference are written row by row too: threads never meet there either)
    int nt = row_threads(B, (size_t)(4 * A.H * A.P + (A.rs ? A.H * A.P : 0)) * sizeof(T));
    // the whole loop, or chunks of A.chunk steps, each projected first (A.project, outside
    // the flush-to-zero mode of the loop: the products over all steps never ran in it)
    const int64_t Tn = A.T_, chunk = A.project ? A.chunk : Tn;
    for (int64_t s0 = 0; s0 < Tn; s0 += chunk) {
        const int64_t s1 = s0 + chunk < Tn ? s0 + chunk : Tn;
        // the chunk's steps are t in [t0, t1)
        const int64_t t0 = A.reverse ? Tn - s1 : s0, t1 = A.reverse ? Tn - s0 : s1;
        if (A.project) A.project(A.project_ctx, t0, t1);
        const int64_t t_base = A.project ? t0 : 0;
        if (nt > 1) {
#pragma omp parallel num_threads(nt)
            {
                int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
                int64_t r0 = B * id / k, r1 = B * (id + 1) / k;
                unsigned int fp;
                fp_begin(&fp);
                if (r0 < r1) forward_rows(A, G, PK, r0, r1, 1, s0, s1, t_base);
                fp_end(fp);
            }
        } else {
            FtzScope ftz(Tn);  // (the pool's threads too when the whole loop is long)
            forward_rows(A, G, PK, 0, B, 0, s0, s1, t_base);
        }
    }
}

// acc (k) += the column sums of M (n x k, contiguous)
template <typename T>
static void col_sums(int64_t n, int64_t k, const T *GL_RESTRICT M, T *GL_RESTRICT acc) {
    for (int64_t r = 0; r < n; r++) {
        const T *GL_RESTRICT row = M + r * k;
#pragma GCC ivdep
        for (int64_t j = 0; j < k; j++) acc[j] += row[j];
    }
}

template <typename T>
static void backward_rows(const BackwardArgs<T> &A, const Gemms &G, const Packed &PK, int64_t r0,
                          int64_t r1, T *db, T *dv, int threads) {
    const int64_t Tn = A.T_, B = A.B, H = A.H, P = A.P, H4 = 4 * H;
    const bool bf16 = A.w16 != nullptr && sizeof(T) == sizeof(float);
    uint16_t *d16 = bf16 ? new uint16_t[(size_t)((r1 - r0) * H4)] : nullptr;
    T *dr = A.whr ? new T[(size_t)((r1 - r0) * H)] : nullptr;
    T *dhr = A.dh + r0 * P, *dcr = A.dc + r0 * H;
    const VariantArgs<T> *V = A.v;
    const int64_t K = V ? V->K : 0;
    // zoneout on h: the gradient reaching H~, and the part that goes straight to H_{t-1}
    T *zg = V && V->zh ? new T[(size_t)((r1 - r0) * P)] : nullptr;
    T *zcarry = V && V->zh ? new T[(size_t)((r1 - r0) * P)] : nullptr;
    for (int64_t s = 0; s < Tn; s++) {
        const int64_t t = A.reverse ? s : Tn - 1 - s;
        const int64_t nb = A.batch_sizes ? A.batch_sizes[t] : B;
        const int64_t e = nb < r1 ? nb : r1, n = e - r0;
        if (n <= 0) continue;
        // the rows that continued from the previous step (in the forward pass's order) read
        // C_{t-1} there; the others started from c0
        const bool first = A.reverse ? t == Tn - 1 : t == 0;
        const int64_t before = first ? 0 : (A.batch_sizes ? A.batch_sizes[A.reverse ? t + 1 : t - 1] : B);
        const int64_t split = before < r0 ? r0 : (before > e ? e : before);
        const T *cprev = first ? nullptr : A.cs + (A.reverse ? t + 1 : t - 1) * B * H;
        const T *dyt = A.dy ? A.dy + (t * B + r0) * P : nullptr;
        const T *g = dhr, *gy = dyt;
        int64_t ldg = P;
        if (zg) {  // H_t = H~ + k (H_{t-1} - H~)
            const T *kb = V->zh + (t * B + r0) * P;
            for (int64_t j = 0; j < n * P; j++) {
                T tot = dyt ? dhr[j] + dyt[j] : dhr[j];
                zg[j] = (1 - kb[j]) * tot;
                zcarry[j] = kb[j] * tot;
            }
            g = zg;
            gy = nullptr;
        }
        if (A.whr) {  // through the projection: dL/dr = dL/dH~ W_hr
            T *gh = zg ? zg : dhr;
            if (gy)
                for (int64_t j = 0; j < n * P; j++) gh[j] += gy[j];
            __builtin_memcpy(A.dhs + (t * B + r0) * P, gh, (size_t)(n * P) * sizeof(T));
            product(G, PK.whr, PK.hwhr, n, H, P, gh, P, A.whr, H, T(0), dr, H, threads);
            g = dr;
            gy = nullptr;
            ldg = H;
        }
        T *d = A.da + (t * B + r0) * H4;
        const T *gt = A.gates + (t * B + r0) * H4;
        const T *tct = A.tanh_c + (t * B + r0) * H;
        const T *auxt = V && V->aux ? V->aux + t * B * K : nullptr;
        T *dhwt = A.dhw ? A.dhw + (t * B + r0) * H4 : nullptr;
        for (int blk = 0; blk < 2; blk++) {
            const int64_t b0 = blk == 0 ? r0 : split, b1 = blk == 0 ? split : e;
            if (b1 <= b0) continue;
            const int64_t o = b0 - r0;
            const T *cpb = blk == 0 ? cprev + b0 * H : A.c0 + b0 * H;
            if (V) {
                auto cell = threads == 1 ? cell_backward_v<T> : cell_backward_v_par<T>;
                cell(b1 - b0, H, gt + o * H4, H4, cpb, H, tct + o * H, H, g + o * ldg,
                     gy ? gy + o * P : nullptr, ldg, dcr + o * H, H, d + o * H4, *V,
                     auxt ? auxt + b0 * K : nullptr, V->zc ? V->zc + (t * B + b0) * H : nullptr,
                     dhwt ? dhwt + o * H4 : nullptr);
                if (dv)
                    variant_sums(b1 - b0, H, (const T *)(d + o * H4), gt + o * H4, tct + o * H,
                                 g + o * ldg, gy ? gy + o * P : nullptr, ldg, cpb, H,
                                 A.cs + (t * B + b0) * H, *V, auxt ? auxt + b0 * K : nullptr, dv);
            } else {
                auto cell = threads == 1 ? cell_backward<T> : cell_backward_par<T>;
                cell(b1 - b0, H, gt + o * H4, H4, cpb, H, tct + o * H, H, g + o * ldg,
                     gy ? gy + o * P : nullptr, ldg, dcr + o * H, H, d + o * H4);
            }
        }
        if (db) col_sums(n, H4, d, db);  // while d is in cache
        if (dhwt && !V->ln_hh)  // d itself multiplies W (and is turned into dL/d(x U^T) below)
            __builtin_memcpy(dhwt, d, (size_t)(n * H4) * sizeof(T));
        const T *dw_src = dhwt ? dhwt : d;  // what multiplies W
        if (bf16) {  // dL/dH_{t-1} = d W
            to_bf16(n * H4, (const float *)dw_src, d16);
            product_bf16(G, PK.w16, n, P, H4, d16, H4, A.w16, 0.0f, (float *)dhr, P, threads);
        } else {
            product(G, PK.w, PK.hw, n, P, H4, dw_src, H4, A.w, P, T(0), dhr, P, threads);
        }
        if (V && V->hmask)  // the product read H_{t-1} m_h
            for (int64_t j = 0; j < n * P; j++) dhr[j] *= V->hmask[r0 * P + j];
        if (zcarry)
            for (int64_t j = 0; j < n * P; j++) dhr[j] += zcarry[j];
        if (V && V->ln_ih)  // da -> dL/d(x U^T) through the input product's normalisation
            each_row(r0, e, H4, threads, [&](int64_t b) {
                T *db_ = A.da + (t * B + b) * H4;
                const T *xb = auxt + b * K;
                ln_row_backward(H4, (const T *)db_, V->ln_ih, xb + V->o_xn, xb[V->o_rstd], db_);
            });
    }
    delete[] d16;
    delete[] dr;
    delete[] zg;
    delete[] zcarry;
}

// db: the bias gradient, summed as each step's rows are made (a share's partial sums, then the
// shares in order: the same bits on every run with the same threads)
template <typename T>
static void layer_backward(const BackwardArgs<T> &A, const Gemms &G) {
    const int64_t B = A.B, H4 = 4 * A.H, NV = 13 * A.H;
    int nt = row_threads(B, (size_t)(H4 * A.P + (A.whr ? A.H * A.P : 0)) * sizeof(T));
    if (A.db) __builtin_memset(A.db, 0, (size_t)H4 * sizeof(T));
    if (A.dv) __builtin_memset(A.dv, 0, (size_t)NV * sizeof(T));
    Packed PK;  // W (4H x P) and W_hr (P x H), packed once for all steps
    if (!A.w16 && A.T_ > 1) pack_weights(G, PK, H4, A.P, A.w, A.P, A.H, A.whr);
    if (A.T_ > 1) pack_weight_bf16(G, PK, H4, A.P, A.w16);
    if (nt > 1) {
        T *parts = A.db ? new T[(size_t)(nt * H4)]() : nullptr;
        T *vparts = A.dv ? new T[(size_t)(nt * NV)]() : nullptr;
#pragma omp parallel num_threads(nt)
        {
            int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
            int64_t r0 = B * id / k, r1 = B * (id + 1) / k;
            unsigned int fp;
            fp_begin(&fp);
            if (r0 < r1)
                backward_rows(A, G, PK, r0, r1, parts ? parts + id * H4 : nullptr,
                              vparts ? vparts + id * NV : nullptr, 1);
            fp_end(fp);
        }
        if (parts) {
            for (int k = 0; k < nt; k++)
                for (int64_t j = 0; j < H4; j++) A.db[j] += parts[k * H4 + j];
            delete[] parts;
        }
        if (vparts) {
            for (int k = 0; k < nt; k++)
                for (int64_t j = 0; j < NV; j++) A.dv[j] += vparts[k * NV + j];
            delete[] vparts;
        }
        return;
    }
    FtzScope ftz(A.T_);
    backward_rows(A, G, PK, 0, B, A.db, A.dv, 0);
}

// ---- the one-token step ------------------------------------------------------------------------
// acc (rows) += Wt^T v, Wt (k x rows, row-major: the TRANSPOSED weight): each of the k columns
// a contiguous axpy over all rows, acc in L1; eight columns per pass.
template <typename T>
static void gemv_t_block(int64_t rows, int64_t r0, int64_t r1, int64_t k, const T *GL_RESTRICT Wt,
                         const T *GL_RESTRICT v, T *GL_RESTRICT acc) {
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const T *GL_RESTRICT w0 = Wt + j * rows;
        const T *GL_RESTRICT w1 = w0 + rows;
        const T *GL_RESTRICT w2 = w1 + rows;
        const T *GL_RESTRICT w3 = w2 + rows;
        const T *GL_RESTRICT w4 = w3 + rows;
        const T *GL_RESTRICT w5 = w4 + rows;
        const T *GL_RESTRICT w6 = w5 + rows;
        const T *GL_RESTRICT w7 = w6 + rows;
        T x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];
        T x4 = v[j + 4], x5 = v[j + 5], x6 = v[j + 6], x7 = v[j + 7];
        for (int64_t r = r0; r < r1; r++)
            acc[r] += (w0[r] * x0 + w1[r] * x1 + w2[r] * x2 + w3[r] * x3) +
                      (w4[r] * x4 + w5[r] * x5 + w6[r] * x6 + w7[r] * x7);
    }
    for (; j < k; j++) {
        const T *GL_RESTRICT w0 = Wt + j * rows;
        T x0 = v[j];
        for (int64_t r = r0; r < r1; r++) acc[r] += w0[r] * x0;
    }
}

// rows split in 64-row blocks over the threads when rows * k >= min_work
template <typename F>
static void parallel_rows(int64_t rows, int64_t k, int64_t min_work, F &&body) {
    if (rows * k >= min_work && omp_get_max_threads() > 1 && !omp_in_parallel()) {
#pragma omp parallel
        {
            int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
            int64_t blocks = (rows + 63) / 64;
            int64_t r0 = blocks * id / nt * 64, r1 = blocks * (id + 1) / nt * 64;
            if (r1 > rows) r1 = rows;
            if (r0 < r1) body(r0, r1);
        }
    } else {
        body(int64_t(0), rows);
    }
}

// Large products (weights beyond L2) are memory-bound on one core: rows split over the threads.
template <typename T>
static void gemv_t(int64_t rows, int64_t k, const T *Wt, const T *v, T *acc) {
    parallel_rows(rows, k, int64_t(1) << 18,
                  [&](int64_t r0, int64_t r1) { gemv_t_block(rows, r0, r1, k, Wt, v, acc); });
}

// Weight-only int8: Wt8 (k x rows) int8, out[r] = scale[r] * sum_j Wt8[j][r] v[j] (+ bias[r]).
// The int8 values are widened to float in registers: a quarter of the bytes to stream, which
// is what a batch-1 product is bound by.
static void gemv_t_i8_block(int64_t rows, int64_t r0, int64_t r1, int64_t k,
                            const int8_t *GL_RESTRICT Wt, const float *GL_RESTRICT v,
                            float *GL_RESTRICT acc) {
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const int8_t *GL_RESTRICT w0 = Wt + j * rows;
        const int8_t *GL_RESTRICT w1 = w0 + rows;
        const int8_t *GL_RESTRICT w2 = w1 + rows;
        const int8_t *GL_RESTRICT w3 = w2 + rows;
        float x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];
        for (int64_t r = r0; r < r1; r++)
            acc[r] += ((float)w0[r] * x0 + (float)w1[r] * x1) + ((float)w2[r] * x2 + (float)w3[r] * x3);
    }
    for (; j < k; j++) {
        const int8_t *GL_RESTRICT w0 = Wt + j * rows;
        float x0 = v[j];
        for (int64_t r = r0; r < r1; r++) acc[r] += (float)w0[r] * x0;
    }
}

static void linear_i8(int64_t rows, int64_t k, const int8_t *Wt, const float *scale,
                      const float *bias, const float *v, float *out) {
    __builtin_memset(out, 0, (size_t)rows * sizeof(float));
    parallel_rows(rows, k, int64_t(1) << 20, [&](int64_t r0, int64_t r1) {
        gemv_t_i8_block(rows, r0, r1, k, Wt, v, out);
        for (int64_t r = r0; r < r1; r++) out[r] = out[r] * scale[r] + (bias ? bias[r] : 0.0f);
    });
}

template <typename T>
static void linear(int64_t rows, int64_t k, const T *Wt, const T *bias, const T *v, T *out) {
    if (bias)
        __builtin_memcpy(out, bias, (size_t)rows * sizeof(T));
    else
        __builtin_memset(out, 0, (size_t)rows * sizeof(T));
    gemv_t(rows, k, Wt, v, out);
}

// A step's two products, a += [U W] [x; h], read from PANELS: the weight's 4H rows in blocks of
// kPanel, each block stored as its own contiguous (k x kPanel) matrix (k = in + P columns: the
// input weight's, then the recurrent weight's; rows past 4H zero). A thread's panels are one
// sequential stream of memory, and a panel's kPanel sums stay in vector registers over all k
// columns. From 2^16 multiply-adds the panels are shared out over the threads, and each thread
// visits its panels front to back on one step and back to front on the next ("zig-zag"): read
// in the same order every step, a working set a little larger than the caches evicts itself
// completely (LRU meets a cyclic scan); reversed, the panels read last are still cached and are
// read first. Each panel's sum runs over its columns in one fixed order, so every step gives
// the same bits whatever the visiting order.
template <typename T>
static inline void panel_axpy(int64_t n, const T *GL_RESTRICT w, const T *GL_RESTRICT v,
                              T *GL_RESTRICT s) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const T *GL_RESTRICT w0 = w + j * kPanel;
        T x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];
        for (int r = 0; r < kPanel; r++)
            s[r] += (w0[r] * x0 + w0[r + kPanel] * x1) +
                    (w0[r + 2 * kPanel] * x2 + w0[r + 3 * kPanel] * x3);
    }
    for (; j < n; j++) {
        const T *GL_RESTRICT w0 = w + j * kPanel;
        T x0 = v[j];
        for (int r = 0; r < kPanel; r++) s[r] += w0[r] * x0;
    }
}

template <typename T>
static void panels_block(int64_t q0, int64_t q1, int64_t k_in, const T *x, int64_t P,
                         const T *h, const T *W, T *a, bool back) {
    for (int64_t n = q0; n < q1; n++) {
        int64_t q = back ? q0 + q1 - 1 - n : n;
        const T *pw = W + q * (k_in + P) * kPanel;
        T s[kPanel];
        __builtin_memcpy(s, a + q * kPanel, sizeof s);
        if (x) panel_axpy(k_in, pw, x, s);
        panel_axpy(P, pw + k_in * kPanel, h, s);
        __builtin_memcpy(a + q * kPanel, s, sizeof s);
    }
}

// the same from int8 panels: each panel's sums start at zero, and are scaled per row and added
// to a at the end
static inline void panel_axpy_i8(int64_t n, const int8_t *GL_RESTRICT w, const float *GL_RESTRICT v,
                                 float *GL_RESTRICT s) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int8_t *GL_RESTRICT w0 = w + j * kPanel;
        float x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];
        for (int r = 0; r < kPanel; r++)
            s[r] += ((float)w0[r] * x0 + (float)w0[r + kPanel] * x1) +
                    ((float)w0[r + 2 * kPanel] * x2 + (float)w0[r + 3 * kPanel] * x3);
    }
    for (; j < n; j++) {
        const int8_t *GL_RESTRICT w0 = w + j * kPanel;
        float x0 = v[j];
        for (int r = 0; r < kPanel; r++) s[r] += (float)w0[r] * x0;
    }
}

static void panels_i8(int64_t H, int64_t k_in, const float *x, int64_t P, const float *h,
                      const int8_t *W, const float *scale, float *a, bool back) {
    int64_t rows = (4 * H + kPanel - 1) / kPanel * kPanel;
    // a quarter of float32's bytes a panel: the threads take a share from 4x the work
    parallel_rows(rows, (x ? k_in : 0) + P, int64_t(1) << 18, [&](int64_t r0, int64_t r1) {
        const int64_t q0 = r0 / kPanel, q1 = (r1 + kPanel - 1) / kPanel;
        for (int64_t n = q0; n < q1; n++) {
            int64_t q = back ? q0 + q1 - 1 - n : n;
            const int8_t *pw = W + q * (k_in + P) * kPanel;
            float s[kPanel] = {};
            if (x) panel_axpy_i8(k_in, pw, x, s);
            panel_axpy_i8(P, pw + k_in * kPanel, h, s);
            float *aq = a + q * kPanel;
            const float *sc = scale + q * kPanel;
            for (int r = 0; r < kPanel; r++) aq[r] += s[r] * sc[r];
        }
    });
}

template <typename T>
static void panels(int64_t H, int64_t k_in, const T *x, int64_t P, const T *h, const T *W, T *a,
                   bool back) {
    int64_t rows = (4 * H + kPanel - 1) / kPanel * kPanel;
    parallel_rows(rows, (x ? k_in : 0) + P, int64_t(1) << 16, [&](int64_t r0, int64_t r1) {
        panels_block(r0 / kPanel, (r1 + kPanel - 1) / kPanel, k_in, x, P, h, W, a, back);
    });
}

template <typename T>
static void step(const StepArgs<T> &S) {
    const int64_t L = S.L, H = S.H, P = S.P;
    T *a = S.work;
    T *r = a + (4 * H + kPanel - 1) / kPanel * kPanel, *tcw = r + H;
    for (int64_t l = 0; l < L; l++) {
        const T *W = S.panels ? S.panels[l] : nullptr, *bias = S.bias[l], *whr_t = S.whr_t[l];
        T *hl = S.h + l * P, *cl = S.c + l * H;
        const T *v = l == 0 ? S.x : S.h + (l - 1) * P;
        const bool proj_in = l == 0 && S.xproj;
        if (proj_in)
            __builtin_memcpy(a, S.xproj, (size_t)(4 * H) * sizeof(T));
        else if (bias)
            __builtin_memcpy(a, bias, (size_t)(4 * H) * sizeof(T));
        else
            __builtin_memset(a, 0, (size_t)(4 * H) * sizeof(T));
        if constexpr (std::is_same<T, float>::value) {
            if (S.panels8) {
                panels_i8(H, S.in_sizes[l], proj_in ? nullptr : v, P, hl, S.panels8[l],
                          S.scales[l], a, S.zigzag_back);
            } else {
                panels(H, S.in_sizes[l], proj_in ? (const T *)nullptr : v, P, hl, W, a,
                       S.zigzag_back);
            }
        } else {
            panels(H, S.in_sizes[l], proj_in ? (const T *)nullptr : v, P, hl, W, a,
                   S.zigzag_back);
        }
        T *dst = whr_t ? r : hl;
        cell_forward(int64_t(1), H, a, 4 * H, (const T *)nullptr, cl, H, cl, H, tcw, H, dst, H);
        if (whr_t) {
            __builtin_memset(hl, 0, (size_t)P * sizeof(T));
            gemv_t(P, H, whr_t, r, hl);
        }
    }
    if (S.out != S.h + (L - 1) * P)
        __builtin_memcpy(S.out, S.h + (L - 1) * P, (size_t)P * sizeof(T));
}

static const Kernels table = {
    GL_ISA_NAME,
    [](const ForwardArgs<float> &a, const Gemms &g) { layer_forward(a, g); },
    [](const ForwardArgs<double> &a, const Gemms &g) { layer_forward(a, g); },
    [](const BackwardArgs<float> &a, const Gemms &g) { layer_backward(a, g); },
    [](const BackwardArgs<double> &a, const Gemms &g) { layer_backward(a, g); },
    [](const StepArgs<float> &s) { step(s); },
    [](const StepArgs<double> &s) { step(s); },
    [](int64_t rows, int64_t k, const float *Wt, const float *b, const float *v, float *out) {
        linear(rows, k, Wt, b, v, out);
    },
    [](int64_t rows, int64_t k, const double *Wt, const double *b, const double *v, double *out) {
        linear(rows, k, Wt, b, v, out);
    },
    [](int64_t rows, int64_t k, const int8_t *Wt, const float *scale, const float *b,
       const float *v, float *out) { linear_i8(rows, k, Wt, scale, b, v, out); },
    [](int64_t n, int64_t H, float *a, int64_t lda, const float *cp, int64_t ldp, float *c,
       float *tc, int64_t ldc, float *out, int64_t ldo) {
        cell_forward(n, H, a, lda, (const float *)nullptr, cp, ldp, c, ldc, tc, ldc, out, ldo);
    },
    [](int64_t n, int64_t H, double *a, int64_t lda, const double *cp, int64_t ldp, double *c,
       double *tc, int64_t ldc, double *out, int64_t ldo) {
        cell_forward(n, H, a, lda, (const double *)nullptr, cp, ldp, c, ldc, tc, ldc, out, ldo);
    },
    [](int64_t n, int64_t H, const float *a, int64_t lda, const float *cp, int64_t ldp,
       const float *tc, int64_t ldt, const float *dh, const float *dy, int64_t ldh, float *dc,
       int64_t ldc, float *d) { cell_backward(n, H, a, lda, cp, ldp, tc, ldt, dh, dy, ldh, dc, ldc, d); },
    [](int64_t n, int64_t H, const double *a, int64_t lda, const double *cp, int64_t ldp,
       const double *tc, int64_t ldt, const double *dh, const double *dy, int64_t ldh,
       double *dc, int64_t ldc, double *d) {
        cell_backward(n, H, a, lda, cp, ldp, tc, ldt, dh, dy, ldh, dc, ldc, d);
    },
    [](int64_t n, const float *src, uint16_t *dst) { to_bf16(n, src, dst); },
};

#undef GL_RESTRICT
#undef GL_INLINE
