// CUDA kernels of the probe guard. The per-element arithmetic (stream_update,
// crosses, swbce_*) lives in probe_guard.h and is tested on the CPU; this file
// keeps indexing, loads and block reductions.
#include "cuda_common.cuh"
#include "probe_guard.h"

namespace pykernels::core {
namespace {

constexpr int kThreads = 256;  // one block per row (accumulate) or per sequence (loss)

// The loss's softmax shift is a max with fmax, which skips NaN (see swbce_kernel).
struct FmaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return fmax(a, b);
  }
};

// ---- probe_accumulate: one block per (row, group of up to KG heads) ----

template <DType D, int KG>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateProblem p) {
  __shared__ float shared[kThreads / kWarp];
  const int64_t n = blockIdx.x;
  const int64_t k0 = int64_t(blockIdx.y) * KG;
  const void* row = static_cast<const char*>(p.hidden) + n * p.row_stride * dtype_size(D);
  float acc[KG];
#pragma unroll
  for (int k = 0; k < KG; ++k) acc[k] = 0.f;
  for (int64_t j = threadIdx.x; j < p.hidden_size; j += kThreads) {
    const float x = load_as_float<D>(row, j);
#pragma unroll
    for (int k = 0; k < KG; ++k)
      if (k0 + k < p.heads) acc[k] = fmaf(x, __ldg(p.weight_t + (k0 + k) * p.hidden_size + j), acc[k]);
  }
#pragma unroll
  for (int k = 0; k < KG; ++k) {
    const float total = block_sum<kThreads>(acc[k], shared);
    if (threadIdx.x == 0 && k0 + k < p.heads) p.acc[n * p.heads + k0 + k] += total;
  }
}

template <DType D>
void launch_accumulate(const AccumulateProblem& p, cudaStream_t stream) {
  constexpr int KG = 4;
  const dim3 grid(unsigned(p.rows), unsigned((p.heads + KG - 1) / KG));
  accumulate_kernel<D, KG><<<grid, kThreads, 0, stream>>>(p);
  cuda_check(cudaGetLastError(), "probe_accumulate kernel launch");
}

// ---- probe_stream_step(_varlen): one block; rows are few (one per active sequence),
// each thread walks its row's segment in order ----

__global__ void __launch_bounds__(kThreads) stream_step_kernel(StreamStepProblem p) {
  __shared__ unsigned long long error;
  __shared__ long long step;
  if (threadIdx.x == 0) {
    error = 0;
    step = p.status[0] + 1;
  }
  __syncthreads();
  for (int64_t r = threadIdx.x; r < p.rows; r += blockDim.x) {
    if (const int64_t bad = stream_segment_error(p, r)) atomicOr(&error, (unsigned long long)bad);
    const int64_t s = p.slot_ids[r];
    if (s < 0 || s >= p.slots) {
      atomicOr(&error, (unsigned long long)kSlotOutOfRange);
      continue;
    }
    auto* stamp = reinterpret_cast<unsigned long long*>(p.meta + s * kMetaFields + kMetaStamp);
    if (atomicExch(stamp, (unsigned long long)step) == (unsigned long long)step)
      atomicOr(&error, (unsigned long long)kSlotDuplicated);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.status[0] = step;
    p.status[1] |= int64_t(error);
  }
  for (int64_t r = threadIdx.x; r < p.rows; r += blockDim.x) {
    if (error) stream_fail_row(p, r);
    else stream_step_row(p, r);
  }
}

// ---- softmax_weighted_bce: one block per sequence; `work` [batch, seq_len] ----

template <typename T>
__global__ void __launch_bounds__(kThreads) swbce_kernel(SwbceProblem p, T* work) {
  __shared__ T shared[kThreads / kWarp];
  const int64_t b = blockIdx.x, Tn = p.seq_len, M = p.window;
  const T* z = static_cast<const T*>(p.logits) + b * Tn;
  T* zbar = work + b * Tn;  // indexed by token
  const T y = static_cast<const T*>(p.labels)[b];
  const T tau = T(p.tau);
  const int64_t n = swbce_length(p.lengths, b, p.seq_len);
  const int64_t first = swbce_first_prediction(n, M);

  T top = -INFINITY;
  for (int64_t t = first + threadIdx.x; t < n; t += kThreads) {
    zbar[t] = swim_at(z, 1, t, M);
    top = fmax(top, zbar[t] / tau);  // fmax skips NaN, which reaches the loss through exp below
  }
  top = block_reduce<kThreads>(top, shared, FmaxOp{});
  if (!(top > -INFINITY)) top = T(0);
  T denom = T(0), weighted = T(0);
  for (int64_t t = first + threadIdx.x; t < n; t += kThreads) {
    const T e = exp(zbar[t] / tau - top);
    denom += e;
    weighted += e * swbce_bce(y, zbar[t], exp(-fabs(zbar[t])));
  }
  denom = block_sum<kThreads>(denom, shared);
  weighted = block_sum<kThreads>(weighted, shared);
  const T loss = weighted / denom;
  if (threadIdx.x == 0) static_cast<T*>(p.loss)[b] = loss;
  if (p.grad == nullptr) return;

  for (int64_t t = first + threadIdx.x; t < n; t += kThreads) {
    const T w = exp(zbar[t] / tau - top) / denom, a = exp(-fabs(zbar[t]));
    zbar[t] =
        swbce_dzbar(w, zbar[t], a, swbce_bce(y, zbar[t], a), y, loss, tau, p.detach_weights) / T(swim_count(t, M));
  }
  __syncthreads();
  T* grad = static_cast<T*>(p.grad) + b * Tn;
  for (int64_t s = threadIdx.x; s < Tn; s += kThreads) {
    T g = T(0);
    if (s < n) {
      const int64_t hi = s + M - 1 < n - 1 ? s + M - 1 : n - 1;
      for (int64_t t = s > first ? s : first; t <= hi; ++t) g += zbar[t];
    }
    grad[s] = g;
  }
}

}  // namespace

void probe_accumulate_cuda(const AccumulateProblem& p, void* stream_ptr) {
  if (p.rows == 0 || p.heads == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.dtype) {
    case DType::Float32: launch_accumulate<DType::Float32>(p, stream); break;
    case DType::Float16: launch_accumulate<DType::Float16>(p, stream); break;
    case DType::BFloat16: launch_accumulate<DType::BFloat16>(p, stream); break;
    case DType::Float64: throw_unsupported_dtype("probe_accumulate_", p.dtype);
  }
}

void probe_stream_step_cuda(const StreamStepProblem& p, void* stream_ptr) {
  stream_step_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream_ptr)>>>(p);
  cuda_check(cudaGetLastError(), "probe_stream_step kernel launch");
}

void softmax_weighted_bce_cuda(const SwbceProblem& p, void* scratch, void* stream_ptr) {
  if (p.batch == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.dtype) {
    case DType::Float32:
      swbce_kernel<float><<<unsigned(p.batch), kThreads, 0, stream>>>(p, static_cast<float*>(scratch));
      break;
    case DType::Float64:
      swbce_kernel<double><<<unsigned(p.batch), kThreads, 0, stream>>>(p, static_cast<double*>(scratch));
      break;
    default: throw_unsupported_dtype("softmax_weighted_bce", p.dtype);
  }
  cuda_check(cudaGetLastError(), "softmax_weighted_bce kernel launch");
}

}  // namespace pykernels::core
