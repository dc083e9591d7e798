// What every CUDA core shares: the error check, the warp size and the warp / block
// reductions. Torch-free, like the rest of core/.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pykernels::core {

constexpr int kWarp = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Throws std::runtime_error naming the failed step (`what`, e.g. "energy kernel launch").
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pykernels CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Butterfly reduction over the warp: every lane gets op(all lanes' v). All 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  return v;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce(v, SumOp{});
}

// Reduction over a block of kThreads threads (a multiple of kWarp); every thread gets the
// result, combined in warp order. `shared` holds kThreads / kWarp values; it may be reused by
// the next call (the leading barrier waits for this call's readers).
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* shared, Op op) {
  static_assert(kThreads % kWarp == 0, "block_reduce: kThreads must be a multiple of the warp size");
  v = warp_reduce(v, op);
  __syncthreads();  // `shared` may still be read by a previous call
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  T total = shared[0];
  for (int w = 1; w < kThreads / kWarp; ++w) total = op(total, shared[w]);
  return total;
}

template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  return block_reduce<kThreads>(v, shared, SumOp{});
}

}  // namespace pykernels::core
