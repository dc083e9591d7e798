// AVX-512 build of the CPU probe kernel. probe_scores_cpu.cpp calls it only
// after checking the CPU, so the rest of the library needs no AVX-512.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Everything shared with other instruction sets is included before the
// target switch, so its inline functions are compiled for the baseline ISA.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "probe_guard.h"
#include "probe_scores.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 warns about its own intrinsic headers' deliberate self-initialisation.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,fma,f16c")
#endif

#define PK_KERNEL_NS avx512
#define PK_SIMD_AVX512
#include "probe_scores_cpu_kernel.h"

namespace pykernels::core {
void probe_logits_cpu_avx512(const ProbeScoresProblem& p, int64_t b, int64_t t0, int64_t t1) {
  avx512::probe_logits_tile_any_dtype(p, b, t0, t1);
}
void probe_accumulate_cpu_avx512(const AccumulateProblem& p, int64_t n0, int64_t n1) {
  avx512::accumulate_rows_any_dtype(p, n0, n1);
}
}  // namespace pykernels::core

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
