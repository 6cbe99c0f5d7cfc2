// The matrix products of gemm.h.
#include "gemm.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <chrono>
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

void onednn_tile(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                 int64_t ldb, bool add, float *C, int64_t ldc) {
    for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
        const int64_t kb = std::min(kBlockK, k - k0);
        at::native::cpublas::brgemm(m, n, kb, lda, ldb, ldc, add || k0 > 0, A + k0, B + k0 * ldb,
                                    C, false);
    }
}

void onednn_gemm(int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                 int64_t ldb, float beta, float *C, int64_t ldc, int threads) {
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

}  // namespace

Provider provider_of(const std::string &name) {
    if (name == "torch") return Provider::Torch;
    if (name == "onednn") return Provider::OneDNN;
    throw std::invalid_argument("glasslstm: unknown GEMM provider '" + name +
                                "'; use 'torch' or 'onednn'");
}

Gemms gemms(Provider step, bool bf16) {
    Gemms g;
    g.f32 = step == Provider::OneDNN ? onednn_gemm : torch_gemm<float>;
    g.f64 = torch_gemm<double>;
    g.bf16 = bf16 ? bf16_gemm : nullptr;
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

at::Tensor mm_bf16(const at::Tensor &A, const at::Tensor &B) {
    at::Tensor a = A.to(at::kBFloat16).contiguous(), b = B.to(at::kBFloat16).contiguous();
    at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
    if (c.numel() == 0) return c;
    if (a.size(1) == 0) return c.zero_();
    bf16_gemm(a.size(0), b.size(1), a.size(1),
              reinterpret_cast<const uint16_t *>(a.const_data_ptr<at::BFloat16>()), a.size(1),
              reinterpret_cast<const uint16_t *>(b.const_data_ptr<at::BFloat16>()), b.size(1),
              0.0f, c.mutable_data_ptr<float>(), c.size(1), 0);
    return c;
}

double gemm_probe(const std::string &provider, int64_t m, int64_t n, int64_t k, int64_t reps,
                  int64_t threads) {
    const bool bf16 = provider == "bf16";
    Provider p = bf16 ? Provider::Torch : provider_of(provider);
    at::Tensor a = at::randn({m, k}), b = at::randn({k, n}).mul_(0.01), c = at::zeros({m, n});
    at::Tensor a16 = a.to(at::kBFloat16), b16 = b.to(at::kBFloat16);
    auto run = [&] {
        if (bf16)
            bf16_gemm(m, n, k, reinterpret_cast<const uint16_t *>(a16.const_data_ptr<at::BFloat16>()),
                      k, reinterpret_cast<const uint16_t *>(b16.const_data_ptr<at::BFloat16>()), n,
                      1.0f, c.mutable_data_ptr<float>(), n, (int)threads);
        else
            gemms(p, false).f32(m, n, k, a.const_data_ptr<float>(), k, b.const_data_ptr<float>(),
                                n, 1.0f, c.mutable_data_ptr<float>(), n, (int)threads);
    };
    auto timed = [&] {
        auto t0 = std::chrono::steady_clock::now();
        run();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    // threads == 1: as inside a row-split loop, every thread of the pool runs its own product
    // on its own rows at the same time (one-thread products); the wall time of the region
    std::vector<at::Tensor> cs;
    auto once = [&] {
#ifdef _OPENMP
        if (threads == 1 && omp_get_max_threads() > 1) {
            const int nt = omp_get_max_threads();
            while ((int)cs.size() < nt) cs.push_back(at::zeros({m, n}));
            auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
            {
                float *cp = cs[omp_get_thread_num()].mutable_data_ptr<float>();
                if (bf16)
                    bf16_gemm(m, n, k,
                              reinterpret_cast<const uint16_t *>(a16.const_data_ptr<at::BFloat16>()),
                              k, reinterpret_cast<const uint16_t *>(b16.const_data_ptr<at::BFloat16>()),
                              n, 1.0f, cp, n, 1);
                else
                    gemms(p, false).f32(m, n, k, a.const_data_ptr<float>(), k,
                                        b.const_data_ptr<float>(), n, 1.0f, cp, n, 1);
            }
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
#endif
        return timed();
    };
    double best = 1e30;
    once();  // warm-up: kernels generated, operands in cache
    for (int64_t r = 0; r < std::max<int64_t>(reps, 1); r++) best = std::min(best, once());
    return best;
}

}  // namespace glasslstm
