// The matrix products of gemm.h.
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <ctime>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace glasslstm {

namespace {

template <typename T>
at::Tensor view(const T *p, int64_t rows, int64_t cols, int64_t ld) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    return at::from_blob(const_cast<T *>(p), {rows, cols}, {ld, 1}, opts);
}

// "torch": at::cpu::addmm_out on views of the raw memory (torch's BLAS; inside a parallel
// region the BLAS runs on the calling thread)
template <typename T>
void torch_gemm(int64_t m, int64_t n, int64_t k, const T *A, int64_t lda, const T *B,
                int64_t ldb, T beta, T *C, int64_t ldc, int /*threads*/) {
    if (m <= 0 || n <= 0) return;
    at::Tensor c = view(C, m, n, ldc);
    if (k <= 0) {
        if (beta == T(0)) c.zero_();
        return;
    }
    at::Tensor a = view(A, m, k, lda), b = view(B, k, n, ldb);
    if (beta == T(0))
        at::cpu::mm_out(c, a, b);
    else
        at::cpu::addmm_out(c, c, a, b, beta, 1);
}

// "onednn": oneDNN's brgemm micro-kernel on column blocks of kBlockN (and row blocks of
// kBlockM, K in chunks of kBlockK: the operands of one call stay in the core's caches), the
// blocks shared out over the OpenMP threads with a static schedule, so that a thread keeps
// multiplying by the same columns of B step after step (they stay in its cache).
constexpr int64_t kBlockN = 64, kBlockM = 64, kBlockK = 512;
// Columns per block of the packed float32 weight (the per-step products of a time loop), a
// function of the product's K. 32, as oneDNN's own LSTM takes for float32: measured on a
// 2-core Xeon (AMX), inference of torch.nn.LSTM's size against it, same process, alternating:
// 0.97 -> 1.01-1.03x at H=512, 0.90-0.92 -> 0.96-0.98x at H=1024 (64-column blocks -> 32); 16
// and 48 were slower. With a short K (H <= 128 in a layer's forward) a block's product is so
// small that the call costs about as much as the multiplication: 128 columns there (4 calls a
// step at H=128 instead of 16). Same machine, T=100, B=32, three rounds, each width in its
// own process alternating with torch.nn.LSTM: inference 0.90-0.92 -> 0.94-0.96x and training
// 1.03-1.05 -> 1.06-1.07x at H=128; inference 0.97-0.98 -> 1.00-1.03x at H=64.
int64_t pack_width(int64_t k, int64_t /*n*/) { return k <= 128 ? 128 : 32; }

void onednn_tile(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                 int64_t ldb, bool add, float *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
        const int64_t kb = std::min(kBlockK, k - k0);
        at::native::cpublas::brgemm(m, n, kb, lda, ldb, ldc, add || k0 > 0, A + k0, B + k0 * ldb,
                                    C, false);
    }
}

int64_t onednn_packed_size(int64_t k, int64_t n);
void onednn_pack(int64_t k, int64_t n, const float *B, int64_t ldb, float *out);
void onednn_pack_t(int64_t k, int64_t n, const float *Bt, int64_t ldbt, float *out);
void onednn_gemm_packed(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                        const float *Bp, float beta, float *C, int64_t ldc, int threads);

void onednn_gemm(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                 int64_t ldb, float beta, float *C, int64_t ldc, int threads) {
    if (m > 2 * kBlockM && k > 0 && n > 0) {
        // many row blocks read every column block of B: packing it first pays for itself
        std::vector<float> packed((size_t)onednn_packed_size(k, n));
        onednn_pack(k, n, B, ldb, packed.data());
        onednn_gemm_packed(m, n, k, A, lda, packed.data(), beta, C, ldc, threads);
        return;
    }
    if (m <= 0 || n <= 0) return;
    if (beta != 0.0f && beta != 1.0f)
        throw std::invalid_argument("glasslstm: the oneDNN product takes beta 0 or 1");
    if (k <= 0) {
        if (beta == 0.0f)
            for (int64_t i = 0; i < m; i++) std::fill(C + i * ldc, C + i * ldc + n, 0.0f);
        return;
    }
    const bool add = beta != 0.0f;
    const int64_t mb = (m + kBlockM - 1) / kBlockM, nb = (n + kBlockN - 1) / kBlockN;
    const int64_t tiles = mb * nb;
    auto tile = [&](int64_t t) {
        const int64_t i0 = (t / nb) * kBlockM, j0 = (t % nb) * kBlockN;
        onednn_tile(std::min(kBlockM, m - i0), std::min(kBlockN, n - j0), k, A + i0 * lda, lda,
                    B + j0, ldb, add, C + i0 * ldc + j0, ldc);
    };
#ifdef _OPENMP
    if (threads != 1 && tiles > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) tile(t);
        return;
    }
#endif
    for (int64_t t = 0; t < tiles; t++) tile(t);
}

// The same with B packed once: column blocks of W = pack_width(k, n), each block (k x W)
// contiguous (the last one padded). A block of B is then one stream of memory instead of k rows
// a page apart, which is what the per-step products of a time loop read again and again.
int64_t onednn_packed_size(int64_t k, int64_t n) {
    const int64_t W = pack_width(k, n);
    return (n + W - 1) / W * W * k;
}

// fill(j0, w, blk) for each column block of the packed copy: the block's w columns from j0 on,
// to be written to blk (k x W, the columns past w zero); the blocks shared over the threads
template <typename F>
void each_packed_block(int64_t k, int64_t n, float *out, F &&fill) {
    const int64_t W = pack_width(k, n), nb = (n + W - 1) / W;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t j = b0; j < b1; j++) {
            const int64_t j0 = j * W;
            fill(j0, std::min(W, n - j0), out + j * k * W);
        }
    });
}

void onednn_pack(int64_t k, int64_t n, const float *B, int64_t ldb, float *out) {
    const int64_t W = pack_width(k, n);
    each_packed_block(k, n, out, [&](int64_t j0, int64_t w, float *blk) {
        for (int64_t r = 0; r < k; r++) {
            std::copy(B + r * ldb + j0, B + r * ldb + j0 + w, blk + r * W);
            std::fill(blk + r * W + w, blk + (r + 1) * W, 0.0f);
        }
    });
}

// The same packed copy made from B^T (n x k, row-major: a weight as torch stores it), so that
// no transposed copy of the weight is made first: block j is the transpose of rows
// [j W, (j + 1) W) of B^T, done in tiles of kTransposeRows rows that stay in L1.
constexpr int64_t kTransposeRows = 32;
void onednn_pack_t(int64_t k, int64_t n, const float *Bt, int64_t ldbt, float *out) {
    const int64_t W = pack_width(k, n);
    each_packed_block(k, n, out, [&](int64_t j0, int64_t w, float *blk) {
        for (int64_t r0 = 0; r0 < k; r0 += kTransposeRows) {
            const int64_t r1 = std::min(k, r0 + kTransposeRows);
            for (int64_t c = 0; c < w; c++) {
                const float *src = Bt + (j0 + c) * ldbt;
                for (int64_t r = r0; r < r1; r++) blk[r * W + c] = src[r];
            }
            for (int64_t c = w; c < W; c++)
                for (int64_t r = r0; r < r1; r++) blk[r * W + c] = 0.0f;
        }
    });
}

void onednn_gemm_packed(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                        const float *Bp, float beta, float *C, int64_t ldc, int threads) {
    if (m <= 0 || n <= 0) return;
    if (beta != 0.0f && beta != 1.0f)
        throw std::invalid_argument("glasslstm: the oneDNN product takes beta 0 or 1");
    const bool add = beta != 0.0f;
    const int64_t W = pack_width(k, n);
    const int64_t mb = (m + kBlockM - 1) / kBlockM, nb = (n + W - 1) / W;
    const int64_t tiles = mb * nb;
    auto tile = [&](int64_t t) {
        const int64_t i0 = (t / nb) * kBlockM, j = t % nb, j0 = j * W;
        const int64_t rows = std::min(kBlockM, m - i0), cols = std::min(W, n - j0);
        const float *blk = Bp + j * k * W;
        for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
            const int64_t kb = std::min(kBlockK, k - k0);
            at::native::cpublas::brgemm(rows, cols, kb, lda, W, ldc, add || k0 > 0,
                                        A + i0 * lda + k0, blk + k0 * W, C + i0 * ldc + j0,
                                        false);
        }
    };
#ifdef _OPENMP
    if (threads != 1 && tiles > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) tile(t);
        return;
    }
#endif
    for (int64_t t = 0; t < tiles; t++) tile(t);
}

// bf16 operands, float32 result: torch's bf16 GEMM (brgemm without VNNI packing falls through
// to cpublas's bf16 x bf16 -> float32 GEMM: MKL's gemm_bf16bf16f32 or oneDNN's)
void bf16_gemm(int64_t m, int64_t n, int64_t k, const uint16_t *A, int64_t lda, const uint16_t *B,
               int64_t ldb, float beta, float *C, int64_t ldc, int /*threads*/) {
    if (m <= 0 || n <= 0) return;
    if (beta != 0.0f && beta != 1.0f)
        throw std::invalid_argument("glasslstm: the bf16 product takes beta 0 or 1");
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta != 0.0f,
                                reinterpret_cast<const at::BFloat16 *>(A),
                                reinterpret_cast<const at::BFloat16 *>(B), C, false);
}

// bf16 with B in the VNNI layout of the CPU's bf16 matrix unit (AMX), packed once by
// cpublas::pack in column blocks of kBlockN (each block k x kBlockN, pairs of rows interleaved),
// multiplied by oneDNN's brgemm micro-kernel: the per-step products of a time loop then read a
// weight laid out for the tiles instead of having it converted on every call. Only where torch
// can pack bf16 (cpublas::could_pack: AMX), with an even k and whole column blocks.
bool bf16_fits(int64_t k, int64_t n) {
    return k > 0 && k % 2 == 0 && n > 0 && n % kBlockN == 0 &&
           at::native::cpublas::could_pack(at::kBFloat16);
}

int64_t bf16_packed_size(int64_t k, int64_t n) { return k * n; }

void bf16_pack(int64_t k, int64_t n, const uint16_t *B, int64_t ldb, uint16_t *out) {
    for (int64_t j0 = 0; j0 < n; j0 += kBlockN)
        at::native::cpublas::pack(k, kBlockN, ldb, kBlockN, at::kBFloat16, at::kBFloat16,
                                  B + j0, out + j0 * k);
}

void bf16_gemm_packed(int64_t m, int64_t n, int64_t k, const uint16_t *A, int64_t lda,
                      const uint16_t *Bp, float beta, float *C, int64_t ldc, int threads) {
    if (m <= 0 || n <= 0) return;
    if (beta != 0.0f && beta != 1.0f)
        throw std::invalid_argument("glasslstm: the bf16 product takes beta 0 or 1");
    const bool add = beta != 0.0f;
    const int64_t mb = (m + kBlockM - 1) / kBlockM, nb = n / kBlockN, tiles = mb * nb;
    auto tile = [&](int64_t t) {
        const int64_t i0 = (t / nb) * kBlockM, j0 = (t % nb) * kBlockN;
        at::native::cpublas::brgemm(std::min(kBlockM, m - i0), kBlockN, k, lda, kBlockN, ldc, add,
                                    reinterpret_cast<const at::BFloat16 *>(A + i0 * lda),
                                    reinterpret_cast<const at::BFloat16 *>(Bp + j0 * k),
                                    C + i0 * ldc + j0, true);
    };
#ifdef _OPENMP
    if (threads != 1 && tiles > 1 && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; t++) tile(t);
            at::native::cpublas::brgemm_release(true);  // the tile unit's state, per thread
        }
        return;
    }
#endif
    for (int64_t t = 0; t < tiles; t++) tile(t);
    at::native::cpublas::brgemm_release(true);
}

// "onednn_linear": the weight as torch.nn.Linear's (B^T, n x k) reordered once into oneDNN's
// layout, each product one call of oneDNN's inner product on it, both through torch's mkldnn
// operators (called boxed: their C++ signatures are not part of torch's public headers).
c10::OperatorHandle mkldnn_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// the calls below are products on plain float32 tensors, whatever the caller's autocast state
struct PlainCall {
    c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
    c10::impl::ExcludeDispatchKeyGuard no_autograd{c10::autograd_dispatch_keyset};
};

void *linear_make(int64_t k, int64_t n, const float *B, int64_t ldb) {
    static const auto reorder = mkldnn_op("mkldnn::_reorder_linear_weight");
    PlainCall plain;
    torch::jit::Stack st{view(B, k, n, ldb).t().contiguous(), c10::IValue()};
    reorder.callBoxed(&st);
    return new at::Tensor(st[0].toTensor());
}

void linear_free(void *h) { delete static_cast<at::Tensor *>(h); }

void linear_gemm(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, void *h,
                 float beta, float *C, int64_t ldc, int /*threads*/) {
    if (m <= 0 || n <= 0) return;
    static const auto linear = mkldnn_op("mkldnn::_linear_pointwise");
    PlainCall plain;
    at::Tensor x = view(A, m, k, lda);
    torch::jit::Stack st{x.is_contiguous() ? x : x.contiguous(),
                         *static_cast<at::Tensor *>(h),
                         c10::IValue(),
                         std::string("none"),
                         c10::List<std::optional<at::Scalar>>(),
                         c10::IValue()};
    linear.callBoxed(&st);
    at::Tensor c = view(C, m, n, ldc);
    if (beta == 0.0f)
        c.copy_(st[0].toTensor());
    else if (beta == 1.0f)
        c.add_(st[0].toTensor());
    else
        c.mul_(beta).add_(st[0].toTensor());
}

}  // namespace

Provider provider_of(const std::string &name) {
    if (name == "torch") return Provider::Torch;
    if (name == "onednn") return Provider::OneDNN;
    if (name == "onednn_linear") return Provider::OneDNNLinear;
    throw std::invalid_argument("glasslstm: unknown GEMM provider '" + name +
                                "'; use 'torch', 'onednn' or 'onednn_linear'");
}

Gemms gemms(Provider step, bool bf16) {
    Gemms g;
    g.f32 = step == Provider::OneDNN ? onednn_gemm : torch_gemm<float>;
    g.f64 = torch_gemm<double>;
    g.bf16 = bf16 ? bf16_gemm : nullptr;
    if (bf16) {
        g.packed16.fits = bf16_fits;
        g.packed16.packed_size = bf16_packed_size;
        g.packed16.pack = bf16_pack;
        g.packed16.gemm_packed = bf16_gemm_packed;
    }
    if (step == Provider::OneDNNLinear) {
        g.packed.make = linear_make;
        g.packed.gemm_handle = linear_gemm;
        g.packed.free_handle = linear_free;
    }
    if (step == Provider::OneDNN) {
        g.packed.packed_size = onednn_packed_size;
        g.packed.pack = onednn_pack;
        g.packed.pack_t = onednn_pack_t;
        g.packed.gemm_packed = onednn_gemm_packed;
    }
    return g;
}

void mm_into(Provider p, const at::Tensor &A, const at::Tensor &B, double beta, at::Tensor &C) {
    if (p == Provider::OneDNN && A.scalar_type() == at::kFloat && A.stride(1) == 1 &&
        B.stride(1) == 1 && C.stride(1) == 1) {
        onednn_gemm(A.size(0), B.size(1), A.size(1), A.const_data_ptr<float>(), A.stride(0),
                    B.const_data_ptr<float>(), B.stride(0), static_cast<float>(beta),
                    C.mutable_data_ptr<float>(), C.stride(0), 0);
        return;
    }
    if (beta == 0.0)
        at::cpu::mm_out(C, A, B);
    else
        at::cpu::addmm_out(C, C, A, B, beta, 1);
}

at::Tensor mm(Provider p, const at::Tensor &A, const at::Tensor &B) {
    if (p == Provider::OneDNN && A.scalar_type() == at::kFloat) {
        at::Tensor a = A.stride(1) == 1 ? A : A.contiguous();
        at::Tensor b = B.stride(1) == 1 ? B : B.contiguous();
        at::Tensor c = at::empty({A.size(0), B.size(1)}, A.options());
        mm_into(p, a, b, 0.0, c);
        return c;
    }
    return at::cpu::mm(A, B);
}

// dst (cols x rows) = src (rows x cols)^T, converted to D, in kTile x kTile tiles: both sides
// of a tile stay in L1, and the threads share the tiles' column bands
template <typename S, typename D>
static void transpose_tiles(int64_t rows, int64_t cols, const S *src, D *dst) {
    constexpr int64_t kTile = 32;
    at::parallel_for(0, (cols + kTile - 1) / kTile, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t j0 = b0 * kTile; j0 < std::min(cols, b1 * kTile); j0 += kTile) {
            const int64_t j1 = std::min(cols, j0 + kTile);
            for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
                const int64_t i1 = std::min(rows, i0 + kTile);
                for (int64_t j = j0; j < j1; j++)
                    for (int64_t i = i0; i < i1; i++) dst[j * rows + i] = D(src[i * cols + j]);
            }
        }
    });
}

// X (2-D) as a row-major bfloat16 tensor. A transposed view of a float32 matrix (the weight
// gradient's dA^T) is converted and transposed in one blocked pass: converting first and then
// copying the strided view costs several times as much (a cache miss per element).
static at::Tensor bf16_rows(const at::Tensor &X) {
    if (X.scalar_type() != at::kFloat || X.is_contiguous() || !X.t().is_contiguous())
        return X.to(at::kBFloat16).contiguous();
    // X is the transpose of a contiguous (cols x rows) matrix
    at::Tensor out = at::empty({X.size(0), X.size(1)}, X.options().dtype(at::kBFloat16));
    transpose_tiles(X.size(1), X.size(0), X.const_data_ptr<float>(),
                    out.mutable_data_ptr<at::BFloat16>());
    return out;
}

at::Tensor transposed(const at::Tensor &W) {
    if (W.dim() != 2 || !W.is_contiguous() ||
        (W.scalar_type() != at::kFloat && W.scalar_type() != at::kDouble))
        return W.t().contiguous();
    at::Tensor out = at::empty({W.size(1), W.size(0)}, W.options());
    if (W.scalar_type() == at::kFloat)
        transpose_tiles(W.size(0), W.size(1), W.const_data_ptr<float>(),
                        out.mutable_data_ptr<float>());
    else
        transpose_tiles(W.size(0), W.size(1), W.const_data_ptr<double>(),
                        out.mutable_data_ptr<double>());
    return out;
}

at::Tensor mm_bf16(const at::Tensor &A, const at::Tensor &B) {
    at::Tensor a = bf16_rows(A), b = bf16_rows(B);
    at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
    if (c.numel() == 0) return c;
    if (a.size(1) == 0) return c.zero_();
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    const auto *A16 = reinterpret_cast<const uint16_t *>(a.const_data_ptr<at::BFloat16>());
    const auto *B16 = reinterpret_cast<const uint16_t *>(b.const_data_ptr<at::BFloat16>());
    if (m > 2 * kBlockM && bf16_fits(k, n)) {  // many row blocks read B: pack it once
        std::vector<uint16_t> packed((size_t)bf16_packed_size(k, n));
        bf16_pack(k, n, B16, n, packed.data());
        bf16_gemm_packed(m, n, k, A16, k, packed.data(), 0.0f, c.mutable_data_ptr<float>(), n, 0);
        return c;
    }
    bf16_gemm(m, n, k, A16, k, B16, n, 0.0f, c.mutable_data_ptr<float>(), n, 0);
    return c;
}

double gemm_probe(const std::string &provider, int64_t m, int64_t n, int64_t k, int64_t reps,
                  int64_t threads) {
    const bool bf16 = provider == "bf16";
    Provider p = bf16 ? Provider::Torch : provider_of(provider);
    // Operands filled without a random generator: probing must not move the user's seed
    // (a probe on first use would otherwise change which numbers a seeded run draws next).
    at::Tensor a = at::arange(m * k, at::kFloat).remainder_(7.0).sub_(3.0).view({m, k});
    at::Tensor b = at::arange(k * n, at::kFloat).remainder_(5.0).sub_(2.0).mul_(0.01).view({k, n});
    at::Tensor c = at::zeros({m, n});
    at::Tensor a16 = a.to(at::kBFloat16), b16 = b.to(at::kBFloat16);
    // threads == 1: the one-thread product of a row-split loop, on this thread alone (the
    // pool set to one thread meanwhile), timed in this thread's CPU time: what the kernel
    // costs, whatever else the machine runs. threads == 0: the pool, timed on the wall clock.
    const bool one = threads == 1;
    const int saved = at::get_num_threads();
    if (one) at::set_num_threads(1);
    // a packed layout the provider keeps itself is made once, outside the timing, as a time
    // loop makes it once per call
    const Gemms g = gemms(p, false);
    void *handle = !bf16 && g.packed.make ? g.packed.make(k, n, b.const_data_ptr<float>(), n)
                                          : nullptr;
    auto run = [&] {
        if (handle)
            g.packed.gemm_handle(m, n, k, a.const_data_ptr<float>(), k, handle, 1.0f,
                                 c.mutable_data_ptr<float>(), n, one ? 1 : 0);
        else if (bf16)
            bf16_gemm(m, n, k, reinterpret_cast<const uint16_t *>(a16.const_data_ptr<at::BFloat16>()),
                      k, reinterpret_cast<const uint16_t *>(b16.const_data_ptr<at::BFloat16>()), n,
                      1.0f, c.mutable_data_ptr<float>(), n, one ? 1 : 0);
        else
            g.f32(m, n, k, a.const_data_ptr<float>(), k, b.const_data_ptr<float>(),
                                n, 1.0f, c.mutable_data_ptr<float>(), n, one ? 1 : 0);
    };
    auto now = [&] {
        timespec ts;
        clock_gettime(one ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec * 1e-9;
    };
    run();  // warm-up: kernels generated, operands in cache
    double best = 1e30;
    for (int64_t r = 0; r < std::max<int64_t>(reps, 1); r++) {
        const double t0 = now();
        run();
        best = std::min(best, now() - t0);
    }
    if (one) at::set_num_threads(saved);
    if (handle) g.packed.free_handle(handle);
    return best;
}

}  // namespace glasslstm
