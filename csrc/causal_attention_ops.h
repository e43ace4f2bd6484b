// The functions registration.cpp registers for the `pipeline` operators, per dispatch key:
// the CPU kernels (end of causal_attention.cpp) and the CUDA kernels (end of
// causal_attention_cuda.cu, compiled only for a CUDA build of torch). Declared here, apart
// from their files, so that one file holds the operators' schemas and every registration.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace pipeline::attention {

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse);
std::tuple<at::Tensor, at::Tensor> causal_attention_qkv_fwd_cpu(const at::Tensor& qkv_in,
                                                                int64_t n_head);
at::Tensor causal_attention_qkv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv_in,
                                        const at::Tensor& out, const at::Tensor& lse,
                                        int64_t n_head);
// The instruction set the CPU kernels use now (PIPELINE_CPU_CAPABILITY caps it).
std::string cpu_capability();

namespace cuda {

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cuda(const at::Tensor& q_in,
                                                             const at::Tensor& k_in,
                                                             const at::Tensor& v_in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in);
std::tuple<at::Tensor, at::Tensor> causal_attention_qkv_fwd_cuda(const at::Tensor& qkv,
                                                                 int64_t n_head);
at::Tensor causal_attention_qkv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                         const at::Tensor& out, const at::Tensor& lse,
                                         int64_t n_head);

}  // namespace cuda
}  // namespace pipeline::attention
