// Minimal SIMD vocabulary for the CPU kernels: a struct `Vec` with the same
// static functions for every instruction set, so a kernel is written once.
//
// Not a standalone header. A kernel translation unit (probe_scores_cpu_avx512.cpp
// and friends) includes it after enabling its instruction set with
// `#pragma GCC target`, defining PK_KERNEL_NS (the namespace that keeps each
// instruction set's copies of the kernels apart, so the linker never mixes
// them) and one of PK_SIMD_AVX512 / PK_SIMD_AVX2 (none: portable scalar).
// The kernels are only called after a run-time CPU check, so the library
// loads and runs on CPUs without AVX2 / AVX-512.
#pragma once

#ifndef PK_KERNEL_NS
#error "define PK_KERNEL_NS before including simd.h"
#endif

#include <cstdint>

#include "common.h"

namespace pykernels::core::PK_KERNEL_NS {

#if !defined(PK_SIMD_AVX512) && !defined(PK_SIMD_AVX2)
// Portable fallback: one lane; the compiler may still vectorise the loops.
struct Vec {
  using reg = float;
  static constexpr int kLanes = 1;
  static reg zero() { return 0.f; }
  static reg load(const float* p) { return *p; }
  static reg load_bf16(const uint16_t* p) { return bf16_bits_to_float(*p); }
  static reg load_f16(const uint16_t* p) { return f16_bits_to_float(*p); }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static float sum(reg a) { return a; }
  static void prefetch(const void*) {}
};
#endif

#if defined(PK_SIMD_AVX2)
struct Vec {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_bf16(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};
#endif

#if defined(PK_SIMD_AVX512)
struct Vec {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_bf16(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(reg a) { return _mm512_reduce_add_ps(a); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};
#endif

}  // namespace pykernels::core::PK_KERNEL_NS
