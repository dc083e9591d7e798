// The assertion macro of the torch-free C++ tests: counts failures and prints where and why,
// so one run reports every failing case.
#pragma once

#include <cstdio>

inline int failures = 0;

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      ++failures;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)
