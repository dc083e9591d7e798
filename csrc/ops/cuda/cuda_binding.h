// What the CUDA bindings share: the device check and the current stream, as the cores take it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

namespace pykernels::ops {

inline void expect_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ", t.device());
}

// The current CUDA stream of the current device, as the cores' `void* stream`.
inline void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace pykernels::ops
