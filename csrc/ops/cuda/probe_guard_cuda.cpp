// CUDA bindings of the probe guard ops: device guard, current stream, scratch
// from PyTorch's caching allocator, no host sync.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../probe_guard_common.h"
#include "cuda_binding.h"

namespace pykernels::ops {
namespace {

void probe_accumulate_cuda(at::Tensor& acc, const at::Tensor& hidden, const at::Tensor& weight_l) {
  expect_cuda(acc, "probe_accumulate_");
  const c10::cuda::CUDAGuard guard(acc.device());
  PackedAccumulate P = pack_accumulate(acc, hidden, weight_l);
  core::probe_accumulate_cuda(P.problem, current_stream());
  finish_accumulate(acc, P);
}

std::tuple<at::Tensor, at::Tensor> probe_stream_step_cuda(at::Tensor& state, at::Tensor& meta, at::Tensor& status,
                                                          const at::Tensor& slot_ids, const at::Tensor& token_logits,
                                                          const std::optional<at::Tensor>& active,
                                                          const at::Tensor& threshold, int64_t window,
                                                          double ema_alpha) {
  expect_cuda(state, "probe_stream_step");
  const c10::cuda::CUDAGuard guard(state.device());
  PackedStreamStep P = pack_stream_step("probe_stream_step", state, meta, status, slot_ids, nullptr, nullptr,
                                        token_logits, active, threshold, window, ema_alpha);
  core::probe_stream_step_cuda(P.problem, current_stream());
  return {P.scores, P.flagged};
}

std::tuple<at::Tensor, at::Tensor> probe_stream_step_varlen_cuda(
    at::Tensor& state, at::Tensor& meta, at::Tensor& status, const at::Tensor& slot_ids, const at::Tensor& token_starts,
    const at::Tensor& token_counts, const at::Tensor& token_logits, const at::Tensor& threshold, int64_t window,
    double ema_alpha) {
  expect_cuda(state, "probe_stream_step_varlen");
  const c10::cuda::CUDAGuard guard(state.device());
  PackedStreamStep P = pack_stream_step("probe_stream_step_varlen", state, meta, status, slot_ids, &token_starts,
                                        &token_counts, token_logits, std::nullopt, threshold, window, ema_alpha);
  core::probe_stream_step_cuda(P.problem, current_stream());
  return {P.scores, P.flagged};
}

std::tuple<at::Tensor, at::Tensor> softmax_weighted_bce_fwd_cuda(const at::Tensor& token_logits,
                                                                 const at::Tensor& labels, const at::Tensor& lengths,
                                                                 int64_t window, double tau, bool detach_weights,
                                                                 bool compute_grad) {
  expect_cuda(token_logits, "softmax_weighted_bce");
  const c10::cuda::CUDAGuard guard(token_logits.device());
  PackedSwbce P = pack_swbce(token_logits, labels, lengths, window, tau, detach_weights, compute_grad);
  if (P.problem.seq_len > 0) {
    at::Tensor scratch = at::empty_like(P.logits);
    core::softmax_weighted_bce_cuda(P.problem, scratch.data_ptr(), current_stream());
  }
  return {P.loss, P.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("probe_accumulate_", &probe_accumulate_cuda);
  m.impl("probe_stream_step", &probe_stream_step_cuda);
  m.impl("probe_stream_step_varlen", &probe_stream_step_varlen_cuda);
  m.impl("softmax_weighted_bce_fwd", &softmax_weighted_bce_fwd_cuda);
}

}  // namespace pykernels::ops
