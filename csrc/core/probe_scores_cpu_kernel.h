// The CPU probe-logit kernels (probe_scores, probe_accumulate_), written once over the SIMD struct Vec (simd.h)
// and compiled once per instruction set by probe_scores_cpu{,_avx2,_avx512}.cpp,
// each in its own namespace PK_KERNEL_NS (see simd.h).
//
// Work unit: a tile of consecutive tokens of one sequence. For each layer the
// tile's rows are read once, R = 4 rows at a time so every weight vector
// loaded is used 4 times; the next rows are prefetched because each row is a
// separate stream that the hardware prefetcher would otherwise pick up late.
#pragma once

#include <algorithm>
#include <cstdint>

#include "probe_guard.h"
#include "probe_scores.h"
#include "simd.h"

namespace pykernels::core::PK_KERNEL_NS {

template <DType D>
inline Vec::reg load_activations(const void* row, int64_t j) {
  static_assert(D != DType::Float64, "load_activations: float activations only");
  if constexpr (D == DType::Float32) {
    return Vec::load(static_cast<const float*>(row) + j);
  } else if constexpr (D == DType::BFloat16) {
    return Vec::load_bf16(static_cast<const uint16_t*>(row) + j);
  } else {
    return Vec::load_f16(static_cast<const uint16_t*>(row) + j);
  }
}

// out[r * out_stride + k] += rows[r] . w[k * H : (k + 1) * H] for r < R, k < K.
template <DType D, int K, int R>
void dot_rows(const void* const* rows, const void* const* next_rows, const float* w, int64_t H, float* out,
              int64_t out_stride) {
  using reg = Vec::reg;
  constexpr int64_t kElemBytes = dtype_size(D);
  constexpr int64_t kLine = 64 / kElemBytes;  // activations per cache line
  constexpr int64_t kLanes = Vec::kLanes;
  static_assert(kLine % kLanes == 0, "a cache line must hold whole vectors");

  reg acc[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = Vec::zero();

  int64_t j = 0;
  for (; j + kLine <= H; j += kLine) {
    for (int r = 0; r < R; ++r) Vec::prefetch(static_cast<const char*>(next_rows[r]) + j * kElemBytes);
    for (int64_t u = 0; u < kLine; u += kLanes) {
      reg x[R];
      for (int r = 0; r < R; ++r) x[r] = load_activations<D>(rows[r], j + u);
      for (int k = 0; k < K; ++k) {
        const reg wk = Vec::load(w + k * H + j + u);
        for (int r = 0; r < R; ++r) acc[r][k] = Vec::fma(x[r], wk, acc[r][k]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < K; ++k) {
      float s = Vec::sum(acc[r][k]);
      for (int64_t jj = j; jj < H; ++jj) s += load_as_float<D>(rows[r], jj) * w[k * H + jj];
      out[r * out_stride + k] += s;
    }
  }
}

// Heads are processed in groups of up to 4 (the register budget); a larger K
// re-reads the R rows from L1 once per group.
template <DType D, int R>
void dot_rows_all_heads(const void* const* rows, const void* const* next_rows, const float* w, int64_t H, int64_t K,
                        float* out) {
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const float* wk = w + k0 * H;
    float* o = out + k0;
    switch (std::min<int64_t>(4, K - k0)) {
      case 1: dot_rows<D, 1, R>(rows, next_rows, wk, H, o, K); break;
      case 2: dot_rows<D, 2, R>(rows, next_rows, wk, H, o, K); break;
      case 3: dot_rows<D, 3, R>(rows, next_rows, wk, H, o, K); break;
      default: dot_rows<D, 4, R>(rows, next_rows, wk, H, o, K); break;
    }
  }
}

template <DType D>
void probe_logits_tile(const ProbeScoresProblem& p, int64_t b, int64_t t_begin, int64_t t_end) {
  constexpr int R = 4;
  const int64_t K = p.heads, H = p.hidden, L = p.num_layers;
  const int64_t elem = dtype_size(D);
  float* out = p.out + (b * p.seq_len + t_begin) * K;
  for (int64_t t = t_begin; t < t_end; ++t)
    for (int64_t k = 0; k < K; ++k) out[(t - t_begin) * K + k] = p.bias ? p.bias[k] : 0.f;

  auto row = [&](int64_t l, int64_t t) -> const void* {
    const LayerView& v = p.layers[l];
    return static_cast<const char*>(v.data) + (b * v.stride_b + t * v.stride_t) * elem;
  };
  for (int64_t l = 0; l < L; ++l) {
    const float* w = p.weight_t + l * K * H;
    int64_t t = t_begin;
    for (; t + R <= t_end; t += R) {
      const void* rows[R];
      const void* next[R];
      // Prefetch the next group of this layer, or the tile's start in the next layer.
      const bool last_group = t + 2 * R > t_end;
      const int64_t nl = last_group ? std::min(l + 1, L - 1) : l;
      const int64_t nt = last_group ? t_begin : t + R;
      for (int r = 0; r < R; ++r) {
        rows[r] = row(l, t + r);
        next[r] = row(nl, std::min(nt + r, t_end - 1));
      }
      dot_rows_all_heads<D, R>(rows, next, w, H, K, out + (t - t_begin) * K);
    }
    for (; t < t_end; ++t) {
      const void* rows[1] = {row(l, t)};
      dot_rows_all_heads<D, 1>(rows, rows, w, H, K, out + (t - t_begin) * K);
    }
  }
}

// probe_accumulate: acc[n, :] += row_n . W for rows [n_begin, n_end), R rows at a time.
template <DType D>
void accumulate_rows(const AccumulateProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int R = 4;
  const int64_t elem = dtype_size(D), K = p.heads;
  auto row = [&](int64_t n) -> const void* { return static_cast<const char*>(p.hidden) + n * p.row_stride * elem; };
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    const void* rows[R];
    const void* next[R];
    for (int r = 0; r < R; ++r) {
      rows[r] = row(n + r);
      next[r] = row(std::min(n + R + r, n_end - 1));
    }
    dot_rows_all_heads<D, R>(rows, next, p.weight_t, p.hidden_size, K, p.acc + n * K);
  }
  for (; n < n_end; ++n) {
    const void* rows[1] = {row(n)};
    dot_rows_all_heads<D, 1>(rows, rows, p.weight_t, p.hidden_size, K, p.acc + n * K);
  }
}

inline void accumulate_rows_any_dtype(const AccumulateProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.dtype) {
    case DType::Float32: accumulate_rows<DType::Float32>(p, n_begin, n_end); break;
    case DType::Float16: accumulate_rows<DType::Float16>(p, n_begin, n_end); break;
    case DType::BFloat16: accumulate_rows<DType::BFloat16>(p, n_begin, n_end); break;
    case DType::Float64: throw_unsupported_dtype("probe_accumulate_", p.dtype);
  }
}

inline void probe_logits_tile_any_dtype(const ProbeScoresProblem& p, int64_t b, int64_t t_begin, int64_t t_end) {
  switch (p.dtype) {
    case DType::Float32: probe_logits_tile<DType::Float32>(p, b, t_begin, t_end); break;
    case DType::Float16: probe_logits_tile<DType::Float16>(p, b, t_begin, t_end); break;
    case DType::BFloat16: probe_logits_tile<DType::BFloat16>(p, b, t_begin, t_end); break;
    case DType::Float64: throw_unsupported_dtype("probe_scores", p.dtype);
  }
}

}  // namespace pykernels::core::PK_KERNEL_NS
