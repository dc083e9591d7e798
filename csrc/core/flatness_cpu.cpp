// CPU flatness kernels: one row (or probe row) at a time; the torch binding
// splits rows across threads. Arithmetic lives in flatness.h.
#include "flatness.h"

namespace pykernels::core {

namespace {

// Row maximum and logsumexp of z[0, cols), widened to A.
template <typename T, typename A = typename Elem<T>::Acc>
A row_logsumexp(const T* z, int64_t cols) {
  A m = A(-INFINITY);
  for (int64_t k = 0; k < cols; ++k) m = lse_max_step(m, Elem<T>::load(z + k));
  A sum = A(0);
  for (int64_t k = 0; k < cols; ++k) sum += lse_term(Elem<T>::load(z + k), m);
  return lse_finish(m, sum);
}

}  // namespace

template <typename T>
void energy_rows_cpu(const EnergyProblem<T>& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) p.out[r] = -row_logsumexp(p.logits + r * p.row_stride, p.cols);
}

template <typename T>
void logsumexp_hvp_rows_cpu(const LseHvpProblem<T>& p, int64_t row_begin, int64_t row_end) {
  const int64_t K = p.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* z = p.logits + r * p.logits_row_stride;
    const T lse = row_logsumexp(z, K);
    T* s = p.softmax + r * K;
    for (int64_t k = 0; k < K; ++k) s[k] = softmax_at(z[k], lse);
    p.energy[r] = -lse;
    for (int64_t i = 0; i < p.samples; ++i) {
      const T* u = p.tangents + i * p.tangent_sample_stride + r * p.tangent_row_stride;
      T* h = p.hvp + (i * p.rows + r) * K;
      T dot = T(0);
      for (int64_t k = 0; k < K; ++k) dot += s[k] * u[k];
      for (int64_t k = 0; k < K; ++k) h[k] = lse_hvp_at(s[k], u[k], dot);
    }
  }
}

template <typename T>
void fill_probes_cpu(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset, ProbeKind kind) {
  const ProbeKey key = probe_key(seed);
  for (int64_t i = begin; i < end; ++i) out[i] = probe_value<T>(key, offset + uint64_t(i), kind);
}

template <typename T>
void probe_dots_rows_cpu(const ProbeDotsProblem<T>& p, int64_t row_begin, int64_t row_end) {
  constexpr int kLanes = 8;  // independent partial sums: the compiler vectorises them
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t s = r / p.batch, b = r % p.batch;
    const T* v = p.v + s * p.v_sample_stride + b * p.v_batch_stride;
    const T* w = p.w + s * p.w_sample_stride + b * p.w_batch_stride;
    T part[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= p.dim; d += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += v[d + j] * w[d + j];
    T total = T(0);
    for (; d < p.dim; ++d) total += v[d] * w[d];
    for (int j = 0; j < kLanes; ++j) total += part[j];
    p.out[r] = total;
  }
}

template void energy_rows_cpu(const EnergyProblem<float>&, int64_t, int64_t);
template void energy_rows_cpu(const EnergyProblem<double>&, int64_t, int64_t);
template void energy_rows_cpu(const EnergyProblem<Float16Bits>&, int64_t, int64_t);
template void energy_rows_cpu(const EnergyProblem<BFloat16Bits>&, int64_t, int64_t);
template void logsumexp_hvp_rows_cpu(const LseHvpProblem<float>&, int64_t, int64_t);
template void logsumexp_hvp_rows_cpu(const LseHvpProblem<double>&, int64_t, int64_t);
template void fill_probes_cpu(float*, int64_t, int64_t, uint64_t, uint64_t, ProbeKind);
template void fill_probes_cpu(double*, int64_t, int64_t, uint64_t, uint64_t, ProbeKind);
template void probe_dots_rows_cpu(const ProbeDotsProblem<float>&, int64_t, int64_t);
template void probe_dots_rows_cpu(const ProbeDotsProblem<double>&, int64_t, int64_t);

}  // namespace pykernels::core
