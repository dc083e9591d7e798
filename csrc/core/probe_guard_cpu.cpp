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
    error |= stream_segment_error(p, r);
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
  const int64_t first = swbce_first_prediction(n, M), P = n - first;

  // Per prediction: zbar, a = exp(-|zbar|), bce, and the softmax numerator.
  thread_local std::vector<T> work;
  work.resize(size_t(4 * P));
  T *zbar = work.data(), *a = zbar + P, *bce = a + P, *e = bce + P;
  if (n >= M) {
    // Full windows: prediction i averages z[i .. i + M - 1]. Summed oldest first
    // from zero exactly as swim_at does (so bit-identical), window position by
    // window position, which the compiler vectorises across predictions.
    std::fill(zbar, zbar + P, T(0));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < P; ++i) zbar[i] += z[i + m];
    for (int64_t i = 0; i < P; ++i) zbar[i] /= T(M);
  } else {
    zbar[0] = swim_at(z, 1, n - 1, M);  // one prediction over all n tokens
  }
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < P; ++i) {
    a[i] = exp(-std::fabs(zbar[i]));
    bce[i] = swbce_bce(y, zbar[i], a[i]);
    top = std::max(top, zbar[i] / tau);  // std::max skips NaN, which reaches the loss through exp below
  }
  if (!(top > -std::numeric_limits<T>::infinity())) top = T(0);
  T denom = T(0), weighted = T(0);
  for (int64_t i = 0; i < P; ++i) {
    e[i] = exp(zbar[i] / tau - top);
    denom += e[i];
    weighted += e[i] * bce[i];
  }
  const T loss = weighted / denom;
  static_cast<T*>(p.loss)[b] = loss;
  if (p.grad == nullptr) return;

  T* grad = static_cast<T*>(p.grad) + b * T_;
  // d loss / d zbar_t divided by the window's token count, in place of e.
  for (int64_t i = 0; i < P; ++i)
    e[i] =
        swbce_dzbar(e[i] / denom, zbar[i], a[i], bce[i], y, loss, tau, p.detach_weights) / T(swim_count(first + i, M));
  std::fill(grad, grad + T_, T(0));
  if (n >= M) {  // prediction i's window is tokens i .. i + M - 1
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < P; ++i) grad[i + m] += e[i];
  } else {
    std::fill(grad, grad + n, e[0]);
  }
}

}  // namespace

void softmax_weighted_bce_cpu(const SwbceProblem& p, int64_t b) {
  switch (p.dtype) {
    case DType::Float32: swbce_sequence<float>(p, b); return;
    case DType::Float64: swbce_sequence<double>(p, b); return;
    default: throw_unsupported_dtype("softmax_weighted_bce", p.dtype);
  }
}

}  // namespace pykernels::core
