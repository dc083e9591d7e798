// CPU probe scoring: picks the SIMD build of the logit kernels (probe_scores,
// probe_accumulate_) for this CPU and implements the (cheap, sequential)
// smoothing pass.
#include <cstdlib>
#include <cstring>

#include "probe_guard.h"
#include "probe_scores.h"

#define PK_KERNEL_NS scalar
#include "probe_scores_cpu_kernel.h"

namespace pykernels::core {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
void probe_logits_cpu_avx512(const ProbeScoresProblem& p, int64_t b, int64_t t0, int64_t t1);
void probe_logits_cpu_avx2(const ProbeScoresProblem& p, int64_t b, int64_t t0, int64_t t1);
void probe_accumulate_cpu_avx512(const AccumulateProblem& p, int64_t n0, int64_t n1);
void probe_accumulate_cpu_avx2(const AccumulateProblem& p, int64_t n0, int64_t n1);
#define PK_HAVE_X86_DISPATCH 1
#endif

namespace {

enum class Isa { Scalar, Avx2, Avx512 };

Isa best_isa() {
#ifdef PK_HAVE_X86_DISPATCH
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Scalar;
}

// PYKERNELS_CPU_ISA=scalar|avx2|avx512 lowers the instruction set (tests use it
// to exercise every build on one machine); it never raises it above the CPU's.
Isa active_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("PYKERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "scalar") == 0) want = Isa::Scalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  return want < best ? want : best;
}

}  // namespace

const char* probe_scores_cpu_isa() {
  switch (active_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

void probe_logits_cpu(const ProbeScoresProblem& p, int64_t b, int64_t t0, int64_t t1) {
  switch (active_isa()) {
#ifdef PK_HAVE_X86_DISPATCH
    case Isa::Avx512: probe_logits_cpu_avx512(p, b, t0, t1); return;
    case Isa::Avx2: probe_logits_cpu_avx2(p, b, t0, t1); return;
#endif
    default: scalar::probe_logits_tile_any_dtype(p, b, t0, t1); return;
  }
}

void probe_accumulate_cpu(const AccumulateProblem& p, int64_t n0, int64_t n1) {
  switch (active_isa()) {
#ifdef PK_HAVE_X86_DISPATCH
    case Isa::Avx512: probe_accumulate_cpu_avx512(p, n0, n1); return;
    case Isa::Avx2: probe_accumulate_cpu_avx2(p, n0, n1); return;
#endif
    default: scalar::accumulate_rows_any_dtype(p, n0, n1); return;
  }
}

void smooth_sequence_cpu(const ProbeScoresProblem& p, int64_t b, Smoothing smoothing, int64_t window, float alpha) {
  const int64_t T = p.seq_len, K = p.heads;
  const int64_t len = clamped_length(p.lengths, b, T);
  float* z = p.out + b * T * K;
  if (smoothing == Smoothing::Swim && window > 1) {
    // In place, newest token first: out[t] reads z[t - window + 1 .. t], none of
    // which has been overwritten yet.
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = len - 1; t >= 0; --t) z[t * K + k] = swim_at(z + k, K, t, window);
  } else if (smoothing == Smoothing::Ema) {
    for (int64_t k = 0; k < K; ++k) {
      float e = 0.f;
      for (int64_t t = 0; t < len; ++t) {
        e = ema_apply(ema_token_map(z[t * K + k], alpha, t == 0), e);
        z[t * K + k] = e;
      }
    }
  }
  for (int64_t i = len * K; i < T * K; ++i) z[i] = 0.f;
}

}  // namespace pykernels::core
