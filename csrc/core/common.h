// Shared helpers for the torch-free kernel cores: host/device qualifiers and
// the 16-bit float conversions every backend uses to read activations.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

namespace pykernels::core {

// Element types the kernels read. Values match nothing outside this project;
// the torch bindings translate at::ScalarType into these.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline int64_t dtype_size(DType t) { return t == DType::Float32 ? 4 : 2; }

PK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bfloat16 is the top half of a float32: widening is exact.
PK_HD float bf16_bits_to_float(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }

// IEEE binary16 -> float32, exact for every input (subnormals, inf, NaN payloads).
PK_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);  // signed zero
  // Subnormal: shift the mantissa up until its leading one reaches bit 10.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | (uint32_t(112 - e) << 23) | ((mant & 0x3ffu) << 13));
}

// Element j of a row of D-typed values, widened to float (exact).
template <DType D>
PK_HD float load_as_float(const void* row, int64_t j) {
  if constexpr (D == DType::Float32) {
    return static_cast<const float*>(row)[j];
  } else if constexpr (D == DType::BFloat16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
  } else {
    return f16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
  }
}

}  // namespace pykernels::core
