// The probe guard's kernels (docs: pykernels/probes/stream.py, training.py):
//   probe_accumulate    acc[n, k] += hidden[n, :] . W_l[:, k]   (one layer of a probe, in place)
//   probe_stream_step   one decode step of per-slot streaming smoothing + latched flags
//   probe_stream_step_varlen  the same over a segment of tokens per slot (a prefill chunk)
//   softmax_weighted_bce  the paper's training loss and its gradient, fused
//
// Torch-free: raw pointers and sizes. Smoothing reuses probe_scores.h (swim_at,
// ema_token_map, ema_apply), so streaming equals probe_scores by construction.
#pragma once

#include <math.h>  // exp / log1p overloads for float and double, host and device

#include <cstdint>

#include "probe_scores.h"

namespace pykernels::core {

// ---- probe_accumulate ----

struct AccumulateProblem {
  const void* hidden;  // [rows, hidden], unit stride along hidden
  int64_t row_stride;  // elements between rows
  DType dtype;
  int64_t rows, hidden_size, heads;
  const float* weight_t;  // [heads, hidden] float32, contiguous (W_l transposed)
  float* acc;             // [rows, heads] float32, contiguous
};

// Adds rows [row_begin, row_end) into acc. Thread-safe for disjoint row ranges.
void probe_accumulate_cpu(const AccumulateProblem& p, int64_t row_begin, int64_t row_end);
// Whole problem on `stream` (a cudaStream_t), one launch.
void probe_accumulate_cuda(const AccumulateProblem& p, void* stream);

// ---- probe_stream_step (one token per row) and probe_stream_step_varlen (a segment per row) ----
//
// Per-slot state (slot s in [0, slots)):
//   state[s]  float32 [ring, heads]: ring == 1 holds the EMA e; for SWiM
//             ring == 2 * window holds the last `window` logits twice (token t
//             at t % window and t % window + window), so the window ending at
//             any token is contiguous and swim_at reads it oldest first, exactly
//             as probe_scores does.
//   meta[s]   int64 {tokens seen since reset, token index of the first flag or -1, stamp}
//   status    int64 {steps taken, error bits} (shared by all slots)
// Row r steps slot slot_ids[r] through its segment of tokens in order: token
// rows [starts[r], starts[r] + counts[r]) in the varlen op, row r alone in the
// one-token op. A step with a bad slot id or segment changes no state, sets an
// error bit, and returns NaN scores for the segments' tokens with every row
// flagged (fail closed); the host reads the bits when it next reads flags.

enum StreamError : int64_t { kSlotOutOfRange = 1, kSlotDuplicated = 2, kSegmentOutOfRange = 4 };
constexpr int kMetaCount = 0, kMetaFlagToken = 1, kMetaStamp = 2, kMetaFields = 3;

struct StreamStepProblem {
  float* state;
  int64_t* meta;
  int64_t* status;
  int64_t slots, ring, heads;
  int64_t window;           // SWiM window; 0 selects the EMA
  float alpha;              // EMA weight of the newest token
  const int64_t* slot_ids;  // [rows]
  const int64_t* starts;    // [rows] first token row of each segment, or nullptr: row r is token r
  const int64_t* counts;    // [rows] tokens of each segment (with starts)
  const float* logits;      // [tokens, heads] contiguous
  const bool* active;  // [rows] or nullptr (all active); one-token op only: inactive rows leave their slot untouched
  const float* threshold;  // [heads]
  int64_t rows;
  int64_t tokens;
  float* scores;  // [tokens, heads] out (token rows outside every segment: left to the caller, zeros)
  bool* flagged;  // [rows] out
};

// Score of one (slot, head) after appending logit z; updates the slot's state.
PK_HD float stream_update(float* state, int64_t heads, int64_t k, int64_t count, int64_t window, float alpha, float z) {
  if (window == 0) {
    const float e = ema_apply(ema_token_map(z, alpha, count == 0), state[k]);
    state[k] = e;
    return e;
  }
  const int64_t pos = count % window;
  state[pos * heads + k] = z;
  state[(pos + window) * heads + k] = z;
  // Read the window ending at the newest token from the half where it is contiguous.
  const int64_t t = count < window ? count : pos + window;
  return swim_at(state + k, heads, t, window);
}

// Fail closed: a NaN score counts as a crossing.
PK_HD bool crosses(float score, float threshold) { return !(score <= threshold); }

// Row r's token rows [begin, begin + count).
PK_HD void stream_segment(const StreamStepProblem& p, int64_t r, int64_t& begin, int64_t& count) {
  begin = p.starts != nullptr ? p.starts[r] : r;
  count = p.starts != nullptr ? p.counts[r] : 1;
}

PK_HD bool segment_in_range(int64_t begin, int64_t count, int64_t tokens) {
  return begin >= 0 && begin <= tokens && count >= 0 && count <= tokens - begin;  // no overflow
}

// Error bits of row r's segment: inside [0, tokens), count >= 0, starting at or
// after row r - 1's end (checked only when row r - 1 is in range: else it is
// the error, and its end could overflow).
PK_HD int64_t stream_segment_error(const StreamStepProblem& p, int64_t r) {
  if (p.starts == nullptr) return 0;
  const int64_t begin = p.starts[r];
  if (!segment_in_range(begin, p.counts[r], p.tokens)) return kSegmentOutOfRange;
  if (r > 0 && segment_in_range(p.starts[r - 1], p.counts[r - 1], p.tokens) &&
      begin < p.starts[r - 1] + p.counts[r - 1])
    return kSegmentOutOfRange;
  return 0;
}

// Row r of a step whose slot ids and segments were checked: advances its slot
// through its tokens, writes their scores and the row's latched flag.
PK_HD void stream_step_row(const StreamStepProblem& p, int64_t r) {
  const int64_t K = p.heads;
  int64_t* meta = p.meta + p.slot_ids[r] * kMetaFields;
  if (p.active != nullptr && !p.active[r]) {
    for (int64_t k = 0; k < K; ++k) p.scores[r * K + k] = 0.f;
    p.flagged[r] = meta[kMetaFlagToken] >= 0;
    return;
  }
  float* state = p.state + p.slot_ids[r] * p.ring * K;
  int64_t begin, count;
  stream_segment(p, r, begin, count);
  for (int64_t i = begin; i < begin + count; ++i) {
    float* out = p.scores + i * K;
    bool crossed = false;
    for (int64_t k = 0; k < K; ++k) {
      out[k] = stream_update(state, K, k, meta[kMetaCount], p.window, p.alpha, p.logits[i * K + k]);
      crossed = crossed || crosses(out[k], p.threshold[k]);
    }
    if (crossed && meta[kMetaFlagToken] < 0) meta[kMetaFlagToken] = meta[kMetaCount];
    ++meta[kMetaCount];
  }
  p.flagged[r] = meta[kMetaFlagToken] >= 0;
}

// Row r of a step with bad slot ids or segments: NaN scores for its tokens
// that lie in [0, tokens) (the segment itself may be the error), flagged.
PK_HD void stream_fail_row(const StreamStepProblem& p, int64_t r) {
  int64_t begin, count;
  stream_segment(p, r, begin, count);
  if (count > 0 && begin < p.tokens) {
    const int64_t end = begin > p.tokens - count ? p.tokens : begin + count;  // no overflow
    for (int64_t i = begin < 0 ? 0 : begin; i < end; ++i)
      for (int64_t k = 0; k < p.heads; ++k) p.scores[i * p.heads + k] = NAN;
  }
  p.flagged[r] = true;
}

void probe_stream_step_cpu(const StreamStepProblem& p);
void probe_stream_step_cuda(const StreamStepProblem& p, void* stream);

// ---- softmax_weighted_bce ----
//
// Sequence b (valid tokens [0, n), n >= 1), window M, temperature tau, label y:
//   zbar_t = swim_at(z, t, M), predictions at t in [M - 1, n - 1] (or only
//   t = n - 1 when n < M: one prediction averaging every token),
//   w = softmax(zbar / tau) over the predictions,
//   loss = sum_t w_t * bce(y, zbar_t),  bce(y, x) = softplus(x) - y * x.
// d loss / d zbar_t = w_t * (sigmoid(zbar_t) - y) + w_t * (bce_t - loss) / tau
// (the second term only when the weights are not detached), and
// d loss / d z_s = sum over predictions t whose window holds s of that / count_t.

struct SwbceProblem {
  const void* logits;      // [batch, seq_len] contiguous, of `dtype`
  const void* labels;      // [batch], same type
  const int64_t* lengths;  // [batch], values in [1, seq_len]
  int64_t batch, seq_len, window;
  double tau;
  bool detach_weights;
  DType dtype;  // of logits, labels, loss and grad: Float32 or Float64
  void* loss;   // [batch] out
  void* grad;   // [batch, seq_len] out (d loss_b / d z), or nullptr
};

// Valid tokens of sequence b, clamped to [1, seq_len] so bad lengths cannot
// address memory outside the batch (the Python wrapper reports them first).
PK_HD int64_t swbce_length(const int64_t* lengths, int64_t b, int64_t seq_len) {
  const int64_t n = lengths[b];
  return n < 1 ? 1 : (n > seq_len ? seq_len : n);
}

PK_HD int64_t swbce_first_prediction(int64_t n, int64_t window) { return n >= window ? window - 1 : n - 1; }

// softplus(x) and sigmoid(x) from a = exp(-|x|), which both need (one exp for both).
template <typename T>
PK_HD T softplus_from(T x, T a) {
  return (x > T(0) ? x : T(0)) + log1p(a);
}

template <typename T>
PK_HD T sigmoid_from(T x, T a) {
  return x >= T(0) ? T(1) / (T(1) + a) : a / (T(1) + a);
}

// bce(y, x) = -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))) = softplus(x) - y x.
template <typename T>
PK_HD T swbce_bce(T y, T x, T a) {
  return softplus_from(x, a) - y * x;
}

// d loss / d zbar_t from the prediction's weight w, zbar (with a = exp(-|zbar|)),
// its bce, the label and the sequence loss.
template <typename T>
PK_HD T swbce_dzbar(T w, T zbar, T a, T bce, T y, T loss, T tau, bool detach_weights) {
  const T g = w * (sigmoid_from(zbar, a) - y);
  return detach_weights ? g : g + w * (bce - loss) / tau;
}

// Number of tokens in the window of prediction t.
PK_HD int64_t swim_count(int64_t t, int64_t window) { return t + 1 < window ? t + 1 : window; }

void softmax_weighted_bce_cpu(const SwbceProblem& p, int64_t b);
// `scratch` holds batch * seq_len elements of the logits' type (device memory).
void softmax_weighted_bce_cuda(const SwbceProblem& p, void* scratch, void* stream);

}  // namespace pykernels::core
