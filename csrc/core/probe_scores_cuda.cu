// CUDA probe scoring: a logit kernel that streams every activation once, then
// a small smoothing kernel. Per-element arithmetic lives in probe_scores.h
// (shared with, and tested by, the CPU build); this file holds the indexing,
// vector loads and warp reductions.
#include <algorithm>
#include <stdexcept>

#include "cuda_common.cuh"
#include "probe_scores.h"

namespace pykernels::core {
namespace {

constexpr int kTokensPerWarp = 4;  // each weight load is reused for 4 tokens
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxLayersPerLaunch = 64;  // layer table travels in kernel parameters
constexpr int kVecElems = 8;             // activations per lane per step (16 B of bf16)

struct LayerTable {
  const void* data[kMaxLayersPerLaunch];
  int64_t stride_b[kMaxLayersPerLaunch];
  int64_t stride_t[kMaxLayersPerLaunch];
  int count;
};

// Eight consecutive activations from a 16-byte aligned address.
template <DType D>
__device__ __forceinline__ void load8(const void* row, int64_t j, float (&x)[kVecElems]) {
  if constexpr (D == DType::Float32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + j);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    x[0] = a.x;
    x[1] = a.y;
    x[2] = a.z;
    x[3] = a.w;
    x[4] = b.x;
    x[5] = b.y;
    x[6] = b.z;
    x[7] = b.w;
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + j));
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = uint16_t(words[i] & 0xffffu), hi = uint16_t(words[i] >> 16);
      x[2 * i] = D == DType::BFloat16 ? bf16_bits_to_float(lo) : f16_bits_to_float(lo);
      x[2 * i + 1] = D == DType::BFloat16 ? bf16_bits_to_float(hi) : f16_bits_to_float(hi);
    }
  }
}

// One warp scores kTokensPerWarp consecutive tokens (flattened b*T + t) for a
// group of up to KG heads, over the layers in `table` (first_layer onwards).
// kVectorized: every row is 16-byte aligned and H % 8 == 0.
template <DType D, int KG, bool kVectorized>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    probe_logits_kernel(LayerTable table, int first_layer, bool accumulate, int64_t B, int64_t T, int64_t H, int64_t K,
                        const float* __restrict__ weight_t, const float* __restrict__ bias,
                        const int64_t* __restrict__ lengths, float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t first_token = warp * kTokensPerWarp;
  const int64_t k0 = int64_t(blockIdx.y) * KG;
  if (first_token >= B * T) return;
  const int64_t elem = dtype_size(D);

  bool valid[kTokensPerWarp];
  int64_t tb[kTokensPerWarp], tt[kTokensPerWarp];
#pragma unroll
  for (int r = 0; r < kTokensPerWarp; ++r) {
    const int64_t n = first_token + r;
    tb[r] = n / T;
    tt[r] = n % T;
    valid[r] = n < B * T && tt[r] < clamped_length(lengths, tb[r], T);
  }

  float acc[kTokensPerWarp][KG];
#pragma unroll
  for (int r = 0; r < kTokensPerWarp; ++r)
#pragma unroll
    for (int k = 0; k < KG; ++k) acc[r][k] = 0.f;

  for (int li = 0; li < table.count; ++li) {
    const float* w = weight_t + (int64_t(first_layer + li) * K + k0) * H;
    const void* rows[kTokensPerWarp];
#pragma unroll
    for (int r = 0; r < kTokensPerWarp; ++r)
      rows[r] =
          static_cast<const char*>(table.data[li]) + (tb[r] * table.stride_b[li] + tt[r] * table.stride_t[li]) * elem;
    if constexpr (kVectorized) {
#pragma unroll 2  // two steps' loads in flight per lane: the kernel is bound by memory latency
      for (int64_t j = int64_t(lane) * kVecElems; j < H; j += kWarp * kVecElems) {
        float x[kTokensPerWarp][kVecElems];
#pragma unroll
        for (int r = 0; r < kTokensPerWarp; ++r) {
          if (valid[r]) load8<D>(rows[r], j, x[r]);
          else
#pragma unroll
            for (int e = 0; e < kVecElems; ++e) x[r][e] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < KG; ++k) {
          if (k0 + k >= K) break;
          const float4* wp = reinterpret_cast<const float4*>(w + k * H + j);
          const float4 wa = __ldg(wp), wb = __ldg(wp + 1);
          const float wv[kVecElems] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
          for (int r = 0; r < kTokensPerWarp; ++r)
#pragma unroll
            for (int e = 0; e < kVecElems; ++e) acc[r][k] = fmaf(x[r][e], wv[e], acc[r][k]);
        }
      }
    } else {
      for (int64_t j = lane; j < H; j += kWarp) {
        float x[kTokensPerWarp];
#pragma unroll
        for (int r = 0; r < kTokensPerWarp; ++r) x[r] = valid[r] ? load_as_float<D>(rows[r], j) : 0.f;
#pragma unroll
        for (int k = 0; k < KG; ++k) {
          if (k0 + k >= K) break;
          const float wv = __ldg(w + k * H + j);
#pragma unroll
          for (int r = 0; r < kTokensPerWarp; ++r) acc[r][k] = fmaf(x[r], wv, acc[r][k]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kTokensPerWarp; ++r)
#pragma unroll
    for (int k = 0; k < KG; ++k) acc[r][k] = warp_sum(acc[r][k]);

  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < kTokensPerWarp; ++r) {
    const int64_t n = first_token + r;
    if (n >= B * T) break;
#pragma unroll
    for (int k = 0; k < KG; ++k) {
      if (k0 + k >= K) break;
      float* o = out + n * K + k0 + k;
      if (!valid[r]) *o = 0.f;  // padding holds 0
      else *o = accumulate ? *o + acc[r][k] : acc[r][k] + (bias ? bias[k0 + k] : 0.f);
    }
  }
}

// SWiM: one thread per (token, head); reads the raw logits, writes `out`.
__global__ void swim_kernel(const float* __restrict__ z, float* __restrict__ out, int64_t B, int64_t T, int64_t K,
                            const int64_t* __restrict__ lengths, int64_t window) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * T * K) return;
  const int64_t k = i % K, t = (i / K) % T, b = i / (K * T);
  out[i] = t < clamped_length(lengths, b, T) ? swim_at(z + b * T * K + k, K, t, window) : 0.f;
}

// EMA: one warp per (sequence, head). Tokens go in chunks of 32 * kItems; each
// lane composes its kItems token maps, a warp scan composes across lanes, and
// the carried state links the chunks (ema_compose is associative).
constexpr int kEmaItems = 4;

__device__ __forceinline__ EmaMap shfl_up_map(EmaMap m, int offset) {
  return EmaMap{__shfl_up_sync(kFullWarpMask, m.decay, offset), __shfl_up_sync(kFullWarpMask, m.add, offset)};
}

__global__ void ema_kernel(const float* __restrict__ z, float* __restrict__ out, int64_t B, int64_t T, int64_t K,
                           const int64_t* __restrict__ lengths, float alpha) {
  const int lane = threadIdx.x % kWarp;
  const int64_t seq = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (seq >= B * K) return;
  const int64_t b = seq / K, k = seq % K;
  const int64_t len = clamped_length(lengths, b, T);
  const float* zs = z + b * T * K + k;
  float* os = out + b * T * K + k;
  const EmaMap identity{1.f, 0.f};
  float carry = 0.f;
  for (int64_t c0 = 0; c0 < T; c0 += kWarp * kEmaItems) {
    const int64_t t0 = c0 + int64_t(lane) * kEmaItems;
    EmaMap mine = identity;
#pragma unroll
    for (int i = 0; i < kEmaItems; ++i)
      if (t0 + i < len) mine = ema_compose(mine, ema_token_map(zs[(t0 + i) * K], alpha, t0 + i == 0));
    EmaMap incl = mine;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const EmaMap other = shfl_up_map(incl, offset);
      if (lane >= offset) incl = ema_compose(other, incl);
    }
    EmaMap excl = shfl_up_map(incl, 1);
    if (lane == 0) excl = identity;
    float e = ema_apply(excl, carry);
#pragma unroll
    for (int i = 0; i < kEmaItems; ++i) {
      const int64_t t = t0 + i;
      if (t >= T) break;
      if (t < len) {
        e = ema_apply(ema_token_map(zs[t * K], alpha, t == 0), e);
        os[t * K] = e;
      } else {
        os[t * K] = 0.f;
      }
    }
    const EmaMap last{__shfl_sync(kFullWarpMask, incl.decay, kWarp - 1),
                      __shfl_sync(kFullWarpMask, incl.add, kWarp - 1)};
    carry = ema_apply(last, carry);
  }
}

template <DType D, int KG>
void launch_logits(const ProbeScoresProblem& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seq_len;
  const int64_t warps = (tokens + kTokensPerWarp - 1) / kTokensPerWarp;
  const dim3 grid(unsigned((warps + kWarpsPerBlock - 1) / kWarpsPerBlock), unsigned((p.heads + KG - 1) / KG));
  const dim3 block(kWarp * kWarpsPerBlock);

  bool vectorized = p.hidden % kVecElems == 0;
  const int64_t elem = dtype_size(p.dtype);
  for (int64_t l = 0; l < p.num_layers; ++l) {
    const LayerView& v = p.layers[l];
    vectorized = vectorized && reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && (v.stride_b * elem) % 16 == 0 &&
                 (v.stride_t * elem) % 16 == 0;
  }
  for (int64_t l0 = 0; l0 < p.num_layers; l0 += kMaxLayersPerLaunch) {
    LayerTable table{};
    table.count = int(std::min<int64_t>(kMaxLayersPerLaunch, p.num_layers - l0));
    for (int i = 0; i < table.count; ++i) {
      table.data[i] = p.layers[l0 + i].data;
      table.stride_b[i] = p.layers[l0 + i].stride_b;
      table.stride_t[i] = p.layers[l0 + i].stride_t;
    }
    const bool accumulate = l0 > 0;
    if (vectorized)
      probe_logits_kernel<D, KG, true><<<grid, block, 0, stream>>>(
          table, int(l0), accumulate, p.batch, p.seq_len, p.hidden, p.heads, p.weight_t, p.bias, p.lengths, p.out);
    else
      probe_logits_kernel<D, KG, false><<<grid, block, 0, stream>>>(
          table, int(l0), accumulate, p.batch, p.seq_len, p.hidden, p.heads, p.weight_t, p.bias, p.lengths, p.out);
    cuda_check(cudaGetLastError(), "probe_scores logit kernel launch");
  }
}

template <DType D>
void launch_logits_any_heads(const ProbeScoresProblem& p, cudaStream_t stream) {
  if (p.heads == 1) launch_logits<D, 1>(p, stream);
  else if (p.heads == 2) launch_logits<D, 2>(p, stream);
  else if (p.heads <= 4) launch_logits<D, 4>(p, stream);
  else launch_logits<D, 8>(p, stream);  // more heads: several head groups (grid.y)
}

}  // namespace

void probe_scores_cuda(const ProbeScoresProblem& problem, Smoothing smoothing, int64_t window, float alpha,
                       float* scratch, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t n = problem.batch * problem.seq_len * problem.heads;
  if (n == 0) return;
  const bool smooth = probe_scores_needs_scratch(smoothing, window);
  if (smooth && scratch == nullptr)
    throw std::invalid_argument("pykernels probe_scores CUDA: smoothing needs a scratch buffer");

  // Smoothing reads the raw logits while it writes the output, so the logits go to scratch.
  ProbeScoresProblem p = problem;
  float* raw = smooth ? scratch : nullptr;
  if (smooth) p.out = raw;
  switch (p.dtype) {
    case DType::Float32: launch_logits_any_heads<DType::Float32>(p, stream); break;
    case DType::Float16: launch_logits_any_heads<DType::Float16>(p, stream); break;
    case DType::BFloat16: launch_logits_any_heads<DType::BFloat16>(p, stream); break;
    case DType::Float64: throw_unsupported_dtype("probe_scores", p.dtype);
  }
  if (smoothing == Smoothing::Swim && smooth) {
    const int threads = 256;
    swim_kernel<<<unsigned((n + threads - 1) / threads), threads, 0, stream>>>(raw, problem.out, p.batch, p.seq_len,
                                                                               p.heads, p.lengths, window);
    cuda_check(cudaGetLastError(), "probe_scores swim kernel launch");
  } else if (smoothing == Smoothing::Ema) {
    const int warps_per_block = 4;
    const int64_t seqs = p.batch * p.heads;
    ema_kernel<<<unsigned((seqs + warps_per_block - 1) / warps_per_block), kWarp * warps_per_block, 0, stream>>>(
        raw, problem.out, p.batch, p.seq_len, p.heads, p.lengths, alpha);
    cuda_check(cudaGetLastError(), "probe_scores ema kernel launch");
  }
}

}  // namespace pykernels::core
