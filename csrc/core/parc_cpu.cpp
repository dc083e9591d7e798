// CPU model-selection kernels: normalised rows, row-tile dot products, and ranking by a bucket
// sort. Values are spread over ~m/8 buckets by linear interpolation between their min and max
// (a monotone map, so equal values share a bucket and buckets are ordered); each bucket, a few
// values on average, is then sorted on its own. Ranks and tie groups are exact: positions are
// integers and ties are detected by comparing doubles, never by rounding them.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "parc.h"

// No fused multiply-add contraction: a vectorised loop would fuse in its vector body and not in
// its scalar remainder, so a pair's value would depend on where it sits in a row.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace pykernels::core {
namespace {

constexpr int64_t kTile = 256;                     // columns of one row handled per pass over zt
constexpr int64_t kValuesPerBucket = 8;            // average bucket size of the rank sorts
constexpr int64_t kPairsPerBucket = 1;             // ... of PARC's grid, where most buckets need no sort
constexpr int64_t kMaxBuckets = int64_t(1) << 24;  // bounds the count arrays at large M

// Maps a value to its bucket; monotone non-decreasing in the value.
struct Buckets {
  double lo = 0.0, scale = 0.0;
  int64_t count = 1;

  Buckets(double lo_, double hi, int64_t values) : lo(lo_) {
    count = std::clamp<int64_t>(values / kValuesPerBucket, 1, kMaxBuckets);
    const double span = hi - lo;
    scale = (span > 0.0 && std::isfinite(span)) ? double(count) / span : 0.0;
  }

  int64_t operator()(double v) const {
    if (scale == 0.0 || !(v > lo)) return 0;
    const double x = (v - lo) * scale;
    return x >= double(count - 1) ? count - 1 : int64_t(x);
  }
};

// Sorts m items by a double key: a counting sort into buckets (monotone in the key), std::sort
// of the rare buckets that came out large, then one insertion-sort pass over the whole array,
// cheap because every item already sits within its bucket's few positions. item_at(i) makes
// item i; the sorted items go to out[0, m).
template <typename Item, typename ItemAt, typename KeyOf>
void bucket_sort(int64_t m, const Buckets& buckets, ItemAt item_at, KeyOf key, Item* out, std::vector<int64_t>& end) {
  end.assign(size_t(buckets.count) + 1, 0);
  for (int64_t i = 0; i < m; ++i) ++end[size_t(buckets(key(item_at(i)))) + 1];
  std::partial_sum(end.begin(), end.end(), end.begin());  // end[k] = start of bucket k
  for (int64_t i = 0; i < m; ++i) {
    const Item it = item_at(i);
    out[end[size_t(buckets(key(it)))]++] = it;
  }
  auto less = [&](const Item& a, const Item& b) { return key(a) < key(b); };
  for (int64_t k = 0, begin = 0; k < buckets.count; begin = end[size_t(k)], ++k)
    if (end[size_t(k)] - begin > 32) std::sort(out + begin, out + end[size_t(k)], less);
  for (int64_t i = 1; i < m; ++i) {
    const Item v = out[i];
    int64_t j = i;
    for (; j > 0 && less(v, out[j - 1]); --j) out[j] = out[j - 1];
    out[j] = v;
  }
}

// Buckets over the bits of non-negative doubles in [lo, hi]: an integer subtraction and shift,
// monotone in the value, about `values / kPairsPerBucket` of them.
struct BitBuckets {
  int64_t lo_bits = 0, count = 1;
  int shift = 0;

  BitBuckets(double lo, double hi, int64_t values) : lo_bits(double_bits(lo)) {
    const uint64_t span = uint64_t(double_bits(hi) - lo_bits) + 1;
    const uint64_t target = uint64_t(std::clamp<int64_t>(values / kPairsPerBucket, 1, kMaxBuckets));
    while ((span >> shift) > target) ++shift;
    count = int64_t(((span - 1) >> shift) + 1);
  }

  int64_t operator()(double v) const { return (double_bits(v) - lo_bits) >> shift; }
};

// The grid's buckets are sorted into in two passes, each with counters that stay in L1: by
// coarse bucket (the top bits of the fine index, 2^kFineBits fine buckets each), then each
// coarse bucket, a few hundred values, by its fine buckets. One pass over the fine index would
// scatter with random counter updates across the whole grid (megabytes at m ~ 5e5).
constexpr int kFineBits = 9;
constexpr int64_t kFinePerCoarse = int64_t(1) << kFineBits;

int64_t coarse_count(const BitBuckets& grid) { return ((grid.count - 1) >> kFineBits) + 1; }

// Counting sort of m values by coarse bucket (unsorted within one): afterwards coarse bucket c
// is out[end[c-1], end[c]) (end[-1] = 0).
void scatter_to_coarse(const double* in, int64_t m, const BitBuckets& grid, double* out, std::vector<int64_t>& end) {
  end.assign(size_t(coarse_count(grid)) + 1, 0);
  for (int64_t i = 0; i < m; ++i) ++end[size_t(grid(in[i]) >> kFineBits) + 1];
  std::partial_sum(end.begin(), end.end(), end.begin());
  for (int64_t i = 0; i < m; ++i) out[end[size_t(grid(in[i]) >> kFineBits)]++] = in[i];
  end.pop_back();
}

// The values in[begin, stop) of one coarse bucket, by fine bucket, to out[begin, stop): afterwards
// fine bucket f is out[end[f-1], end[f]) (end[-1] = begin), positions counted from the array's start.
void scatter_to_fine(const double* in, int64_t begin, int64_t stop, const BitBuckets& grid, double* out, int64_t* end) {
  constexpr int64_t mask = kFinePerCoarse - 1;
  std::fill(end, end + kFinePerCoarse + 1, 0);
  for (int64_t i = begin; i < stop; ++i) ++end[(grid(in[i]) & mask) + 1];
  end[0] = begin;
  std::partial_sum(end, end + kFinePerCoarse + 1, end);
  for (int64_t i = begin; i < stop; ++i) out[end[grid(in[i]) & mask]++] = in[i];
}

void sort_small(double* first, double* last) {
  if (last - first > 24) {
    std::sort(first, last);
    return;
  }
  for (double* i = first + 1; i < last; ++i) {
    const double v = *i;
    double* j = i;
    for (; j > first && v < *(j - 1); --j) *j = *(j - 1);
    *j = v;
  }
}

// sum(t^3 - t) over the groups of equal values among k unsorted values. Ties are rare, so a
// small group is first checked pairwise, and sorted only when it holds one.
__int128 tie_sum_unsorted(double* v, int64_t k) {
  if (k < 2) return 0;
  if (k == 2) return v[0] == v[1] ? tie_term_exact(2) : 0;  // the most common case: no loop
  if (k <= 16) {
    bool tie = false;  // no early exit: the loop runs branch-free
    for (int64_t a = 1; a < k; ++a)
      for (int64_t c = 0; c < a; ++c) tie |= v[a] == v[c];
    if (!tie) return 0;
  }
  sort_small(v, v + k);
  __int128 ties = 0;
  for (int64_t start = 0, stop; start < k; start = stop) {
    stop = start + 1;
    while (stop < k && v[stop] == v[start]) ++stop;
    ties += tie_term_exact(stop - start);
  }
  return ties;
}

template <typename T>
void finite_range(const T* v, int64_t stride, int64_t m, double& lo, double& hi) {
  lo = std::numeric_limits<double>::infinity();
  hi = -lo;
  for (int64_t i = 0; i < m; ++i) {
    const double x = double(v[i * stride]);
    if (std::isfinite(x)) {
      lo = std::min(lo, x);
      hi = std::max(hi, x);
    }
  }
}

template <typename T>
const T* model_row(const FeatureBatch& f, int64_t b, int64_t row) {
  return static_cast<const T*>(f.data) + (b * f.n + row) * f.d;
}

// acc[jj] = <row i, row j0 + jj> for jj < len, from transposed normalised rows zt [d, n], each
// summed in k order (so a pair's value does not depend on where it sits; the loop vectorises
// across jj). Compiled for AVX-512, AVX2 and baseline x86-64 (PK_CPU_CLONES).

template <typename Z>
inline void dot_row_tile_body(const Z* __restrict zt, int64_t n, int64_t d, int64_t i, int64_t j0, int64_t len,
                              Z* __restrict acc) {
  for (int64_t jj = 0; jj < len; ++jj) acc[jj] = Z(0);
  for (int64_t k = 0; k < d; ++k) {
    const Z a = zt[k * n + i];
    const Z* __restrict col = zt + k * n + j0;
    for (int64_t jj = 0; jj < len; ++jj) acc[jj] += a * col[jj];
  }
}

PK_CPU_CLONES void dot_row_tile_simd(const float* zt, int64_t n, int64_t d, int64_t i, int64_t j0, int64_t len,
                                     float* acc) {
  dot_row_tile_body(zt, n, d, i, j0, len, acc);
}

PK_CPU_CLONES void dot_row_tile_simd(const double* zt, int64_t n, int64_t d, int64_t i, int64_t j0, int64_t len,
                                     double* acc) {
  dot_row_tile_body(zt, n, d, i, j0, len, acc);
}

template <typename Z>
void dot_row_tile(const Z* zt, int64_t n, int64_t d, int64_t i, int64_t j0, int64_t len, Z* acc) {
  dot_row_tile_simd(zt, n, d, i, j0, len, acc);
  Z largest = Z(0);
#pragma omp simd reduction(max : largest)
  for (int64_t jj = 0; jj < len; ++jj) largest = std::max(largest, std::abs(acc[jj]));
  if (largest >= Z(kDuplicateGate))  // rare: only then look for duplicated samples
    for (int64_t jj = 0; jj < len; ++jj) acc[jj] = duplicate_correlation(zt + i, zt + j0 + jj, d, n, acc[jj]);
}

}  // namespace

template <typename Z>
bool normalize_row_cpu(const FeatureBatch& f, int64_t b, int64_t row, Z* zt, int64_t column) {
  const int64_t d = f.d, n = f.n;
  double mean = 0.0, norm2 = 0.0;
  auto value = [&](int64_t k) -> double {
    return f.dtype == DType::Float32 ? double(model_row<float>(f, b, row)[k]) : model_row<double>(f, b, row)[k];
  };
  bool varies = false;  // a constant row is undefined however its mean rounds (pykernels/selection/correlation.py)
  for (int64_t k = 0; k < d; ++k) {
    mean += value(k);
    varies |= value(k) != value(0);
  }
  mean /= double(d);
  for (int64_t k = 0; k < d; ++k) norm2 += (value(k) - mean) * (value(k) - mean);
  const double inv = 1.0 / std::sqrt(norm2);
  const bool ok = varies && norm2 > 0.0 && std::isfinite(inv) && std::isfinite(norm2);
  for (int64_t k = 0; k < d; ++k)
    zt[k * n + column] = ok ? Z((value(k) - mean) * inv) : std::numeric_limits<Z>::quiet_NaN();
  return ok;
}

template <typename Z>
void corr_distance_rows_cpu(const Z* zt, int64_t n, int64_t d, int64_t row_begin, int64_t row_end, bool triu, Z* out) {
  Z acc[kTile];
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t first = triu ? i + 1 : 0;
    for (int64_t j0 = first; j0 < n; j0 += kTile) {
      const int64_t len = std::min(kTile, n - j0);
      dot_row_tile(zt, n, d, i, j0, len, acc);
      Z* dst = triu ? out + triu_index(i, j0, n) : out + i * n + j0;
      for (int64_t jj = 0; jj < len; ++jj) dst[jj] = corr_distance(acc[jj]);
    }
    // A row's distance to itself is 0 by definition (NaN for an undefined row).
    if (!triu) out[i * n + i] = std::isnan(zt[i]) ? zt[i] : Z(0);
  }
}

template <typename T>
double twice_average_ranks_cpu(const T* values, int64_t stride, int64_t m, int64_t* twice_rank, RankScratch& s) {
  double lo, hi;
  finite_range(values, stride, m, lo, hi);
  s.items.resize(size_t(m));
  bucket_sort(
      m, Buckets(lo, hi, m), [&](int64_t i) { return RankItem{double(values[i * stride]), i}; },
      [](const RankItem& it) { return it.value; }, s.items.data(), s.bucket_end);
  __int128 ties = 0;
  for (int64_t start = 0, stop; start < m; start = stop) {
    stop = start + 1;
    while (stop < m && s.items[size_t(stop)].value == s.items[size_t(start)].value) ++stop;
    // Positions start..stop-1 hold ranks start+1..stop; their average, doubled, is start+stop+1.
    for (int64_t p = start; p < stop; ++p) twice_rank[s.items[size_t(p)].index] = start + stop + 1;
    ties += tie_term_exact(stop - start);
  }
  return double(ties);
}

double spearman_from_ranks_cpu(const int64_t* twice_rank_x, const int64_t* twice_rank_y, int64_t m, double ties_x,
                               double ties_y) {
  // |2r - m - 1| < m, so each product is below m^2 (exact in int64 for m < 3e9) and the sum,
  // up to m^3, is exact in 128 bits.
  __int128 sum = 0;
  for (int64_t i = 0; i < m; ++i) sum += __int128((twice_rank_x[i] - m - 1) * (twice_rank_y[i] - m - 1));
  return spearman_rho(m, double(sum), ties_x, ties_y);
}

void parc_labels_cpu(const int64_t* classes, int64_t n, int64_t* order, int64_t* block_end, int64_t* n_same,
                     int64_t* n_diff) {
  std::iota(order, order + n, int64_t(0));
  std::stable_sort(order, order + n, [&](int64_t a, int64_t b) { return classes[a] < classes[b]; });
  int64_t same = 0;
  for (int64_t start = 0, stop; start < n; start = stop) {
    stop = start + 1;
    while (stop < n && classes[order[stop]] == classes[order[start]]) ++stop;
    for (int64_t p = start; p < stop; ++p) block_end[p] = stop;
    same += (stop - start) * (stop - start - 1) / 2;
  }
  *n_same = same;
  *n_diff = n * (n - 1) / 2 - same;
}

double parc_spearman_cpu(const FeatureBatch& f, const ParcLabels& labels, int64_t b, ParcScratch& s) {
  const int64_t n = f.n, d = f.d, n_same = labels.n_same;
  const int64_t m = n * (n - 1) / 2, n_diff = m - n_same;
  s.zt.resize(size_t(d * n));
  for (int64_t p = 0; p < n; ++p)
    if (!normalize_row_cpu(f, b, labels.order[p], s.zt.data(), p)) return pk_nan();

  // Distances in class order: row p's same-class pairs (p < j < block_end[p]) go to the first
  // n_same slots, its different-class pairs to the rest, each part in row order.
  s.pairs.resize(size_t(m));
  double* same_out = s.pairs.data();
  double* diff_out = s.pairs.data() + n_same;
  double lo = std::numeric_limits<double>::infinity(), hi = 0.0;
  double acc[kTile];
  for (int64_t p = 0; p < n; ++p) {
    const int64_t e = labels.block_end[p];
    for (int64_t j0 = p + 1; j0 < n; j0 += kTile) {
      const int64_t len = std::min(kTile, n - j0);
      dot_row_tile(s.zt.data(), n, d, p, j0, len, acc);
#pragma omp simd reduction(min : lo) reduction(max : hi)
      for (int64_t jj = 0; jj < len; ++jj) {
        acc[jj] = corr_distance(acc[jj]);
        lo = std::min(lo, acc[jj]);
        hi = std::max(hi, acc[jj]);
      }
      const int64_t split = std::clamp<int64_t>(e - j0, 0, len);
      same_out = std::copy(acc, acc + split, same_out);
      diff_out = std::copy(acc + split, acc + len, diff_out);
    }
  }

  // Both parts go into one grid of buckets over the distances' bits (non-negative doubles order
  // like their bits). Walking the buckets in order: every different-class value of bucket k lies
  // above the same-class values of the earlier buckets; within a bucket, usually holding no
  // same-class value, only ties remain to be found. The same-class part is sorted, the
  // different-class part only where a bucket needs it.
  const BitBuckets grid(lo, hi, m);
  s.bucketed.resize(size_t(m));
  s.same_end.resize(size_t(kFinePerCoarse) + 1);
  s.diff_end.resize(size_t(kFinePerCoarse) + 1);
  double* same = s.pairs.data();  // the fine passes put the values back here, bucket by bucket
  double* diff = s.pairs.data() + n_same;
  scatter_to_coarse(same, n_same, grid, s.bucketed.data(), s.same_coarse_end);
  scatter_to_coarse(diff, n_diff, grid, s.bucketed.data() + n_same, s.diff_coarse_end);
  int64_t twice_u = 0;
  __int128 ties = 0;
  for (int64_t c = 0, cs = 0, cd = 0; c < coarse_count(grid);
       cs = s.same_coarse_end[size_t(c)], cd = s.diff_coarse_end[size_t(c)], ++c) {
    const int64_t* same_end = s.same_end.data();
    const int64_t* diff_end = s.diff_end.data();
    scatter_to_fine(s.bucketed.data(), cs, s.same_coarse_end[size_t(c)], grid, same, s.same_end.data());
    scatter_to_fine(s.bucketed.data() + n_same, cd, s.diff_coarse_end[size_t(c)], grid, diff, s.diff_end.data());
    for (int64_t k = 0, s0 = cs, d0 = cd; k < kFinePerCoarse; s0 = same_end[k], d0 = diff_end[k], ++k) {
      const int64_t s1 = same_end[k], d1 = diff_end[k];
      if (s1 > s0) sort_small(same + s0, same + s1);
      if (s1 == s0) {  // different-class values only: all above the s0 same-class values so far
        twice_u += (d1 - d0) * 2 * s0;
        ties += tie_sum_unsorted(diff + d0, d1 - d0);
        continue;
      }
      sort_small(diff + d0, diff + d1);
      for (int64_t i = s0, j = d0; i < s1 || j < d1;) {  // merge the two sorted runs by value
        const double v = (j >= d1 || (i < s1 && same[i] < diff[j])) ? same[i] : diff[j];
        int64_t a = 0, cnt = 0;
        while (i < s1 && same[i] == v) ++i, ++a;
        while (j < d1 && diff[j] == v) ++j, ++cnt;
        // cnt different-class values above the i - a same-class values before this group, tied with a.
        twice_u += cnt * (2 * (i - a) + a);
        ties += tie_term_exact(a + cnt);
      }
    }
  }
  return parc_rho(n_same, n_diff, twice_u, double(ties));
}

template bool normalize_row_cpu<float>(const FeatureBatch&, int64_t, int64_t, float*, int64_t);
template bool normalize_row_cpu<double>(const FeatureBatch&, int64_t, int64_t, double*, int64_t);
template void corr_distance_rows_cpu<float>(const float*, int64_t, int64_t, int64_t, int64_t, bool, float*);
template void corr_distance_rows_cpu<double>(const double*, int64_t, int64_t, int64_t, int64_t, bool, double*);
template double twice_average_ranks_cpu<float>(const float*, int64_t, int64_t, int64_t*, RankScratch&);
template double twice_average_ranks_cpu<double>(const double*, int64_t, int64_t, int64_t*, RankScratch&);

}  // namespace pykernels::core
