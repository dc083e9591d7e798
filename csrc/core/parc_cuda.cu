// CUDA model-selection kernels. Per-element arithmetic (pair index, clipping, duplicate rule,
// sort keys, the closed-form rho) lives in parc.h, shared with and tested by the CPU build; this
// file holds the indexing, shared-memory tiles, reductions and the CUB sorts.
//
// Ranks come from a device-wide radix sort of 64-bit keys; the tie group of a sorted position is
// [lower_bound, upper_bound) of its key, found by binary search, so ranks and tie sums are exact
// integers. Models (spearman: rows) are sorted one after another, which bounds the scratch to one
// model's pairs whatever the batch size.
#include <algorithm>
#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "parc.h"

namespace pykernels::core {
namespace {

constexpr int kThreads = 256;  // 1-D kernels
constexpr int kTile = 32;      // pair tiles are kTile x kTile
constexpr int kTileRows = 8;   // blockDim.y of the tile kernels; each thread owns 4 rows
constexpr int kRowsPerThread = kTile / kTileRows;
constexpr int kChunk = 32;      // feature dims staged in shared memory per step
constexpr int kMaxGrid = 4096;  // blocks of the grid-stride kernels

// Splits one scratch allocation into 256-byte aligned arrays (base == nullptr: only measures).
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += (count * sizeof(T) + 255) & ~size_t(255);
    return p;
  }
};

unsigned grid_for(int64_t items, int threads = kThreads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// A signed 128-bit integer sum that blocks add to with atomics, exactly: two 64-bit words, the
// carry out of the low word added to the high one. Integer addition is associative, so the
// result does not depend on the order the blocks run in (double atomics would: the CPU sums the
// same integers exactly, in __int128).
struct ExactSum {
  unsigned long long lo, hi;
};

__device__ __forceinline__ __int128 warp_sum_exact(__int128 v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const unsigned long long lo = __shfl_xor_sync(kFullWarpMask, static_cast<unsigned long long>(v), offset);
    const long long hi = __shfl_xor_sync(kFullWarpMask, static_cast<long long>(v >> 64), offset);
    v += static_cast<__int128>((static_cast<unsigned __int128>(hi) << 64) | lo);
  }
  return v;
}

// Every thread of the block calls this with its partial sum; one atomic pair per warp.
__device__ __forceinline__ void add_exact(ExactSum* sum, __int128 v) {
  v = warp_sum_exact(v);
  if (threadIdx.x % kWarp != 0) return;
  const unsigned long long lo = static_cast<unsigned long long>(v);
  const unsigned long long old = atomicAdd(&sum->lo, lo);
  const unsigned long long carry = old + lo < old ? 1ull : 0ull;
  const unsigned long long hi = static_cast<unsigned long long>(v >> 64) + carry;
  if (hi != 0) atomicAdd(&sum->hi, hi);
}

__device__ __forceinline__ double exact_value(const ExactSum& s) {
  return double(static_cast<__int128>((static_cast<unsigned __int128>(s.hi) << 64) | s.lo));
}

// One warp per output row p of model b: z[b, p] = normalised x[b, order[p]] (order may be null).
template <typename In, typename Z>
__global__ void normalize_rows_kernel(const In* __restrict x, Z* __restrict z, int64_t batch, int64_t n, int64_t d,
                                      const int64_t* __restrict order, int* __restrict invalid) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (row >= batch * n) return;
  const int64_t b = row / n, p = row % n;
  const In* src = x + (b * n + (order ? order[p] : p)) * d;
  double sum = 0.0;
  bool varies = false;  // a constant row is undefined however its mean rounds (as on the CPU)
  for (int64_t k = lane; k < d; k += kWarp) {
    sum += double(src[k]);
    varies |= src[k] != src[0];
  }
  const double mean = warp_sum(sum) / double(d);
  double squares = 0.0;
  for (int64_t k = lane; k < d; k += kWarp) squares += (double(src[k]) - mean) * (double(src[k]) - mean);
  const double norm2 = warp_sum(squares);
  const double inv = 1.0 / sqrt(norm2);
  const bool ok = __any_sync(kFullWarpMask, varies) && norm2 > 0.0 && isfinite(norm2) && isfinite(inv);
  for (int64_t k = lane; k < d; k += kWarp) z[row * d + k] = ok ? Z((double(src[k]) - mean) * inv) : Z(pk_nan());
  if (!ok && lane == 0 && invalid != nullptr) atomicOr(invalid + b, 1);
}

enum class TileOut { Full, Triu, ParcKeys };

// One kTile x kTile tile of pairs (i, j) of model model0 + blockIdx.z: correlations of the
// normalised rows, summed over k in order by the thread that owns the pair.
template <typename Z, TileOut kOut>
__global__ void __launch_bounds__(kTile* kTileRows)
    pair_tile_kernel(const Z* __restrict z, int64_t n, int64_t d, int64_t model0, void* __restrict out,
                     const int64_t* __restrict block_end) {
  const int64_t b = model0 + blockIdx.z;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  if (kOut != TileOut::Full && j0 + kTile - 1 <= i0) return;  // no pair i < j in this tile
  __shared__ Z zi[kTile][kChunk + 1];
  __shared__ Z zj[kTile][kChunk + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const Z* zb = z + b * n * d;
  Z acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = Z(0);
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    for (int r = ty; r < kTile; r += kTileRows) {
      const int64_t k = k0 + tx;
      zi[r][tx] = (i0 + r < n && k < d) ? zb[(i0 + r) * d + k] : Z(0);
      zj[r][tx] = (j0 + r < n && k < d) ? zb[(j0 + r) * d + k] : Z(0);
    }
    __syncthreads();
    const int kc = int(d - k0 < kChunk ? d - k0 : kChunk);
    for (int k = 0; k < kc; ++k) {
      const Z zjk = zj[tx][k];
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) acc[r] += zi[ty + r * kTileRows][k] * zjk;
    }
    __syncthreads();
  }
  const int64_t j = j0 + tx;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t i = i0 + ty + r * kTileRows;
    if (i >= n || j >= n || (kOut != TileOut::Full && i >= j)) continue;
    const Z c = duplicate_correlation(zb + i * d, zb + j * d, d, int64_t(1), acc[r]);
    const Z dist = corr_distance(c);
    if constexpr (kOut == TileOut::Full) {
      static_cast<Z*>(out)[b * n * n + i * n + j] = i == j ? (c != c ? c : Z(0)) : dist;
    } else if constexpr (kOut == TileOut::Triu) {
      static_cast<Z*>(out)[b * (n * (n - 1) / 2) + triu_index(i, j, n)] = dist;
    } else {  // keys of one model at a time
      static_cast<int64_t*>(out)[triu_index(i, j, n)] = parc_pair_key(double(dist), j < block_end[i]);
    }
  }
}

template <typename T>
__device__ __forceinline__ int64_t lower_bound(const T* a, int64_t lo, int64_t hi, T v) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ int64_t upper_bound(const T* a, int64_t lo, int64_t hi, T v) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// From one model's sorted keys [same-class | different-class]: 2U and the tie sum.
__global__ void parc_count_kernel(const int64_t* __restrict keys, int64_t m, const int64_t* __restrict pair_counts,
                                  unsigned long long* __restrict twice_u, ExactSum* __restrict ties) {
  const int64_t n_same = pair_counts[0];
  unsigned long long u = 0;
  __int128 t = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < m; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t key = keys[p];
    const bool same = p < n_same;
    const int64_t same_key = (key & INT64_MAX) | INT64_MIN;  // this distance as a same-class key
    const int64_t lo = lower_bound(keys, int64_t(0), n_same, same_key);
    const int64_t hi = upper_bound(keys, lo, n_same, same_key);
    if (!same) u += (unsigned long long)(2 * lo + (hi - lo));
    if (p == 0 || p == n_same || keys[p - 1] != key) {  // first of its run in its part
      const int64_t a = hi - lo;
      const int64_t c = upper_bound(keys, p, same ? n_same : m, key) - p;
      t += same ? tie_term_exact(a) : tie_term_exact(a + c) - tie_term_exact(a);
    }
  }
  using ReduceU = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename ReduceU::TempStorage su;
  const unsigned long long block_u = ReduceU(su).Sum(u);
  if (threadIdx.x == 0) atomicAdd(twice_u, block_u);
  add_exact(ties, t);
}

__global__ void parc_final_kernel(int64_t batch, const int64_t* __restrict pair_counts,
                                  const unsigned long long* __restrict twice_u, const ExactSum* __restrict ties,
                                  const int* __restrict invalid, double* __restrict out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  out[b] = invalid[b] ? pk_nan() : parc_rho(pair_counts[0], pair_counts[1], int64_t(twice_u[b]), exact_value(ties[b]));
}

// ---- spearman ----

template <typename T>
__global__ void rank_keys_kernel(const T* __restrict row, int64_t m, int64_t* __restrict keys,
                                 uint32_t* __restrict index, int* __restrict has_nan) {
  bool nan = false;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < m; p += int64_t(gridDim.x) * blockDim.x) {
    const double v = double(row[p]);
    nan |= v != v;
    keys[p] = v != v ? 0 : order_key(v);
    index[p] = uint32_t(p);
  }
  if (__syncthreads_or(nan) && threadIdx.x == 0) atomicOr(has_nan, 1);
}

// ranks[index[p]] = 2 * average rank of sorted position p; the tie sum into *ties.
__global__ void midrank_kernel(const int64_t* __restrict sorted, const uint32_t* __restrict index, int64_t m,
                               int64_t* __restrict ranks, ExactSum* __restrict ties) {
  __int128 t = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < m; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t key = sorted[p];
    const int64_t lo = lower_bound(sorted, int64_t(0), p + 1, key);
    const int64_t hi = upper_bound(sorted, p, m, key);
    ranks[index[p]] = lo + hi + 1;
    if (p == lo) t += tie_term_exact(hi - lo);
  }
  add_exact(ties, t);
}

// *sum += sum over p of (rx - m - 1)(ry - m - 1); each product is exact in int64, the sum in 128 bits.
__global__ void rank_products_kernel(const int64_t* __restrict rx, const int64_t* __restrict ry, int64_t m,
                                     ExactSum* __restrict sum) {
  __int128 s = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < m; p += int64_t(gridDim.x) * blockDim.x)
    s += (rx[p] - m - 1) * (ry[p] - m - 1);
  add_exact(sum, s);
}

__global__ void spearman_final_kernel(int64_t rows, int64_t m, bool shared_y, const ExactSum* __restrict sums,
                                      const ExactSum* __restrict ties_x, const ExactSum* __restrict ties_y,
                                      const int* __restrict nan_x, const int* __restrict nan_y,
                                      double* __restrict out) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int64_t ry = shared_y ? 0 : r;
  out[r] = (nan_x[r] || nan_y[ry])
               ? pk_nan()
               : spearman_rho(m, exact_value(sums[r]), exact_value(ties_x[r]), exact_value(ties_y[ry]));
}

size_t sort_pairs_temp_bytes(int64_t m) {
  size_t bytes = 0;
  cuda_check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                             static_cast<int64_t*>(nullptr), static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), int(m)),
             "model selection sort size query");
  return bytes;
}

size_t sort_keys_temp_bytes(int64_t m) {
  size_t bytes = 0;
  cuda_check(cub::DeviceRadixSort::SortKeys(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                            static_cast<int64_t*>(nullptr), int(m)),
             "model selection sort size query");
  return bytes;
}

void require_int_items(int64_t m, const char* op) {
  if (m > INT_MAX)
    throw std::invalid_argument(std::string("pykernels ") + op + " CUDA: " + std::to_string(m) +
                                " values per row exceed the 2^31 - 1 a radix sort takes");
}

struct DistanceScratch {
  void* z;
};

DistanceScratch carve_distance(const FeatureBatch& f, Carver& c) {
  const size_t elem = f.dtype == DType::Float32 ? sizeof(float) : sizeof(double);
  return DistanceScratch{c.take<char>(size_t(f.batch * f.n * f.d) * elem)};
}

template <typename Z>
void launch_normalize(const FeatureBatch& f, Z* z, const int64_t* order, int* invalid, cudaStream_t stream) {
  const int64_t rows = f.batch * f.n;
  const int warps = kThreads / kWarp;
  const unsigned blocks = unsigned((rows + warps - 1) / warps);
  if (f.dtype == DType::Float32)
    normalize_rows_kernel<float, Z>
        <<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(f.data), z, f.batch, f.n, f.d, order, invalid);
  else
    normalize_rows_kernel<double, Z>
        <<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(f.data), z, f.batch, f.n, f.d, order, invalid);
  cuda_check(cudaGetLastError(), "model selection normalize kernel launch");
}

// Grid axes y and z stop at 65,535: tiles on y allow n up to 2M samples (far past memory); models
// on z are launched in chunks of at most kMaxGridZ.
constexpr int64_t kMaxGridZ = 65535;

dim3 tile_grid(int64_t n, int64_t models) {
  const unsigned tiles = unsigned((n + kTile - 1) / kTile);
  return dim3(tiles, tiles, unsigned(models));
}

struct ParcCudaScratch {
  double* z;
  int64_t *keys, *sorted;
  void* sort_temp;
  size_t sort_bytes;
  unsigned long long* twice_u;
  ExactSum* ties;
  int* invalid;
};

ParcCudaScratch carve_parc(const FeatureBatch& f, Carver& c) {
  const int64_t m = f.n * (f.n - 1) / 2;
  ParcCudaScratch s{};
  s.z = c.take<double>(size_t(f.batch * f.n * f.d));
  s.keys = c.take<int64_t>(size_t(m));
  s.sorted = c.take<int64_t>(size_t(m));
  s.sort_bytes = sort_keys_temp_bytes(m);
  s.sort_temp = c.take<char>(s.sort_bytes);
  s.twice_u = c.take<unsigned long long>(size_t(f.batch));
  s.ties = c.take<ExactSum>(size_t(f.batch));
  s.invalid = c.take<int>(size_t(f.batch));
  return s;
}

struct SpearmanCudaScratch {
  int64_t *keys, *sorted, *rx, *ry;
  uint32_t *index, *sorted_index;
  void* sort_temp;
  size_t sort_bytes;
  ExactSum *sums, *ties_x, *ties_y;
  int *nan_x, *nan_y;
};

SpearmanCudaScratch carve_spearman(const SpearmanProblem& p, Carver& c) {
  SpearmanCudaScratch s{};
  const size_t m = size_t(p.m), rows = size_t(p.rows);
  s.keys = c.take<int64_t>(m);
  s.sorted = c.take<int64_t>(m);
  s.rx = c.take<int64_t>(m);
  s.ry = c.take<int64_t>(m);
  s.index = c.take<uint32_t>(m);
  s.sorted_index = c.take<uint32_t>(m);
  s.sort_bytes = sort_pairs_temp_bytes(p.m);
  s.sort_temp = c.take<char>(s.sort_bytes);
  s.sums = c.take<ExactSum>(rows);
  s.ties_x = c.take<ExactSum>(rows);
  s.ties_y = c.take<ExactSum>(rows);
  s.nan_x = c.take<int>(rows);
  s.nan_y = c.take<int>(rows);
  return s;
}

// Doubled average ranks of one row into `ranks`, its tie sum into *ties, NaN flag into *has_nan.
template <typename T>
void rank_row(const T* row, int64_t m, SpearmanCudaScratch& s, int64_t* ranks, ExactSum* ties, int* has_nan,
              cudaStream_t stream) {
  rank_keys_kernel<T><<<grid_for(m), kThreads, 0, stream>>>(row, m, s.keys, s.index, has_nan);
  cuda_check(cudaGetLastError(), "model selection rank key kernel launch");
  size_t bytes = s.sort_bytes;
  cuda_check(cub::DeviceRadixSort::SortPairs(s.sort_temp, bytes, s.keys, s.sorted, s.index, s.sorted_index, int(m), 0,
                                             64, stream),
             "model selection radix sort");
  midrank_kernel<<<grid_for(m), kThreads, 0, stream>>>(s.sorted, s.sorted_index, m, ranks, ties);
  cuda_check(cudaGetLastError(), "model selection midrank kernel launch");
}

template <typename T>
void spearman_rows(const SpearmanProblem& p, SpearmanCudaScratch& s, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const bool shared_y = p.y_row_stride == 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    rank_row(x + r * p.x_row_stride, p.m, s, s.rx, s.ties_x + r, s.nan_x + r, stream);
    if (!shared_y || r == 0) rank_row(y + r * p.y_row_stride, p.m, s, s.ry, s.ties_y + r, s.nan_y + r, stream);
    rank_products_kernel<<<grid_for(p.m), kThreads, 0, stream>>>(s.rx, s.ry, p.m, s.sums + r);
    cuda_check(cudaGetLastError(), "model selection rank product kernel launch");
  }
  spearman_final_kernel<<<grid_for(p.rows), kThreads, 0, stream>>>(p.rows, p.m, shared_y, s.sums, s.ties_x, s.ties_y,
                                                                   s.nan_x, s.nan_y, p.out);
  cuda_check(cudaGetLastError(), "model selection spearman final kernel launch");
}

}  // namespace

int64_t pairwise_corr_distance_cuda_workspace(const FeatureBatch& f) {
  Carver c{nullptr};
  carve_distance(f, c);
  return int64_t(c.used);
}

void pairwise_corr_distance_cuda(const FeatureBatch& f, bool triu, void* out, void* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (f.batch == 0 || f.n == 0) return;
  Carver c{static_cast<char*>(workspace)};
  const DistanceScratch s = carve_distance(f, c);
  const dim3 block(kTile, kTileRows);
  auto run = [&](auto* z) {
    using Z = std::remove_pointer_t<decltype(z)>;
    launch_normalize(f, z, nullptr, nullptr, stream);
    for (int64_t b0 = 0; b0 < f.batch; b0 += kMaxGridZ) {
      const dim3 grid = tile_grid(f.n, std::min(kMaxGridZ, f.batch - b0));
      if (triu) pair_tile_kernel<Z, TileOut::Triu><<<grid, block, 0, stream>>>(z, f.n, f.d, b0, out, nullptr);
      else pair_tile_kernel<Z, TileOut::Full><<<grid, block, 0, stream>>>(z, f.n, f.d, b0, out, nullptr);
      cuda_check(cudaGetLastError(), "model selection distance kernel launch");
    }
  };
  if (f.dtype == DType::Float32) run(static_cast<float*>(s.z));
  else run(static_cast<double*>(s.z));
}

int64_t spearman_cuda_workspace(const SpearmanProblem& p) {
  require_int_items(p.m, "spearman");
  Carver c{nullptr};
  carve_spearman(p, c);
  return int64_t(c.used);
}

void spearman_cuda(const SpearmanProblem& p, void* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.rows == 0) return;
  require_int_items(p.m, "spearman");
  Carver c{static_cast<char*>(workspace)};
  SpearmanCudaScratch s = carve_spearman(p, c);
  // sums, ties and NaN flags start at zero (they are carved back to back).
  cuda_check(
      cudaMemsetAsync(s.sums, 0, reinterpret_cast<char*>(s.nan_y + p.rows) - reinterpret_cast<char*>(s.sums), stream),
      "model selection clear accumulators");
  if (p.dtype == DType::Float32) spearman_rows<float>(p, s, stream);
  else spearman_rows<double>(p, s, stream);
}

int64_t parc_spearman_cuda_workspace(const FeatureBatch& f) {
  require_int_items(f.n * (f.n - 1) / 2, "parc_spearman");
  Carver c{nullptr};
  carve_parc(f, c);
  return int64_t(c.used);
}

void parc_spearman_cuda(const FeatureBatch& f, const ParcLabels& labels, const int64_t* pair_counts, double* out,
                        void* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (f.batch == 0) return;
  const int64_t m = f.n * (f.n - 1) / 2;
  require_int_items(m, "parc_spearman");
  Carver c{static_cast<char*>(workspace)};
  ParcCudaScratch s = carve_parc(f, c);
  cuda_check(cudaMemsetAsync(s.twice_u, 0,
                             reinterpret_cast<char*>(s.invalid + f.batch) - reinterpret_cast<char*>(s.twice_u), stream),
             "model selection clear accumulators");
  launch_normalize(f, s.z, labels.order, s.invalid, stream);
  const dim3 block(kTile, kTileRows);
  for (int64_t b = 0; b < f.batch && m > 0; ++b) {
    pair_tile_kernel<double, TileOut::ParcKeys>
        <<<tile_grid(f.n, 1), block, 0, stream>>>(s.z, f.n, f.d, b, s.keys, labels.block_end);
    cuda_check(cudaGetLastError(), "model selection pair key kernel launch");
    size_t bytes = s.sort_bytes;
    cuda_check(cub::DeviceRadixSort::SortKeys(s.sort_temp, bytes, s.keys, s.sorted, int(m), 0, 64, stream),
               "model selection radix sort");
    parc_count_kernel<<<grid_for(m), kThreads, 0, stream>>>(s.sorted, m, pair_counts, s.twice_u + b, s.ties + b);
    cuda_check(cudaGetLastError(), "model selection pair count kernel launch");
  }
  parc_final_kernel<<<grid_for(f.batch), kThreads, 0, stream>>>(f.batch, pair_counts, s.twice_u, s.ties, s.invalid,
                                                                out);
  cuda_check(cudaGetLastError(), "model selection parc final kernel launch");
}

}  // namespace pykernels::core
