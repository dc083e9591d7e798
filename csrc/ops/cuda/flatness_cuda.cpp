// CUDA bindings of the flatness ops (built only when CUDA is enabled): device
// guard, current stream, outputs from PyTorch's caching allocator.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../flatness_common.h"
#include "cuda_binding.h"

namespace pykernels::ops {
namespace {

at::Tensor energy_cuda(const at::Tensor& logits) {
  expect_cuda(logits, "energy");
  const c10::cuda::CUDAGuard guard(logits.device());
  PackedEnergy P = pack_energy(logits);
  visit_logits_dtype(logits.scalar_type(), "energy", "logits",
                     [&](auto tag) { core::energy_cuda(energy_problem<decltype(tag)>(P), current_stream()); });
  return finish_energy(P, logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logsumexp_hvp_cuda(const at::Tensor& logits,
                                                                  const at::Tensor& tangents) {
  expect_cuda(logits, "logsumexp_hvp");
  const c10::cuda::CUDAGuard guard(logits.device());
  PackedLseHvp P = pack_logsumexp_hvp(logits, tangents);
  visit_real_dtype(logits.scalar_type(), "logsumexp_hvp", "logits", [&](auto tag) {
    core::logsumexp_hvp_cuda(logsumexp_hvp_problem<decltype(tag)>(P), current_stream());
  });
  return {P.softmax, P.energy, P.hvp};
}

void fill_probes_cuda(at::Tensor& out, int64_t seed, int64_t offset, c10::string_view kind) {
  expect_cuda(out, "fill_probes_");
  const c10::cuda::CUDAGuard guard(out.device());
  const core::ProbeKind k = parse_probe_kind(kind);
  at::Tensor buf = probe_buffer(out, offset);
  visit_real_dtype(out.scalar_type(), "fill_probes_", "out", [&](auto tag) {
    using T = decltype(tag);
    core::fill_probes_cuda(typed_mut<T>(buf), buf.numel(), uint64_t(seed), uint64_t(offset), k, current_stream());
  });
  if (!buf.is_same(out)) out.copy_(buf);
}

at::Tensor probe_dots_cuda(const at::Tensor& v, const at::Tensor& w) {
  expect_cuda(v, "probe_dots");
  const c10::cuda::CUDAGuard guard(v.device());
  PackedProbeDots P = pack_probe_dots(v, w);
  visit_real_dtype(v.scalar_type(), "probe_dots", "v",
                   [&](auto tag) { core::probe_dots_cuda(probe_dots_problem<decltype(tag)>(P), current_stream()); });
  return P.out;
}

at::Tensor curvature_step_cuda(at::Tensor& tangents, const at::Tensor& d1, const at::Tensor& c2) {
  expect_cuda(tangents, "curvature_step_");
  const c10::cuda::CUDAGuard guard(tangents.device());
  PackedCurvatureStep P = pack_curvature_step(tangents, d1, c2);
  visit_real_dtype(tangents.scalar_type(), "curvature_step_", "tangents", [&](auto tag) {
    core::curvature_step_cuda(curvature_step_problem<decltype(tag)>(P), current_stream());
  });
  finish_curvature_step(P, tangents);
  return P.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("energy", &energy_cuda);
  m.impl("logsumexp_hvp", &logsumexp_hvp_cuda);
  m.impl("fill_probes_", &fill_probes_cuda);
  m.impl("probe_dots", &probe_dots_cuda);
  m.impl("curvature_step_", &curvature_step_cuda);
}

}  // namespace pykernels::ops
