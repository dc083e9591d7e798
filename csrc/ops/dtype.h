// The one translation of at::ScalarType into the cores' element types (core::DType,
// core/common.h), with the check that names the op and argument on a dtype it does not take.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../core/common.h"

namespace pykernels::ops {

inline bool core_dtype_of(at::ScalarType t, core::DType* out) {
  switch (t) {
    case at::kFloat: *out = core::DType::Float32; return true;
    case at::kDouble: *out = core::DType::Float64; return true;
    case at::kHalf: *out = core::DType::Float16; return true;
    case at::kBFloat16: *out = core::DType::BFloat16; return true;
    default: return false;
  }
}

// `t` as a core::DType, which must be one of Accepted: else "<op>: <arg> must be float32 or
// float64, got Half".
template <core::DType... Accepted>
core::DType to_core_dtype(at::ScalarType t, const char* op, const char* arg) {
  core::DType d{};
  if (core_dtype_of(t, &d) && ((d == Accepted) || ...)) return d;
  const core::DType accepted[] = {Accepted...};
  std::string names;
  for (size_t i = 0; i < sizeof...(Accepted); ++i) {
    if (i > 0) names += i + 1 == sizeof...(Accepted) ? " or " : ", ";
    names += core::dtype_name(accepted[i]);
  }
  TORCH_CHECK(false, op, ": ", arg, " must be ", names, ", got ", t);
}

// Calls f(core::Storage<D>{}) for the dtype D of `t`, one of Accepted (checked as above); f is
// instantiated for the accepted dtypes only.
template <core::DType... Accepted, typename F>
void visit_dtype(at::ScalarType t, const char* op, const char* arg, F&& f) {
  const core::DType d = to_core_dtype<Accepted...>(t, op, arg);
  ((d == Accepted ? f(core::Storage<Accepted>{}) : void()), ...);
}

}  // namespace pykernels::ops
