// The kernels of kernels.h, compiled once per x86 instruction-set level (AVX-512, AVX2 + FMA,
// baseline) from the one source in kernels_impl.h; kernels() picks the best level the CPU runs,
// once. The build is therefore portable: a package built on one machine runs on another, and
// each machine gets the vector width it has.
#include "kernels.h"

#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads() { return 1; }
static inline int omp_get_num_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
static inline int omp_in_parallel() { return 0; }
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GL_X86 1
#endif

namespace glasslstm {

#ifdef GL_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2,prefer-vector-width=512")
namespace isa_avx512 {
#define GL_ISA_NAME "avx512"
#include "kernels_impl.h"
#undef GL_ISA_NAME
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace isa_avx2 {
#define GL_ISA_NAME "avx2"
#include "kernels_impl.h"
#undef GL_ISA_NAME
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_base {
#define GL_ISA_NAME "baseline"
#include "kernels_impl.h"
#undef GL_ISA_NAME
}  // namespace isa_base

const Kernels &kernels() {
    static const Kernels *chosen = [] {
#ifdef GL_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
            return &isa_avx512::table;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return &isa_avx2::table;
#endif
        return &isa_base::table;
    }();
    return *chosen;
}

int loop_threads(int64_t B, size_t weight_bytes) { return isa_base::row_threads(B, weight_bytes); }

unsigned int fp_mode() {
#ifdef GL_X86
    return _mm_getcsr();
#else
    return 0;
#endif
}

}  // namespace glasslstm
