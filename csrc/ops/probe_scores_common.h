// Tensor -> ProbeScoresProblem packing shared by the CPU and CUDA bindings.
// The Python wrapper has already validated the arguments with friendly
// messages; these checks guard C++ callers and keep the kernels memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../core/probe_scores.h"
#include "dtype.h"

namespace pykernels::ops {

inline core::Smoothing parse_smoothing(const std::string& s) {
  if (s == "none") return core::Smoothing::None;
  if (s == "swim") return core::Smoothing::Swim;
  if (s == "ema") return core::Smoothing::Ema;
  TORCH_CHECK(false, "probe_scores: smoothing must be 'none', 'swim' or 'ema', got '", s, "'");
}

// The activation dtypes the probe kernels read (widened to float32 exactly).
inline core::DType activation_dtype(at::ScalarType t, const char* op, const char* arg) {
  using core::DType;
  return to_core_dtype<DType::Float32, DType::Float16, DType::BFloat16>(t, op, arg);
}

// Owns the tensors the problem's raw pointers refer to.
struct PackedProbeScores {
  std::vector<at::Tensor> layers;  // keeps any contiguous copies alive
  std::vector<core::LayerView> views;
  at::Tensor weight_t, bias, lengths, out;
  core::ProbeScoresProblem problem{};
  core::Smoothing smoothing = core::Smoothing::None;
  int64_t window = 1;
  float alpha = 1.f;
};

inline PackedProbeScores pack_probe_scores(at::TensorList hidden_states, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& lengths, const std::string& smoothing,
                                           int64_t window, double ema_alpha) {
  PackedProbeScores P;
  const int64_t L = int64_t(hidden_states.size());
  TORCH_CHECK(L >= 1, "probe_scores: hidden_states must hold at least one layer");
  const at::Tensor& h0 = hidden_states[0];
  TORCH_CHECK(h0.dim() == 3, "probe_scores: each layer must be [B, T, H], got ", h0.sizes());
  const int64_t B = h0.size(0), T = h0.size(1), H = h0.size(2);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == L && weight.size(1) == H, "probe_scores: weight must be [L=", L,
              ", H=", H, ", K], got ", weight.sizes());
  const int64_t K = weight.size(2);
  const auto device = h0.device();
  for (const auto& h : hidden_states) {
    TORCH_CHECK(h.sizes() == h0.sizes() && h.scalar_type() == h0.scalar_type() && h.device() == device,
                "probe_scores: every layer must match layer 0 in shape, dtype and device");
    // The kernels need a unit-stride hidden dim; other strides cost one copy of that layer.
    P.layers.push_back(h.size(2) <= 1 || h.stride(2) == 1 ? h : h.contiguous());
  }
  TORCH_CHECK(weight.device() == device, "probe_scores: weight must be on ", device);
  P.weight_t = weight.to(at::kFloat).transpose(1, 2).contiguous();  // [L, K, H]
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->device() == device, "probe_scores: bias must be [K=", K,
                "] on ", device);
    P.bias = bias->to(at::kFloat).contiguous();
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->device() == device,
                "probe_scores: lengths must be [B=", B, "] on ", device);
    P.lengths = lengths->to(at::kLong).contiguous();
    if (device.is_cpu() && B > 0) {  // checking device memory would need a host sync
      TORCH_CHECK(P.lengths.min().item<int64_t>() >= 0 && P.lengths.max().item<int64_t>() <= T,
                  "probe_scores: lengths must lie in [0, T=", T, "]");
    }
  }
  P.smoothing = parse_smoothing(smoothing);
  TORCH_CHECK(window >= 1, "probe_scores: window must be >= 1, got ", window);
  TORCH_CHECK(ema_alpha > 0.0 && ema_alpha <= 1.0, "probe_scores: ema_alpha must lie in (0, 1], got ", ema_alpha);
  P.window = window;
  P.alpha = float(ema_alpha);
  P.out = at::empty({B, T, K}, h0.options().dtype(at::kFloat));

  for (const auto& h : P.layers) P.views.push_back({h.data_ptr(), h.stride(0), h.stride(1)});
  P.problem = core::ProbeScoresProblem{P.views.data(),
                                       L,
                                       activation_dtype(h0.scalar_type(), "probe_scores", "hidden_states"),
                                       B,
                                       T,
                                       H,
                                       K,
                                       P.weight_t.data_ptr<float>(),
                                       P.bias.defined() ? P.bias.data_ptr<float>() : nullptr,
                                       P.lengths.defined() ? P.lengths.data_ptr<int64_t>() : nullptr,
                                       P.out.data_ptr<float>()};
  return P;
}

}  // namespace pykernels::ops
