// Argument checks and tensor -> problem packing shared by the CPU and CUDA bindings of the
// model-selection ops. The Python wrappers validate first with friendly messages; these checks
// guard C++ callers and keep the kernels memory-safe.
#pragma once

#include <ATen/ATen.h>

#include "../core/parc.h"
#include "dtype.h"

namespace pykernels::ops {

inline core::DType real_dtype(const at::Tensor& t, const char* op, const char* name) {
  return to_core_dtype<core::DType::Float32, core::DType::Float64>(t.scalar_type(), op, name);
}

// features [B, N, D] -> a contiguous copy (if needed) and its FeatureBatch view.
inline core::FeatureBatch feature_batch(const at::Tensor& features, const char* op) {
  TORCH_CHECK(features.dim() == 3, op, ": features must be [B, N, D], got ", features.sizes());
  TORCH_CHECK(features.is_contiguous(), op, ": features must be contiguous");
  // A row of no values has no mean: the kernels would divide by D = 0 (and the CPU one index past it).
  TORCH_CHECK(features.size(2) > 0, op, ": features need at least one feature dim (D > 0), got ", features.sizes());
  return core::FeatureBatch{features.data_ptr(), real_dtype(features, op, "features"), features.size(0),
                            features.size(1), features.size(2)};
}

inline int64_t pair_count(int64_t n) { return n * (n - 1) / 2; }

inline at::Tensor distance_output(const at::Tensor& features, bool triu) {
  const int64_t B = features.size(0), N = features.size(1);
  return triu ? at::empty({B, pair_count(N)}, features.options()) : at::empty({B, N, N}, features.options());
}

inline void check_spearman_args(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.sizes() == x.sizes(), "spearman: x and y must both be [B, M], got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "spearman: x and y must share a dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), "spearman: x and y must be on one device");
  real_dtype(x, "spearman", "x");
}

inline void check_classes(const at::Tensor& classes, const at::Tensor& features) {
  TORCH_CHECK(classes.dim() == 1 && classes.size(0) == features.size(1) && classes.scalar_type() == at::kLong,
              "parc_spearman: classes must be int64 [N=", features.size(1), "], got ", classes.scalar_type(), " ",
              classes.sizes());
  TORCH_CHECK(classes.device() == features.device(), "parc_spearman: classes must be on ", features.device());
}

}  // namespace pykernels::ops
