// Torch-free tests of the flatness cores (run by ctest): the logsumexp and
// softmax arithmetic shared with the CUDA kernels (special values included),
// the CPU kernels against naive double-precision loops, and the probe
// generator against known answers of the Python reference
// (pykernels/reference/flatness.py) and its expected statistics.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "flatness.h"

using namespace pykernels::core;

static const double kInf = std::numeric_limits<double>::infinity();

static double naive_lse(const std::vector<double>& z) {
  double m = -kInf;
  for (double v : z) m = std::max(m, v);
  if (std::isinf(m)) return m;
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

static double energy_of(const std::vector<double>& z) {
  EnergyProblem<double> p{z.data(), int64_t(z.size()), 1, int64_t(z.size()), nullptr};
  double out = 0;
  p.out = &out;
  energy_rows_cpu(p, 0, 1);
  return out;
}

static void test_energy_special_values() {
  const double nan = std::nan("");
  CHECK(energy_of({0.0, 0.0}) == -std::log(2.0), "two zeros: -log 2");
  CHECK(energy_of({kInf, 1.0}) == -kInf, "+inf logit -> -inf energy");
  CHECK(energy_of({-kInf, -kInf}) == kInf, "all -inf -> +inf energy");
  CHECK(energy_of({}) == kInf, "empty row -> +inf energy");
  CHECK(std::isnan(energy_of({nan, 1.0})), "NaN -> NaN");
  CHECK(std::isnan(energy_of({kInf, nan})), "+inf and NaN -> NaN");
  CHECK(energy_of({kInf, kInf}) == -kInf, "two +inf -> -inf (no inf - inf)");
  CHECK(energy_of({-kInf, 3.0}) == -3.0, "-inf entries contribute nothing");
  CHECK(std::fabs(energy_of({1e300, 1e300}) + 1e300) <= 1e285, "huge logits do not overflow");
  CHECK(std::isnan(softmax_at(1.0, kInf)), "softmax of a row with lse = +inf is NaN");
}

template <typename T>
static T from_double(double v);
template <>
float from_double<float>(double v) {
  return float(v);
}
template <>
double from_double<double>(double v) {
  return v;
}
template <>
Float16Bits from_double<Float16Bits>(double v) {  // values below are exact in float16
  const float f = float(v);
  for (uint32_t h = 0; h < 65536; ++h)
    if (f16_bits_to_float(uint16_t(h)) == f) return Float16Bits{uint16_t(h)};
  return Float16Bits{0x7e00};
}
template <>
BFloat16Bits from_double<BFloat16Bits>(double v) {  // truncation; values below are exact
  const float f = float(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return BFloat16Bits{uint16_t(u >> 16)};
}

template <typename T>
static void test_energy_rows(const char* name, double tol) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> q(-64, 64);  // multiples of 1/8: exact in every type
  const int64_t rows = 13, cols = 37, stride = 41;
  std::vector<T> z(rows * stride);
  std::vector<double> zd(rows * stride);
  for (size_t i = 0; i < z.size(); ++i) {
    zd[i] = q(rng) / 8.0;
    z[i] = from_double<T>(zd[i]);
  }
  std::vector<typename Elem<T>::Acc> out(rows);
  EnergyProblem<T> p{z.data(), stride, rows, cols, out.data()};
  energy_rows_cpu(p, 0, 5);
  energy_rows_cpu(p, 5, rows);
  for (int64_t r = 0; r < rows; ++r) {
    const double expect = -naive_lse(std::vector<double>(zd.begin() + r * stride, zd.begin() + r * stride + cols));
    CHECK(std::fabs(out[r] - expect) <= tol * (1 + std::fabs(expect)), "%s row %lld: %g vs %g", name, (long long)r,
          double(out[r]), expect);
  }
}

static void test_logsumexp_hvp_rows() {
  std::mt19937 rng(2);
  std::normal_distribution<double> nd(0.0, 2.0);
  const int64_t S = 3, N = 5, K = 7;
  std::vector<double> z(N * K), u(S * N * K), s(N * K), e(N), h(S * N * K);
  for (auto& v : z) v = nd(rng);
  for (auto& v : u) v = nd(rng);
  LseHvpProblem<double> p{z.data(), K, u.data(), N * K, K, S, N, K, s.data(), e.data(), h.data()};
  logsumexp_hvp_rows_cpu(p, 0, N);
  for (int64_t r = 0; r < N; ++r) {
    const std::vector<double> row(z.begin() + r * K, z.begin() + (r + 1) * K);
    const double lse = naive_lse(row);
    CHECK(std::fabs(e[r] + lse) < 1e-13, "energy row %lld", (long long)r);
    for (int64_t i = 0; i < S; ++i) {
      // (diag(s) - s s^T) u, written out
      for (int64_t k = 0; k < K; ++k) {
        const double sk = std::exp(row[k] - lse);
        double expect = sk * u[(i * N + r) * K + k];
        for (int64_t l = 0; l < K; ++l) expect -= sk * std::exp(row[l] - lse) * u[(i * N + r) * K + l];
        CHECK(std::fabs(h[(i * N + r) * K + k] - expect) < 1e-13, "hvp s%lld r%lld k%lld", (long long)i, (long long)r,
              (long long)k);
        if (i == 0) CHECK(std::fabs(s[r * K + k] - sk) < 1e-15, "softmax r%lld k%lld", (long long)r, (long long)k);
      }
    }
  }
}

static void test_probe_known_answers() {
  // Values of the Python reference (pykernels/reference/flatness.py).
  CHECK(mix32(0) == 0u && mix32(1) == 0x688990c0u && mix32(2) == 0xd1132181u && mix32(0xdeadbeefu) == 0xe628c683u,
        "mix32 known answers");
  const ProbeKey key = probe_key(12345);
  CHECK(key.k1 == 0xf5c2b9fau && key.k2 == 0x280d2132u, "probe_key(12345)");
  const uint64_t idx[3] = {0, 1, (uint64_t(1) << 32) + 7};
  const uint32_t s0[3] = {0x59454c9au, 0xb5281197u, 0xe6aaad98u}, s1[3] = {0x127d97a7u, 0x465b5ffcu, 0x9c8184f9u};
  for (int i = 0; i < 3; ++i) {
    CHECK(probe_bits(key, idx[i], 0) == s0[i], "stream 0 bits %d", i);
    CHECK(probe_bits(key, idx[i], 1) == s1[i], "stream 1 bits %d", i);
  }
  const double g[3] = {1.3046213665023405, -0.12922920552385644, -0.20907069283001847};
  for (int i = 0; i < 3; ++i)
    CHECK(std::fabs(probe_value<double>(key, uint64_t(i), ProbeKind::Gaussian) - g[i]) < 1e-14, "gaussian %d", i);
}

static void test_probe_statistics_and_offsets() {
  const int64_t n = 1 << 20;
  std::vector<double> r(n), g(n);
  fill_probes_cpu(r.data(), 0, n, 7, 0, ProbeKind::Rademacher);
  fill_probes_cpu(g.data(), 0, n, 7, 0, ProbeKind::Gaussian);
  double rs = 0, gm = 0, g2 = 0, g4 = 0;
  bool pm1 = true;
  for (int64_t i = 0; i < n; ++i) {
    pm1 = pm1 && (r[i] == 1.0 || r[i] == -1.0);
    rs += r[i];
    gm += g[i];
    g2 += g[i] * g[i];
    g4 += g[i] * g[i] * g[i] * g[i];
  }
  CHECK(pm1, "Rademacher values are +-1");
  CHECK(std::fabs(rs / n) < 5e-3, "Rademacher mean %g", rs / n);
  CHECK(std::fabs(gm / n) < 5e-3 && std::fabs(g2 / n - 1) < 5e-3 && std::fabs(g4 / n - 3) < 0.05,
        "Gaussian moments %g %g %g", gm / n, g2 / n, g4 / n);
  std::vector<float> part(100);
  fill_probes_cpu(part.data(), 0, 100, 7, 5000, ProbeKind::Gaussian);
  for (int i = 0; i < 100; ++i) CHECK(std::fabs(part[i] - g[5000 + i]) < 1e-5, "offset %d", i);
}

static void test_probe_dots() {
  const int64_t S = 2, B = 3, D = 29;
  std::vector<float> v(S * B * D * 2), w(S * B * D);
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(int(i % 11) - 5) / 4.f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(int(i % 7) - 3) / 2.f;
  std::vector<float> out(S * B);
  // v: batch stride 2 * D (every other row), w contiguous
  ProbeDotsProblem<float> p{v.data(), 2 * B * D, 2 * D, w.data(), B * D, D, S, B, D, out.data()};
  probe_dots_rows_cpu(p, 0, S * B);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = 0; b < B; ++b) {
      double expect = 0;
      for (int64_t d = 0; d < D; ++d) expect += double(v[s * 2 * B * D + b * 2 * D + d]) * w[(s * B + b) * D + d];
      CHECK(out[s * B + b] == float(expect), "dot s%lld b%lld: %g vs %g", (long long)s, (long long)b,
            double(out[s * B + b]), expect);
    }
}

static void test_curvature_step() {
  const int64_t R = 6, P = 3, D = 37;  // D odd: a vector remainder; dyadic values: exact sums
  std::vector<float> t(R * D), d1(P * D), c2(P * D), out(R);
  for (size_t i = 0; i < t.size(); ++i) t[i] = float(int(i % 9) - 4) / 4.f;
  for (size_t i = 0; i < d1.size(); ++i) d1[i] = float(int(i % 5) - 2) / 2.f;
  for (size_t i = 0; i < c2.size(); ++i) c2[i] = float(int(i % 7) - 3) / 8.f;
  const std::vector<float> before = t;
  CurvatureStepProblem<float> p{t.data(), d1.data(), c2.data(), R, P, D, out.data()};
  curvature_step_rows_cpu(p, 0, R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t f = (r % P) * D;
    double expect = 0;
    for (int64_t j = 0; j < D; ++j) {
      const double v = before[r * D + j];
      expect += double(c2[f + j]) * v * v;
      CHECK(t[r * D + j] == float(v * d1[f + j]), "tangent r%lld j%lld", (long long)r, (long long)j);
    }
    CHECK(out[r] == float(expect), "term r%lld: %g vs %g", (long long)r, double(out[r]), expect);
  }
}

int main() {
  test_energy_special_values();
  test_energy_rows<double>("double", 1e-15);
  test_energy_rows<float>("float", 1e-6);
  test_energy_rows<Float16Bits>("float16", 1e-6);
  test_energy_rows<BFloat16Bits>("bfloat16", 1e-6);
  test_logsumexp_hvp_rows();
  test_probe_known_answers();
  test_probe_statistics_and_offsets();
  test_probe_dots();
  test_curvature_step();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all flatness core tests passed\n");
  return 0;
}
