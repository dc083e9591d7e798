// CPU bindings of the flatness ops: rows split across PyTorch's intra-op
// thread pool (so torch.set_num_threads applies).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "flatness_common.h"

namespace pykernels::ops {

namespace {

// Rows per task so that a task touches about 16k elements.
int64_t grain(int64_t elements_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elements_per_row)); }

void expect_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got ", t.device());
}

at::Tensor energy_cpu(const at::Tensor& logits) {
  expect_cpu(logits, "energy");
  PackedEnergy P = pack_energy(logits);
  visit_logits_dtype(logits.scalar_type(), "energy", "logits", [&](auto tag) {
    using T = decltype(tag);
    const auto problem = energy_problem<T>(P);
    at::parallel_for(0, problem.rows, grain(problem.cols),
                     [&](int64_t begin, int64_t end) { core::energy_rows_cpu(problem, begin, end); });
  });
  return finish_energy(P, logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logsumexp_hvp_cpu(const at::Tensor& logits, const at::Tensor& tangents) {
  expect_cpu(logits, "logsumexp_hvp");
  PackedLseHvp P = pack_logsumexp_hvp(logits, tangents);
  visit_real_dtype(logits.scalar_type(), "logsumexp_hvp", "logits", [&](auto tag) {
    using T = decltype(tag);
    const auto problem = logsumexp_hvp_problem<T>(P);
    at::parallel_for(0, problem.rows, grain(problem.cols * (problem.samples + 1)),
                     [&](int64_t begin, int64_t end) { core::logsumexp_hvp_rows_cpu(problem, begin, end); });
  });
  return {P.softmax, P.energy, P.hvp};
}

void fill_probes_cpu(at::Tensor& out, int64_t seed, int64_t offset, c10::string_view kind) {
  expect_cpu(out, "fill_probes_");
  const core::ProbeKind k = parse_probe_kind(kind);
  at::Tensor buf = probe_buffer(out, offset);
  visit_real_dtype(out.scalar_type(), "fill_probes_", "out", [&](auto tag) {
    using T = decltype(tag);
    T* data = typed_mut<T>(buf);
    at::parallel_for(0, buf.numel(), 16384, [&](int64_t begin, int64_t end) {
      core::fill_probes_cpu(data, begin, end, uint64_t(seed), uint64_t(offset), k);
    });
  });
  if (!buf.is_same(out)) out.copy_(buf);
}

at::Tensor probe_dots_cpu(const at::Tensor& v, const at::Tensor& w) {
  expect_cpu(v, "probe_dots");
  PackedProbeDots P = pack_probe_dots(v, w);
  visit_real_dtype(v.scalar_type(), "probe_dots", "v", [&](auto tag) {
    using T = decltype(tag);
    const auto problem = probe_dots_problem<T>(P);
    at::parallel_for(0, problem.samples * problem.batch, grain(problem.dim),
                     [&](int64_t begin, int64_t end) { core::probe_dots_rows_cpu(problem, begin, end); });
  });
  return P.out;
}

at::Tensor curvature_step_cpu(at::Tensor& tangents, const at::Tensor& d1, const at::Tensor& c2) {
  expect_cpu(tangents, "curvature_step_");
  PackedCurvatureStep P = pack_curvature_step(tangents, d1, c2);
  visit_real_dtype(tangents.scalar_type(), "curvature_step_", "tangents", [&](auto tag) {
    using T = decltype(tag);
    const auto problem = curvature_step_problem<T>(P);
    at::parallel_for(0, problem.rows, grain(problem.dim),
                     [&](int64_t begin, int64_t end) { core::curvature_step_rows_cpu(problem, begin, end); });
  });
  finish_curvature_step(P, tangents);
  return P.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("energy", &energy_cpu);
  m.impl("logsumexp_hvp", &logsumexp_hvp_cpu);
  m.impl("fill_probes_", &fill_probes_cpu);
  m.impl("probe_dots", &probe_dots_cpu);
  m.impl("curvature_step_", &curvature_step_cpu);
}

}  // namespace pykernels::ops
