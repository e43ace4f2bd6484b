// The `pipeline` operators in one place: their schemas (the extension's one TORCH_LIBRARY),
// the kernels registered for each dispatch key (the functions of causal_attention_ops.h), and
// the Python module `pipeline.kernels._C`, whose import runs these registrations. A reader
// finds here what each operator takes and returns and where it runs; the kernels stay beside
// their code. What autograd and torch.compile need (backward formulas, fake kernels) is
// registered in Python, by pipeline/kernels/__init__.py. Other operators, or other dispatch
// keys, are added here too: there can be only one TORCH_LIBRARY(pipeline, ...).

#include <Python.h>

#include <torch/library.h>

#include "causal_attention_ops.h"

TORCH_LIBRARY(pipeline, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor out, Tensor lse)");
  m.def(
      "causal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse) -> (Tensor dq, Tensor dk, Tensor dv)");
  // The same attention on the model's packed (B, T, 3C) projection [q | k | v]: out is
  // (B, T, C) and the backward returns the projection's gradient, with no split, transpose
  // or concatenation copies around the kernels.
  m.def("causal_attention_qkv_fwd(Tensor qkv, int n_head) -> (Tensor out, Tensor lse)");
  m.def(
      "causal_attention_qkv_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, "
      "int n_head) -> Tensor dqkv");
  // Which instruction set the CPU kernels use ("default", "avx2", "avx512", "avx512_bf16").
  m.def("causal_attention_cpu_capability() -> str",
        &pipeline::attention::cpu_capability);
}

TORCH_LIBRARY_IMPL(pipeline, CPU, m) {
  m.impl("causal_attention_fwd", &pipeline::attention::causal_attention_fwd_cpu);
  m.impl("causal_attention_bwd", &pipeline::attention::causal_attention_bwd_cpu);
  m.impl("causal_attention_qkv_fwd", &pipeline::attention::causal_attention_qkv_fwd_cpu);
  m.impl("causal_attention_qkv_bwd", &pipeline::attention::causal_attention_qkv_bwd_cpu);
}

// setup.py compiles causal_attention_cuda.cu, and defines WITH_CUDA, only for a CUDA build of
// torch (see there).
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(pipeline, CUDA, m) {
  m.impl("causal_attention_fwd", &pipeline::attention::cuda::causal_attention_fwd_cuda);
  m.impl("causal_attention_bwd", &pipeline::attention::cuda::causal_attention_bwd_cuda);
  m.impl("causal_attention_qkv_fwd", &pipeline::attention::cuda::causal_attention_qkv_fwd_cuda);
  m.impl("causal_attention_qkv_bwd", &pipeline::attention::cuda::causal_attention_qkv_bwd_cuda);
}
#endif

// `import pipeline.kernels._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
