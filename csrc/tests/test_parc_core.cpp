// Torch-free tests of the model-selection cores (run by ctest): the shared arithmetic (pair
// indexing, sort keys, the closed-form rho) and the CPU kernels against naive double loops,
// including inputs built to be full of ties.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "parc.h"

using namespace pykernels::core;

// ---- naive references ----

// Doubled average ranks: 2 * (#less + (#equal + 1) / 2) = 2 #less + #equal + 1.
static std::vector<int64_t> naive_twice_ranks(const std::vector<double>& v) {
  std::vector<int64_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    int64_t less = 0, equal = 0;
    for (double w : v) less += w < v[i], equal += w == v[i];
    r[i] = 2 * less + equal + 1;
  }
  return r;
}

static double naive_pearson(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = double(x.size());
  double mx = 0, my = 0;
  for (size_t i = 0; i < x.size(); ++i) mx += x[i] / n, my += y[i] / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sxy += (x[i] - mx) * (y[i] - my);
    sxx += (x[i] - mx) * (x[i] - mx);
    syy += (y[i] - my) * (y[i] - my);
  }
  return sxy / std::sqrt(sxx * syy);
}

static double naive_spearman(const std::vector<double>& x, const std::vector<double>& y) {
  const auto rx = naive_twice_ranks(x), ry = naive_twice_ranks(y);
  return naive_pearson(std::vector<double>(rx.begin(), rx.end()), std::vector<double>(ry.begin(), ry.end()));
}

// 1 - Pearson between rows i and j of a [n, d] matrix, clipped like np.corrcoef.
static double naive_distance(const std::vector<double>& x, int64_t d, int64_t i, int64_t j) {
  std::vector<double> a(x.begin() + i * d, x.begin() + (i + 1) * d), b(x.begin() + j * d, x.begin() + (j + 1) * d);
  return corr_distance(naive_pearson(a, b));
}

// ---- tests ----

static void test_triu_index() {
  for (int64_t n : {2, 3, 7, 40}) {
    int64_t expect = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j)
        CHECK(triu_index(i, j, n) == expect++, "triu_index(%lld, %lld, %lld)", (long long)i, (long long)j,
              (long long)n);
  }
}

static void test_sort_keys_order_like_values() {
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd;
  std::vector<double> v = {
      0.0,    -0.0,   1.0, -1.0, std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
      1e-310, -1e-310};
  for (int i = 0; i < 200; ++i) v.push_back(nd(rng) * std::pow(10.0, i % 7 - 3));
  for (double a : v)
    for (double b : v) {
      CHECK((a < b) == (order_key(a) < order_key(b)), "order_key(%g) vs order_key(%g)", a, b);
      CHECK((a == b) == (order_key(a) == order_key(b)), "order_key ties for %g, %g", a, b);
    }
  // PARC keys: every same-class pair first, then by distance; the distance survives the key.
  const double ds[] = {0.0, 1e-300, 0.5, 1.0, 1.0000000000000002, 2.0};
  for (double a : ds) {
    CHECK(parc_key_distance(parc_pair_key(a, true)) == a && parc_key_distance(parc_pair_key(a, false)) == a,
          "key round trip %g", a);
    for (double b : ds) {
      CHECK(parc_pair_key(a, true) < parc_pair_key(b, false), "same-class %g before different-class %g", a, b);
      CHECK((a < b) == (parc_pair_key(a, true) < parc_pair_key(b, true)), "same-class order %g %g", a, b);
      CHECK((a < b) == (parc_pair_key(a, false) < parc_pair_key(b, false)), "diff-class order %g %g", a, b);
    }
  }
}

static void test_ranks_against_naive() {
  std::mt19937_64 rng(2);
  RankScratch scratch;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t m = 1 + trial * 37 % 300;
    std::vector<double> v(static_cast<size_t>(m));
    std::uniform_int_distribution<int> small(0, trial % 5 + 1);  // many ties
    std::normal_distribution<double> nd;
    for (auto& x : v) x = trial % 2 ? double(small(rng)) : nd(rng);
    if (trial % 7 == 3)
      v[0] = std::numeric_limits<double>::infinity(), v[m - 1] = -std::numeric_limits<double>::infinity();
    std::vector<int64_t> got(static_cast<size_t>(m));
    const double ties = twice_average_ranks_cpu(v.data(), 1, m, got.data(), scratch);
    const auto expect = naive_twice_ranks(v);
    double expect_ties = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      int64_t t = 0;
      for (double w : v) t += w == v[i];
      expect_ties += double(tie_term_exact(t)) / double(t);  // each group counted once overall
    }
    CHECK(got == expect, "ranks differ (trial %d, m %lld)", trial, (long long)m);
    CHECK(std::fabs(ties - expect_ties) <= 1e-9 * (1 + expect_ties), "tie sum %g vs %g", ties, expect_ties);
  }
  // Strided float input, all values equal.
  std::vector<float> same(20, 3.5f);
  std::vector<int64_t> r(10);
  CHECK(twice_average_ranks_cpu(same.data(), 2, 10, r.data(), scratch) == double(tie_term_exact(10)), "all tied");
  CHECK(std::all_of(r.begin(), r.end(), [](int64_t x) { return x == 11; }), "all ranks (1 + 10) / 2");
}

static void test_spearman_against_naive() {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int> small(0, 3);
  RankScratch scratch;
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t m = 5 + trial * 13;
    std::vector<double> x(static_cast<size_t>(m)), y(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      x[size_t(i)] = trial % 3 ? nd(rng) : small(rng);
      y[size_t(i)] = 0.5 * x[size_t(i)] + (trial % 2 ? nd(rng) : small(rng));
    }
    std::vector<int64_t> rx(static_cast<size_t>(m)), ry(static_cast<size_t>(m));
    const double tx = twice_average_ranks_cpu(x.data(), 1, m, rx.data(), scratch);
    const double ty = twice_average_ranks_cpu(y.data(), 1, m, ry.data(), scratch);
    const double got = spearman_from_ranks_cpu(rx.data(), ry.data(), m, tx, ty);
    const double expect = naive_spearman(x, y);
    CHECK(std::fabs(got - expect) < 1e-12 || (std::isnan(got) && std::isnan(expect)),
          "spearman %.17g vs %.17g (trial %d)", got, expect, trial);
  }
  std::vector<int64_t> tied = {3, 3}, other = {2, 4};
  CHECK(std::isnan(spearman_from_ranks_cpu(tied.data(), other.data(), 2, double(tie_term_exact(2)), 0)),
        "constant side gives NaN");
}

static void test_closed_form_equals_pearson_of_ranks() {
  // rho from (n0, n1, 2U, ties) against Pearson(ranks, indicator) on a hand-sized example with ties.
  const std::vector<double> value = {0.1, 0.4, 0.4, 0.2, 0.9, 0.4, 0.1};
  const std::vector<double> diff = {0, 1, 0, 1, 1, 1, 0};
  int64_t n0 = 0, n1 = 0, twice_u = 0;
  for (size_t a = 0; a < value.size(); ++a) {
    (diff[a] ? n1 : n0)++;
    if (!diff[a]) continue;
    for (size_t b = 0; b < value.size(); ++b)
      if (!diff[b]) twice_u += value[a] > value[b] ? 2 : (value[a] == value[b] ? 1 : 0);
  }
  const double ties = double(tie_term_exact(2) + tie_term_exact(3));  // two 0.1s, three 0.4s
  CHECK(std::fabs(parc_rho(n0, n1, twice_u, ties) - naive_spearman(value, diff)) < 1e-14, "closed form %.17g vs %.17g",
        parc_rho(n0, n1, twice_u, ties), naive_spearman(value, diff));
  CHECK(std::isnan(parc_rho(0, 5, 0, 0)) && std::isnan(parc_rho(3, 0, 0, 0)), "one-sided pairs give NaN");
}

static FeatureBatch batch_of(const std::vector<double>& x, int64_t b, int64_t n, int64_t d) {
  return FeatureBatch{x.data(), DType::Float64, b, n, d};
}

static void test_distance_rows_against_naive() {
  std::mt19937_64 rng(4);
  std::normal_distribution<double> nd;
  for (int64_t n : {3, 17, 300}) {
    const int64_t d = n % 5 + 3;
    std::vector<double> x(static_cast<size_t>(2 * n * d));
    for (auto& v : x) v = nd(rng);
    const int64_t constant = n / 2;  // row of model 1 with zero variance
    for (int64_t k = 0; k < d; ++k) x[size_t((n + constant) * d + k)] = 4.0;
    const FeatureBatch f = batch_of(x, 2, n, d);
    for (int64_t b = 0; b < 2; ++b) {
      std::vector<double> zt(static_cast<size_t>(d * n));
      for (int64_t i = 0; i < n; ++i) {
        const bool ok = normalize_row_cpu(f, b, i, zt.data(), i);
        CHECK(ok == !(b == 1 && i == constant), "normalize_row_cpu(%lld, %lld) = %d", (long long)b, (long long)i, ok);
      }
      std::vector<double> full(size_t(n * n), -7.0), tri(size_t(n * (n - 1) / 2), -7.0);
      corr_distance_rows_cpu(zt.data(), n, d, 0, n, false, full.data());
      corr_distance_rows_cpu(zt.data(), n, d, 0, n, true, tri.data());
      std::vector<double> xb(x.begin() + b * n * d, x.begin() + (b + 1) * n * d);
      double worst = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          const bool undefined = b == 1 && (i == constant || j == constant);
          const double got = full[size_t(i * n + j)];
          if (undefined) {
            CHECK(std::isnan(got), "distance involving the constant row must be NaN");
            continue;
          }
          const double expect = i == j ? 0.0 : naive_distance(xb, d, i, j);
          worst = std::max(worst, std::fabs(got - expect));
          if (i < j) CHECK(tri[size_t(triu_index(i, j, n))] == got, "triu and full layouts disagree");
        }
      CHECK(worst < 1e-13, "n %lld model %lld: max error %g", (long long)n, (long long)b, worst);
    }
  }
}

// PARC against Spearman of the materialised pairs, on random and on tie-heavy features. The
// pairs come from corr_distance_rows_cpu (checked above against naive Pearson): rounding decides
// which near-equal distances tie, and this test is about ranking those exact values.
static void check_parc_case(int64_t n, int64_t d, int classes, bool quantized, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int> pick(0, 3), cls(0, classes - 1);
  const int64_t B = 2;
  std::vector<double> x(static_cast<size_t>(B * n * d));
  // Quantised: every row is one of four fixed rows, so distances repeat exactly.
  std::vector<double> protos(static_cast<size_t>(4 * d));
  for (auto& v : protos) v = nd(rng);
  for (int64_t r = 0; r < B * n; ++r)
    for (int64_t k = 0; k < d; ++k) x[size_t(r * d + k)] = quantized ? protos[size_t(pick(rng) * d + k)] : nd(rng);
  std::vector<int64_t> y(static_cast<size_t>(n));
  for (auto& v : y) v = cls(rng) * 10 - 3;  // arbitrary ids
  std::vector<int64_t> order(static_cast<size_t>(n)), block_end(static_cast<size_t>(n));
  ParcLabels labels{order.data(), block_end.data(), 0, 0};
  parc_labels_cpu(y.data(), n, order.data(), block_end.data(), &labels.n_same, &labels.n_diff);
  int64_t same_pairs = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) same_pairs += y[size_t(i)] == y[size_t(j)];
  CHECK(labels.n_same == same_pairs && labels.n_same + labels.n_diff == n * (n - 1) / 2, "pair counts");
  const FeatureBatch f = batch_of(x, B, n, d);
  ParcScratch scratch;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> zt(static_cast<size_t>(d * n)), dist(static_cast<size_t>(n * (n - 1) / 2)), label;
    for (int64_t i = 0; i < n; ++i) normalize_row_cpu(f, b, i, zt.data(), i);
    corr_distance_rows_cpu(zt.data(), n, d, 0, n, true, dist.data());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) label.push_back(y[size_t(i)] == y[size_t(j)] ? 0.0 : 1.0);
    const double got = parc_spearman_cpu(f, labels, b, scratch);
    const double expect = naive_spearman(dist, label);
    CHECK(std::fabs(got - expect) < 1e-12, "parc n %lld d %lld C %d quantized %d: %.17g vs %.17g", (long long)n,
          (long long)d, classes, quantized, got, expect);
  }
}

static void test_parc_against_naive() {
  check_parc_case(3, 4, 2, false, 5);
  check_parc_case(40, 6, 3, false, 6);
  check_parc_case(90, 32, 7, false, 7);
  check_parc_case(60, 5, 4, true, 8);
  check_parc_case(50, 3, 2, true, 9);
}

static void test_parc_degenerate_model_is_nan() {
  const int64_t n = 6, d = 3;
  std::vector<double> x(static_cast<size_t>(n * d));
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(i * i % 7);
  for (int64_t k = 0; k < d; ++k) x[size_t(2 * d + k)] = 1.0;  // a constant row
  std::vector<int64_t> y = {0, 1, 0, 1, 0, 1}, order(n), block_end(n);
  ParcLabels labels{order.data(), block_end.data(), 0, 0};
  parc_labels_cpu(y.data(), n, order.data(), block_end.data(), &labels.n_same, &labels.n_diff);
  ParcScratch scratch;
  CHECK(std::isnan(parc_spearman_cpu(batch_of(x, 1, n, d), labels, 0, scratch)), "constant row gives NaN");
  x[0] = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < d; ++k) x[size_t(2 * d + k)] = double(k);
  CHECK(std::isnan(parc_spearman_cpu(batch_of(x, 1, n, d), labels, 0, scratch)), "Inf feature gives NaN");
}

int main() {
  test_triu_index();
  test_sort_keys_order_like_values();
  test_ranks_against_naive();
  test_spearman_against_naive();
  test_closed_form_equals_pearson_of_ranks();
  test_distance_rows_against_naive();
  test_parc_against_naive();
  test_parc_degenerate_model_is_nan();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
