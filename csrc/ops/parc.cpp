// CPU bindings of the model-selection ops, on PyTorch's intra-op thread pool (so
// torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "parc_common.h"

namespace pykernels::ops {
namespace {

// Scratch of all worker threads together, in bytes: parc_spearman needs 16 M bytes per model
// (M = N(N-1)/2 distances and their bucketed copy), 3.2 GB at N = 20,000, so only as many models
// run at once as fit in this (one at least). PYKERNELS_CPU_SCRATCH_BYTES overrides the 2 GiB.
int64_t scratch_budget_bytes() {
  const char* env = std::getenv("PYKERNELS_CPU_SCRATCH_BYTES");
  const long long bytes = env ? std::atoll(env) : 0;
  return bytes > 0 ? int64_t(bytes) : int64_t(1) << 31;
}

// Runs body(item, scratch) for items [0, count) on the intra-op pool, each thread taking the next
// item as it finishes one: on a busy machine a delayed thread then delays one item, not a
// fixed share of them. Scratch is per thread, scratch_bytes of it per item at most.
template <typename Scratch, typename Body>
void for_each_item(int64_t count, int64_t scratch_bytes, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t fit = std::max<int64_t>(1, scratch_budget_bytes() / std::max<int64_t>(1, scratch_bytes));
  const int64_t workers = std::min({count, int64_t(at::get_num_threads()), fit});
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t w = begin; w < end; ++w)
      for (int64_t item = next++; item < count; item = next++) body(item, scratch);
  });
}

template <typename Z>
void corr_distances(const core::FeatureBatch& f, bool triu, at::Tensor& out) {
  const int64_t B = f.batch, N = f.n, D = f.d;
  at::Tensor zt = at::empty({B, D, N}, out.options());
  Z* z = zt.data_ptr<Z>();
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) core::normalize_row_cpu(f, r / N, r % N, z + (r / N) * D * N, r % N);
  });
  // Row i of the triangle holds N - 1 - i pairs: rows i and N - 1 - i make one item of even work.
  const int64_t per_model = triu ? (N + 1) / 2 : N;
  const int64_t out_stride = triu ? pair_count(N) : N * N;
  Z* o = out.data_ptr<Z>();
  at::parallel_for(0, B * per_model, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / per_model, i = item % per_model;
      const Z* zb = z + b * D * N;
      core::corr_distance_rows_cpu(zb, N, D, i, i + 1, triu, o + b * out_stride);
      if (triu && N - 1 - i != i) core::corr_distance_rows_cpu(zb, N, D, N - 1 - i, N - i, triu, o + b * out_stride);
    }
  });
}

at::Tensor pairwise_corr_distance_cpu(const at::Tensor& features, bool triu) {
  TORCH_CHECK(features.device().is_cpu(), "pairwise_corr_distance (CPU kernel): expected CPU tensors");
  const at::Tensor x = features.contiguous();
  const core::FeatureBatch f = feature_batch(x, "pairwise_corr_distance");
  at::Tensor out = distance_output(x, triu);
  if (out.numel() == 0) return out;
  if (f.dtype == core::DType::Float32) corr_distances<float>(f, triu, out);
  else corr_distances<double>(f, triu, out);
  return out;
}

template <typename T>
bool row_has_nan(const T* v, int64_t stride, int64_t m) {
  for (int64_t i = 0; i < m; ++i)
    if (std::isnan(v[i * stride])) return true;
  return false;
}

template <typename T>
void spearman_rows(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  const int64_t B = x.size(0), M = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  double* o = out.data_ptr<double>();
  // A y broadcast over the rows (row stride 0, e.g. label distances) is ranked once.
  const bool shared_y = y.stride(0) == 0;
  std::vector<int64_t> shared_ranks;
  double shared_ties = 0.0;
  bool shared_nan = false;
  if (shared_y && B > 0) {
    core::RankScratch scratch;
    shared_nan = row_has_nan(yp, y.stride(1), M);
    if (!shared_nan) {
      shared_ranks.resize(size_t(M));
      shared_ties = core::twice_average_ranks_cpu(yp, y.stride(1), M, shared_ranks.data(), scratch);
    }
  }
  struct Scratch {
    core::RankScratch sort;
    std::vector<int64_t> rx, ry;
  };
  const int64_t scratch_bytes = int64_t(sizeof(core::RankItem) + 2 * sizeof(int64_t)) * M;  // items, rx, ry
  for_each_item<Scratch>(B, scratch_bytes, [&](int64_t b, Scratch& s) {
    const T* xb = xp + b * x.stride(0);
    const T* yb = yp + b * y.stride(0);
    if (row_has_nan(xb, x.stride(1), M) || (shared_y ? shared_nan : row_has_nan(yb, y.stride(1), M))) {
      o[b] = core::pk_nan();
      return;
    }
    s.rx.resize(size_t(M));
    const double tx = core::twice_average_ranks_cpu(xb, x.stride(1), M, s.rx.data(), s.sort);
    double ty = shared_ties;
    if (!shared_y) {
      s.ry.resize(size_t(M));
      ty = core::twice_average_ranks_cpu(yb, y.stride(1), M, s.ry.data(), s.sort);
    }
    o[b] = core::spearman_from_ranks_cpu(s.rx.data(), shared_y ? shared_ranks.data() : s.ry.data(), M, tx, ty);
  });
}

at::Tensor spearman_cpu(const at::Tensor& x, const at::Tensor& y) {
  check_spearman_args(x, y);
  TORCH_CHECK(x.device().is_cpu(), "spearman (CPU kernel): expected CPU tensors");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  if (x.scalar_type() == at::kFloat) spearman_rows<float>(x, y, out);
  else spearman_rows<double>(x, y, out);
  return out;
}

at::Tensor parc_spearman_cpu(const at::Tensor& features, const at::Tensor& classes) {
  TORCH_CHECK(features.device().is_cpu(), "parc_spearman (CPU kernel): expected CPU tensors");
  const at::Tensor x = features.contiguous();
  const core::FeatureBatch f = feature_batch(x, "parc_spearman");
  check_classes(classes, x);
  const at::Tensor ids = classes.contiguous();
  std::vector<int64_t> order(static_cast<size_t>(f.n)), block_end(static_cast<size_t>(f.n));
  core::ParcLabels labels{order.data(), block_end.data(), 0, 0};
  core::parc_labels_cpu(ids.data_ptr<int64_t>(), f.n, order.data(), block_end.data(), &labels.n_same, &labels.n_diff);
  at::Tensor out = at::empty({f.batch}, x.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t m = f.n * (f.n - 1) / 2;
  const int64_t scratch_bytes = int64_t(sizeof(double)) * (2 * m + f.n * f.d);  // pairs, bucketed, zt
  for_each_item<core::ParcScratch>(f.batch, scratch_bytes, [&](int64_t b, core::ParcScratch& scratch) {
    o[b] = core::parc_spearman_cpu(f, labels, b, scratch);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("pairwise_corr_distance", &pairwise_corr_distance_cpu);
  m.impl("spearman", &spearman_cpu);
  m.impl("parc_spearman", &parc_spearman_cpu);
}

}  // namespace pykernels::ops
