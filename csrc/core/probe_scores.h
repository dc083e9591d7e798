// Fused activation-probe scoring: z[b,t,k] = sum_l h_l[b,t,:] . W_l[:,k] + bias[k],
// then optional smoothing along t (see docs in pykernels/probes/scoring.py).
//
// Torch-free: raw pointers and sizes. The torch bindings in csrc/ops build a
// ProbeScoresProblem from tensors and call these entry points.
#pragma once

#include <cstdint>

#include "common.h"

namespace pykernels::core {

enum class Smoothing : int { None = 0, Swim = 1, Ema = 2 };

// One layer's activations [B, T, H]: strides in elements, the hidden dim is unit-stride.
struct LayerView {
  const void* data;
  int64_t stride_b;
  int64_t stride_t;
};

struct ProbeScoresProblem {
  const LayerView* layers;  // [num_layers]; on CUDA this array lives in host memory
  int64_t num_layers;
  DType dtype;  // element type of every layer
  int64_t batch, seq_len, hidden, heads;
  const float* weight_t;   // [num_layers, heads, hidden] float32, contiguous (W transposed)
  const float* bias;       // [heads] or nullptr
  const int64_t* lengths;  // [batch] valid tokens per sequence, or nullptr (= seq_len)
  float* out;              // [batch, seq_len, heads] float32, contiguous
};

// Valid length of sequence b, clamped to [0, seq_len] so bad lengths cannot
// address memory outside the batch (the Python wrapper reports them first).
PK_HD int64_t clamped_length(const int64_t* lengths, int64_t b, int64_t seq_len) {
  if (lengths == nullptr) return seq_len;
  const int64_t n = lengths[b];
  return n < 0 ? 0 : (n > seq_len ? seq_len : n);
}

// ---- Smoothing arithmetic, shared by the CPU and CUDA kernels ----

// SWiM at token t (0-based): mean of z over the last `window` tokens, or over
// the t+1 tokens available when t < window. z points at token 0 of one
// (sequence, head) series whose consecutive tokens are `stride` floats apart.
// Summed directly (not a running sum) so a NaN/Inf reaches exactly the
// windows that contain it.
// Templated on the element type so the float64 training loss shares it.
template <typename T>
PK_HD T swim_at(const T* z, int64_t stride, int64_t t, int64_t window) {
  const int64_t first = t + 1 > window ? t + 1 - window : 0;
  T sum = T(0);
  for (int64_t s = first; s <= t; ++s) sum += z[s * stride];
  return sum / T(t + 1 - first);
}

// EMA as an affine map e -> decay * e + add. Token t's map is
// (1 - alpha, alpha * z_t); the first token's is (0, z_0) since e_0 = z_0.
struct EmaMap {
  float decay;
  float add;
};

PK_HD EmaMap ema_token_map(float z, float alpha, bool first) {
  return first ? EmaMap{0.f, z} : EmaMap{1.f - alpha, alpha * z};
}

// Map for "apply `earlier`, then `later`" (the scan operator of the parallel
// EMA). A zero decay means the earlier state is forgotten exactly (first token,
// or alpha == 1): it is dropped rather than multiplied by zero, so a NaN before
// a reset does not leak past it. A product of decays that underflows is kept at
// the smallest normal float instead, so a NaN/Inf state still reaches every
// later token as it does in the sequential recurrence.
PK_HD EmaMap ema_compose(EmaMap earlier, EmaMap later) {
  if (later.decay == 0.f) return later;
  const float add = later.decay * earlier.add + later.add;
  if (earlier.decay == 0.f) return EmaMap{0.f, add};
  const float decay = later.decay * earlier.decay;
  return EmaMap{decay == 0.f ? 1.17549435e-38f : decay, add};
}

PK_HD float ema_apply(EmaMap m, float e) { return m.decay == 0.f ? m.add : m.decay * e + m.add; }

// ---- CPU entry points (probe_scores_cpu.cpp) ----

// Raw logits (bias included, no smoothing) for tokens [t_begin, t_end) of
// sequence b. Thread-safe for disjoint token ranges; the caller parallelises.
void probe_logits_cpu(const ProbeScoresProblem& p, int64_t b, int64_t t_begin, int64_t t_end);

// Smooths out[b, :len, :] in place and writes 0 to the padded tail [len, T).
void smooth_sequence_cpu(const ProbeScoresProblem& p, int64_t b, Smoothing smoothing, int64_t window, float alpha);

// Which SIMD path probe_logits_cpu takes on this machine: "avx512", "avx2" or "scalar".
const char* probe_scores_cpu_isa();

// ---- CUDA entry points (probe_scores_cuda.cu); `stream` is a cudaStream_t ----

// Whether the CUDA path needs a float scratch buffer of batch*seq_len*heads.
inline bool probe_scores_needs_scratch(Smoothing smoothing, int64_t window) {
  return smoothing == Smoothing::Ema || (smoothing == Smoothing::Swim && window > 1);
}

// Full op: logits then smoothing, all queued on `stream` (no host sync, no
// allocation: capturable in a CUDA graph). `p.layers` is read on the host;
// every other pointer is device memory. Throws std::runtime_error on a CUDA error.
void probe_scores_cuda(const ProbeScoresProblem& p, Smoothing smoothing, int64_t window, float alpha, float* scratch,
                       void* stream);

}  // namespace pykernels::core
