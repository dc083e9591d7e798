// CPU kernels of the probe guard: the streaming step and the fused training
// loss (probe_accumulate's CPU kernel shares the SIMD dot products of
// probe_scores and lives with them in probe_scores_cpu*.cpp).
#include <algorithm>
#include <limits>
#include <vector>

#include "probe_guard.h"

namespace pykernels::core {

void probe_stream_step_cpu(const StreamStepProblem& p) {
  const int64_t step = ++p.status[0];
  int64_t error = 0;
  for (int64_t r = 0; r < p.rows; ++r) {  // check every row before touching any state
    const int64_t s = p.slot_ids[r];
    if (s < 0 || s >= p.slots) {
      error |= kSlotOutOfRange;
      continue;
    }
    int64_t& stamp = p.meta[s * kMetaFields + kMetaStamp];
    if (stamp == step) error |= kSlotDuplicated;
    stamp = step;
  }
  p.status[1] |= error;
  for (int64_t r = 0; r < p.rows; ++r) {
    if (error) stream_fail_row(p, r);
    else stream_step_row(p, r);
  }
}

namespace {

template <typename T>
void swbce_sequence(const SwbceProblem& p, int64_t b) {
  const int64_t T_ = p.seq_len, M = p.window;
  const T* z = static_cast<const T*>(p.logits) + b * T_;
  const T y = static_cast<const T*>(p.labels)[b];
  const T tau = T(p.tau);
  const int64_t n = swbce_length(p.lengths, b, p.seq_len);
  const int64_t first = swbce_first_prediction(n, M);

  std::vector<T> zbar(size_t(n - first));
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t t = first; t < n; ++t) {
    zbar[t - first] = swim_at(z, 1, t, M);
    top = std::max(top, zbar[t - first] / tau);
  }
  if (!(top > -std::numeric_limits<T>::infinity())) top = T(0);  // all -inf or NaN: let NaN through below
  T denom = T(0), weighted = T(0);
  for (int64_t t = first; t < n; ++t) {
    const T e = exp(zbar[t - first] / tau - top);
    denom += e;
    weighted += e * swbce_bce(y, zbar[t - first]);
  }
  const T loss = weighted / denom;
  static_cast<T*>(p.loss)[b] = loss;
  if (p.grad == nullptr) return;

  T* grad = static_cast<T*>(p.grad) + b * T_;
  // d loss / d zbar_t, divided by the window's token count, in place of zbar.
  for (int64_t t = first; t < n; ++t) {
    const T w = exp(zbar[t - first] / tau - top) / denom;
    zbar[t - first] = swbce_dzbar(w, zbar[t - first], y, loss, tau, p.detach_weights) / T(swim_count(t, M));
  }
  for (int64_t s = 0; s < T_; ++s) {
    T g = T(0);
    if (s < n) {
      // Predictions t in [max(s, first), min(s + M - 1, n - 1)] have s in their window.
      const int64_t hi = std::min(s + M - 1, n - 1);
      for (int64_t t = std::max(s, first); t <= hi; ++t) g += zbar[t - first];
    }
    grad[s] = g;
  }
}

}  // namespace

void softmax_weighted_bce_cpu(const SwbceProblem& p, int64_t b) {
  if (p.fp64) swbce_sequence<double>(p, b);
  else swbce_sequence<float>(p, b);
}

}  // namespace pykernels::core
