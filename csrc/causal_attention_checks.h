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

// The packed-QKV entry points take the model's (B, T, 3C) projection [q | k | v] and n_head.
inline void check_packed_qkv(const at::Tensor& qkv, int64_t n_head) {
  TORCH_CHECK(qkv.dim() == 3,
              "causal_attention_qkv: qkv must be the (B, T, 3C) projection [q | k | v], got shape ",
              qkv.sizes());
  TORCH_CHECK(n_head > 0, "causal_attention_qkv: n_head must be positive, got ", n_head);
  TORCH_CHECK(qkv.size(2) > 0 && qkv.size(2) % (3 * n_head) == 0,
              "causal_attention_qkv: the last dimension of qkv (", qkv.size(2),
              ") must be 3 * n_head * head_dim with n_head = ", n_head);
}

// grad_out and out of the packed backward: (B, T, C) for a (B, T, 3C) qkv.
inline void check_packed_outputs(const at::Tensor& grad_out, const at::Tensor& out,
                                 const at::Tensor& qkv) {
  const std::array<int64_t, 3> shape{qkv.size(0), qkv.size(1), qkv.size(2) / 3};
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape),
                "causal_attention_qkv: grad_out and out must have shape (B, T, C) = ",
                at::IntArrayRef(shape), ", got ", t->sizes());
  }
}

// A (B, T, C) tensor as the (B, H, T, D) view of its heads (no copy).
inline at::Tensor heads_view(const at::Tensor& x, int64_t n_head) {
  return x.unflatten(2, {n_head, x.size(2) / n_head}).transpose(1, 2);
}

// q, k, v of a packed (B, T, 3C) projection as (B, H, T, D) views (no copy).
inline std::array<at::Tensor, 3> split_packed_qkv(const at::Tensor& qkv, int64_t n_head) {
  const int64_t C = qkv.size(2) / 3;
  return {heads_view(qkv.narrow(2, 0, C), n_head), heads_view(qkv.narrow(2, C, C), n_head),
          heads_view(qkv.narrow(2, 2 * C, C), n_head)};
}

}  // namespace pipeline::attention
