/* glasslstm's fused CPU kernels: the LSTM cell's pointwise math, forward and backward; whole
 * time loops (forward and backward, float32 or with bf16 GEMMs under autocast) on torch's own
 * BLAS; and a whole one-token step (all layers) for streaming inference.
 *
 * Plain C99 with no torch or Python headers: glasslstm.ops.cpu compiles this file once per
 * machine (gcc/cc -O3 -march=native) and calls it through ctypes, so it builds in about a
 * second, never depends on torch's C++ ABI, and uses the vector units of the CPU it runs on.
 *
 * Every kernel exists for float (suffix _f32) and double (_f64); bf16 products are float's
 * only. Gate order is torch's:
 * i, f, g, o (the article's i, f, N, o); a gate row is 4H wide.
 *
 * exp is our own (Cephes-style range reduction + polynomial, ~2 ulp in float) so that loops
 * vectorise without -ffast-math (-ffp-contract=fast lets them use FMA); NaN and Inf propagate (a diverging run must see
 * its NaN loss).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RESTRICT __restrict__

#ifdef _OPENMP
#include <omp.h>
/* rows split in 64-row blocks (whole cache lines) over the threads when the work (rows x k
 * multiply-adds) is at least min_work */
#define PARALLEL_ROWS(rows, k, min_work, CALL)                                                \
    if ((rows) * (k) >= (min_work) && omp_get_max_threads() > 1) {                            \
        _Pragma("omp parallel")                                                               \
        {                                                                                     \
            int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();                    \
            int64_t blocks = ((rows) + 63) / 64;                                              \
            int64_t r0 = blocks * id / nt * 64, r1 = blocks * (id + 1) / nt * 64;             \
            if (r1 > (rows)) r1 = (rows);                                                     \
            if (r0 < r1) CALL;                                                                \
        }                                                                                     \
    } else {                                                                                  \
        int64_t r0 = 0, r1 = (rows);                                                          \
        CALL;                                                                                 \
    }
#else
#define PARALLEL_ROWS(rows, k, min_work, CALL) { int64_t r0 = 0, r1 = (rows); CALL; }
#endif

/* ---- exp, sigmoid, tanh that gcc vectorises ---------------------------------------- */

static inline float exp_f32(float x) {
    /* exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2] */
    float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
    xc = xc < -87.3365447504f ? -87.3365447504f : xc;  /* NaN fails both tests: kept */
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
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
    memcpy(&scale, &e, sizeof scale);
    float y = p * scale;
    /* past the clamps the true result is 0 or inf; NaN stays NaN */
    y = x < -87.3365447504f ? 0.0f : y;
    y = x > 88.3762626647949f ? INFINITY : y;
    return y;
}

static inline double exp_f64(double x) {
    double xc = x > 709.0 ? 709.0 : x;
    xc = xc < -708.0 ? -708.0 : xc;
    double n = floor(xc * 1.4426950408889634 + 0.5);
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    /* Padé-free Taylor to degree 13: |r| <= 0.347, error < 1e-17 relative */
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
    memcpy(&scale, &e, sizeof scale);
    double y = p * scale;
    y = x < -708.0 ? 0.0 : y;
    y = x > 709.0 ? (double)INFINITY : y;
    return y;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp_f64(-x)); }

/* tanh(x) = 2 sigmoid(2x) - 1: one exp and one division, exact at +-inf, NaN in NaN out; near 0
 * the absolute error is one rounding of a value of size 1 (what the tests bound). */
static inline float tanh_f32(float x) { return 2.0f / (1.0f + exp_f32(-2.0f * x)) - 1.0f; }
static inline double tanh_f64(double x) { return 2.0 / (1.0 + exp_f64(-2.0 * x)) - 1.0; }

/* ---- the cell, pointwise ---------------------------------------------------------------
 * forward: a (n rows, stride lda >= 4H) holds the pre-activations x U + H W + b on entry and
 * the activated gates i, f, g, o on exit; c = f c_prev + i g; tc = tanh(c); out = o tc.
 * bias (4H, nullable): added to every row of a first (a time loop's x U then comes from a
 * plain GEMM: torch's addmm would write the broadcast bias over the whole (T B, 4H) first).
 * c_prev, c, tc, out: n rows of H, row strides ldc (c_prev, c, tc) and ldo (out).
 */
#define CELL_FORWARD(T, SUF)                                                                  \
void glasslstm_cell_forward_##SUF(int64_t n, int64_t H, T *RESTRICT a, int64_t lda,          \
                                  const T *RESTRICT bias, const T *c_prev, int64_t ldp, T *c, \
                                  T *RESTRICT tc,                                             \
                                  int64_t ldc, T *RESTRICT out, int64_t ldo) {               \
    for (int64_t b = 0; b < n; b++) {                                                         \
        T *RESTRICT ai = a + b * lda, *RESTRICT af = ai + H, *RESTRICT ag = ai + 2 * H,       \
          *RESTRICT ao = ai + 3 * H;                                                          \
        const T *cp = c_prev + b * ldp;                                                       \
        T *cb = c + b * ldc, *RESTRICT tb = tc + b * ldc, *RESTRICT ob = out + b * ldo;       \
        if (bias) {                                                                           \
            _Pragma("GCC ivdep")                                                              \
            for (int64_t j = 0; j < 4 * H; j++) ai[j] += bias[j];                             \
        }                                                                                     \
        _Pragma("GCC ivdep")                                                                  \
        for (int64_t j = 0; j < H; j++) {                                                     \
            T i = sigmoid_##SUF(ai[j]), f = sigmoid_##SUF(af[j]);                             \
            T g = tanh_##SUF(ag[j]), o = sigmoid_##SUF(ao[j]);                                \
            T cn = f * cp[j] + i * g;                                                         \
            T t = tanh_##SUF(cn);                                                             \
            ai[j] = i; af[j] = f; ag[j] = g; ao[j] = o;                                       \
            cb[j] = cn; tb[j] = t; ob[j] = o * t;                                             \
        }                                                                                     \
    }                                                                                         \
}
CELL_FORWARD(float, f32)
CELL_FORWARD(double, f64)

/* backward of one step: a holds the activated gates (stride lda); dh the gradient reaching
 * o * tanh(c) (stride ldh), dy (nullable, stride ldh) added to it; dc (stride ldc) the
 * gradient reaching c from later steps on entry and dL/dc_prev on exit; d (stride lda) gets
 * the pre-activation gradients di, df, dg, do.
 */
#define CELL_BACKWARD(T, SUF)                                                                 \
void glasslstm_cell_backward_##SUF(int64_t n, int64_t H, const T *RESTRICT a, int64_t lda,   \
                                   const T *RESTRICT c_prev, int64_t ldp,                     \
                                   const T *RESTRICT tc, int64_t ldt,                         \
                                   const T *RESTRICT dh, const T *RESTRICT dy, int64_t ldh,   \
                                   T *RESTRICT dc, int64_t ldc, T *RESTRICT d) {             \
    for (int64_t b = 0; b < n; b++) {                                                         \
        const T *ai = a + b * lda, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;          \
        const T *cp = c_prev + b * ldp, *tb = tc + b * ldt, *hb = dh + b * ldh;               \
        const T *yb = dy ? dy + b * ldh : NULL;                                               \
        T *cb = dc + b * ldc;                                                                 \
        T *di = d + b * lda, *df = di + H, *dg = di + 2 * H, *dO = di + 3 * H;                \
        _Pragma("GCC ivdep")                                                                  \
        for (int64_t j = 0; j < H; j++) {                                                     \
            T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tb[j];                          \
            T dr = yb ? hb[j] + yb[j] : hb[j];                                                \
            T dcn = cb[j] + dr * o * (1 - t * t);                                             \
            di[j] = dcn * g * i * (1 - i);                                                    \
            df[j] = dcn * cp[j] * f * (1 - f);                                                \
            dg[j] = dcn * i * (1 - g * g);                                                    \
            dO[j] = dr * t * o * (1 - o);                                                     \
            cb[j] = dcn * f;                                                                  \
        }                                                                                     \
    }                                                                                         \
}
CELL_BACKWARD(float, f32)
CELL_BACKWARD(double, f64)

/* ---- a whole one-token step for streaming inference -------------------------------------
 * acc (rows) += Wt^T v, with Wt (k x rows, row-major): the TRANSPOSED weight, so that each of
 * the k columns is a contiguous axpy over all rows — loops gcc vectorises fully, with acc in
 * L1. Four columns per pass quarter the loads and stores of acc.
 */
#define GEMV_BLOCK(T, SUF)                                                                    \
static void gemv_t_block_##SUF(int64_t rows, int64_t r0, int64_t r1, int64_t k,               \
                               const T *RESTRICT Wt, const T *RESTRICT v, T *RESTRICT acc) {  \
    int64_t j = 0;                                                                            \
    for (; j + 8 <= k; j += 8) {                                                              \
        const T *RESTRICT w0 = Wt + j * rows;                                                 \
        const T *RESTRICT w1 = w0 + rows, *RESTRICT w2 = w1 + rows, *RESTRICT w3 = w2 + rows; \
        const T *RESTRICT w4 = w3 + rows, *RESTRICT w5 = w4 + rows, *RESTRICT w6 = w5 + rows; \
        const T *RESTRICT w7 = w6 + rows;                                                     \
        T x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];                             \
        T x4 = v[j + 4], x5 = v[j + 5], x6 = v[j + 6], x7 = v[j + 7];                         \
        for (int64_t r = r0; r < r1; r++)                                                     \
            acc[r] += (w0[r] * x0 + w1[r] * x1 + w2[r] * x2 + w3[r] * x3)                     \
                    + (w4[r] * x4 + w5[r] * x5 + w6[r] * x6 + w7[r] * x7);                    \
    }                                                                                         \
    for (; j < k; j++) {                                                                      \
        const T *RESTRICT w0 = Wt + j * rows;                                                 \
        T x0 = v[j];                                                                          \
        for (int64_t r = r0; r < r1; r++) acc[r] += w0[r] * x0;                               \
    }                                                                                         \
}                                                                                             \
/* Large products (weights beyond L2) are memory-bound on one core: split the rows over the   \
 * OpenMP threads (torch's own pool: libgomp is shared, torch.set_num_threads applies). */    \
static void gemv_t_##SUF(int64_t rows, int64_t k, const T *RESTRICT Wt,                      \
                         const T *RESTRICT v, T *RESTRICT acc) {                              \
    PARALLEL_ROWS(rows, k, 1 << 18, gemv_t_block_##SUF(rows, r0, r1, k, Wt, v, acc))          \
}
GEMV_BLOCK(float, f32)
GEMV_BLOCK(double, f64)

/* A step's two products (input and recurrent weight), a += [U W] [x; h], read from PANELS:
 * the weight's 4H rows in blocks of PANEL, each block stored as its own contiguous (k x PANEL)
 * matrix (k = in + P columns: the input weight's, then the recurrent weight's; rows past 4H
 * zero). A thread's panels are then one sequential stream of memory (the transposed layout
 * had it jump every 4 KB: a new prefetch ramp on every page), and a panel's PANEL sums stay in
 * vector registers over all k columns. From 2^16 multiply-adds the panels are shared out over
 * the threads (each reads its part of the weights into its own L2), and each thread visits its
 * panels front to back on one step and back to front on the next ("zig-zag"): read in the
 * same order every step, a working set a little larger than L2 evicts itself completely (LRU
 * meets a cyclic scan); reversed, the panels read last are still cached and are read first.
 * Each panel's sum runs over its columns in one fixed order, so every step gives the same bits
 * whatever the visiting order. Measured at H = 512 (8 MB of weights, 2 threads): 117 us
 * against 170 us for the transposed layout; at H = 128: 2.8 us on 2 threads, 4.0 us on one. */
#define PANEL 64
#define PANELS(T, SUF)                                                                        \
static inline void panel_axpy_##SUF(int64_t n, const T *RESTRICT w, const T *RESTRICT v,     \
                                    T *RESTRICT s) {                                          \
    int64_t j = 0;                                                                            \
    for (; j + 4 <= n; j += 4) {                                                              \
        const T *RESTRICT w0 = w + j * PANEL;                                                 \
        T x0 = v[j], x1 = v[j + 1], x2 = v[j + 2], x3 = v[j + 3];                             \
        for (int r = 0; r < PANEL; r++)                                                       \
            s[r] += (w0[r] * x0 + w0[r + PANEL] * x1)                                         \
                  + (w0[r + 2 * PANEL] * x2 + w0[r + 3 * PANEL] * x3);                        \
    }                                                                                         \
    for (; j < n; j++) {                                                                      \
        const T *RESTRICT w0 = w + j * PANEL;                                                 \
        T x0 = v[j];                                                                          \
        for (int r = 0; r < PANEL; r++) s[r] += w0[r] * x0;                                   \
    }                                                                                         \
}                                                                                             \
/* panels [q0, q1) of a (k_in + P columns each); the input part only when x is given */        \
static void panels_block_##SUF(int64_t q0, int64_t q1, int64_t k_in, const T *x, int64_t P,  \
                               const T *h, const T *W, T *a, int reverse) {                   \
    for (int64_t n = q0; n < q1; n++) {                                                       \
        int64_t q = reverse ? q0 + q1 - 1 - n : n;                                            \
        const T *pw = W + q * (k_in + P) * PANEL;                                             \
        T s[PANEL];                                                                           \
        memcpy(s, a + q * PANEL, sizeof s);                                                   \
        if (x) panel_axpy_##SUF(k_in, pw, x, s);                                              \
        panel_axpy_##SUF(P, pw + k_in * PANEL, h, s);                                         \
        memcpy(a + q * PANEL, s, sizeof s);                                                   \
    }                                                                                         \
}                                                                                             \
static void panels_##SUF(int64_t H, int64_t k_in, const T *x, int64_t P, const T *h,         \
                         const T *W, T *a, int reverse) {                                     \
    int64_t rows = (4 * H + PANEL - 1) / PANEL * PANEL;                                       \
    PARALLEL_ROWS(rows, (x ? k_in : 0) + P, 1 << 16,                                          \
                  panels_block_##SUF(r0 / PANEL, (r1 + PANEL - 1) / PANEL, k_in, x, P, h, W, \
                                     a, reverse))                                             \
}
PANELS(float, f32)
PANELS(double, f64)

/* What a one-token step keeps from call to call: built once per set of weights by
 * glasslstm.stream.StepKernel, so a step passes 7 pointers instead of 13 arguments.
 * layers[3 l .. 3 l + 2] = {[w_ih w_hh] as panels (see PANELS; in_sizes[l] + P columns),
 * bias (b_ih + b_hh, or NULL), w_hr^T (H x P, or NULL: a contiguous TRANSPOSED copy, see
 * gemv_t)}, l = 0..L-1; in_sizes[l]: the input size of layer l; work: glasslstm_step_work(H)
 * values of scratch; phase: flipped by every step (the zig-zag order of the panels). */
typedef struct {
    int64_t L, H, P;
    const int64_t *in_sizes;
    const void *const *layers;
    void *work;
    int64_t phase;
} glasslstm_step_plan;

int64_t glasslstm_step_panel(void) { return PANEL; }
int64_t glasslstm_step_work(int64_t H) { return (4 * H + PANEL - 1) / PANEL * PANEL + 2 * H; }

/* One token through L stacked layers, in place.
 * x: the layer-0 input (I values), or NULL when xproj is given: xproj (4H values) is the
 * layer-0 input projection x U_0 already computed (a language model's embedding row pushed
 * through U_0 ahead of time), bias included.
 * h (L x P) and c (L x H): the state, updated in place; h_in/c_in (nullable): copied into h/c
 * first (a drop-in call's hx, left untouched). out (P values): the last layer's new h (may
 * alias h).
 */
#define STEP(T, SUF)                                                                          \
void glasslstm_step_##SUF(glasslstm_step_plan *plan, const T *x, const T *xproj,             \
                          const T *h_in, const T *c_in, T *h, T *c, T *out) {                \
    int64_t L = plan->L, H = plan->H, P = plan->P;                                            \
    const T *const *layers = (const T *const *)plan->layers;                                  \
    T *a = (T *)plan->work;                                                                   \
    T *r = a + (4 * H + PANEL - 1) / PANEL * PANEL, *tcw = r + H;                             \
    int reverse = (int)(plan->phase & 1);                                                     \
    plan->phase ^= 1;                                                                         \
    if (h_in && h_in != h) memcpy(h, h_in, (size_t)(L * P) * sizeof(T));                      \
    if (c_in && c_in != c) memcpy(c, c_in, (size_t)(L * H) * sizeof(T));                      \
    for (int64_t l = 0; l < L; l++) {                                                         \
        const T *W = layers[3 * l], *bias = layers[3 * l + 1], *w_hr = layers[3 * l + 2];     \
        T *hl = h + l * P, *cl = c + l * H;                                                   \
        const T *v = l == 0 ? x : h + (l - 1) * P;                                            \
        if (l == 0 && xproj) memcpy(a, xproj, 4 * H * sizeof(T));                             \
        else if (bias) memcpy(a, bias, 4 * H * sizeof(T));                                    \
        else memset(a, 0, 4 * H * sizeof(T));                                                 \
        panels_##SUF(H, plan->in_sizes[l], (l == 0 && xproj) ? NULL : v, P, hl, W, a,         \
                     reverse);                                                                \
        T *dst = w_hr ? r : hl;                                                               \
        glasslstm_cell_forward_##SUF(1, H, a, 4 * H, NULL, cl, H, cl, tcw, H, dst, H);        \
        if (w_hr) {                                                                           \
            memset(hl, 0, P * sizeof(T));                                                     \
            gemv_t_##SUF(P, H, w_hr, r, hl);                                                  \
        }                                                                                     \
    }                                                                                         \
    if (out != h + (L - 1) * P) memcpy(out, h + (L - 1) * P, P * sizeof(T));                  \
}
STEP(float, f32)
STEP(double, f64)

/* out (rows) = Wt^T v + bias (NULL: none), Wt (k x rows) the transposed weight: a language
 * model's output layer for one token. */
#define LINEAR(T, SUF)                                                                        \
void glasslstm_linear_##SUF(int64_t rows, int64_t k, const T *Wt, const T *bias, const T *v, \
                            T *out) {                                                         \
    if (bias) memcpy(out, bias, (size_t)rows * sizeof(T));                                    \
    else memset(out, 0, (size_t)rows * sizeof(T));                                            \
    gemv_t_##SUF(rows, k, Wt, v, out);                                                        \
}
LINEAR(float, f32)
LINEAR(double, f64)

/* ---- whole time loops, calling the BLAS gemm that torch itself uses -------------------
 * gemm: a Fortran-interface ?gemm (column-major; torch's MKL exports sgemm_/dgemm_), so the
 * per-step matrix products run on the same kernels and threads as torch.addmm, and the time
 * loop costs no Python. Row-major C (n x m) = A (n x k) B^T with B (m x k) is, column-major,
 * C^T = B A^T: gemm("T", "N", m, n, k, B, k, A, k, C, m).
 *
 * forward: gates (T, B, 4H) holds x U on entry (activated gates on exit), b added in the loop
 * when bias (4H) is given (else gates hold x U + b); hs (T+1, B, P)
 * and cs (T+1, B, H) hold the initial state at index 0 (forward) or T (reverse); tanh_c
 * (T, B, H); rs (T, B, H) o * tanh(c) before the projection, or NULL without one; batch_sizes
 * (T rows active per step, sorted longest first) or NULL. transposed: w_hh and w_hr are given
 * as contiguous copies of their transposes (P x 4H, H x P): MKL's "N" GEMM is 20-30% faster
 * at these shapes than its "T" one, which pays for the copy from about 8 steps on.
 */
/* Denormals flushed to zero for the duration of a time loop. Gradients that vanish along a
 * long sequence (the vanishing gradient itself) pass through the denormal range (below
 * 1.2e-38 in float32), where x86 arithmetic is one to two orders of magnitude slower: a
 * T = 1000 LSTM backward ran 13x slower without this. FTZ writes such results as zero, DAZ
 * reads such inputs as zero (an absolute change below 1.2e-38). Set on the calling thread,
 * and for loops of FTZ_POOL_STEPS steps or more also on the OpenMP pool's threads (the
 * BLAS's threads: libgomp's pool is torch's; 20% faster at T = 1000 on 2 threads), restored
 * on each of them on the way out. Short loops skip the pool: its two parallel regions cost
 * ~8% of a one-step forward + backward. */
#define FTZ_POOL_STEPS 32
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FTZ_MAX_THREADS 256
typedef struct { unsigned int saved[FTZ_MAX_THREADS]; int pool; } ftz_state;
static void ftz_set(unsigned int *saved) { *saved = _mm_getcsr(); _mm_setcsr(*saved | 0x8040u); }
#ifdef _OPENMP
#define FTZ_EACH_THREAD(POOL, STMT)                                                           \
    if (POOL) {                                                                               \
        _Pragma("omp parallel")                                                               \
        { int id_ = omp_get_thread_num(); if (id_ < FTZ_MAX_THREADS) { STMT; } }             \
    } else { int id_ = 0; STMT; }
#else
#define FTZ_EACH_THREAD(POOL, STMT) { int id_ = 0; (void)(POOL); STMT; }
#endif
static void ftz_begin(ftz_state *st, int64_t steps) {
    st->pool = steps >= FTZ_POOL_STEPS;
    FTZ_EACH_THREAD(st->pool, ftz_set(&st->saved[id_]))
}
static void ftz_end(ftz_state *st) { FTZ_EACH_THREAD(st->pool, _mm_setcsr(st->saved[id_])) }
static inline void fp_begin(unsigned int *saved) { ftz_set(saved); }
static inline void fp_end(unsigned int saved) { _mm_setcsr(saved); }
#else
static inline void fp_begin(unsigned int *saved) { *saved = 0; }
static inline void fp_end(unsigned int saved) { (void)saved; }
typedef struct { int unused; } ftz_state;
static void ftz_begin(ftz_state *st, int64_t steps) { (void)st; (void)steps; }
static void ftz_end(ftz_state *st) { (void)st; }
#endif

/* Batch-row split of a whole time loop over the OpenMP threads (see forward_rows below):
 * how many threads, at least ROW_SPLIT_MIN rows each (ROW_SPLIT_MIN_SMALL for weights up to
 * 512 KiB: then even 2 rows a thread beat threaded GEMMs, 10-12% at H = 128, B = 4 and 8; at
 * 1 MiB each thread reading all of W for so few rows was 5-10% slower); 1 = one loop on the
 * calling thread, its GEMMs threaded by the BLAS. Inside the region the BLAS runs one thread per call (MKL
 * and OpenBLAS do not nest), and each thread flushes denormals for itself. */
#define ROW_SPLIT_MIN 8
#define ROW_SPLIT_MIN_SMALL 2
#ifndef ROW_SPLIT_MAX_BYTES
#define ROW_SPLIT_MAX_BYTES (1 << 20)
#endif
#ifdef _OPENMP
static int row_threads(int64_t B, size_t weight_bytes) {
    int64_t nt = omp_get_max_threads();
    if (omp_in_parallel() || weight_bytes > ROW_SPLIT_MAX_BYTES) return 1;
    int64_t min_rows = weight_bytes <= ROW_SPLIT_MAX_BYTES / 2 ? ROW_SPLIT_MIN_SMALL : ROW_SPLIT_MIN;
    if (nt > B / min_rows) nt = B / min_rows;
    return nt < 1 ? 1 : (int)nt;
}
#define ROW_SPLIT(B, BODY) /* the threads: the caller's variable nt */                        \
    _Pragma("omp parallel num_threads(nt)")                                                   \
    {                                                                                         \
        int64_t nt_ = omp_get_num_threads(), id_ = omp_get_thread_num();                      \
        int64_t r0 = (B) * id_ / nt_, r1 = (B) * (id_ + 1) / nt_;                              \
        unsigned int fp_;                                                                     \
        fp_begin(&fp_);                                                                       \
        if (r0 < r1) BODY                                                                     \
        fp_end(fp_);                                                                          \
    }
#else
static int row_threads(int64_t B, size_t weight_bytes) { (void)B; (void)weight_bytes; return 1; }
#define ROW_SPLIT(B, BODY) { int64_t r0 = 0, r1 = (B), id_ = 0; (void)id_; BODY }
#endif

/* CELL_ROWS: rows [r0, r1) of a step's gate math on each OpenMP thread (see
 * cell_forward_par), or all rows here (inside a row split, or too little work). */
#define CELL_SPLIT_MIN 8192
static int cell_threads(int64_t n, int64_t H) {
#ifdef _OPENMP
    if (n >= 2 && n * H >= CELL_SPLIT_MIN && !omp_in_parallel()) return omp_get_max_threads();
#else
    (void)n; (void)H;
#endif
    return 1;
}
#define CELL_ROWS(n, H, CALL)                                                                 \
    int nt = cell_threads(n, H);                                                              \
    if (nt > 1) {                                                                             \
        ROW_SPLIT(n, { CALL; })                                                               \
    } else {                                                                                  \
        int64_t r0 = 0, r1 = (n);                                                             \
        CALL;                                                                                 \
    }

/* The BLAS routines a time loop calls (addresses found in torch's own library by
 * glasslstm.ops.cpu): gemm, and MKL's packed-GEMM trio (NULL where absent: float64, other
 * BLAS). With the trio, the recurrent weight is packed into the GEMM kernel's internal layout
 * once per loop and every step multiplies with the packed copy: a step's GEMM (a few rows of
 * h against the whole weight) otherwise repacks the weight on every call. */
typedef struct {
    void *gemm, *pack_get_size, *pack, *compute, *gemm_bf16;
} glasslstm_blas;
typedef size_t (*pack_size_t)(const char *, const int *, const int *, const int *);

/* ---- bfloat16 GEMMs for autocast: bf16 operands, float32 accumulation and result ----------
 * gemm_bf16 is MKL's gemm_bf16bf16f32 (Fortran interface, column-major), found in torch's
 * library like sgemm_; on CPUs with AMX or AVX512-BF16 it is several times faster than sgemm.
 * Under torch.autocast(bfloat16) the time loops multiply by a bf16 copy of the recurrent
 * weight, each step's h (or, backward, da) rounded to bf16 first; the gate math, the cell
 * state and every sum stay float32. bf16 values are uint16_t bit patterns. */
typedef void (*gemm_bf16_t)(const char *, const char *, const int *, const int *, const int *,
                            const float *, const uint16_t *, const int *, const uint16_t *,
                            const int *, const float *, float *, const int *);

/* float32 -> bfloat16, rounded to nearest even (what torch's .to(torch.bfloat16) does); NaN
 * stays NaN (quieted), +-inf stays inf */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void glasslstm_to_bf16(int64_t n, const float *RESTRICT src, uint16_t *RESTRICT dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
}

/* C (m x n, ldc; float32) = op(A) B + beta C, column-major: A (bf16, op ta, lda); B given in
 * float32 (k x n, ldb), rounded into scratch (k x n bf16) first. A void C keeps the float64
 * instantiations of the loops compiling (they never take this path). */
static void gemm_bf16_b32(const glasslstm_blas *blas, char ta, int64_t m, int64_t n, int64_t k,
                          const uint16_t *A, int64_t lda, const float *B, int64_t ldb,
                          uint16_t *scratch, float beta, void *C, int64_t ldc) {
    for (int64_t j = 0; j < n; j++) glasslstm_to_bf16(k, B + j * ldb, scratch + j * k);
    int mi = (int)m, ni = (int)n, ki = (int)k, la = (int)lda, lb = (int)k, lc = (int)ldc;
    float one = 1;
    ((gemm_bf16_t)blas->gemm_bf16)(&ta, "N", &mi, &ni, &ki, &one, A, &la, scratch, &lb, &beta,
                                   (float *)C, &lc);
}

/* Row-major C (M x N, ldc; float32) = op(A) op(B), A and B bf16 row-major (ta/tb 'N' or 'T':
 * whether the stored matrix is used transposed): the big GEMMs of an autocast layer (input
 * projection, weight and input gradients). Row-major C is column-major C^T = op(B)^T op(A)^T,
 * and a row-major matrix read column-major is its transpose: the same flags, operands
 * swapped. */
void glasslstm_mm_bf16(const glasslstm_blas *blas, int64_t M, int64_t N, int64_t K,
                       const uint16_t *A, int64_t lda, int ta, const uint16_t *B, int64_t ldb,
                       int tb, float beta, float *C, int64_t ldc) {
    char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
    int mi = (int)N, ni = (int)M, ki = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    float one = 1;
    ((gemm_bf16_t)blas->gemm_bf16)(&fb, &fa, &mi, &ni, &ki, &one, B, &la, A, &lb, &beta, C, &lc);
}

#define LAYER_LOOPS(T, SUF, GEMM_T)                                                           \
typedef void (*GEMM_T)(const char *, const char *, const int *, const int *, const int *,    \
                       const T *, const T *, const int *, const T *, const int *, const T *, \
                       T *, const int *);                                                     \
typedef void (*pack_##SUF##_t)(const char *, const char *, const int *, const int *,         \
                               const int *, const T *, const T *, const int *, T *);         \
typedef void (*compute_##SUF##_t)(const char *, const char *, const int *, const int *,      \
                                  const int *, const T *, const int *, const T *,            \
                                  const int *, const T *, T *, const int *);                  \
static void gemm_##SUF(GEMM_T gemm, char ta, char tb, int64_t m, int64_t n, int64_t k,       \
                       const T *A, int64_t lda, const T *B, int64_t ldb, T beta, T *C,       \
                       int64_t ldc) {                                                         \
    int mi = (int)m, ni = (int)n, ki = (int)k, la = (int)lda, lb = (int)ldb, lc = (int)ldc;   \
    T one = 1;                                                                                \
    gemm(&ta, &tb, &mi, &ni, &ki, &one, A, &la, B, &lb, &beta, C, &lc);                       \
}                                                                                             \
/* A (m x k, column-major, op ta) packed for C (m x n) = op(A) B, or NULL (no packed GEMM    \
 * here, too short a loop, or no memory): then the caller multiplies with plain gemm. */      \
static T *pack_a_##SUF(const glasslstm_blas *blas, int64_t Tn, char ta, int64_t m,           \
                       int64_t n, int64_t k, const T *A, int64_t lda) {                       \
    if (!blas->pack || !blas->compute || !blas->pack_get_size || Tn < 4) return NULL;         \
    int mi = (int)m, ni = (int)n, ki = (int)k, la = (int)lda;                                 \
    T one = 1;                                                                                \
    size_t bytes = ((pack_size_t)blas->pack_get_size)("A", &mi, &ni, &ki);                    \
    T *packed = bytes ? (T *)malloc(bytes) : NULL;                                            \
    if (packed) ((pack_##SUF##_t)blas->pack)("A", &ta, &mi, &ni, &ki, &one, A, &la, packed);  \
    return packed;                                                                            \
}                                                                                             \
/* C (m x n, ldc) = packed A times B (k x n, ldb) + beta C, n the packed n (steps of a ragged  \
 * batch with fewer rows use plain gemm: MKL documents compute only for the packed sizes). */        \
static void compute_##SUF(const glasslstm_blas *blas, int64_t m, int64_t n, int64_t k,       \
                          const T *packed, const T *B, int64_t ldb, T beta, T *C,            \
                          int64_t ldc) {                                                      \
    int mi = (int)m, ni = (int)n, ki = (int)k, lb = (int)ldb, lc = (int)ldc;                  \
    ((compute_##SUF##_t)blas->compute)("P", "N", &mi, &ni, &ki, packed, &mi, B, &lb, &beta,   \
                                       C, &lc);                                               \
}                                                                                             \
/* The gate math of a step in a loop that is not row-split (large weights: the BLAS threads \
 * each GEMM): from CELL_SPLIT_MIN values on, the rows are shared by the OpenMP threads too,  \
 * instead of one thread doing them while the others wait for the next GEMM. */               \
static void cell_forward_par_##SUF(int64_t n, int64_t H, T *a, int64_t lda, const T *bias,   \
                                   const T *cp, int64_t ldp, T *c, T *tc, int64_t ldc,        \
                                   T *out, int64_t ldo) {                                     \
    CELL_ROWS(n, H, glasslstm_cell_forward_##SUF(r1 - r0, H, a + r0 * lda, lda, bias,         \
                                                 cp + r0 * ldp, ldp, c + r0 * ldc,            \
                                                 tc + r0 * ldc, ldc, out + r0 * ldo, ldo))    \
}                                                                                             \
static void cell_backward_par_##SUF(int64_t n, int64_t H, const T *a, int64_t lda,           \
                                    const T *cp, int64_t ldp, const T *tc, int64_t ldt,       \
                                    const T *dh, const T *dy, int64_t ldh, T *dc, int64_t ldc, \
                                    T *d) {                                                   \
    CELL_ROWS(n, H, glasslstm_cell_backward_##SUF(r1 - r0, H, a + r0 * lda, lda,              \
                                                  cp + r0 * ldp, ldp, tc + r0 * ldt, ldt,     \
                                                  dh + r0 * ldh, dy ? dy + r0 * ldh : NULL,   \
                                                  ldh, dc + r0 * ldc, ldc, d + r0 * lda))     \
}                                                                                             \
/* acc (k) += the column sums of A (n x k, contiguous) */                                    \
static void col_sums_##SUF(int64_t n, int64_t k, const T *RESTRICT A, T *RESTRICT acc) {      \
    for (int64_t r = 0; r < n; r++) {                                                         \
        const T *RESTRICT row = A + r * k;                                                    \
        _Pragma("GCC ivdep")                                                                  \
        for (int64_t j = 0; j < k; j++) acc[j] += row[j];                                     \
    }                                                                                         \
}                                                                                             \
/* One thread's share of a time loop: batch rows [r0, r1) for all steps. Rows of a batch never \
 * meet in an LSTM (row b's state depends on row b alone), so threads that own disjoint rows  \
 * run whole loops without a single barrier: each multiplies its rows by the (packed) weight \
 * with a one-thread GEMM and does their gate math. `packed` is this share's own copy. */     \
static void forward_rows_##SUF(const glasslstm_blas *blas, const T *packed, int64_t Tn,      \
                               int64_t B, int64_t H, int64_t P, int64_t r0, int64_t r1,       \
                               T *gates, T *hs, T *cs, T *tanh_c, T *rs, const T *w_hh,       \
                               const T *w_hr, const T *bias, const uint16_t *w16,             \
                               const int64_t *batch_sizes, int reverse, int transposed) {     \
    GEMM_T gemm = (GEMM_T)blas->gemm;                                                         \
    /* w16: the recurrent weight in bf16 (4H x P row-major): autocast's bf16 steps */          \
    uint16_t *h16 = w16 ? (uint16_t *)malloc((size_t)((r1 - r0) * P) * sizeof(uint16_t)) : NULL; \
    if (!h16) w16 = NULL; /* no memory for the scratch: float32 steps */                      \
    for (int64_t s = 0; s < Tn; s++) {                                                        \
        int64_t t = reverse ? Tn - 1 - s : s;                                                 \
        int64_t prev = reverse ? t + 1 : t, cur = reverse ? t : t + 1;                        \
        int64_t nb = batch_sizes ? batch_sizes[t] : B;                                        \
        int64_t e = nb < r1 ? nb : r1, n = e - r0; /* active rows: [r0, e) */                 \
        T *hp = hs + prev * B * P, *hc = hs + cur * B * P;                                    \
        T *cp = cs + prev * B * H, *cc = cs + cur * B * H;                                    \
        if (e < r1) { /* rows past their end (or before their start) keep their state */      \
            int64_t k0 = e > r0 ? e : r0;                                                     \
            memcpy(hc + k0 * P, hp + k0 * P, (size_t)((r1 - k0) * P) * sizeof(T));            \
            memcpy(cc + k0 * H, cp + k0 * H, (size_t)((r1 - k0) * H) * sizeof(T));            \
        }                                                                                     \
        if (n <= 0) continue;                                                                 \
        T *a = gates + (t * B + r0) * 4 * H, *hpr = hp + r0 * P;                              \
        if (w16) gemm_bf16_b32(blas, 'T', 4 * H, n, P, w16, P, (const float *)hpr, P, h16, 1,  \
                               a, 4 * H);                                                     \
        else if (packed && n == r1 - r0) compute_##SUF(blas, 4 * H, n, P, packed, hpr, P, 1, a, \
                                                       4 * H);                                \
        else if (transposed) gemm_##SUF(gemm, 'N', 'N', 4 * H, n, P, w_hh, 4 * H, hpr, P, 1,  \
                                        a, 4 * H);                                            \
        else gemm_##SUF(gemm, 'T', 'N', 4 * H, n, P, w_hh, P, hpr, P, 1, a, 4 * H);           \
        T *dst = rs ? rs + (t * B + r0) * H : hc + r0 * P;                                    \
        cell_forward_par_##SUF(n, H, a, 4 * H, bias, cp + r0 * H, H, cc + r0 * H,             \
                               tanh_c + (t * B + r0) * H, H, dst, rs ? H : P);                \
        if (rs && transposed) gemm_##SUF(gemm, 'N', 'N', P, n, H, w_hr, P, dst, H, 0,         \
                                         hc + r0 * P, P);                                     \
        else if (rs) gemm_##SUF(gemm, 'T', 'N', P, n, H, w_hr, H, dst, H, 0, hc + r0 * P, P); \
    }                                                                                         \
    free(h16);                                                                                \
}                                                                                             \
static T *pack_forward_##SUF(const glasslstm_blas *blas, int64_t Tn, int64_t H, int64_t P,   \
                             int64_t n, const T *w_hh, int transposed) {                      \
    return transposed ? pack_a_##SUF(blas, Tn, 'N', 4 * H, n, P, w_hh, 4 * H)                 \
                      : pack_a_##SUF(blas, Tn, 'T', 4 * H, n, P, w_hh, P);                    \
}                                                                                             \
void glasslstm_layer_forward_##SUF(const glasslstm_blas *blas, int64_t Tn, int64_t B,        \
                                   int64_t H, int64_t P,                                      \
                                   T *gates, T *hs, T *cs, T *tanh_c, T *rs, const T *w_hh,   \
                                   const T *w_hr, const T *bias, const uint16_t *w16,         \
                                   const int64_t *batch_sizes, int reverse, int transposed) { \
    if (sizeof(T) != sizeof(float) || !blas->gemm_bf16) w16 = NULL;                           \
    int nt = row_threads(B, (size_t)(4 * H * P + (rs ? H * P : 0)) * sizeof(T));              \
    if (nt > 1) {                                                                             \
        ROW_SPLIT(B, {                                                                    \
            T *packed = w16 ? NULL : pack_forward_##SUF(blas, Tn, H, P, r1 - r0, w_hh,         \
                                                        transposed);                          \
            forward_rows_##SUF(blas, packed, Tn, B, H, P, r0, r1, gates, hs, cs, tanh_c, rs,  \
                               w_hh, w_hr, bias, w16, batch_sizes, reverse, transposed);      \
            free(packed);                                                                     \
        })                                                                                    \
        return;                                                                               \
    }                                                                                         \
    ftz_state ftz;                                                                            \
    ftz_begin(&ftz, Tn);                                                                      \
    T *packed = w16 ? NULL : pack_forward_##SUF(blas, Tn, H, P, B, w_hh, transposed);         \
    forward_rows_##SUF(blas, packed, Tn, B, H, P, 0, B, gates, hs, cs, tanh_c, rs, w_hh, w_hr, \
                       bias, w16, batch_sizes, reverse, transposed);                          \
    free(packed);                                                                             \
    ftz_end(&ftz);                                                                            \
}                                                                                             \
/* backward, rows [r0, r1) (see forward_rows): dy (T, B, P) or NULL; dh (B, P) and dc (B, H):  \
 * the gradients reaching the final state on entry, the initial state's on exit; da (T, B,    \
 * 4H): the pre-activation gradients (zero-filled by the caller where rows are inactive); dhs  \
 * (T, B, P) the gradient reaching each H_t (needed for dW_hr) and dr (B, H) scratch, both    \
 * only with a projection. w16: the recurrent weight TRANSPOSED in bf16 (P x 4H row-major:    \
 * MKL's bf16 GEMM of these shapes is 16-20% faster on it than on the forward's layout). */  \
static void backward_rows_##SUF(const glasslstm_blas *blas, const T *packed, int64_t Tn,     \
                                int64_t B, int64_t H, int64_t P, int64_t r0, int64_t r1,      \
                                const T *gates, const T *cs, const T *tanh_c, const T *dy,    \
                                T *dh, T *dc, T *da, T *dhs, T *dr, const T *w_hh,            \
                                const T *w_hr, T *RESTRICT db, const uint16_t *w16,           \
                                const int64_t *batch_sizes, int reverse) {                    \
    GEMM_T gemm = (GEMM_T)blas->gemm;                                                         \
    T *dhr = dh + r0 * P, *dcr = dc + r0 * H;                                                 \
    uint16_t *d16 = w16 ? (uint16_t *)malloc((size_t)((r1 - r0) * 4 * H) * sizeof(uint16_t)) \
                        : NULL;                                                               \
    if (!d16) w16 = NULL;                                                                     \
    for (int64_t s = 0; s < Tn; s++) {                                                        \
        int64_t t = reverse ? s : Tn - 1 - s;                                                 \
        int64_t prev = reverse ? t + 1 : t;                                                   \
        int64_t nb = batch_sizes ? batch_sizes[t] : B;                                        \
        int64_t n = (nb < r1 ? nb : r1) - r0;                                                 \
        if (n <= 0) continue;                                                                 \
        const T *dyt = dy ? dy + (t * B + r0) * P : NULL;                                     \
        const T *g = dr + r0 * H, *gy = NULL;                                                 \
        int64_t ldg = H;                                                                      \
        if (w_hr) {                                                                           \
            if (dyt) for (int64_t j = 0; j < n * P; j++) dhr[j] += dyt[j];                    \
            memcpy(dhs + (t * B + r0) * P, dhr, (size_t)(n * P) * sizeof(T));                 \
            gemm_##SUF(gemm, 'N', 'N', H, n, P, w_hr, H, dhr, P, 0, dr + r0 * H, H);          \
        } else {                                                                              \
            g = dhr; gy = dyt; ldg = P;                                                       \
        }                                                                                     \
        T *d = da + (t * B + r0) * 4 * H;                                                     \
        cell_backward_par_##SUF(n, H, gates + (t * B + r0) * 4 * H, 4 * H,                    \
                                      cs + (prev * B + r0) * H, H, tanh_c + (t * B + r0) * H, \
                                      H, g, gy, ldg, dcr, H, d);                              \
        if (db) col_sums_##SUF(n, 4 * H, d, db); /* while d is in cache */                     \
        if (w16) gemm_bf16_b32(blas, 'T', P, n, 4 * H, w16, 4 * H, (const float *)d, 4 * H,    \
                               d16, 0, dhr, P);                                               \
        else if (packed && n == r1 - r0) compute_##SUF(blas, P, n, 4 * H, packed, d, 4 * H, 0, \
                                                       dhr, P);                               \
        else gemm_##SUF(gemm, 'N', 'N', P, n, 4 * H, w_hh, P, d, 4 * H, 0, dhr, P);           \
    }                                                                                         \
    free(d16);                                                                                \
}                                                                                             \
/* db (4H, nullable): the bias gradient, the sum of da over all rows, added up as each step's  \
 * rows are made (a share's partial sums, then the shares in order: the same bits on every    \
 * run with the same threads). */                                                             \
void glasslstm_layer_backward_##SUF(const glasslstm_blas *blas, int64_t Tn, int64_t B,       \
                                    int64_t H, int64_t P,                                     \
                                    const T *gates, const T *cs, const T *tanh_c,             \
                                    const T *dy, T *dh, T *dc, T *da, T *dhs, T *dr,          \
                                    const T *w_hh, const T *w_hr, T *db, const uint16_t *w16, \
                                    const int64_t *batch_sizes, int reverse) {                \
    if (sizeof(T) != sizeof(float) || !blas->gemm_bf16) w16 = NULL;                           \
    int nt = row_threads(B, (size_t)(4 * H * P + (w_hr ? H * P : 0)) * sizeof(T));            \
    if (db) memset(db, 0, (size_t)(4 * H) * sizeof(T));                                       \
    T *parts = NULL;                                                                          \
    if (nt > 1 && db) {                                                                       \
        parts = (T *)calloc((size_t)(nt * 4 * H), sizeof(T));                                 \
        if (!parts) nt = 1;                                                                   \
    }                                                                                         \
    if (nt > 1) {                                                                             \
        ROW_SPLIT(B, {                                                                    \
            T *packed = w16 ? NULL : pack_a_##SUF(blas, Tn, 'N', P, r1 - r0, 4 * H, w_hh, P);  \
            backward_rows_##SUF(blas, packed, Tn, B, H, P, r0, r1, gates, cs, tanh_c, dy, dh, \
                                dc, da, dhs, dr, w_hh, w_hr, parts ? parts + id_ * 4 * H : NULL, \
                                w16, batch_sizes, reverse);                                   \
            free(packed);                                                                     \
        })                                                                                    \
        if (parts) {                                                                          \
            for (int k = 0; k < nt; k++)                                                      \
                for (int64_t j = 0; j < 4 * H; j++) db[j] += parts[k * 4 * H + j];            \
            free(parts);                                                                      \
        }                                                                                     \
        return;                                                                               \
    }                                                                                         \
    ftz_state ftz;                                                                            \
    ftz_begin(&ftz, Tn);                                                                      \
    T *packed = w16 ? NULL : pack_a_##SUF(blas, Tn, 'N', P, B, 4 * H, w_hh, P);               \
    backward_rows_##SUF(blas, packed, Tn, B, H, P, 0, B, gates, cs, tanh_c, dy, dh, dc, da,    \
                        dhs, dr, w_hh, w_hr, db, w16, batch_sizes, reverse);                  \
    free(packed);                                                                             \
    ftz_end(&ftz);                                                                            \
}
LAYER_LOOPS(float, f32, gemm_f32_t)
LAYER_LOOPS(double, f64, gemm_f64_t)

/* The calling thread's floating-point control (MXCSR on x86, else 0): lets the tests check
 * that a time loop leaves it as it found it. */
unsigned int glasslstm_fp_mode(void) {
#if defined(__x86_64__) || defined(__i386__)
    return _mm_getcsr();
#else
    return 0;
#endif
}

int glasslstm_abi_version(void) { return 10; }
