// CPU binding of pykernels::probe_scores: tiles of tokens in parallel on
// PyTorch's intra-op thread pool (so torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "probe_scores_common.h"

namespace pykernels::ops {

namespace {

constexpr int64_t kTileTokens = 64;  // tokens of one sequence per work item
// Activations a thread should read at least before another one is woken: below
// this (e.g. one decode step) waking threads costs more than it saves, and on a
// busy machine a descheduled worker stalls the whole call.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 20;

at::Tensor probe_scores_cpu(at::TensorList hidden_states, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lengths,
                            c10::string_view smoothing, int64_t window, double ema_alpha) {
  TORCH_CHECK(hidden_states.empty() || hidden_states[0].device().is_cpu(),
              "probe_scores (CPU kernel): expected CPU tensors");
  PackedProbeScores P =
      pack_probe_scores(hidden_states, weight, bias, lengths, std::string(smoothing), window, ema_alpha);
  const core::ProbeScoresProblem& p = P.problem;

  std::vector<std::pair<int64_t, int64_t>> tiles;  // (sequence, first token)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = core::clamped_length(p.lengths, b, p.seq_len);
    for (int64_t t = 0; t < len; t += kTileTokens) tiles.emplace_back(b, t);
  }
  int64_t tile_elements = 0;  // activations in the largest tile
  for (const auto& [b, t0] : tiles)
    tile_elements =
        std::max(tile_elements, (std::min(t0 + kTileTokens, core::clamped_length(p.lengths, b, p.seq_len)) - t0));
  tile_elements *= p.num_layers * p.hidden;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, tile_elements));
  at::parallel_for(0, int64_t(tiles.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [b, t0] = tiles[i];
      const int64_t t1 = std::min(t0 + kTileTokens, core::clamped_length(p.lengths, b, p.seq_len));
      core::probe_logits_cpu(p, b, t0, t1);
    }
  });
  const int64_t smooth_grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, p.seq_len * p.heads));
  at::parallel_for(0, p.batch, smooth_grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) core::smooth_sequence_cpu(p, b, P.smoothing, P.window, P.alpha);
  });
  return P.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) { m.impl("probe_scores", &probe_scores_cpu); }

}  // namespace pykernels::ops
