// CUDA flatness kernels. Per-element arithmetic lives in flatness.h (shared with,
// and tested by, the CPU build); this file holds indexing and warp/block reductions.
#include <algorithm>
#include <stdexcept>

#include "cuda_common.cuh"
#include "flatness.h"

namespace pykernels::core {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kSamplesPerWarp = 8;  // logsumexp_hvp: tangents handled by one warp
constexpr int kDotThreads = 256;    // probe_dots: one block per probe row

// The running max of logsumexp, with its NaN rule (lse_max_step), as a reduction op.
struct LseMaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return lse_max_step(a, b);
  }
};

// logsumexp of one row, cooperatively by a warp; every lane gets the result.
template <typename T, typename A = typename Elem<T>::Acc>
__device__ __forceinline__ A warp_row_logsumexp(const T* z, int64_t cols, int lane) {
  A m = A(-INFINITY);
  for (int64_t k = lane; k < cols; k += kWarp) m = lse_max_step(m, Elem<T>::load(z + k));
  m = warp_reduce(m, LseMaxOp{});
  A sum = A(0);
  for (int64_t k = lane; k < cols; k += kWarp) sum += lse_term(Elem<T>::load(z + k), m);
  return lse_finish(m, warp_sum(sum));
}

template <typename T>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) energy_kernel(EnergyProblem<T> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= p.rows) return;
  const auto lse = warp_row_logsumexp(p.logits + r * p.row_stride, p.cols, lane);
  if (lane == 0) p.out[r] = -lse;
}

// Warp (row r, tangents [i0, i0 + kSamplesPerWarp)). The warp of the first chunk
// also writes the row's softmax and energy; the others recompute the (cached) row.
template <typename T>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) logsumexp_hvp_kernel(LseHvpProblem<T> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= p.rows) return;
  const int64_t K = p.cols;
  const T* z = p.logits + r * p.logits_row_stride;
  const T lse = warp_row_logsumexp(z, K, lane);
  if (blockIdx.y == 0) {
    for (int64_t k = lane; k < K; k += kWarp) p.softmax[r * K + k] = softmax_at(z[k], lse);
    if (lane == 0) p.energy[r] = -lse;
  }
  const int64_t i0 = int64_t(blockIdx.y) * kSamplesPerWarp;
  const int64_t i1 = i0 + kSamplesPerWarp < p.samples ? i0 + kSamplesPerWarp : p.samples;
  for (int64_t i = i0; i < i1; ++i) {
    const T* u = p.tangents + i * p.tangent_sample_stride + r * p.tangent_row_stride;
    T dot = T(0);
    for (int64_t k = lane; k < K; k += kWarp) dot += softmax_at(z[k], lse) * u[k];
    dot = warp_sum(dot);
    T* h = p.hvp + (i * p.rows + r) * K;
    for (int64_t k = lane; k < K; k += kWarp) h[k] = lse_hvp_at(softmax_at(z[k], lse), u[k], dot);
  }
}

template <typename T>
__global__ void fill_probes_kernel(T* out, int64_t count, ProbeKey key, uint64_t offset, ProbeKind kind) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    out[i] = probe_value<T>(key, offset + uint64_t(i), kind);
}

template <typename T>
__global__ void __launch_bounds__(kDotThreads) probe_dots_kernel(ProbeDotsProblem<T> p) {
  __shared__ T partial[kDotThreads / kWarp];
  const int64_t r = blockIdx.x;  // = s * batch + b
  const int64_t s = r / p.batch, b = r % p.batch;
  const T* v = p.v + s * p.v_sample_stride + b * p.v_batch_stride;
  const T* w = p.w + s * p.w_sample_stride + b * p.w_batch_stride;
  T acc = T(0);
  for (int64_t d = threadIdx.x; d < p.dim; d += kDotThreads) acc += v[d] * w[d];
  acc = block_sum<kDotThreads>(acc, partial);
  if (threadIdx.x == 0) p.out[r] = acc;
}

// One block per tangent row: the row is read and written once; its factor row is r % period.
template <typename T>
__global__ void __launch_bounds__(kDotThreads) curvature_step_kernel(CurvatureStepProblem<T> p) {
  __shared__ T partial[kDotThreads / kWarp];
  const int64_t r = blockIdx.x;
  T* t = p.tangents + r * p.dim;
  const T* d1 = p.d1 + (r % p.period) * p.dim;
  const T* c2 = p.c2 + (r % p.period) * p.dim;
  T acc = T(0);
  for (int64_t j = threadIdx.x; j < p.dim; j += kDotThreads) {
    const T v = t[j];
    acc += c2[j] * v * v;
    t[j] = v * d1[j];
  }
  acc = block_sum<kDotThreads>(acc, partial);
  if (threadIdx.x == 0) p.out[r] = acc;
}

unsigned row_blocks(int64_t rows) { return unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

template <typename T>
void energy_cuda(const EnergyProblem<T>& p, void* stream) {
  if (p.rows == 0) return;
  energy_kernel<T><<<row_blocks(p.rows), kWarp * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_check(cudaGetLastError(), "energy kernel launch");
}

template <typename T>
void logsumexp_hvp_cuda(const LseHvpProblem<T>& p, void* stream) {
  if (p.rows == 0) return;
  const int64_t chunks = std::max<int64_t>(1, (p.samples + kSamplesPerWarp - 1) / kSamplesPerWarp);
  if (chunks > 65535) throw std::invalid_argument("pykernels logsumexp_hvp CUDA: more than 524280 tangents");
  const dim3 grid(row_blocks(p.rows), unsigned(chunks));
  logsumexp_hvp_kernel<T><<<grid, kWarp * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_check(cudaGetLastError(), "logsumexp_hvp kernel launch");
}

template <typename T>
void fill_probes_cuda(T* out, int64_t count, uint64_t seed, uint64_t offset, ProbeKind kind, void* stream) {
  if (count == 0) return;
  const int threads = 256;
  const unsigned blocks = unsigned(std::min<int64_t>((count + threads - 1) / threads, 8192));
  fill_probes_kernel<T>
      <<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(out, count, probe_key(seed), offset, kind);
  cuda_check(cudaGetLastError(), "fill_probes kernel launch");
}

template <typename T>
void probe_dots_cuda(const ProbeDotsProblem<T>& p, void* stream) {
  const int64_t rows = p.samples * p.batch;
  if (rows == 0) return;
  probe_dots_kernel<T><<<unsigned(rows), kDotThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_check(cudaGetLastError(), "probe_dots kernel launch");
}

template <typename T>
void curvature_step_cuda(const CurvatureStepProblem<T>& p, void* stream) {
  if (p.rows == 0) return;
  if (p.rows > 0x7fffffff) throw std::invalid_argument("pykernels curvature_step_ CUDA: more than 2^31 - 1 rows");
  curvature_step_kernel<T><<<unsigned(p.rows), kDotThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  cuda_check(cudaGetLastError(), "curvature_step kernel launch");
}

template void energy_cuda(const EnergyProblem<float>&, void*);
template void energy_cuda(const EnergyProblem<double>&, void*);
template void energy_cuda(const EnergyProblem<Float16Bits>&, void*);
template void energy_cuda(const EnergyProblem<BFloat16Bits>&, void*);
template void logsumexp_hvp_cuda(const LseHvpProblem<float>&, void*);
template void logsumexp_hvp_cuda(const LseHvpProblem<double>&, void*);
template void fill_probes_cuda(float*, int64_t, uint64_t, uint64_t, ProbeKind, void*);
template void fill_probes_cuda(double*, int64_t, uint64_t, uint64_t, ProbeKind, void*);
template void probe_dots_cuda(const ProbeDotsProblem<float>&, void*);
template void probe_dots_cuda(const ProbeDotsProblem<double>&, void*);
template void curvature_step_cuda(const CurvatureStepProblem<float>&, void*);
template void curvature_step_cuda(const CurvatureStepProblem<double>&, void*);

}  // namespace pykernels::core
