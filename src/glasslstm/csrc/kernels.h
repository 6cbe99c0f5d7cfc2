// glasslstm's CPU kernels: what they take and what they give (no torch headers here).
//
// The LSTM cell in the article's notation (gate order in every 4H row: torch's i, f, g, o;
// g is the article's N_t, the new information):
//
//     i, f, o = sigmoid(pre_i, pre_f, pre_o)     g = tanh(pre_g)
//     C_t = f * C_{t-1} + i * g                   H_t = o * tanh(C_t)   (then H_t W_hr^T: LSTMP)
//
// where pre = x_t U^T + H_{t-1} W^T + b. kernels_impl.h holds the code: the cell's pointwise
// math, whole time loops (forward and backward) and the one-token step. kernels.cpp compiles
// it once per x86 instruction-set level and picks the best the CPU runs; ops.cpp wraps it as
// torch operators. Matrix products go through a Gemms table (gemm.cpp): torch's own routines,
// chosen per machine by measurement (glasslstm.ops.gemm).
#pragma once

#include <cstddef>
#include <cstdint>

namespace glasslstm {

// Row-major C (m x n, ldc) = A (m x k, lda) B (k x n, ldb) + beta C. `threads`: 1 = run on the
// calling thread (inside a parallel region), 0 = use the thread pool.
template <typename T>
using gemm_fn = void (*)(int64_t m, int64_t n, int64_t k, const T *A, int64_t lda, const T *B,
                         int64_t ldb, T beta, T *C, int64_t ldc, int threads);
// The same with bfloat16 operands (raw bit patterns) and a float32 result.
using gemm_bf16_fn = void (*)(int64_t m, int64_t n, int64_t k, const uint16_t *A, int64_t lda,
                              const uint16_t *B, int64_t ldb, float beta, float *C, int64_t ldc,
                              int threads);

// A float32 B (k x n) copied once into the layout a provider multiplies fastest, for the many
// products of a time loop by the same weight: packed_size gives the floats the copy takes,
// pack makes it, gemm_packed multiplies by it (m x k times the packed k x n). Null where the
// provider has no such layout (the loops then use gemm_fn on B as it is).
struct PackedGemm {
    int64_t (*packed_size)(int64_t k, int64_t n) = nullptr;
    void (*pack)(int64_t k, int64_t n, const float *B, int64_t ldb, float *out) = nullptr;
    // the same copy made from B^T (n x k, row-major, ldbt): a weight as torch stores it
    void (*pack_t)(int64_t k, int64_t n, const float *Bt, int64_t ldbt, float *out) = nullptr;
    void (*gemm_packed)(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                        const float *Bp, float beta, float *C, int64_t ldc,
                        int threads) = nullptr;
    // Or a layout the provider keeps itself (an opaque handle): make it, multiply by it, free
    // it. A provider sets either the three above or these three.
    void *(*make)(int64_t k, int64_t n, const float *B, int64_t ldb) = nullptr;
    void (*gemm_handle)(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, void *h,
                        float beta, float *C, int64_t ldc, int threads) = nullptr;
    void (*free_handle)(void *h) = nullptr;
};

// The same for bfloat16 operands (raw bit patterns) and a float32 result: B copied once into
// the layout the CPU's bf16 matrix unit reads (AMX's VNNI pairs), where there is one. `fits`
// says whether a B of k x n can be packed; packed_size counts bf16 elements.
struct PackedGemmBf16 {
    bool (*fits)(int64_t k, int64_t n) = nullptr;
    int64_t (*packed_size)(int64_t k, int64_t n) = nullptr;
    void (*pack)(int64_t k, int64_t n, const uint16_t *B, int64_t ldb, uint16_t *out) = nullptr;
    void (*gemm_packed)(int64_t m, int64_t n, int64_t k, const uint16_t *A, int64_t lda,
                        const uint16_t *Bp, float beta, float *C, int64_t ldc,
                        int threads) = nullptr;
};

struct Gemms {
    gemm_fn<float> f32 = nullptr;
    gemm_fn<double> f64 = nullptr;
    gemm_bf16_fn bf16 = nullptr;  // null: float32 products
    PackedGemm packed;            // float32 only
    PackedGemmBf16 packed16;      // bf16 products by a packed weight, where the CPU has a layout
};

// The regularised family (glasslstm.LSTM's layer_norm, peephole, cell_clip, zoneout_c/h,
// recurrent_dropout), one step in the article's notation (a = the four gates' pre-activations):
//
//     a   = LN(x U^T; g_ih) + LN((H_{t-1} m_h) W^T; g_hh) + b      (LN: layer normalisation)
//     i, f = sigmoid(a_i + p_i C_{t-1}, a_f + p_f C_{t-1})   g = tanh(a_g)
//     C~  = clip(f C_{t-1} + i g, -clip, clip)                  o = sigmoid(a_o + p_o C~)
//     H~  = o tanh(LN(C~; g_c, b_c))                             (then H~ W_hr^T: LSTMP)
//     C_t = C~ + k_c (C_{t-1} - C~)      H_t = H~ + k_h (H_{t-1} - H~)       (zoneout)
//
// Every member is optional (null pointer, clip 0). What the backward needs of a step is kept in
// `aux`: per (t, b) row, K values: [x^ (4H) | r^ (4H) | c^ (H) | C~ before clipping (H) |
// 1/std of the three normalisations (3)], each section present only when used (offset -1
// otherwise; glasslstm.ops.library.aux_width mirrors the layout).
template <typename T>
struct VariantArgs {
    const T *ln_ih, *ln_hh;  // (4H) gains of the normalised input and recurrent products, or null
    const T *ln_c, *ln_c_b;  // (H) gain and bias of the normalised cell, or null
    const T *peep;           // (3H) peephole weights in ONNX's order i, o, f, or null
    T clip;                  // bound on C~ (0: none)
    const T *zc, *zh;        // (T, B, H), (T, B, P): k_c, k_h (keep probabilities), or null
    const T *hmask;          // (B, P): m_h, the recurrent dropout mask, or null
    T *aux;                  // (T, B, K), or (1, B, K) when aux_ring (inference), or null
    bool aux_ring;
    int64_t K, o_xn, o_rn, o_cn, o_cnew, o_rstd;  // row width and section offsets (-1: none)
};
constexpr double kLnEps = 1e-5;  // torch.nn.LayerNorm's default

// One layer's time loop, forward. Shapes: T steps, B rows (sorted longest first when ragged),
// H hidden, P = H or proj_size.
template <typename T>
struct ForwardArgs {
    int64_t T_, B, H, P;
    T *gates;           // (T, B, 4H): x U^T on entry, the activated i, f, g, o on exit (zero
                        // past each row's end); or, with `project`, (chunk, B, 4H)
    // Inference in chunks of `chunk` steps: before each, project(project_ctx, t0, t1) writes
    // x_t U^T of the steps t in [t0, t1) into gates (step t at row t - t0), so that the gates of
    // all T steps are never held at once. Null: gates holds every step, projected beforehand.
    void (*project)(void *ctx, int64_t t0, int64_t t1);
    void *project_ctx;
    int64_t chunk;
    const T *bias;      // (4H) added to every row as it is read, or null
    const T *h0, *c0;   // (B, P), (B, H)
    T *y;               // (T, B, P): H_t (zero past each row's end)
    T *cs;              // (T, B, H): C_t (zero past each row's end), or, when cs_ring, (2, B, H)
    bool cs_ring;       // only the last two steps kept (inference without recording)
    T *tanh_c;          // (T, B, H) tanh(C_t), or null (inference)
    T *rs;              // (T, B, H) o * tanh(C_t) before the projection (ring: (1, B, H)), or
                        // null without one
    bool rs_ring;
    T *h_n, *c_n;       // (B, P), (B, H): each row's state after its last step
    const T *w;         // (4H, P): W as torch stores it, contiguous
    const T *whr;       // (P, H): W_hr, contiguous, or null
    const T *w_t;       // (P, 4H): W^T, contiguous; null where the loop packs W (packs_weights)
    const T *whr_t;     // (H, P): W_hr^T, contiguous, or null (no projection, or packed)
    const uint16_t *w_t16;  // (P, 4H) W^T in bf16 (bf16 products), or null
    const int64_t *batch_sizes;  // (T) rows active per step, or null (all rows, all steps)
    bool reverse;
    const VariantArgs<T> *v;     // the regularised family, or null: the article's cell
};

template <typename T>
struct BackwardArgs {
    int64_t T_, B, H, P;
    const T *gates, *cs, *tanh_c, *c0;  // from the forward (cs, tanh_c: (T, B, H))
    const T *dy;        // (T, B, P) or null
    T *dh, *dc;         // (B, P), (B, H): the gradient reaching the final state in, the
                        // initial state's out
    T *da;              // (T, B, 4H): the pre-activation gradients out (zero where inactive)
    T *dhs;             // (T, B, P): the gradient reaching each H_t (projection only), or null
    T *db;              // (4H): the bias gradient (sum of da), or null
    const T *w;         // (4H, P): W
    const T *whr;       // (P, H): W_hr, or null
    const uint16_t *w16;  // (4H, P) W in bf16, or null
    const int64_t *batch_sizes;
    bool reverse;
    const VariantArgs<T> *v;  // as in the forward, or null
    T *dhw;             // (T, B, 4H): dL/d(H_{t-1} W^T), with v->ln_hh (else da is that)
    T *dv;              // (13H): the family's parameter gradients [g_ih (4H) | g_hh (4H) |
                        // p (3H) | g_c (H) | b_c (H)], or null
};

// Whether a float32 forward loop of `steps` steps multiplies by a packed copy of its weights
// made straight from W (PackedGemm::pack_t), so that the caller need not transpose them.
inline bool packs_weights(const Gemms &g, int64_t steps, bool bf16) {
    return g.packed.pack_t != nullptr && steps > 1 && !bf16;
}

// The one-token step through L stacked layers (streaming inference), in place.
template <typename T>
struct StepArgs {
    int64_t L, H, P;
    const int64_t *in_sizes;  // (L) input size of each layer
    const T *const *panels;   // (L) [U W] as panels (see kernels_impl.h)
    const T *const *bias;     // (L) b_ih + b_hh, or null entries
    const T *const *whr_t;    // (L) W_hr^T (H, P), or null entries
    // weight-only int8 (float32 only): [U W] as int8 panels and one scale per row (4H rounded
    // up to kPanel values: row r of W is scale[r] * panels8's row r); null: `panels`
    const int8_t *const *panels8;
    const float *const *scales;
    T *work;                  // step_work(H) values
    bool zigzag_back;         // this step visits the panels back to front
    const T *x;               // layer 0's input (I), or null when xproj is given
    const T *xproj;           // layer 0's x U^T + b (4H), or null
    T *h, *c;                 // (L, P), (L, H): the state, updated
    T *out;                   // (P): the top layer's new h
};

constexpr int64_t kPanel = 64;
inline int64_t step_work(int64_t H) { return (4 * H + kPanel - 1) / kPanel * kPanel + 2 * H; }

// The table of kernels for one instruction-set level (kernels.cpp fills it).
struct Kernels {
    const char *isa;
    void (*forward_f32)(const ForwardArgs<float> &, const Gemms &);
    void (*forward_f64)(const ForwardArgs<double> &, const Gemms &);
    void (*backward_f32)(const BackwardArgs<float> &, const Gemms &);
    void (*backward_f64)(const BackwardArgs<double> &, const Gemms &);
    void (*step_f32)(const StepArgs<float> &);
    void (*step_f64)(const StepArgs<double> &);
    // out (rows) = Wt^T v + bias (null: none), Wt (k, rows): a language model's output layer
    void (*linear_f32)(int64_t rows, int64_t k, const float *Wt, const float *bias,
                       const float *v, float *out);
    void (*linear_f64)(int64_t rows, int64_t k, const double *Wt, const double *bias,
                       const double *v, double *out);
    // the same with W stored int8 (transposed, (k, rows)) and one scale per output row
    void (*linear_i8)(int64_t rows, int64_t k, const int8_t *Wt, const float *scale,
                      const float *bias, const float *v, float *out);
    // one step's pointwise math on n rows (the per-step cell of the Python loops)
    void (*cell_forward_f32)(int64_t n, int64_t H, float *a, int64_t lda, const float *c_prev,
                             int64_t ldp, float *c, float *tc, int64_t ldc, float *out,
                             int64_t ldo);
    void (*cell_forward_f64)(int64_t n, int64_t H, double *a, int64_t lda, const double *c_prev,
                             int64_t ldp, double *c, double *tc, int64_t ldc, double *out,
                             int64_t ldo);
    void (*cell_backward_f32)(int64_t n, int64_t H, const float *a, int64_t lda,
                              const float *c_prev, int64_t ldp, const float *tc, int64_t ldt,
                              const float *dh, const float *dy, int64_t ldh, float *dc,
                              int64_t ldc, float *d);
    void (*cell_backward_f64)(int64_t n, int64_t H, const double *a, int64_t lda,
                              const double *c_prev, int64_t ldp, const double *tc, int64_t ldt,
                              const double *dh, const double *dy, int64_t ldh, double *dc,
                              int64_t ldc, double *d);
    void (*to_bf16)(int64_t n, const float *src, uint16_t *dst);
};

// The best table this CPU runs (chosen once).
const Kernels &kernels();
// How many threads a time loop splits B rows over, for a recurrent weight of this many bytes
// (1: one loop, its products threaded instead); see kernels_impl.h.
int loop_threads(int64_t B, size_t weight_bytes);
// The floating-point control word of the calling thread (MXCSR on x86, else 0).
unsigned int fp_mode();

}  // namespace glasslstm
