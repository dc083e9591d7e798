// Model-selection kernels (docs: pykernels/selection/correlation.py):
//   pairwise_corr_distance  d_ij = 1 - Pearson(x_i, x_j) between the rows of each model's features;
//   spearman                Spearman's rho with average ranks for ties, batched over rows;
//   parc_spearman           PARC's fused path: feature distances -> ranks -> Spearman against the
//                           two-valued label distances (same class / different class), in closed form.
//
// Torch-free: raw pointers and sizes. The torch bindings in csrc/ops build the problems from tensors.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace pykernels::core {

// ---- Arithmetic shared by the CPU and CUDA kernels ----

// Position of pair (i, j), i < j, in the row-major strict upper triangle of an n x n matrix.
PK_HD int64_t triu_index(int64_t i, int64_t j, int64_t n) { return i * (2 * n - i - 1) / 2 + (j - i - 1); }

// 1 - r with the correlation clipped to [-1, 1], as np.corrcoef clips it; NaN stays NaN.
// Clipping makes rounding of perfectly (anti-)correlated rows land on exact ties (0 or 2).
template <typename T>
PK_HD T corr_distance(T r) {
  return T(1) - (r > T(1) ? T(1) : (r < T(-1) ? T(-1) : r));
}

// Correlations at least this close to +-1 are checked for exact duplicates (see
// duplicate_correlation); the gate only saves work, the decision is bit equality.
constexpr double kDuplicateGate = 0.999;

// r for the pair of normalised rows (a, b) (D values each, `stride` apart): exactly +1 when the
// rows are bit-equal (a duplicated sample) and -1 when exact negatives. Rounding would otherwise
// leave 1 +- a few ulps, differently per pair position and per backend, splitting what are ties.
template <typename Z>
PK_HD Z duplicate_correlation(const Z* a, const Z* b, int64_t d, int64_t stride, Z r) {
  if (!(r >= Z(kDuplicateGate) || r <= Z(-kDuplicateGate))) return r;
  const bool positive = r > Z(0);
  for (int64_t k = 0; k < d; ++k) {
    const Z x = a[k * stride], y = b[k * stride];
    if (positive ? x != y : x != -y) return r;
  }
  return positive ? Z(1) : Z(-1);
}

// t^3 - t: what a group of t tied values removes from 12 * M * (variance of the average ranks),
// exact (t < 2^31, so below 2^93): the CPU and CUDA kernels sum tie terms in 128-bit integers and
// round the total to double once, so the sum is exact and does not depend on the order.
PK_HD __int128 tie_term_exact(int64_t t) { return __int128(t) * t * t - t; }

// The bits of one type read as another of the same size (memcpy compiles to a move, host and device).
template <typename To, typename From>
PK_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To out;
  memcpy(&out, &v, sizeof out);
  return out;
}

PK_HD double pk_nan() { return bit_cast<double>(INT64_C(0x7ff8000000000000)); }
PK_HD int64_t double_bits(double d) { return bit_cast<int64_t>(d); }
PK_HD double bits_double(int64_t b) { return bit_cast<double>(b); }

// Signed-integer sort key of a double that orders like the double (-0 and +0 tie; no NaN).
PK_HD int64_t order_key(double v) {
  if (v == 0.0) return 0;
  const int64_t b = double_bits(v);
  return b < 0 ? b ^ INT64_C(0x7fffffffffffffff) : b;
}

// Sort key of one PARC pair. Distances are >= +0, so their IEEE bits order them; the sign bit
// marks same-class pairs, so an ascending *signed* sort puts every same-class pair first and
// then every different-class pair, each group ordered by distance.
PK_HD int64_t parc_pair_key(double distance, bool same_class) {
  const int64_t bits = double_bits(distance == 0.0 ? 0.0 : distance);
  return same_class ? (bits | INT64_MIN) : bits;
}

PK_HD double parc_key_distance(int64_t key) { return bits_double(key & INT64_MAX); }

// Spearman's rho between M values and a two-valued variable (n_same pairs at the low value,
// n_diff at the high one): the point-biserial correlation of the average ranks,
//   rho = (U - n0 n1 / 2) / (sqrt(n0 n1) sigma_R),  12 M sigma_R^2 = M^3 - M - sum(t^3 - t),
// with U the Mann-Whitney count of (different, same) pairs where the different-class value is
// larger, ties counting 1/2. twice_u = 2U is an integer, kept exact by the callers.
PK_HD double parc_rho(int64_t n_same, int64_t n_diff, int64_t twice_u, double ties) {
  if (n_same <= 0 || n_diff <= 0) return pk_nan();
  const double m = double(n_same) + double(n_diff);
  const double spread = (m * m * m - m - ties) / (12.0 * m);   // sigma_R^2
  if (!(spread > 0.0)) return pk_nan();                        // every value tied
  const double numerator = double(twice_u - n_same * n_diff);  // 2U - n0 n1, exact in int64
  return numerator / (2.0 * sqrt(double(n_same) * double(n_diff) * spread));
}

// Spearman's rho from doubled average ranks: `centered_products` = sum over the M values of
// (2 r_x - M - 1)(2 r_y - M - 1), ties_x / ties_y = sum(t^3 - t) of each side's tie groups.
//   S_xy = centered_products / 4,  S_xx = (M^3 - M - ties_x) / 12.
PK_HD double spearman_rho(int64_t m, double centered_products, double ties_x, double ties_y) {
  const double md = double(m);
  const double sxx = md * md * md - md - ties_x;
  const double syy = md * md * md - md - ties_y;
  if (m < 2 || !(sxx > 0.0) || !(syy > 0.0)) return pk_nan();
  return 3.0 * centered_products / sqrt(sxx * syy);
}

// ---- Problems ----

// Features of a batch of models: [batch, n, d], contiguous.
struct FeatureBatch {
  const void* data;
  DType dtype;  // Float32 or Float64
  int64_t batch, n, d;
};

// The label side of PARC, computed once per probe set: the samples ordered by class, so
// that every same-class pair (i < j in that order) lies in a diagonal block.
struct ParcLabels {
  const int64_t* order;      // [n] sample index at each position
  const int64_t* block_end;  // [n] end (exclusive) of the class block holding each position
  int64_t n_same, n_diff;    // pairs within / across classes (host values; CUDA reads device copies)
};

// ---- CPU entry points (parc_cpu.cpp) ----

// Normalised rows, stored transposed: zt[k * n + i] = (x_ik - mean_i) / |x_i - mean_i|, so that a
// row's dot products with a run of other rows vectorise. Z is float (Float32 input) or double.
// Returns false for a constant or non-finite row (its column is then NaN).
template <typename Z>
bool normalize_row_cpu(const FeatureBatch& f, int64_t b, int64_t row, Z* zt, int64_t column);

// Distances of rows [row_begin, row_end) from the normalised rows zt ([d, n], see above):
// out is [n, n] (full, zero diagonal) or [n(n-1)/2] (triu), in Z.
template <typename Z>
void corr_distance_rows_cpu(const Z* zt, int64_t n, int64_t d, int64_t row_begin, int64_t row_end, bool triu, Z* out);

// Buffers reused across calls by one thread.
struct RankItem {
  double value;
  int64_t index;
};
struct RankScratch {
  std::vector<RankItem> items;
  std::vector<int64_t> bucket_end;
};

// Doubled average ranks (2 * rank, 1-based: an integer) of m non-NaN values read with `stride`;
// returns the tie sum sum(t^3 - t). Requires m < 2^53.
template <typename T>
double twice_average_ranks_cpu(const T* values, int64_t stride, int64_t m, int64_t* twice_rank, RankScratch& scratch);

// Spearman's rho from two doubled-rank vectors, with exact integer products.
double spearman_from_ranks_cpu(const int64_t* twice_rank_x, const int64_t* twice_rank_y, int64_t m, double ties_x,
                               double ties_y);

// The label side from class ids [n] (equal ids = same class): order and block_end are [n].
void parc_labels_cpu(const int64_t* classes, int64_t n, int64_t* order, int64_t* block_end, int64_t* n_same,
                     int64_t* n_diff);

struct ParcScratch {
  std::vector<double> zt, pairs, bucketed;
  std::vector<int64_t> same_coarse_end, diff_coarse_end, same_end, diff_end;
};

// PARC's Spearman rho for model b; NaN for a model with a constant or non-finite row.
double parc_spearman_cpu(const FeatureBatch& f, const ParcLabels& labels, int64_t b, ParcScratch& scratch);

// ---- CUDA entry points (parc_cuda.cu); `stream` is a cudaStream_t, every pointer device memory
// unless noted. Each queues work on `stream` without host syncs and throws std::runtime_error on a
// CUDA error. Scratch comes from the caller (PyTorch's allocator); sizes from the *_workspace calls.

// out: [batch, n, n] or [batch, n(n-1)/2] of the features' type (float or double).
int64_t pairwise_corr_distance_cuda_workspace(const FeatureBatch& f);
void pairwise_corr_distance_cuda(const FeatureBatch& f, bool triu, void* out, void* workspace, void* stream);

// x, y: [rows, m] with row strides (0 = one row broadcast to all, ranked once); out: [rows] double.
struct SpearmanProblem {
  const void* x;
  const void* y;
  DType dtype;  // of x and y: Float32 or Float64
  int64_t rows, m, x_row_stride, y_row_stride;
  double* out;
};
int64_t spearman_cuda_workspace(const SpearmanProblem& p);
void spearman_cuda(const SpearmanProblem& p, void* workspace, void* stream);

// labels.order / block_end point to device memory; n_same_device: [2] int64 {n_same, n_diff} on
// the device. out: [batch] double.
int64_t parc_spearman_cuda_workspace(const FeatureBatch& f);
void parc_spearman_cuda(const FeatureBatch& f, const ParcLabels& labels, const int64_t* pair_counts, double* out,
                        void* workspace, void* stream);

}  // namespace pykernels::core
