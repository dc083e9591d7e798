// The pykernels operator library: every schema is defined here, once.
// Implementations register per dispatch key next to their bindings
// (probe_scores.cpp for CPU, cuda/*.cpp for CUDA); fake (meta) kernels and
// autograd are registered from Python in pykernels/_ops.py.
#include <torch/library.h>

#include <string>

#include "../core/probe_scores.h"

#ifdef PYKERNELS_PYTHON_MODULE  // set by setup.py; C++ hosts load the library directly
#include <Python.h>
extern "C" {
// `import pykernels._C` loads this shared library, which runs the static
// registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(pykernels, m) {
  // Fused activation-probe scoring (docs: pykernels/probes/scoring.py).
  m.def(
      "probe_scores(Tensor[] hidden_states, Tensor weight, Tensor? bias, Tensor? lengths, "
      "str smoothing, int window, float ema_alpha) -> Tensor");
  // Which SIMD build the CPU kernels use on this machine ("avx512", "avx2", "scalar").
  m.def("cpu_isa() -> str", []() -> std::string { return pykernels::core::probe_scores_cpu_isa(); });

  // Likelihood-landscape flatness (docs: pykernels/flatness/ops.py). The class dim
  // of logits is the last; autograd, vmap and fake kernels: pykernels/_ops.py.
  m.def("energy(Tensor logits) -> Tensor");
  m.def("logsumexp_hvp(Tensor logits, Tensor tangents) -> (Tensor, Tensor, Tensor)");
  m.def("fill_probes_(Tensor(a!) out, int seed, int offset, str kind) -> ()");
  m.def("probe_dots(Tensor v, Tensor w) -> Tensor");
}
