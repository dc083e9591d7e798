// CPU flatness kernels: one row (or probe row) at a time; the torch binding
// splits rows across threads. Arithmetic lives in flatness.h. Sums are "omp simd"
// reductions (vectorised, in lane-wise partial sums; -fopenmp-simd needs no runtime),
// the running max keeps kLanes partial maxima. The row loops are compiled for
// AVX-512, AVX2 and baseline x86-64 (PK_CPU_CLONES).
#include <algorithm>
#include <type_traits>

#include "flatness.h"

namespace pykernels::core {

namespace {

constexpr int kLanes = 8;

// Inlined into each multiversioned entry point below, so that they are compiled for its
// instruction set (a call would run the baseline x86-64 build).
#define PK_INLINE [[gnu::always_inline]] inline

// exp(x) for x <= 0 or NaN (a logit minus its row's maximum), in arithmetic the compiler
// vectorises: libm's exp is a scalar call, which made this kernel 2-3x slower than
// torch.logsumexp. x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two, so n ln2_hi is
// exact), e^r by its Taylor polynomial (truncation below 0.1 ulp), times 2^n built in the
// exponent bits. Below `lowest` (2^n would be subnormal) it returns 0: such a term joins a
// sum of at least 1, the row maximum's own term, and vanishes there as it would anyway.
template <typename A>
struct ExpNonPositive;
template <>
struct ExpNonPositive<float> {
  using Bits = int32_t;
  static constexpr float lowest = -87.0f, log2e = 1.44269504088896341f, shifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int degree = 7, bias = 127, mantissa = 23;
};
template <>
struct ExpNonPositive<double> {
  using Bits = int64_t;
  static constexpr double lowest = -708.0, log2e = 1.4426950408889634074, shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int degree = 13, bias = 1023, mantissa = 52;
};

// 1 / k! for k = 0 .. degree, computed at compile time.
template <typename A, int degree>
struct InverseFactorials {
  A value[degree + 1];
  constexpr InverseFactorials() : value() {
    A f = A(1);
    for (int k = 0; k <= degree; ++k) {
      if (k > 1) f *= A(k);
      value[k] = A(1) / f;
    }
  }
};

// sum_{k >= K}^{D} r^(k - K) / k!, by Horner, unrolled at compile time: every coefficient
// is a constant of the instruction stream.
template <typename A, int K, int D>
PK_INLINE A taylor_exp(A r) {
  constexpr A coefficient = InverseFactorials<A, D>().value[K];
  if constexpr (K == D) return coefficient;
  else return taylor_exp<A, K + 1, D>(r) * r + coefficient;
}

template <typename A>
PK_INLINE A exp_nonpositive(A x) {
  using C = ExpNonPositive<A>;
  const A xs = x >= C::lowest ? x : C::lowest;            // never NaN: n below is converted to an integer
  const A n = (xs * C::log2e + C::shifter) - C::shifter;  // round to nearest
  const A r = (xs - n * C::ln2_hi) - n * C::ln2_lo;
  const A p = taylor_exp<A, 0, C::degree>(r);
  const typename C::Bits bits = (typename C::Bits(n) + C::bias) << C::mantissa;
  A scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const A e = p * scale;
  const A in_range = x >= C::lowest ? e : A(0);  // selects, not branches: the loops vectorise
  return x == x ? in_range : x;
}

template <typename A>
PK_INLINE A lse_term_cpu(A x, A m) {
  const A e = exp_nonpositive(x - m);  // lse_term with the vectorisable exp
  return x == m ? A(1) : e;
}

// max(m, z[0..n)), ignoring NaN (lse_max_step), in kLanes partial maxima.
template <typename A>
PK_INLINE A max_of(const A* z, int64_t n, A m) {
  A lane_max[kLanes];
  for (int j = 0; j < kLanes; ++j) lane_max[j] = m;
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_max[j] = lse_max_step(lane_max[j], z[k + j]);
  for (; k < n; ++k) m = lse_max_step(m, z[k]);
  for (int j = 0; j < kLanes; ++j) m = lse_max_step(m, lane_max[j]);
  return m;
}

// sum_k lse_term(z[k], m) over z[0..n).
template <typename A>
PK_INLINE A sum_of_terms(const A* z, int64_t n, A m) {
  A sum = A(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += lse_term_cpu(z[k], m);
  return sum;
}

// Row logsumexp of z[0, cols), widened to A. 16-bit rows are widened a chunk at a time into a
// float buffer (GCC vectorises neither loop over the 16-bit structs) and run the float loops.
template <typename T, typename A = typename Elem<T>::Acc>
PK_INLINE A row_logsumexp(const T* z, int64_t cols) {
  if constexpr (std::is_same_v<T, A>) {
    const A m = max_of(z, cols, A(-INFINITY));
    return lse_finish(m, sum_of_terms(z, cols, m));
  } else {
    constexpr int64_t kChunk = 512;
    A buffer[kChunk];
    const auto widened = [&](int64_t begin) {
      const int64_t n = std::min(kChunk, cols - begin);
      for (int64_t j = 0; j < n; ++j) buffer[j] = Elem<T>::load(z + begin + j);
      return n;
    };
    A m = A(-INFINITY), sum = A(0);
    for (int64_t k = 0; k < cols; k += kChunk) m = max_of(buffer, widened(k), m);
    for (int64_t k = 0; k < cols; k += kChunk) sum += sum_of_terms(buffer, widened(k), m);
    return lse_finish(m, sum);
  }
}

template <typename T>
PK_INLINE T dot(const T* a, const T* b, int64_t n) {
  T total = T(0);
#pragma omp simd reduction(+ : total)
  for (int64_t d = 0; d < n; ++d) total += a[d] * b[d];
  return total;
}

}  // namespace

template <typename T>
PK_INLINE void energy_rows(const EnergyProblem<T>& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) p.out[r] = -row_logsumexp(p.logits + r * p.row_stride, p.cols);
}

template <typename T>
PK_INLINE void logsumexp_hvp_rows(const LseHvpProblem<T>& p, int64_t row_begin, int64_t row_end) {
  const int64_t K = p.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* z = p.logits + r * p.logits_row_stride;
    const T lse = row_logsumexp(z, K);
    T* s = p.softmax + r * K;
    // softmax_at, with the vectorisable exp (z - lse <= 0 or NaN when lse is finite)
    if (lse == T(INFINITY))
      for (int64_t k = 0; k < K; ++k) s[k] = T(NAN);
    else
      for (int64_t k = 0; k < K; ++k) s[k] = exp_nonpositive(z[k] - lse);
    p.energy[r] = -lse;
    for (int64_t i = 0; i < p.samples; ++i) {
      const T* u = p.tangents + i * p.tangent_sample_stride + r * p.tangent_row_stride;
      T* h = p.hvp + (i * p.rows + r) * K;
      const T su = dot(s, u, K);
      for (int64_t k = 0; k < K; ++k) h[k] = lse_hvp_at(s[k], u[k], su);
    }
  }
}

template <typename T>
PK_INLINE void fill_probes(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset, ProbeKind kind) {
  const ProbeKey key = probe_key(seed);
  // Elements whose index shares its high 32 bits share probe_bits' block key: hoist
  // it, so the inner loops are pure 32-bit integer arithmetic (vectorised).
  for (int64_t i = begin; i < end;) {
    const uint64_t index = offset + uint64_t(i);
    const uint64_t to_boundary = (uint64_t(1) << 32) - (index & 0xffffffffu);
    const int64_t stop = uint64_t(end - i) < to_boundary ? end : i + int64_t(to_boundary);
    const uint32_t block = mix32(uint32_t(index >> 32) ^ key.k1);
    const uint32_t lo = uint32_t(index);
    T* o = out + i;
    const int64_t n = stop - i;
    if (kind == ProbeKind::Rademacher) {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t r = mix32(mix32((lo + uint32_t(j)) ^ block) ^ key.k2);
        o[j] = T(1) - T(2) * T(r >> 31);  // = rademacher_from_bits(r)
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t a = mix32((lo + uint32_t(j)) ^ block);
        o[j] = gaussian_from_bits<T>(mix32(a ^ key.k2), mix32(a ^ key.k2 ^ 0x27d4eb2fu));
      }
    }
    i = stop;
  }
}

template <typename T>
PK_INLINE void probe_dots_rows(const ProbeDotsProblem<T>& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t s = r / p.batch, b = r % p.batch;
    p.out[r] = dot(p.v + s * p.v_sample_stride + b * p.v_batch_stride,
                   p.w + s * p.w_sample_stride + b * p.w_batch_stride, p.dim);
  }
}

// One pass over each row: the tangent is read once and written once, and nothing is allocated
// (the point of fusing: a fresh S x B x D temporary costs more in page faults than in arithmetic).
template <typename T>
PK_INLINE void curvature_step_rows(const CurvatureStepProblem<T>& p, int64_t row_begin, int64_t row_end) {
  const int64_t n = p.dim;
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* __restrict__ t = p.tangents + r * n;
    const T* __restrict__ d1 = p.d1 + (r % p.period) * n;
    const T* __restrict__ c2 = p.c2 + (r % p.period) * n;
    T total = T(0);
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      const T v = t[j];
      total += c2[j] * v * v;
      t[j] = v * d1[j];
    }
    p.out[r] = total;
  }
}

// The entry points: one multiversioned (PK_CPU_CLONES) function per op and element type.
#define PK_ROWS_ENTRY(entry, body, Problem, T)                                              \
  namespace {                                                                               \
  PK_CPU_CLONES void body##_simd(const Problem<T>& p, int64_t row_begin, int64_t row_end) { \
    body(p, row_begin, row_end);                                                            \
  }                                                                                         \
  }                                                                                         \
  template <>                                                                               \
  void entry(const Problem<T>& p, int64_t row_begin, int64_t row_end) {                     \
    body##_simd(p, row_begin, row_end);                                                     \
  }

PK_ROWS_ENTRY(energy_rows_cpu, energy_rows, EnergyProblem, float)
PK_ROWS_ENTRY(energy_rows_cpu, energy_rows, EnergyProblem, double)
PK_ROWS_ENTRY(energy_rows_cpu, energy_rows, EnergyProblem, Float16Bits)
PK_ROWS_ENTRY(energy_rows_cpu, energy_rows, EnergyProblem, BFloat16Bits)
PK_ROWS_ENTRY(logsumexp_hvp_rows_cpu, logsumexp_hvp_rows, LseHvpProblem, float)
PK_ROWS_ENTRY(logsumexp_hvp_rows_cpu, logsumexp_hvp_rows, LseHvpProblem, double)
PK_ROWS_ENTRY(probe_dots_rows_cpu, probe_dots_rows, ProbeDotsProblem, float)
PK_ROWS_ENTRY(probe_dots_rows_cpu, probe_dots_rows, ProbeDotsProblem, double)
PK_ROWS_ENTRY(curvature_step_rows_cpu, curvature_step_rows, CurvatureStepProblem, float)
PK_ROWS_ENTRY(curvature_step_rows_cpu, curvature_step_rows, CurvatureStepProblem, double)
#undef PK_ROWS_ENTRY

// The Rademacher hash vectorises (32-bit integer multiplies); the Gaussians' log and cos are libm calls.
#define PK_FILL_ENTRY(T)                                                                                     \
  namespace {                                                                                                \
  PK_CPU_CLONES void fill_probes_simd(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset,    \
                                      ProbeKind kind) {                                                      \
    fill_probes(out, begin, end, seed, offset, kind);                                                        \
  }                                                                                                          \
  }                                                                                                          \
  template <>                                                                                                \
  void fill_probes_cpu(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset, ProbeKind kind) { \
    fill_probes_simd(out, begin, end, seed, offset, kind);                                                   \
  }
PK_FILL_ENTRY(float)
PK_FILL_ENTRY(double)
#undef PK_FILL_ENTRY
#undef PK_INLINE

}  // namespace pykernels::core
