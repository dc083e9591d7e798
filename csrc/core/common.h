// Shared helpers for the torch-free kernel cores: host/device qualifiers, the one
// element-type vocabulary (DType) and the 16-bit float conversions every backend
// uses to read activations.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

// A CPU function compiled for AVX-512, AVX2 and baseline x86-64, the build picked at load
// time (GCC's function multiversioning); the wheel itself targets baseline x86-64. (Each
// string is one clone: "avx2,fma" would be two, an AVX2 one and an FMA one.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define PK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_CPU_CLONES
#endif

namespace pykernels::core {

// Element types of the cores, the one vocabulary of core/. Values match nothing outside
// this project; the torch bindings translate at::ScalarType into these in one place
// (ops/dtype.h). Each op says which of them it takes.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// 16-bit floats travel as their bits; these tags keep float16 and bfloat16 apart.
struct Float16Bits {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

// The C++ type one element of D is stored as: Storage<D>.
template <DType D>
struct DTypeStorage;
template <>
struct DTypeStorage<DType::Float32> {
  using type = float;
};
template <>
struct DTypeStorage<DType::Float64> {
  using type = double;
};
template <>
struct DTypeStorage<DType::Float16> {
  using type = Float16Bits;
};
template <>
struct DTypeStorage<DType::BFloat16> {
  using type = BFloat16Bits;
};
template <DType D>
using Storage = typename DTypeStorage<D>::type;

PK_HD constexpr int64_t dtype_size(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

// For a kernel's dispatch over the dtypes it does not take (the bindings check first).
[[noreturn]] inline void throw_unsupported_dtype(const char* op, DType t) {
  throw std::invalid_argument(std::string("pykernels ") + op + ": " + dtype_name(t) + " is not supported");
}

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

// Element j of a row of D-typed values, widened to float (exact; so no float64).
template <DType D>
PK_HD float load_as_float(const void* row, int64_t j) {
  static_assert(D != DType::Float64, "load_as_float: float64 does not fit in a float");
  if constexpr (D == DType::Float32) {
    return static_cast<const float*>(row)[j];
  } else if constexpr (D == DType::BFloat16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
  } else {
    return f16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
  }
}

}  // namespace pykernels::core
