// CUDA bindings of the model-selection ops (built only when CUDA is enabled): device guard,
// current stream, scratch from PyTorch's caching allocator, and the label side of PARC built with
// device tensor ops (no host sync).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../parc_common.h"
#include "cuda_binding.h"

namespace pykernels::ops {
namespace {

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

at::Tensor pairwise_corr_distance_cuda(const at::Tensor& features, bool triu) {
  expect_cuda(features, "pairwise_corr_distance");
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const core::FeatureBatch f = feature_batch(x, "pairwise_corr_distance");
  at::Tensor out = distance_output(x, triu);
  if (out.numel() == 0) return out;
  at::Tensor ws = workspace(core::pairwise_corr_distance_cuda_workspace(f), x);
  core::pairwise_corr_distance_cuda(f, triu, out.data_ptr(), ws.data_ptr(), current_stream());
  return out;
}

at::Tensor spearman_cuda(const at::Tensor& x, const at::Tensor& y) {
  check_spearman_args(x, y);
  expect_cuda(x, "spearman");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = x.contiguous();
  // A y broadcast over rows stays one row, ranked once.
  const bool shared = y.size(0) > 1 && y.stride(0) == 0;
  const at::Tensor ys = shared ? y.select(0, 0).contiguous() : y.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  core::SpearmanProblem p{xs.data_ptr(), ys.data_ptr(), real_dtype(xs, "spearman", "x"), xs.size(0),
                          xs.size(1),    xs.size(1),    shared ? 0 : xs.size(1),         out.data_ptr<double>()};
  at::Tensor ws = workspace(core::spearman_cuda_workspace(p), xs);
  core::spearman_cuda(p, ws.data_ptr(), current_stream());
  return out;
}

at::Tensor parc_spearman_cuda(const at::Tensor& features, const at::Tensor& classes) {
  expect_cuda(features, "parc_spearman");
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const core::FeatureBatch f = feature_batch(x, "parc_spearman");
  check_classes(classes, x);
  at::Tensor out = at::empty({f.batch}, x.options().dtype(at::kDouble));
  if (f.batch == 0) return out;
  // Label side, once per call: samples in class order; block_end[p] = end of p's class run,
  // a reverse running minimum of the run ends; n_same = sum over p of block_end[p] - p - 1.
  const at::Tensor order = at::argsort(classes, /*stable=*/true);
  const at::Tensor sorted = classes.index_select(0, order);
  const at::Tensor position = at::arange(f.n, classes.options());
  at::Tensor last = at::ones({f.n}, classes.options().dtype(at::kBool));
  if (f.n > 1) last.narrow(0, 0, f.n - 1).copy_(sorted.narrow(0, 0, f.n - 1) != sorted.narrow(0, 1, f.n - 1));
  const at::Tensor run_end = at::where(last, position + 1, at::full({f.n}, f.n, classes.options()));
  const at::Tensor block_end = std::get<0>(at::cummin(run_end.flip(0), 0)).flip(0).contiguous();
  const at::Tensor n_same = (block_end - position - 1).sum();
  const at::Tensor pair_counts = at::stack({n_same, pair_count(f.n) - n_same}).contiguous();
  core::ParcLabels labels{order.data_ptr<int64_t>(), block_end.data_ptr<int64_t>(), 0, 0};
  at::Tensor ws = workspace(core::parc_spearman_cuda_workspace(f), x);
  core::parc_spearman_cuda(f, labels, pair_counts.data_ptr<int64_t>(), out.data_ptr<double>(), ws.data_ptr(),
                           current_stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("pairwise_corr_distance", &pairwise_corr_distance_cuda);
  m.impl("spearman", &spearman_cuda);
  m.impl("parc_spearman", &parc_spearman_cuda);
}

}  // namespace pykernels::ops
