// Kernels behind pykernels.flatness (docs: pykernels/flatness/ops.py):
//   energy          E = -logsumexp(z) per row of logits z [N, K]
//   logsumexp_hvp   softmax s, energy and (diag(s) - s s^T) u for S tangents u [S, N, K],
//                   i.e. the Hessian of logsumexp in logit space applied to each tangent
//   fill_probes     Rademacher / Gaussian probe vectors from (seed, element index)
//   probe_dots      per-row dot products v . w over [R, D] (R = S*B probe rows)
//   curvature_step  one elementwise op of a forward tangent pass: q = sum c2 t^2 per row of
//                   tangents t [R, D], and t *= d1 in place (factor rows repeat with period P)
//
// Torch-free. The per-element arithmetic below is shared by the CPU (flatness_cpu.cpp)
// and CUDA (flatness_cuda.cu) kernels, and the C++ tests check it directly.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace pykernels::core {

// ---- element types (Storage<D> of common.h's DType) ----

// Acc: the type a kernel computes in; load widens one element exactly.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  static PK_HD float load(const float* p) { return *p; }
};
template <>
struct Elem<double> {
  using Acc = double;
  static PK_HD double load(const double* p) { return *p; }
};
template <>
struct Elem<Float16Bits> {
  using Acc = float;
  static PK_HD float load(const Float16Bits* p) { return f16_bits_to_float(p->bits); }
};
template <>
struct Elem<BFloat16Bits> {
  using Acc = float;
  static PK_HD float load(const BFloat16Bits* p) { return bf16_bits_to_float(p->bits); }
};

PK_HD float pk_exp(float x) { return expf(x); }
PK_HD double pk_exp(double x) { return exp(x); }
PK_HD float pk_log(float x) { return logf(x); }
PK_HD double pk_log(double x) { return log(x); }
PK_HD float pk_sqrt(float x) { return sqrtf(x); }
PK_HD double pk_sqrt(double x) { return sqrt(x); }
PK_HD float pk_cos(float x) { return cosf(x); }
PK_HD double pk_cos(double x) { return cos(x); }

// ---- logsumexp with IEEE special values ----
//
// lse = m + log(sum_k term(z_k, m)) with m = max_k z_k, in two sweeps over a row
// that stays in cache. term(x, m) is 1 when x == m, so rows whose maximum is +inf
// or -inf need no inf - inf: all -inf gives -inf (so does an empty row), any +inf
// gives +inf, and a NaN anywhere gives NaN (its term is NaN). Matches torch.logsumexp.

template <typename A>
PK_HD A lse_max_step(A m, A x) {
  return x > m ? x : m;  // NaN never becomes the maximum; its term makes the sum NaN
}

template <typename A>
PK_HD A lse_term(A x, A m) {
  return x == m ? A(1) : pk_exp(x - m);
}

template <typename A>
PK_HD A lse_finish(A m, A sum) {
  if (m == A(INFINITY) && sum == sum) return m;
  return m + pk_log(sum);
}

// Softmax entry from the row's logsumexp: exp(z - lse). A row whose lse is not
// finite (a NaN or +inf logit, or all -inf) is NaN throughout, as in torch.softmax.
template <typename A>
PK_HD A softmax_at(A z, A lse) {
  return lse == A(INFINITY) ? A(NAN) : pk_exp(z - lse);
}

// One entry of (diag(s) - s s^T) u = s * (u - s.u), given dot = s.u.
template <typename A>
PK_HD A lse_hvp_at(A s, A u, A dot) {
  return s * (u - dot);
}

// ---- probe vectors from (seed, index) ----
//
// Counter-based: element `index` of the stream of `seed` is a pure function of the
// two, so every backend, any launch shape and any chunking over probes produce the
// same probes. mix32 is the "lowbias32" integer hash (C. Wellons, hash-prospector).

enum class ProbeKind : int { Rademacher = 0, Gaussian = 1 };

PK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Two 32-bit keys per seed, computed once per launch.
struct ProbeKey {
  uint32_t k1, k2;
};

PK_HD ProbeKey probe_key(uint64_t seed) {
  const uint32_t k1 = mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) ^ 0x9e3779b9u));
  return ProbeKey{k1, mix32(k1 ^ 0x85ebca6bu)};
}

// 32 random bits for `index`; stream 0 and 1 are independent draws (Gaussian needs two).
// (fill_probes_cpu inlines this with the block key hoisted; keep the two in step.)
PK_HD uint32_t probe_bits(ProbeKey key, uint64_t index, uint32_t stream) {
  const uint32_t block = mix32(uint32_t(index >> 32) ^ key.k1);
  const uint32_t a = mix32(uint32_t(index) ^ block);
  return mix32(a ^ key.k2 ^ (stream ? 0x27d4eb2fu : 0u));
}

// +1 or -1 from the top bit.
template <typename A>
PK_HD A rademacher_from_bits(uint32_t r) {
  return (r >> 31) ? A(-1) : A(1);
}

// Box-Muller on two 24-bit uniforms: u1 in (0, 1) (never 0), u2 in [0, 1). Computed in
// double for every output type, then rounded: float32 log / cos differ across libraries
// (CPU libm, CUDA, Triton) by a few ulps, double ones by at most one, which the rounding
// to float absorbs, so every backend gives the same float32 probes.
template <typename A>
PK_HD A gaussian_from_bits(uint32_t r1, uint32_t r2) {
  const double u1 = (double(r1 >> 8) + 0.5) * 5.9604644775390625e-08;  // 2^-24
  const double u2 = double(r2 >> 8) * 5.9604644775390625e-08;
  return A(pk_sqrt(-2.0 * pk_log(u1)) * pk_cos(6.283185307179586 * u2));
}

template <typename A>
PK_HD A probe_value(ProbeKey key, uint64_t index, ProbeKind kind) {
  const uint32_t r1 = probe_bits(key, index, 0);
  if (kind == ProbeKind::Rademacher) return rademacher_from_bits<A>(r1);
  return gaussian_from_bits<A>(r1, probe_bits(key, index, 1));
}

// ---- problems (raw pointers, strides in elements; the last dim is unit-stride) ----

template <typename T>
struct EnergyProblem {
  const T* logits;  // [rows, cols], row stride below
  int64_t row_stride;
  int64_t rows, cols;
  typename Elem<T>::Acc* out;  // [rows], contiguous
};

template <typename T>  // float or double
struct LseHvpProblem {
  const T* logits;  // [rows, cols]
  int64_t logits_row_stride;
  const T* tangents;  // [samples, rows, cols]
  int64_t tangent_sample_stride, tangent_row_stride;
  int64_t samples, rows, cols;
  T* softmax;  // [rows, cols], contiguous
  T* energy;   // [rows]
  T* hvp;      // [samples, rows, cols], contiguous
};

template <typename T>  // float or double
struct ProbeDotsProblem {
  const T* v;  // [samples, batch, dim]
  int64_t v_sample_stride, v_batch_stride;
  const T* w;
  int64_t w_sample_stride, w_batch_stride;
  int64_t samples, batch, dim;
  T* out;  // [samples, batch], contiguous
};

// Row r of the tangents [rows, dim] (contiguous, written in place) takes factor row r % period
// of d1 and c2 [period, dim] (contiguous): out[r] = sum_j c2 t_j^2, then t *= d1.
template <typename T>
struct CurvatureStepProblem {
  T* tangents;
  const T* d1;
  const T* c2;
  int64_t rows, period, dim;
  T* out;  // [rows]
};

// ---- CPU entry points (flatness_cpu.cpp); thread-safe for disjoint row ranges ----

template <typename T>
void energy_rows_cpu(const EnergyProblem<T>& p, int64_t row_begin, int64_t row_end);

template <typename T>
void logsumexp_hvp_rows_cpu(const LseHvpProblem<T>& p, int64_t row_begin, int64_t row_end);

// out[i] = probe value of element offset + i, for i in [begin, end).
template <typename T>
void fill_probes_cpu(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset, ProbeKind kind);

// Rows r = s * batch + b in [row_begin, row_end).
template <typename T>
void probe_dots_rows_cpu(const ProbeDotsProblem<T>& p, int64_t row_begin, int64_t row_end);

template <typename T>
void curvature_step_rows_cpu(const CurvatureStepProblem<T>& p, int64_t row_begin, int64_t row_end);

// ---- CUDA entry points (flatness_cuda.cu); `stream` is a cudaStream_t, pointers are
// device memory, nothing allocates or syncs; throws std::runtime_error on a CUDA error ----

template <typename T>
void energy_cuda(const EnergyProblem<T>& p, void* stream);

template <typename T>
void logsumexp_hvp_cuda(const LseHvpProblem<T>& p, void* stream);

// out holds `count` contiguous elements.
template <typename T>
void fill_probes_cuda(T* out, int64_t count, uint64_t seed, uint64_t offset, ProbeKind kind, void* stream);

template <typename T>
void probe_dots_cuda(const ProbeDotsProblem<T>& p, void* stream);

template <typename T>
void curvature_step_cuda(const CurvatureStepProblem<T>& p, void* stream);

}  // namespace pykernels::core
