// CUDA binding of pykernels::probe_scores (built only when CUDA is enabled):
// device guard, current stream, scratch from PyTorch's caching allocator.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../probe_scores_common.h"
#include "cuda_binding.h"

namespace pykernels::ops {
namespace {

at::Tensor probe_scores_cuda(at::TensorList hidden_states, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lengths,
                             c10::string_view smoothing, int64_t window, double ema_alpha) {
  TORCH_CHECK(!hidden_states.empty() && hidden_states[0].is_cuda(),
              "probe_scores (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(hidden_states[0].device());
  PackedProbeScores P =
      pack_probe_scores(hidden_states, weight, bias, lengths, std::string(smoothing), window, ema_alpha);
  at::Tensor scratch;
  if (core::probe_scores_needs_scratch(P.smoothing, P.window)) scratch = at::empty_like(P.out);
  core::probe_scores_cuda(P.problem, P.smoothing, P.window, P.alpha,
                          scratch.defined() ? scratch.data_ptr<float>() : nullptr, current_stream());
  return P.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) { m.impl("probe_scores", &probe_scores_cuda); }

}  // namespace pykernels::ops
