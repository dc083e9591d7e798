// Tensor -> problem packing for the probe guard ops, shared by the CPU and
// CUDA bindings. The Python API validates with friendly messages first; these
// checks guard C++ callers and keep the kernels memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../core/probe_guard.h"
#include "probe_scores_common.h"

namespace pykernels::ops {

// Holds copies only when an input is not in a layout the kernels read in place.
struct PackedAccumulate {
  at::Tensor hidden_copy, weight_copy, acc_copy;
  core::AccumulateProblem problem{};
};

// The decode-time fast path (unit-stride rows, a float32 weight stored as [K, H]
// and viewed as [H, K], contiguous acc) creates no tensor: per-call overhead is
// what a probe hook on every layer pays.
inline PackedAccumulate pack_accumulate(const at::Tensor& acc, const at::Tensor& hidden, const at::Tensor& weight_l) {
  TORCH_CHECK(hidden.dim() == 2, "probe_accumulate_: hidden must be [N, H], got ", hidden.sizes());
  TORCH_CHECK(weight_l.dim() == 2 && weight_l.size(0) == hidden.size(1),
              "probe_accumulate_: weight_l must be [H=", hidden.size(1), ", K], got ", weight_l.sizes());
  const int64_t N = hidden.size(0), H = hidden.size(1), K = weight_l.size(1);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == N && acc.size(1) == K && acc.scalar_type() == at::kFloat,
              "probe_accumulate_: acc must be float32 [N=", N, ", K=", K, "], got ", acc.scalar_type(), " ",
              acc.sizes());
  TORCH_CHECK(hidden.device() == acc.device() && weight_l.device() == acc.device(),
              "probe_accumulate_: acc, hidden and weight_l must be on one device");
  PackedAccumulate P;
  const at::Tensor* x = &hidden;
  if (H > 1 && hidden.stride(1) != 1) x = &(P.hidden_copy = hidden.contiguous());
  const bool weight_in_place = weight_l.scalar_type() == at::kFloat && (H <= 1 || weight_l.stride(0) == 1) &&
                               (K <= 1 || weight_l.stride(1) == H);
  const float* w_t = weight_in_place
                         ? weight_l.const_data_ptr<float>()
                         : (P.weight_copy = weight_l.to(at::kFloat).t().contiguous()).const_data_ptr<float>();
  float* out = acc.is_contiguous() ? acc.data_ptr<float>()
                                   : (P.acc_copy = at::zeros_like(acc, at::MemoryFormat::Contiguous)).data_ptr<float>();
  P.problem = core::AccumulateProblem{x->const_data_ptr(),
                                      N > 1 ? x->stride(0) : H,
                                      activation_dtype(hidden.scalar_type(), "probe_accumulate_", "hidden"),
                                      N,
                                      H,
                                      K,
                                      w_t,
                                      out};
  return P;
}

// After the kernel: a non-contiguous acc receives the sum computed in its stand-in.
inline void finish_accumulate(const at::Tensor& acc, const PackedAccumulate& P) {
  if (P.acc_copy.defined()) acc.add_(P.acc_copy);
}

struct PackedStreamStep {
  at::Tensor slot_ids, starts, counts, logits, active, threshold, scores, flagged;
  core::StreamStepProblem problem{};
};

// Segments (token_starts, token_counts) given: probe_stream_step_varlen, else
// probe_stream_step (one token per row, optionally `active`). The segments'
// bounds and order are checked by the kernels (no host sync).
inline PackedStreamStep pack_stream_step(const char* op, const at::Tensor& state, const at::Tensor& meta,
                                         const at::Tensor& status, const at::Tensor& slot_ids,
                                         const at::Tensor* token_starts, const at::Tensor* token_counts,
                                         const at::Tensor& token_logits, const std::optional<at::Tensor>& active,
                                         const at::Tensor& threshold, int64_t window, double ema_alpha) {
  TORCH_CHECK(state.dim() == 3 && state.scalar_type() == at::kFloat && state.is_contiguous(), op,
              ": state must be contiguous float32 [slots, ring, K]");
  const int64_t S = state.size(0), ring = state.size(1), K = state.size(2);
  TORCH_CHECK(window >= 0 && ring == (window == 0 ? 1 : 2 * window), op, ": state ring ", ring,
              " does not match window ", window);
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == S && meta.size(1) == core::kMetaFields &&
                  meta.scalar_type() == at::kLong && meta.is_contiguous(),
              op, ": meta must be contiguous int64 [slots, 3]");
  TORCH_CHECK(status.numel() == 2 && status.scalar_type() == at::kLong && status.is_contiguous(), op,
              ": status must be contiguous int64 [2]");
  TORCH_CHECK(slot_ids.dim() == 1, op, ": slot_ids must be [n], got ", slot_ids.sizes());
  const int64_t n = slot_ids.size(0);
  const bool varlen = token_starts != nullptr;
  TORCH_CHECK(token_logits.dim() == 2 && (varlen || token_logits.size(0) == n) && token_logits.size(1) == K, op,
              ": token_logits must be [", varlen ? "N" : "n=", varlen ? "" : std::to_string(n), ", K=", K, "], got ",
              token_logits.sizes());
  const int64_t N = token_logits.size(0);
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == K, op, ": threshold must be [K=", K, "]");
  const auto device = state.device();
  for (const at::Tensor* t : {&meta, &status, &slot_ids, &token_logits, &threshold})
    TORCH_CHECK(t->device() == device, op, ": every tensor must be on ", device);
  TORCH_CHECK(ema_alpha > 0.0 && ema_alpha <= 1.0, op, ": ema_alpha must lie in (0, 1]");
  PackedStreamStep P;
  P.slot_ids = slot_ids.to(at::kLong).contiguous();
  if (varlen) {
    for (const at::Tensor* t : {token_starts, token_counts}) {
      const auto type = t->scalar_type();
      TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == device && (type == at::kLong || type == at::kInt),
                  op, ": token_starts and token_counts must be int64 or int32 [n=", n, "] on ", device, ", got ", type,
                  " ", t->sizes(), " on ", t->device());
    }
    P.starts = token_starts->to(at::kLong).contiguous();
    P.counts = token_counts->to(at::kLong).contiguous();
  }
  P.logits = token_logits.to(at::kFloat).contiguous();
  if (active.has_value()) {
    TORCH_CHECK(active->dim() == 1 && active->size(0) == n && active->device() == device, op, ": active must be [n=", n,
                "] on ", device);
    P.active = active->to(at::kBool).contiguous();
  }
  P.threshold = threshold.to(at::kFloat).contiguous();
  // Token rows outside every segment (and inactive rows) score 0: the one-token
  // op writes each row itself, the varlen op starts from zeros.
  P.scores = varlen ? at::zeros({N, K}, state.options()) : at::empty({N, K}, state.options());
  P.flagged = at::empty({n}, state.options().dtype(at::kBool));
  P.problem = core::StreamStepProblem{state.data_ptr<float>(),
                                      meta.data_ptr<int64_t>(),
                                      status.data_ptr<int64_t>(),
                                      S,
                                      ring,
                                      K,
                                      window,
                                      float(ema_alpha),
                                      P.slot_ids.data_ptr<int64_t>(),
                                      varlen ? P.starts.data_ptr<int64_t>() : nullptr,
                                      varlen ? P.counts.data_ptr<int64_t>() : nullptr,
                                      P.logits.data_ptr<float>(),
                                      P.active.defined() ? P.active.data_ptr<bool>() : nullptr,
                                      P.threshold.data_ptr<float>(),
                                      n,
                                      N,
                                      P.scores.data_ptr<float>(),
                                      P.flagged.data_ptr<bool>()};
  return P;
}

struct PackedSwbce {
  at::Tensor logits, labels, lengths, loss, grad;
  core::SwbceProblem problem{};
};

inline PackedSwbce pack_swbce(const at::Tensor& token_logits, const at::Tensor& labels, const at::Tensor& lengths,
                              int64_t window, double tau, bool detach_weights, bool compute_grad) {
  TORCH_CHECK(token_logits.dim() == 2, "softmax_weighted_bce: token_logits must be [B, T], got ", token_logits.sizes());
  const int64_t B = token_logits.size(0), T = token_logits.size(1);
  const auto type = token_logits.scalar_type();
  const core::DType dtype =
      to_core_dtype<core::DType::Float32, core::DType::Float64>(type, "softmax_weighted_bce", "token_logits");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && labels.device() == token_logits.device(),
              "softmax_weighted_bce: labels must be [B=", B, "] on ", token_logits.device());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.device() == token_logits.device(),
              "softmax_weighted_bce: lengths must be [B=", B, "] on ", token_logits.device());
  TORCH_CHECK(window >= 1 && tau > 0.0, "softmax_weighted_bce: window must be >= 1 and tau > 0");
  PackedSwbce P;
  P.logits = token_logits.contiguous();
  P.labels = labels.to(type).contiguous();
  P.lengths = lengths.to(at::kLong).contiguous();
  if (token_logits.device().is_cpu() && B > 0) {  // on a GPU this would need a host sync
    TORCH_CHECK(P.lengths.min().item<int64_t>() >= 1 && P.lengths.max().item<int64_t>() <= T,
                "softmax_weighted_bce: lengths must lie in [1, T=", T, "]");
  }
  P.loss = at::empty({B}, P.logits.options());
  P.grad = compute_grad ? at::empty({B, T}, P.logits.options()) : at::empty({0}, P.logits.options());
  P.problem = core::SwbceProblem{P.logits.data_ptr(),
                                 P.labels.data_ptr(),
                                 P.lengths.data_ptr<int64_t>(),
                                 B,
                                 T,
                                 window,
                                 tau,
                                 detach_weights,
                                 dtype,
                                 P.loss.data_ptr(),
                                 compute_grad ? P.grad.data_ptr() : nullptr};
  return P;
}

}  // namespace pykernels::ops
