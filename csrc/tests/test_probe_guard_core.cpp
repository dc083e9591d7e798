// Torch-free tests of the probe guard cores (run by ctest): the streaming
// arithmetic shared with the CUDA kernel against the whole-sequence smoothing,
// the CPU stream step's slot checks, its segmented (varlen) form against
// token-by-token steps, probe_accumulate for every instruction
// set, and the fused loss against finite differences in double.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "probe_guard.h"

using namespace pykernels::core;

// stream_update token by token == swim_at / the EMA recurrence over the whole series, bit for bit.
static void test_stream_update_equals_whole_sequence() {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const int64_t K = 2, T = 53;
  std::vector<float> z(T * K);
  for (auto& v : z) v = nd(rng);
  for (int64_t window : {1, 2, 5, 16, 60}) {
    std::vector<float> ring(2 * window * K, 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const float got = stream_update(ring.data(), K, k, t, window, 0.f, z[t * K + k]);
        const float expect = swim_at(z.data() + k, K, t, window);
        CHECK(got == expect, "swim window %lld t %lld k %lld: %g vs %g", (long long)window, (long long)t, (long long)k,
              got, expect);
      }
  }
  for (float alpha : {0.1f, 0.5f, 1.f}) {
    float state[K] = {7.f, 7.f};  // garbage from a previous request: the first token must ignore it
    for (int64_t k = 0; k < K; ++k) {
      float e = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        e = ema_apply(ema_token_map(z[t * K + k], alpha, t == 0), e);
        const float got = stream_update(state, K, k, t, 0, alpha, z[t * K + k]);
        CHECK(got == e, "ema alpha %g t %lld: %g vs %g", alpha, (long long)t, got, e);
      }
    }
  }
}

static void test_crosses_fails_closed() {
  CHECK(crosses(1.f, 0.f) && !crosses(0.f, 0.f) && !crosses(-1.f, 0.f), "strictly above");
  CHECK(crosses(NAN, 0.f), "NaN flags");
  CHECK(crosses(INFINITY, 1e30f) && !crosses(-INFINITY, 0.f), "infinities");
}

struct Stream {
  int64_t slots, window, K;
  std::vector<float> state;
  std::vector<int64_t> meta;
  int64_t status[2] = {0, 0};
  std::vector<float> threshold;
  Stream(int64_t s, int64_t w, int64_t k)
      : slots(s), window(w), K(k), state(s * (w ? 2 * w : 1) * k, 0.f), meta(s * kMetaFields, 0), threshold(k, 0.5f) {
    for (int64_t i = 0; i < s; ++i) meta[i * kMetaFields + kMetaFlagToken] = -1;
  }
  void step(const std::vector<int64_t>& ids, const std::vector<float>& z, std::vector<float>& scores,
            std::vector<bool>& flagged) {
    run(ids, nullptr, nullptr, z, scores, flagged);
  }
  // Segment r of the token rows of z [N, K] steps slot ids[r].
  void step_varlen(const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& counts, const std::vector<float>& z, std::vector<float>& scores,
                   std::vector<bool>& flagged) {
    run(ids, starts.data(), counts.data(), z, scores, flagged);
  }

 private:
  void run(const std::vector<int64_t>& ids, const int64_t* starts, const int64_t* counts, const std::vector<float>& z,
           std::vector<float>& scores, std::vector<bool>& flagged) {
    const int64_t n = int64_t(ids.size()), N = int64_t(z.size()) / K;
    scores.assign(N * K, 0.f);
    std::vector<char> f(n);
    StreamStepProblem p{state.data(),
                        meta.data(),
                        status,
                        slots,
                        window ? 2 * window : 1,
                        K,
                        window,
                        0.25f,
                        ids.data(),
                        starts,
                        counts,
                        z.data(),
                        nullptr,
                        threshold.data(),
                        n,
                        N,
                        scores.data(),
                        reinterpret_cast<bool*>(f.data())};
    probe_stream_step_cpu(p);
    flagged.assign(f.begin(), f.end());
  }
};

static void test_stream_step_slot_checks() {
  for (int64_t window : {0, 3}) {
    Stream s(4, window, 1);
    std::vector<float> scores;
    std::vector<bool> flagged;
    s.step({0, 2}, {1.f, 0.f}, scores, flagged);
    CHECK(flagged[0] && !flagged[1] && s.status[1] == 0, "first step flags slot 0 only");
    const auto state = s.state;
    const auto meta_before = s.meta;
    s.step({1, 1}, {9.f, 9.f}, scores, flagged);
    CHECK(s.status[1] == kSlotDuplicated, "duplicate reported (%lld)", (long long)s.status[1]);
    CHECK(std::isnan(scores[0]) && flagged[0] && flagged[1], "bad step fails closed");
    CHECK(s.state == state, "duplicate changed no state");
    for (int64_t i = 0; i < 4; ++i)
      CHECK(s.meta[i * kMetaFields] == meta_before[i * kMetaFields], "duplicate changed no count");
    s.status[1] = 0;
    s.step({3, 4}, {9.f, 9.f}, scores, flagged);
    CHECK(s.status[1] == kSlotOutOfRange && s.state == state, "out of range reported, no state changed");
    s.status[1] = 0;
    s.step({2}, {4.f}, scores, flagged);
    CHECK(flagged[0] && s.meta[2 * kMetaFields + kMetaFlagToken] == 1, "slot 2 flags at its token 1");
  }
}

// Segments step exactly as one-token steps would; bad segments change nothing and fail closed.
static void test_stream_step_varlen() {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  const int64_t K = 2;
  for (int64_t window : {0, 3}) {
    Stream varlen(4, window, K), tokenwise(4, window, K);
    const std::vector<int64_t> ids = {2, 0, 3}, starts = {1, 5, 5}, counts = {4, 0, 3};
    std::vector<float> z(9 * K);
    for (auto& v : z) v = nd(rng);
    std::vector<float> scores, one;
    std::vector<bool> flagged, one_flag;
    varlen.step_varlen(ids, starts, counts, z, scores, flagged);
    CHECK(varlen.status[0] == 1 && varlen.status[1] == 0, "one step, no error");
    for (size_t r = 0; r < ids.size(); ++r)
      for (int64_t i = starts[r]; i < starts[r] + counts[r]; ++i) {
        tokenwise.step({ids[r]}, std::vector<float>(z.begin() + i * K, z.begin() + (i + 1) * K), one, one_flag);
        CHECK(std::memcmp(&scores[i * K], one.data(), K * sizeof(float)) == 0, "window %lld token %lld",
              (long long)window, (long long)i);
      }
    for (int64_t i : {0, 8})
      CHECK(scores[i * K] == 0.f && scores[i * K + 1] == 0.f, "row %lld outside every segment is 0", (long long)i);
    CHECK(varlen.state == tokenwise.state, "same state");
    for (int64_t s = 0; s < 4; ++s)
      for (int c : {kMetaCount, kMetaFlagToken})
        CHECK(varlen.meta[s * kMetaFields + c] == tokenwise.meta[s * kMetaFields + c], "same meta");
    for (size_t r = 0; r < ids.size(); ++r)
      CHECK(flagged[r] == (varlen.meta[ids[r] * kMetaFields + kMetaFlagToken] >= 0), "flag of row %zu", r);

    const auto state = varlen.state;
    const auto meta = varlen.meta;
    const std::vector<std::vector<int64_t>> bad_starts = {{1, 3}, {-1, 5}, {1, 9}, {1, 5}, {5, 1}};
    const std::vector<std::vector<int64_t>> bad_counts = {{4, 1}, {1, 1}, {4, 1}, {4, -1}, {1, 1}};
    for (size_t c = 0; c < bad_starts.size(); ++c) {
      varlen.status[1] = 0;
      varlen.step_varlen({2, 0}, bad_starts[c], bad_counts[c], z, scores, flagged);
      CHECK(varlen.status[1] == kSegmentOutOfRange, "case %zu: bad segment reported", c);
      CHECK(flagged[0] && flagged[1] && varlen.state == state, "case %zu: fails closed, no state changed", c);
      for (int64_t s = 0; s < 4; ++s)
        CHECK(varlen.meta[s * kMetaFields] == meta[s * kMetaFields], "case %zu: no count changed", c);
    }
    CHECK(std::isnan(scores[5 * K]) && !std::isnan(scores[4 * K]), "NaN for the bad segments' tokens only");
  }
  CHECK(segment_in_range(0, 0, 0) && segment_in_range(3, 0, 3) && !segment_in_range(4, 0, 3) &&
            !segment_in_range(1, INT64_MAX, 3) && !segment_in_range(INT64_MIN, 1, 3),
        "segment bounds without overflow");
}

static void test_accumulate_every_isa() {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  const int64_t N = 7, H = 133, K = 5, stride = H + 4;
  std::vector<float> x(N * stride), w_t(K * H), acc0(N * K);
  for (auto& v : x) v = nd(rng);
  for (auto& v : w_t) v = nd(rng);
  for (auto& v : acc0) v = nd(rng);
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    setenv("PYKERNELS_CPU_ISA", isa, 1);
    if (std::string(probe_scores_cpu_isa()) != isa) continue;
    std::vector<float> acc = acc0;
    AccumulateProblem p{x.data(), stride, DType::Float32, N, H, K, w_t.data(), acc.data()};
    probe_accumulate_cpu(p, 0, 3);
    probe_accumulate_cpu(p, 3, N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double ref = acc0[n * K + k], mag = std::fabs(ref);
        for (int64_t j = 0; j < H; ++j) {
          ref += double(x[n * stride + j]) * w_t[k * H + j];
          mag += std::fabs(double(x[n * stride + j]) * w_t[k * H + j]);
        }
        CHECK(std::fabs(acc[n * K + k] - ref) <= 1e-6 * mag, "%s n %lld k %lld: %g vs %g", isa, (long long)n,
              (long long)k, acc[n * K + k], ref);
      }
  }
  unsetenv("PYKERNELS_CPU_ISA");
}

static double swbce_loss(std::vector<double> z, double y, int64_t n, int64_t T, int64_t M, double tau, bool detach) {
  double loss = 0;
  const int64_t len = n;
  SwbceProblem p{z.data(), &y, &len, 1, T, M, tau, detach, DType::Float64, &loss, nullptr};
  softmax_weighted_bce_cpu(p, 0);
  return loss;
}

static void test_swbce_gradient_by_finite_differences() {
  std::mt19937 rng(4);
  std::normal_distribution<double> nd;
  const int64_t T = 21;
  for (int64_t M : {1, 4, 16, 30})
    for (int64_t n : {int64_t(1), int64_t(3), int64_t(17), T})
      for (double tau : {1.0, 0.3}) {
        std::vector<double> z(T);
        for (auto& v : z) v = 2 * nd(rng);
        const double y = 0.3;
        std::vector<double> grad(T, NAN);
        double loss = 0;
        SwbceProblem p{z.data(), &y, &n, 1, T, M, tau, false, DType::Float64, &loss, grad.data()};
        softmax_weighted_bce_cpu(p, 0);
        CHECK(std::fabs(loss - swbce_loss(z, y, n, T, M, tau, false)) < 1e-15, "grad path changes the loss");
        for (int64_t s = 0; s < T; ++s) {
          std::vector<double> up = z, down = z;
          up[s] += 1e-6;
          down[s] -= 1e-6;
          const double fd = (swbce_loss(up, y, n, T, M, tau, false) - swbce_loss(down, y, n, T, M, tau, false)) / 2e-6;
          CHECK(std::fabs(grad[s] - fd) < 1e-7, "M %lld n %lld tau %g s %lld: %g vs %g", (long long)M, (long long)n,
                tau, (long long)s, grad[s], fd);
        }
      }
}

int main() {
  test_stream_update_equals_whole_sequence();
  test_crosses_fails_closed();
  test_stream_step_slot_checks();
  test_stream_step_varlen();
  test_accumulate_every_isa();
  test_swbce_gradient_by_finite_differences();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
