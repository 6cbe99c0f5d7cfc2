// The matrix products the kernels call, through torch's own routines (gemm.cpp).
//
// Two providers for float32 products:
//   "torch"   torch.addmm's own path on the CPU (at::cpu::addmm_out): the BLAS torch was built
//             with (MKL on x86 builds), threaded by it;
//   "onednn"  oneDNN's batch-reduce GEMM micro-kernel as torch exposes it
//             (at::native::cpublas::brgemm), blocked over the columns here and threaded with
//             OpenMP; where oneDNN cannot run it, torch falls back to its BLAS inside.
//   "onednn_linear"  for the per-step products of a time loop only: oneDNN's inner product
//             (what torch.nn.Linear runs through mkldnn) on the weight reordered once per call
//             into oneDNN's own layout (torch.ops.mkldnn._reorder_linear_weight); the large
//             products of a layer then take torch's path.
// Which one a product uses is chosen per machine by measurement (glasslstm.ops.gemm), per role:
// the per-step recurrent product, and the large products over all steps (input projection,
// input and weight gradients). float64 always takes "torch"; bfloat16 products (autocast) take
// torch's bf16 GEMM with a float32 result (cpublas::brgemm without VNNI packing: MKL's or
// oneDNN's bf16 kernels), and only where they beat float32 on this machine.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "kernels.h"

namespace glasslstm {

enum class Provider { Torch = 0, OneDNN = 1, OneDNNLinear = 2 };

Provider provider_of(const std::string &name);  // "torch" | "onednn" | "onednn_linear"
Gemms gemms(Provider step, bool bf16);

// Row-major C = A B + beta C on tensors (2-D, any strides torch's mm takes), by `p`.
void mm_into(Provider p, const at::Tensor &A, const at::Tensor &B, double beta, at::Tensor &C);
at::Tensor mm(Provider p, const at::Tensor &A, const at::Tensor &B);
// A (m x k) B (k x n) with bfloat16 operands (converted here when float32), float32 result
at::Tensor mm_bf16(const at::Tensor &A, const at::Tensor &B);
// W^T as a contiguous tensor, for a 2-D W: copied tile by tile where W is contiguous (torch's
// W.t().contiguous() walks one side with a stride and took 1.1 ms for a 2048 x 512 weight,
// the tiles 0.2 ms)
at::Tensor transposed(const at::Tensor &W);

// Seconds per product of (m x k) (k x n) by `provider` ("torch", "onednn", "bf16"), measured
// here: the best of `reps` timed calls after a warm-up. threads 1: a one-thread product, in
// the thread's CPU time (unaffected by other processes); 0: the pool, wall-clock time.
double gemm_probe(const std::string &provider, int64_t m, int64_t n, int64_t k, int64_t reps,
                  int64_t threads);
}  // namespace glasslstm
