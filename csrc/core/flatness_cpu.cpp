// CPU flatness kernels: one row (or probe row) at a time; the torch binding
// splits rows across threads. Arithmetic lives in flatness.h; the loops keep
// kLanes independent partial results so the compiler can vectorise them (a
// single running sum would serialise on the add latency).
#include "flatness.h"

namespace pykernels::core {

namespace {

constexpr int kLanes = 8;

// Row maximum and logsumexp of z[0, cols), widened to A.
template <typename T, typename A = typename Elem<T>::Acc>
A row_logsumexp(const T* z, int64_t cols) {
  A lane_max[kLanes], lane_sum[kLanes] = {};
  for (int j = 0; j < kLanes; ++j) lane_max[j] = A(-INFINITY);
  int64_t k = 0;
  for (; k + kLanes <= cols; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_max[j] = lse_max_step(lane_max[j], Elem<T>::load(z + k + j));
  A m = A(-INFINITY);
  for (; k < cols; ++k) m = lse_max_step(m, Elem<T>::load(z + k));
  for (int j = 0; j < kLanes; ++j) m = lse_max_step(m, lane_max[j]);
  A sum = A(0);
  for (k = 0; k + kLanes <= cols; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_sum[j] += lse_term(Elem<T>::load(z + k + j), m);
  for (; k < cols; ++k) sum += lse_term(Elem<T>::load(z + k), m);
  for (int j = 0; j < kLanes; ++j) sum += lane_sum[j];
  return lse_finish(m, sum);
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += a[d + j] * b[d + j];
  T total = T(0);
  for (; d < n; ++d) total += a[d] * b[d];
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
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
      const T su = dot(s, u, K);
      for (int64_t k = 0; k < K; ++k) h[k] = lse_hvp_at(s[k], u[k], su);
    }
  }
}

template <typename T>
void fill_probes_cpu(T* out, int64_t begin, int64_t end, uint64_t seed, uint64_t offset, ProbeKind kind) {
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
void probe_dots_rows_cpu(const ProbeDotsProblem<T>& p, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t s = r / p.batch, b = r % p.batch;
    p.out[r] = dot(p.v + s * p.v_sample_stride + b * p.v_batch_stride,
                   p.w + s * p.w_sample_stride + b * p.w_batch_stride, p.dim);
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
