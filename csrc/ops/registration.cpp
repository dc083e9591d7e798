// The pykernels operator library: every schema is defined here, once.
// Implementations register per dispatch key next to their bindings
// (<family>.cpp for CPU, cuda/<family>_cuda.cpp for CUDA); fake (meta) kernels
// and autograd are registered from Python in pykernels/_ops.py.
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
  // Probe guard (docs: pykernels/probes/{stream,training}.py; the guards: hf.py, vllm.py): one layer of a
  // probe added into a float32 accumulator in place; one streaming decode step
  // over per-slot device state (window 0 = EMA); the fused training loss, which
  // returns per-sequence losses and, when asked, their gradient w.r.t. token_logits.
  m.def("probe_accumulate_(Tensor(a!) acc, Tensor hidden, Tensor weight_l) -> ()");
  m.def(
      "probe_stream_step(Tensor(a!) state, Tensor(b!) meta, Tensor(c!) status, Tensor slot_ids, "
      "Tensor token_logits, Tensor? active, Tensor threshold, int window, float ema_alpha) -> (Tensor, Tensor)");
  // The same step over a segment of tokens per slot (a prefill chunk): slot slot_ids[r]
  // steps through token rows [token_starts[r], token_starts[r] + token_counts[r]) in order.
  m.def(
      "probe_stream_step_varlen(Tensor(a!) state, Tensor(b!) meta, Tensor(c!) status, Tensor slot_ids, "
      "Tensor token_starts, Tensor token_counts, Tensor token_logits, Tensor threshold, int window, "
      "float ema_alpha) -> (Tensor, Tensor)");
  m.def(
      "softmax_weighted_bce_fwd(Tensor token_logits, Tensor labels, Tensor lengths, int window, float tau, "
      "bool detach_weights, bool compute_grad) -> (Tensor, Tensor)");
  // Which SIMD build the CPU kernels use on this machine ("avx512", "avx2", "scalar").
  m.def("cpu_isa() -> str", []() -> std::string { return pykernels::core::probe_scores_cpu_isa(); });

  // Likelihood-landscape flatness (docs: pykernels/flatness/ops.py). The class dim
  // of logits is the last; autograd, vmap and fake kernels: pykernels/_ops.py.
  m.def("energy(Tensor logits) -> Tensor");
  m.def("logsumexp_hvp(Tensor logits, Tensor tangents) -> (Tensor, Tensor, Tensor)");
  m.def("fill_probes_(Tensor(a!) out, int seed, int offset, str kind) -> ()");
  m.def("probe_dots(Tensor v, Tensor w) -> Tensor");
  m.def("curvature_step_(Tensor(a!) tangents, Tensor d1, Tensor c2) -> Tensor");

  // Model selection: row-wise Pearson distances, Spearman with average ranks, and PARC's fused
  // distance -> rank -> correlation against same/different-class labels (docs:
  // pykernels/selection/correlation.py).
  m.def("pairwise_corr_distance(Tensor features, bool triu) -> Tensor");
  m.def("spearman(Tensor x, Tensor y) -> Tensor");
  m.def("parc_spearman(Tensor features, Tensor classes) -> Tensor");
}
