// CPU bindings of the probe guard ops (schemas in registration.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "probe_guard_common.h"

namespace pykernels::ops {
namespace {

// Elements per task: a decode step (and a short prefill) stays on the calling
// thread, where a fork/join would cost more than the dot products.
constexpr int64_t kAccumulateGrainElements = int64_t(1) << 20;

void probe_accumulate_cpu(at::Tensor& acc, const at::Tensor& hidden, const at::Tensor& weight_l) {
  TORCH_CHECK(acc.device().is_cpu(), "probe_accumulate_ (CPU kernel): expected CPU tensors");
  PackedAccumulate P = pack_accumulate(acc, hidden, weight_l);
  if (P.problem.heads > 0 && P.problem.hidden_size > 0) {
    const int64_t grain = std::max<int64_t>(1, kAccumulateGrainElements / P.problem.hidden_size);
    at::parallel_for(0, P.problem.rows, grain,
                     [&](int64_t begin, int64_t end) { core::probe_accumulate_cpu(P.problem, begin, end); });
  }
  finish_accumulate(acc, P);
}

std::tuple<at::Tensor, at::Tensor> probe_stream_step_cpu(at::Tensor& state, at::Tensor& meta, at::Tensor& status,
                                                         const at::Tensor& slot_ids, const at::Tensor& token_logits,
                                                         const std::optional<at::Tensor>& active,
                                                         const at::Tensor& threshold, int64_t window,
                                                         double ema_alpha) {
  TORCH_CHECK(state.device().is_cpu(), "probe_stream_step (CPU kernel): expected CPU tensors");
  PackedStreamStep P = pack_stream_step("probe_stream_step", state, meta, status, slot_ids, nullptr, nullptr,
                                        token_logits, active, threshold, window, ema_alpha);
  core::probe_stream_step_cpu(P.problem);
  return {P.scores, P.flagged};
}

std::tuple<at::Tensor, at::Tensor> probe_stream_step_varlen_cpu(
    at::Tensor& state, at::Tensor& meta, at::Tensor& status, const at::Tensor& slot_ids, const at::Tensor& token_starts,
    const at::Tensor& token_counts, const at::Tensor& token_logits, const at::Tensor& threshold, int64_t window,
    double ema_alpha) {
  TORCH_CHECK(state.device().is_cpu(), "probe_stream_step_varlen (CPU kernel): expected CPU tensors");
  PackedStreamStep P = pack_stream_step("probe_stream_step_varlen", state, meta, status, slot_ids, &token_starts,
                                        &token_counts, token_logits, std::nullopt, threshold, window, ema_alpha);
  core::probe_stream_step_cpu(P.problem);
  return {P.scores, P.flagged};
}

std::tuple<at::Tensor, at::Tensor> softmax_weighted_bce_fwd_cpu(const at::Tensor& token_logits,
                                                                const at::Tensor& labels, const at::Tensor& lengths,
                                                                int64_t window, double tau, bool detach_weights,
                                                                bool compute_grad) {
  TORCH_CHECK(token_logits.device().is_cpu(), "softmax_weighted_bce (CPU kernel): expected CPU tensors");
  PackedSwbce P = pack_swbce(token_logits, labels, lengths, window, tau, detach_weights, compute_grad);
  if (P.problem.seq_len > 0) {
    at::parallel_for(0, P.problem.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) core::softmax_weighted_bce_cpu(P.problem, b);
    });
  }
  return {P.loss, P.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("probe_accumulate_", &probe_accumulate_cpu);
  m.impl("probe_stream_step", &probe_stream_step_cpu);
  m.impl("probe_stream_step_varlen", &probe_stream_step_varlen_cpu);
  m.impl("softmax_weighted_bce_fwd", &softmax_weighted_bce_fwd_cpu);
}

}  // namespace pykernels::ops
