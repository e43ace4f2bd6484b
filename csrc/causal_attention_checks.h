// Argument checks shared by the CPU and CUDA implementations of the causal attention op.
// Each implementation adds its own device, dtype and size checks beside its kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>

namespace pipeline::attention {

// q, k, v: the same (B, H, T, D) shape with D > 0, one dtype, one device.
inline void check_qkv_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "causal_attention: q must have shape (B, H, T, D), got ",
              q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "causal_attention: k must have the shape of q ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "causal_attention: v must have the shape of q ",
              q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(3) > 0, "causal_attention: head dimension D must be positive, got shape ",
              q.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "causal_attention: q, k and v must have the same dtype, got ", q.scalar_type(),
              ", ", k.scalar_type(), " and ", v.scalar_type());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->device() == q.device(),
                "causal_attention: q, k and v must be on the same device, got ", q.device(),
                " and ", t->device());
  }
}

// The backward's extra inputs: grad_out and out shaped and typed like q, lse (B, H, T) of
// `lse_dtype`, all on q's device (q, k, v are checked by the caller).
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& out, const at::Tensor& lse,
                                at::ScalarType lse_dtype) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(),
              "causal_attention: grad_out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "causal_attention: out must have the shape of q ",
              q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "causal_attention: grad_out and out must have the dtype of q (", q.scalar_type(),
              "), got ", grad_out.scalar_type(), " and ", out.scalar_type());
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape),
              "causal_attention: lse must have shape (B, H, T) = ", at::IntArrayRef(lse_shape),
              ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype, "causal_attention: lse must have dtype ", lse_dtype,
              ", got ", lse.scalar_type());
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK(t->device() == q.device(),
                "causal_attention: all inputs must be on the device of q (", q.device(),
                "), got one on ", t->device());
  }
}

}  // namespace pipeline::attention
