// Torch-free tests of the probe-scoring cores (run by ctest): the 16-bit float
// conversions, the smoothing arithmetic shared with the CUDA kernel, and the
// CPU kernel of every instruction set this machine has, against a naive
// double-precision loop.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "probe_scores.h"

using namespace pykernels::core;

static bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0;
}

static void test_f16_conversion_all_values() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = (h >> 15) ? -1 : 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double expect;
    if (exp == 0x1f) expect = mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
    else if (exp == 0) expect = sign * std::ldexp(double(mant), -24);
    else expect = sign * std::ldexp(1.0 + mant / 1024.0, exp - 15);
    const float got = f16_bits_to_float(uint16_t(h));
    CHECK(same_float(got, float(expect)), "f16 0x%04x -> %g, expected %g", h, got, expect);
  }
}

static void test_bf16_conversion() {
  CHECK(bf16_bits_to_float(0x3f80) == 1.0f, "bf16 1.0");
  CHECK(bf16_bits_to_float(0xc020) == -2.5f, "bf16 -2.5");
  CHECK(std::isinf(bf16_bits_to_float(0x7f80)), "bf16 inf");
  CHECK(std::isnan(bf16_bits_to_float(0x7fc0)), "bf16 nan");
}

static void test_swim_by_hand() {
  const float z[5] = {1, 2, 3, 4, 5};
  CHECK(swim_at(z, 1, 0, 3) == 1.f, "first token averages itself");
  CHECK(swim_at(z, 1, 1, 3) == 1.5f, "second token averages the two available");
  CHECK(swim_at(z, 1, 4, 3) == 4.f, "full window: (3+4+5)/3");
  CHECK(swim_at(z, 1, 4, 1) == 5.f, "window 1 is the identity");
  const float zn[5] = {1, NAN, 3, 4, 5};
  CHECK(std::isnan(swim_at(zn, 1, 2, 2)), "window containing the NaN is NaN");
  CHECK(swim_at(zn, 1, 3, 2) == 3.5f, "window past the NaN is clean");
}

// The scan operator must reproduce the sequential recurrence for any split.
static void test_ema_scan_matches_sequential() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (float alpha : {0.1f, 0.5f, 1.0f}) {
    std::vector<float> z(37);
    for (auto& v : z) v = nd(rng);
    std::vector<float> seq(z.size());
    float e = 0.f;
    for (size_t t = 0; t < z.size(); ++t) seq[t] = e = ema_apply(ema_token_map(z[t], alpha, t == 0), e);
    CHECK(seq[0] == z[0], "e_0 = z_0");
    CHECK(std::fabs(seq[1] - (alpha * z[1] + (1 - alpha) * z[0])) < 1e-6f, "e_1 by hand");
    for (size_t split = 1; split < z.size(); split += 5) {
      EmaMap head{0.f, 0.f}, tail{1.f, 0.f};
      for (size_t t = 0; t < split; ++t) head = ema_compose(head, ema_token_map(z[t], alpha, t == 0));
      for (size_t t = split; t < z.size(); ++t) tail = ema_compose(tail, ema_token_map(z[t], alpha, false));
      const float got = ema_apply(tail, ema_apply(head, 0.f));
      CHECK(std::fabs(got - seq.back()) < 1e-5f, "alpha %g split %zu: %g vs %g", alpha, split, got, seq.back());
    }
  }
}

static void test_ema_nan_rules() {
  // A NaN reaches every later token for alpha < 1, even through an underflowed decay...
  EmaMap acc = ema_token_map(NAN, 0.5f, true);
  for (int t = 1; t < 400; ++t) acc = ema_compose(acc, ema_token_map(1.f, 0.5f, false));
  CHECK(std::isnan(ema_apply(acc, 0.f)), "NaN must survive 400 steps of decay 0.5");
  // ...but not past a reset (alpha == 1 forgets the past exactly).
  EmaMap reset = ema_compose(ema_token_map(NAN, 1.f, true), ema_token_map(2.f, 1.f, false));
  CHECK(ema_apply(reset, NAN) == 2.f, "alpha = 1 forgets the NaN");
}

// ---- the CPU kernel vs a naive double loop ----
struct Case {
  int64_t L, B, T, H, K;
  DType dtype;
  bool strided;  // layers as slices of a wider buffer
};

static uint16_t to_bits(float f, DType d) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (d == DType::BFloat16) return uint16_t(u >> 16);  // truncation: exact to read back
  // float -> half for values in normal range by truncation (test data is small).
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int exp = int((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return uint16_t(sign);
  return uint16_t(sign | (uint32_t(exp) << 10) | ((u >> 13) & 0x3ffu));
}

static float from_bits(uint16_t h, DType d) {
  return d == DType::BFloat16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
}

static void run_kernel_case(const Case& c, const char* isa) {
  std::mt19937 rng(unsigned(c.L * 131 + c.H * 7 + c.K));
  std::normal_distribution<float> nd;
  const int64_t elem = dtype_size(c.dtype);
  const int64_t pad = c.strided ? 3 : 0;  // extra elements per row, never read
  const int64_t row = c.H + pad;
  std::vector<std::vector<char>> store(c.L, std::vector<char>(c.B * c.T * row * elem));
  std::vector<std::vector<float>> value(c.L, std::vector<float>(c.B * c.T * c.H));
  std::vector<LayerView> views(c.L);
  for (int64_t l = 0; l < c.L; ++l) {
    for (int64_t i = 0; i < c.B * c.T; ++i)
      for (int64_t j = 0; j < c.H; ++j) {
        float v = nd(rng);
        char* dst = store[l].data() + (i * row + j) * elem;
        if (c.dtype == DType::Float32) {
          std::memcpy(dst, &v, 4);
        } else {
          const uint16_t bits = to_bits(v, c.dtype);
          std::memcpy(dst, &bits, 2);
          v = from_bits(bits, c.dtype);
        }
        value[l][i * c.H + j] = v;
      }
    views[l] = LayerView{store[l].data(), c.T * row, row};
  }
  std::vector<float> w_t(c.L * c.K * c.H), bias(c.K);
  for (auto& v : w_t) v = nd(rng);
  for (auto& v : bias) v = nd(rng);
  std::vector<int64_t> lengths(c.B);
  for (int64_t b = 0; b < c.B; ++b) lengths[b] = c.T - (b % 3);  // some padding
  std::vector<float> out(c.B * c.T * c.K, NAN);

  ProbeScoresProblem p{views.data(), c.L,         c.dtype,        c.B,       c.T, c.H, c.K,
                       w_t.data(),   bias.data(), lengths.data(), out.data()};
  setenv("PYKERNELS_CPU_ISA", isa, 1);
  for (int64_t b = 0; b < c.B; ++b) probe_logits_cpu(p, b, 0, clamped_length(lengths.data(), b, c.T));

  double worst = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < lengths[b]; ++t)
      for (int64_t k = 0; k < c.K; ++k) {
        double ref = bias[k], mag = std::fabs(bias[k]);
        for (int64_t l = 0; l < c.L; ++l)
          for (int64_t j = 0; j < c.H; ++j) {
            const double term = double(value[l][(b * c.T + t) * c.H + j]) * w_t[(l * c.K + k) * c.H + j];
            ref += term;
            mag += std::fabs(term);
          }
        const double err = std::fabs(out[(b * c.T + t) * c.K + k] - ref) / (mag + 1e-30);
        worst = err > worst ? err : worst;
      }
  CHECK(worst < 1e-6, "isa %s L%lld B%lld T%lld H%lld K%lld dtype %d: relative error %g", isa, (long long)c.L,
        (long long)c.B, (long long)c.T, (long long)c.H, (long long)c.K, int(c.dtype), worst);
}

static void test_cpu_kernel_every_isa() {
  const Case cases[] = {
      {3, 2, 9, 70, 1, DType::Float32, false},  {2, 3, 13, 129, 4, DType::Float32, true},
      {4, 1, 6, 64, 6, DType::BFloat16, false}, {2, 2, 11, 100, 3, DType::Float16, true},
      {1, 1, 5, 7, 9, DType::Float32, false},   {2, 2, 8, 256, 2, DType::BFloat16, true},
  };
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    setenv("PYKERNELS_CPU_ISA", isa, 1);
    if (std::string(probe_scores_cpu_isa()) != isa) {
      std::printf("note: %s not available on this CPU, skipped\n", isa);
      continue;
    }
    for (const Case& c : cases) run_kernel_case(c, isa);
  }
  unsetenv("PYKERNELS_CPU_ISA");
}

static void test_smooth_sequence_pads_with_zero() {
  const int64_t T = 6, K = 2;
  std::vector<float> out = {1, 10, 2, 20, 3, 30, 4, 40, 99, 99, 99, 99};
  const int64_t lengths[1] = {4};
  ProbeScoresProblem p{nullptr, 0, DType::Float32, 1, T, 1, K, nullptr, nullptr, lengths, out.data()};
  smooth_sequence_cpu(p, 0, Smoothing::Swim, 2, 0.f);
  const float expect[] = {1, 10, 1.5, 15, 2.5, 25, 3.5, 35, 0, 0, 0, 0};
  for (int i = 0; i < 12; ++i) CHECK(out[i] == expect[i], "swim[%d] = %g, expected %g", i, out[i], expect[i]);
}

int main() {
  test_f16_conversion_all_values();
  test_bf16_conversion();
  test_swim_by_hand();
  test_ema_scan_matches_sequential();
  test_ema_nan_rules();
  test_cpu_kernel_every_isa();
  test_smooth_sequence_pads_with_zero();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
