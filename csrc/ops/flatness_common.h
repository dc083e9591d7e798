// Tensor -> problem packing for the flatness ops, shared by the CPU and CUDA
// bindings. The Python API validates arguments with friendly messages first;
// these checks guard C++ callers and keep the kernels memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "../core/flatness.h"
#include "dtype.h"

namespace pykernels::ops {

// Calls f(T{}) with the core element type of `t` (energy reads 16-bit floats too).
template <typename F>
void visit_logits_dtype(at::ScalarType t, const char* op, const char* arg, F&& f) {
  using core::DType;
  visit_dtype<DType::Float32, DType::Float64, DType::Float16, DType::BFloat16>(t, op, arg, std::forward<F>(f));
}

template <typename F>
void visit_real_dtype(at::ScalarType t, const char* op, const char* arg, F&& f) {
  visit_dtype<core::DType::Float32, core::DType::Float64>(t, op, arg, std::forward<F>(f));
}

template <typename T>
const T* typed(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* typed_mut(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

inline std::vector<int64_t> lead_sizes(const at::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - 1);
}

// `t` as [lead..., cols] -> [prod(lead), cols] with a unit-stride last dim
// (a view when the layout allows, else a copy).
inline at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  at::Tensor r = t.reshape({c10::multiply_integers(lead_sizes(t)), cols});
  return cols > 1 && r.stride(1) != 1 ? r.contiguous() : r;
}

// ---- energy ----

struct PackedEnergy {
  at::Tensor logits;  // [rows, cols]
  at::Tensor out;     // [rows] float32 (16-bit inputs) or the input dtype
};

inline PackedEnergy pack_energy(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 1, "energy: logits must have a class dim, got a 0-dim tensor");
  PackedEnergy P;
  P.logits = as_rows(logits, logits.size(-1));
  const bool wide = logits.scalar_type() == at::kDouble;
  P.out = at::empty({P.logits.size(0)}, logits.options().dtype(wide ? at::kDouble : at::kFloat));
  return P;
}

template <typename T>
core::EnergyProblem<T> energy_problem(PackedEnergy& P) {
  return {typed<T>(P.logits), P.logits.stride(0), P.logits.size(0), P.logits.size(1),
          typed_mut<typename core::Elem<T>::Acc>(P.out)};
}

inline at::Tensor finish_energy(const PackedEnergy& P, const at::Tensor& logits) {
  return P.out.to(logits.scalar_type()).reshape(lead_sizes(logits));
}

// ---- logsumexp_hvp ----

struct PackedLseHvp {
  at::Tensor logits, tangents;  // [N, K], [S, N, K]
  at::Tensor softmax, energy, hvp;
};

inline PackedLseHvp pack_logsumexp_hvp(const at::Tensor& logits, const at::Tensor& tangents) {
  TORCH_CHECK(logits.dim() >= 1, "logsumexp_hvp: logits must have a class dim");
  TORCH_CHECK(tangents.dim() == logits.dim() + 1 && tangents.sizes().slice(1) == logits.sizes(),
              "logsumexp_hvp: tangents must be [S, *logits.shape], got ", tangents.sizes(), " for logits ",
              logits.sizes());
  TORCH_CHECK(tangents.scalar_type() == logits.scalar_type() && tangents.device() == logits.device(),
              "logsumexp_hvp: tangents must match logits in dtype and device");
  const int64_t S = tangents.size(0), K = logits.size(-1);
  PackedLseHvp P;
  P.logits = as_rows(logits, K);
  const int64_t N = P.logits.size(0);
  P.tangents = tangents.reshape({S, N, K});
  if (K > 1 && P.tangents.stride(2) != 1) P.tangents = P.tangents.contiguous();
  P.softmax = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  P.energy = at::empty(lead_sizes(logits), logits.options());
  P.hvp = at::empty(tangents.sizes(), tangents.options().memory_format(at::MemoryFormat::Contiguous));
  return P;
}

template <typename T>
core::LseHvpProblem<T> logsumexp_hvp_problem(PackedLseHvp& P) {
  return {typed<T>(P.logits),      P.logits.stride(0),     typed<T>(P.tangents), P.tangents.stride(0),
          P.tangents.stride(1),    P.tangents.size(0),     P.logits.size(0),     P.logits.size(1),
          typed_mut<T>(P.softmax), typed_mut<T>(P.energy), typed_mut<T>(P.hvp)};
}

// ---- probes ----

inline core::ProbeKind parse_probe_kind(c10::string_view kind) {
  if (kind == "rademacher") return core::ProbeKind::Rademacher;
  if (kind == "gaussian") return core::ProbeKind::Gaussian;
  TORCH_CHECK(false, "fill_probes_: kind must be 'rademacher' or 'gaussian', got '", std::string(kind), "'");
}

// The probe stream is defined over the row-major (logical) element order, so a
// non-contiguous `out` is filled through a contiguous buffer.
inline at::Tensor probe_buffer(const at::Tensor& out, int64_t offset) {
  TORCH_CHECK(offset >= 0, "fill_probes_: offset must be >= 0, got ", offset);
  return out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
}

struct PackedProbeDots {
  at::Tensor v, w;  // [S, B, D], unit-stride last dim
  at::Tensor out;   // [S, B]
};

inline PackedProbeDots pack_probe_dots(const at::Tensor& v, const at::Tensor& w) {
  TORCH_CHECK(v.dim() == 3 && v.sizes() == w.sizes(), "probe_dots: v and w must both be [S, B, D], got ", v.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(v.scalar_type() == w.scalar_type() && v.device() == w.device(),
              "probe_dots: v and w must match in dtype and device");
  auto unit = [](const at::Tensor& t) { return t.size(2) > 1 && t.stride(2) != 1 ? t.contiguous() : t; };
  return {unit(v), unit(w), at::empty({v.size(0), v.size(1)}, v.options())};
}

template <typename T>
core::ProbeDotsProblem<T> probe_dots_problem(PackedProbeDots& P) {
  return {typed<T>(P.v), P.v.stride(0), P.v.stride(1), typed<T>(P.w), P.w.stride(0),
          P.w.stride(1), P.v.size(0),   P.v.size(1),   P.v.size(2),   typed_mut<T>(P.out)};
}

// ---- curvature_step_ ----

struct PackedCurvatureStep {
  at::Tensor tangents, d1, c2;  // [R, D] (the caller's, or a contiguous copy), [P, D], [P, D]
  at::Tensor out;               // [R]
};

inline PackedCurvatureStep pack_curvature_step(const at::Tensor& tangents, const at::Tensor& d1, const at::Tensor& c2) {
  TORCH_CHECK(tangents.dim() >= 1 && d1.dim() == tangents.dim() && d1.sizes() == c2.sizes() &&
                  d1.sizes().slice(1) == tangents.sizes().slice(1),
              "curvature_step_: tangents must be [R, *shape] and d1, c2 [P, *shape], got ", tangents.sizes(), ", ",
              d1.sizes(), " and ", c2.sizes());
  const int64_t R = tangents.size(0), P = d1.size(0);
  TORCH_CHECK(P > 0 ? R % P == 0 : R == 0, "curvature_step_: the ", R, " tangent rows are not a multiple of the ", P,
              " factor rows");
  TORCH_CHECK(d1.scalar_type() == tangents.scalar_type() && c2.scalar_type() == tangents.scalar_type() &&
                  d1.device() == tangents.device() && c2.device() == tangents.device(),
              "curvature_step_: d1 and c2 must match tangents in dtype and device");
  const int64_t D = c10::multiply_integers(tangents.sizes().slice(1));
  return {tangents.contiguous().view({R, D}), d1.contiguous().view({P, D}), c2.contiguous().view({P, D}),
          at::empty({R}, tangents.options())};
}

// A strided `tangents` was computed in a contiguous copy: write it back.
inline void finish_curvature_step(const PackedCurvatureStep& P, at::Tensor& tangents) {
  if (P.tangents.data_ptr() != tangents.data_ptr()) tangents.copy_(P.tangents.view(tangents.sizes()));
}

template <typename T>
core::CurvatureStepProblem<T> curvature_step_problem(PackedCurvatureStep& P) {
  return {typed_mut<T>(P.tangents), typed<T>(P.d1),     typed<T>(P.c2), P.tangents.size(0), P.d1.size(0),
          P.tangents.size(1),       typed_mut<T>(P.out)};
}

}  // namespace pykernels::ops
