// Fused causal attention for CUDA: the CUDA kernels of `pipeline::causal_attention_fwd/bwd`
// (the operators are defined, and these kernels registered, in registration.cpp).
//
// FlashAttention-2 design written with raw PTX (no CUTLASS), for fp16 and bf16 inputs:
//   * one CTA (4 warps, 128 threads) per (64-row tile, head); each warp owns 16 rows;
//   * matrix products with mma.sync.m16n8k16 (fp32 accumulation), operands read from shared
//     memory with ldmatrix (.trans where the operand is needed transposed);
//   * the streamed 64-row tiles (K/V in the forward and dQ pass, Q/dO in the dK/dV pass) are
//     double-buffered with cp.async, so the next tile loads while the current one computes;
//   * shared-memory rows are padded by 16 bytes (row stride D + 8 elements), which makes
//     every ldmatrix and cp.async conflict-free for all supported D without a swizzle;
//   * causal: key tiles past the diagonal are never visited, only the diagonal tile is masked.
//
// Forward: online softmax in registers with exp2 (the 1/sqrt(D) scale and log2(e) are folded
// into one multiplier), row sums kept per thread and reduced across the quad once at the end;
// writes out and the fp32 log-sum-exp (natural log, as the CPU kernel).
//
// Backward (deterministic, no atomics): a small kernel computes delta = rowsum(dO * O); then
//   * dK/dV pass: one CTA per key tile accumulates dK, dV in registers over the query tiles
//     at and below the diagonal, recomputing P from lse;
//   * dQ pass: one CTA per query tile accumulates dQ in registers over the key tiles up to
//     the diagonal (recomputing P and dP once more).
// The separate dQ pass costs two extra tile products per (query, key) tile pair compared with
// atomicAdd into an fp32 dQ buffer, but every gradient is written by exactly one CTA in a
// fixed order, so results are bitwise reproducible.
//
// Supported: fp16/bf16, head dim D in {32, 64, 80, 128}, the last dimension contiguous
// (other strides are honoured; anything else is copied with .contiguous()). Other dtypes or
// head dims on CUDA raise an error naming the supported set.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "causal_attention_checks.h"
#include "causal_attention_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace pipeline::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per tile (16 per warp)
constexpr int kBlockN = 64;           // keys per tile; equal to kBlockM so tiles align
static_assert(kBlockM == kBlockN, "the diagonal tile logic assumes square tiles");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte async copy global -> shared; with valid == false the destination is zero-filled
// (src-size 0), which pads tiles past the end of the sequence.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}

// D (16x8, fp32) += A (16x16) * B (16x8); fragment layout of the PTX ISA (g = lane / 4,
// t = lane % 4): c0, c1 = row g, cols 2t, 2t+1; c2, c3 = row g + 8, same cols.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values (x in the low half = lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// ----------------------------------------------------------------------------------------
// Warp-level tile products. A warp computes a 16 x N block; accumulators acc[N / 8][4] are
// in the mma C layout. Shared-memory operands are row-major with row stride kStride.

// acc += A * B^T, A = 16 rows x K (smem, rows = output rows), B = N rows x K (smem).
template <typename T, int N, int K, int kStride>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[N / 8][4], const T* a, const T* b,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (nb * 16 + (lane / 16) * 8 + lane % 8) * kStride + kk * 16 +
                          ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

// Same with A already in registers as mma A fragments af[K / 16][4].
template <typename T, int N, int K, int kStride>
__device__ __forceinline__ void warp_gemm_nt_areg(float (&acc)[N / 8][4],
                                                  const uint32_t (&af)[K / 16][4], const T* b,
                                                  int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (nb * 16 + (lane / 16) * 8 + lane % 8) * kStride + kk * 16 +
                          ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[2 * nb], af[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * nb + 1], af[kk], bf[2], bf[3]);
    }
  }
}

// acc += A * B, A in registers (af[K / 16][4]), B = K rows x N cols (smem), read with
// ldmatrix.trans so that B's rows (keys or queries) become the reduction dimension.
template <typename T, int N, int K, int kStride>
__device__ __forceinline__ void warp_gemm_nn_areg(float (&acc)[N / 8][4],
                                                  const uint32_t (&af)[K / 16][4], const T* b,
                                                  int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int nb = 0; nb < N / 16; ++nb) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kStride +
                                nb * 16 + (lane / 16) * 8);
      mma_16816<T>(acc[2 * nb], af[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * nb + 1], af[kk], bf[2], bf[3]);
    }
  }
}

// A 16 x 64 fp32 accumulator (C layout) -> A fragments of a 16 x 64 operand: for k-step kk,
// n-blocks 2kk and 2kk+1 supply columns 0-7 and 8-15 of the fragment.
template <typename T>
__device__ __forceinline__ void acc_to_afrag(const float (&acc)[8][4], uint32_t (&af)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    af[kk][0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
    af[kk][1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
    af[kk][2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    af[kk][3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// ----------------------------------------------------------------------------------------
// Global-memory views and tile loads.

// A (B, H, T, D) tensor with contiguous last dimension; strides in elements.
template <typename T>
struct Bhtd {
  T* ptr;
  int64_t stride_b, stride_h, stride_t;

  __device__ __forceinline__ T* head(int b, int h) const {
    return ptr + b * stride_b + h * stride_h;
  }
};

// Async copy of rows [row0, row0 + 64) of one head into a padded smem tile; rows at or past
// T are zero-filled (their source address is clamped to row 0 so it stays valid).
template <typename T, int D, int kStride>
__device__ __forceinline__ void load_tile(T* smem, const T* head, int64_t stride_t, int row0,
                                          int T_len) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(kBlockN * kChunks % kThreads == 0, "every thread copies the same count");
#pragma unroll
  for (int i = 0; i < kBlockN * kChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const bool valid = row0 + r < T_len;
    const T* src = head + (valid ? static_cast<int64_t>(row0 + r) * stride_t : 0) + col;
    cp_async_16(smem + r * kStride + col, src, valid);
  }
}

// Writes a warp's 16 x D fp32 accumulator (times mul) to rows [row0, row0 + 16) of a
// contiguous (T, D) head; rows at or past T are dropped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* head, const float (&acc)[D / 8][4], float mul0,
                                           float mul1, int row0, int T_len, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int r0 = row0 + g, r1 = row0 + g + 8;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = j * 8 + 2 * t;
    if (r0 < T_len) {
      *reinterpret_cast<uint32_t*>(head + static_cast<int64_t>(r0) * D + col) =
          pack2<T>(acc[j][0] * mul0, acc[j][1] * mul0);
    }
    if (r1 < T_len) {
      *reinterpret_cast<uint32_t*>(head + static_cast<int64_t>(r1) * D + col) =
          pack2<T>(acc[j][2] * mul1, acc[j][3] * mul1);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int D>
constexpr int smem_stride() {
  return D + 8;  // 16-byte pad: consecutive rows start in different bank groups
}

// ----------------------------------------------------------------------------------------
// Forward.

template <typename T, int D>
struct FwdParams {
  Bhtd<const T> q, k, v;
  T* out;      // contiguous (B, H, T, D)
  float* lse;  // contiguous (B, H, T)
  int H, T_len;
  float scale_log2;  // log2(e) / sqrt(D)
};

template <int D>
constexpr int fwd_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * smem_stride<D>() * 2;  // Q + 2 x (K, V)
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T, D> p) {
  constexpr int kS = smem_stride<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kS;      // 2 stages
  T* v_s = k_s + 2 * kBlockN * kS;  // 2 stages

  // Heaviest tiles (most key tiles) first, which balances the causal triangle.
  const int m_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const T* q_head = p.q.head(b, h);
  const T* k_head = p.k.head(b, h);
  const T* v_head = p.v.head(b, h);

  load_tile<T, D, kS>(q_s, q_head, p.q.stride_t, m_tile * kBlockM, p.T_len);
  load_tile<T, D, kS>(k_s, k_head, p.k.stride_t, 0, p.T_len);
  load_tile<T, D, kS>(v_s, v_head, p.v.stride_t, 0, p.T_len);
  cp_async_commit();

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // in log2 units (scores * scale_log2)
  float row_sum[2] = {0.f, 0.f};              // per-thread partial sums

  for (int n_tile = 0; n_tile <= m_tile; ++n_tile) {
    const int stage = n_tile % 2;
    // Everyone is done with the other stage (tile n_tile - 1): prefetch tile n_tile + 1.
    __syncthreads();
    if (n_tile < m_tile) {
      const int nxt = 1 - stage;
      load_tile<T, D, kS>(k_s + nxt * kBlockN * kS, k_head, p.k.stride_t,
                          (n_tile + 1) * kBlockN, p.T_len);
      load_tile<T, D, kS>(v_s + nxt * kBlockN * kS, v_head, p.v.stride_t,
                          (n_tile + 1) * kBlockN, p.T_len);
    }
    cp_async_commit();  // possibly empty, keeps the group count uniform
    cp_async_wait<1>();
    __syncthreads();
    if (n_tile == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(qf[kk], q_s + (warp * 16 + lane % 16) * kS + kk * 16 + (lane / 16) * 8);
      }
    }
    const T* ks = k_s + stage * kBlockN * kS;
    const T* vs = v_s + stage * kBlockN * kS;

    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    }
    warp_gemm_nt_areg<T, kBlockN, D, kS>(s, qf, ks, lane);

    if (n_tile == m_tile) {  // diagonal tile: key column > query row is masked
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = warp * 16 + g + (e >= 2 ? 8 : 0);
          const int col = j * 8 + 2 * t + (e & 1);
          if (col > row) s[j][e] = -INFINITY;
        }
      }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      }
      mx = quad_max(mx);
      const float m_new = fmaxf(row_max[r], mx * p.scale_log2);
      // Every row sees at least its own key, so m_new is finite; guard anyway so a fully
      // masked row would give zeros instead of NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j][2 * r] = exp2f(fmaf(s[j][2 * r], p.scale_log2, -m_use));
        s[j][2 * r + 1] = exp2f(fmaf(s[j][2 * r + 1], p.scale_log2, -m_use));
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * r] *= alpha;
        o[j][2 * r + 1] *= alpha;
      }
    }

    uint32_t pf[4][4];
    acc_to_afrag<T>(s, pf);
    warp_gemm_nn_areg<T, D, kBlockN, kS>(o, pf, vs, lane);
  }
  cp_async_wait<0>();

  float inv[2];
  const int row0 = m_tile * kBlockM + warp * 16;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + g + 8 * r;
    if (t == 0 && row < p.T_len) {
      p.lse[bh * p.T_len + row] = l > 0.f ? row_max[r] * kLn2 + logf(l) : -INFINITY;
    }
  }
  store_rows<T, D>(p.out + bh * p.T_len * D, o, inv[0], inv[1], row0, p.T_len, lane);
}

// ----------------------------------------------------------------------------------------
// Backward: delta = rowsum(dO * O), one warp per row, fp32.

template <typename T>
__global__ void __launch_bounds__(256) bwd_delta_kernel(Bhtd<const T> dout, Bhtd<const T> out,
                                                        float* delta, int H, int T_len, int D,
                                                        int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int tt = static_cast<int>(row % T_len);
  const int64_t bh = row / T_len;
  const int h = static_cast<int>(bh % H), b = static_cast<int>(bh / H);
  const T* dorow = dout.head(b, h) + tt * dout.stride_t;
  const T* orow = out.head(b, h) + tt * out.stride_t;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) {
    acc = fmaf(to_float(dorow[d]), to_float(orow[d]), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
  }
  if (lane == 0) delta[row] = acc;
}

template <typename T, int D>
struct BwdParams {
  Bhtd<const T> q, k, v, dout;
  const float* lse;    // contiguous (B, H, T)
  const float* delta;  // contiguous (B, H, T)
  T* dq;               // contiguous (B, H, T, D), likewise dk, dv
  T* dk;
  T* dv;
  int H, T_len;
  float scale;       // 1 / sqrt(D)
  float scale_log2;  // log2(e) / sqrt(D)
};

template <int D>
constexpr int bwd_smem_bytes() {
  // Two resident 64-row tiles + 2 stages x two streamed tiles, + 2 stages x (lse, delta).
  return 6 * kBlockN * smem_stride<D>() * 2 + 2 * 2 * kBlockN * static_cast<int>(sizeof(float));
}

// dK/dV pass: one CTA per key tile; warp w owns keys w*16 .. w*16+15 and works on the
// transposed scores S^T = K Q^T (16 keys x 64 queries) so dK, dV stay in its registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) bwd_dkdv_kernel(const BwdParams<T, D> p) {
  constexpr int kS = smem_stride<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + kBlockN * kS;
  T* q_s = v_s + kBlockN * kS;       // 2 stages
  T* do_s = q_s + 2 * kBlockM * kS;  // 2 stages
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * kBlockM * kS);  // 2 stages, log2 units
  float* delta_s = lse_s + 2 * kBlockM;                              // 2 stages

  const int n_tile = blockIdx.x;  // tile 0 has the most query tiles: launched first
  const int num_tiles = gridDim.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  const T* q_head = p.q.head(b, h);
  const T* do_head = p.dout.head(b, h);
  const float* lse_head = p.lse + bh * p.T_len;
  const float* delta_head = p.delta + bh * p.T_len;

  // lse (log2 units) and delta of a query tile; rows past T get lse = +inf, so their
  // recomputed probabilities are exactly 0 (their Q and dO rows are zero-filled).
  auto load_row_stats = [&](int stage, int m_tile) {
    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      const int row = m_tile * kBlockM + i;
      const bool valid = row < p.T_len;
      lse_s[stage * kBlockM + i] = valid ? lse_head[row] * kLog2e : INFINITY;
      delta_s[stage * kBlockM + i] = valid ? delta_head[row] : 0.f;
    }
  };

  load_tile<T, D, kS>(k_s, p.k.head(b, h), p.k.stride_t, n_tile * kBlockN, p.T_len);
  load_tile<T, D, kS>(v_s, p.v.head(b, h), p.v.stride_t, n_tile * kBlockN, p.T_len);
  load_tile<T, D, kS>(q_s, q_head, p.q.stride_t, n_tile * kBlockM, p.T_len);
  load_tile<T, D, kS>(do_s, do_head, p.dout.stride_t, n_tile * kBlockM, p.T_len);
  load_row_stats(0, n_tile);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dk[j][e] = 0.f;
      dv[j][e] = 0.f;
    }
  }
  const T* k_warp = k_s + warp * 16 * kS;
  const T* v_warp = v_s + warp * 16 * kS;

  for (int m_tile = n_tile; m_tile < num_tiles; ++m_tile) {
    const int stage = (m_tile - n_tile) % 2;
    __syncthreads();
    if (m_tile + 1 < num_tiles) {
      const int nxt = 1 - stage;
      load_tile<T, D, kS>(q_s + nxt * kBlockM * kS, q_head, p.q.stride_t,
                          (m_tile + 1) * kBlockM, p.T_len);
      load_tile<T, D, kS>(do_s + nxt * kBlockM * kS, do_head, p.dout.stride_t,
                          (m_tile + 1) * kBlockM, p.T_len);
      load_row_stats(nxt, m_tile + 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* qs = q_s + stage * kBlockM * kS;
    const T* dos = do_s + stage * kBlockM * kS;
    const float* lse_t = lse_s + stage * kBlockM;
    const float* delta_t = delta_s + stage * kBlockM;

    // P^T = exp2(S^T * scale_log2 - lse_log2[query]); rows = keys, cols = queries.
    float pt[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      pt[j][0] = pt[j][1] = pt[j][2] = pt[j][3] = 0.f;
    }
    warp_gemm_nt<T, kBlockM, D, kS>(pt, k_warp, qs, lane);
    const bool diagonal = m_tile == n_tile;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = warp * 16 + g + (e >= 2 ? 8 : 0);
        const int query = j * 8 + 2 * t + (e & 1);
        const float x = exp2f(fmaf(pt[j][e], p.scale_log2, -lse_t[query]));
        pt[j][e] = (diagonal && query < key) ? 0.f : x;
      }
    }
    {
      uint32_t pf[4][4];
      acc_to_afrag<T>(pt, pf);
      warp_gemm_nn_areg<T, D, kBlockM, kS>(dv, pf, dos, lane);  // dV += P^T dO
    }

    // dP^T = V dO^T; dS^T = P^T * (dP^T - delta[query]).
    float dpt[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
    }
    warp_gemm_nt<T, kBlockM, D, kS>(dpt, v_warp, dos, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = j * 8 + 2 * t + (e & 1);
        dpt[j][e] = pt[j][e] * (dpt[j][e] - delta_t[query]);
      }
    }
    uint32_t dsf[4][4];
    acc_to_afrag<T>(dpt, dsf);
    warp_gemm_nn_areg<T, D, kBlockM, kS>(dk, dsf, qs, lane);  // dK += dS^T Q (scale later)
  }
  cp_async_wait<0>();

  const int row0 = n_tile * kBlockN + warp * 16;
  store_rows<T, D>(p.dk + bh * p.T_len * D, dk, p.scale, p.scale, row0, p.T_len, lane);
  store_rows<T, D>(p.dv + bh * p.T_len * D, dv, 1.f, 1.f, row0, p.T_len, lane);
}

// dQ pass: one CTA per query tile, warp w owns queries w*16 .. w*16+15; K/V tiles up to the
// diagonal are streamed (double-buffered) as in the forward.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const BwdParams<T, D> p) {
  constexpr int kS = smem_stride<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + kBlockM * kS;
  T* k_s = do_s + kBlockM * kS;     // 2 stages
  T* v_s = k_s + 2 * kBlockN * kS;  // 2 stages

  const int m_tile = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  const T* k_head = p.k.head(b, h);
  const T* v_head = p.v.head(b, h);

  load_tile<T, D, kS>(q_s, p.q.head(b, h), p.q.stride_t, m_tile * kBlockM, p.T_len);
  load_tile<T, D, kS>(do_s, p.dout.head(b, h), p.dout.stride_t, m_tile * kBlockM, p.T_len);
  load_tile<T, D, kS>(k_s, k_head, p.k.stride_t, 0, p.T_len);
  load_tile<T, D, kS>(v_s, v_head, p.v.stride_t, 0, p.T_len);
  cp_async_commit();

  // This thread's two rows: lse in log2 units (+inf past T: P = 0) and delta.
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m_tile * kBlockM + warp * 16 + g + 8 * r;
    const bool valid = row < p.T_len;
    lse2[r] = valid ? p.lse[bh * p.T_len + row] * kLog2e : INFINITY;
    delta[r] = valid ? p.delta[bh * p.T_len + row] : 0.f;
  }

  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
  }
  const T* q_warp = q_s + warp * 16 * kS;
  const T* do_warp = do_s + warp * 16 * kS;

  for (int n_tile = 0; n_tile <= m_tile; ++n_tile) {
    const int stage = n_tile % 2;
    __syncthreads();
    if (n_tile < m_tile) {
      const int nxt = 1 - stage;
      load_tile<T, D, kS>(k_s + nxt * kBlockN * kS, k_head, p.k.stride_t,
                          (n_tile + 1) * kBlockN, p.T_len);
      load_tile<T, D, kS>(v_s + nxt * kBlockN * kS, v_head, p.v.stride_t,
                          (n_tile + 1) * kBlockN, p.T_len);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* ks = k_s + stage * kBlockN * kS;
    const T* vs = v_s + stage * kBlockN * kS;

    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    }
    warp_gemm_nt<T, kBlockN, D, kS>(s, q_warp, ks, lane);
    const bool diagonal = n_tile == m_tile;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >= 2 ? 1 : 0;
        const int row = warp * 16 + g + 8 * r;
        const int col = j * 8 + 2 * t + (e & 1);
        const float x = exp2f(fmaf(s[j][e], p.scale_log2, -lse2[r]));
        s[j][e] = (diagonal && col > row) ? 0.f : x;
      }
    }
    float dp[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
    warp_gemm_nt<T, kBlockN, D, kS>(dp, do_warp, vs, lane);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dp[j][e] = s[j][e] * (dp[j][e] - delta[e >= 2 ? 1 : 0]);
      }
    }
    uint32_t dsf[4][4];
    acc_to_afrag<T>(dp, dsf);
    warp_gemm_nn_areg<T, D, kBlockN, kS>(dq, dsf, ks, lane);  // dQ += dS K (scale later)
  }
  cp_async_wait<0>();

  const int row0 = m_tile * kBlockM + warp * 16;
  store_rows<T, D>(p.dq + bh * p.T_len * D, dq, p.scale, p.scale, row0, p.T_len, lane);
}

// ----------------------------------------------------------------------------------------
// Host side.

bool is_supported_head_dim(int64_t D) {
  return D == 32 || D == 64 || D == 80 || D == 128;
}

// cp.async moves 16-byte chunks: the last dimension must be contiguous and rows 16-byte
// aligned. Views that qualify (e.g. (B, T, H, D).transpose(1, 2)) are used in place.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t elems = 16 / t.element_size();
  const bool ok = t.stride(3) == 1 && t.stride(0) % elems == 0 && t.stride(1) % elems == 0 &&
                  t.stride(2) % elems == 0 &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  // clone, not contiguous(): a contiguous view at a misaligned offset must be copied too.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename T>
Bhtd<const T> view_of(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1),
          t.stride(2)};
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv_shapes(q, k, v);
  TORCH_CHECK(q.device().is_cuda(), "causal_attention: the CUDA kernel needs CUDA tensors, got ",
              q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "causal_attention: the CUDA kernel supports dtypes float16 and bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(is_supported_head_dim(q.size(3)),
              "causal_attention: the CUDA kernel supports head dims 32, 64, 80 and 128, got ",
              q.size(3));
  TORCH_CHECK(q.size(2) <= INT32_MAX && q.size(1) <= 65535 && q.size(0) <= 65535,
              "causal_attention: shape too large for the CUDA kernel: ", q.sizes());
}

template <typename Fn>
void dispatch(at::ScalarType dtype, int64_t D, Fn&& fn) {
  auto with_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (D) {
      case 32:
        fn(T{}, std::integral_constant<int, 32>{});
        break;
      case 64:
        fn(T{}, std::integral_constant<int, 64>{});
        break;
      case 80:
        fn(T{}, std::integral_constant<int, 80>{});
        break;
      case 128:
        fn(T{}, std::integral_constant<int, 128>{});
        break;
      default:
        TORCH_CHECK(false, "causal_attention: unsupported head dim ", D);
    }
  };
  if (dtype == at::kHalf) {
    with_dim(__half{});
  } else {
    with_dim(__nv_bfloat16{});
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  // Above 48 KiB a kernel must opt in to dynamic shared memory.
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// (B, H, T, D) heads in the packed (B, T, C) layout.
at::Tensor packed_layout(const at::Tensor& heads) {
  return heads.transpose(1, 2).flatten(2);
}

}  // namespace

// ----------------------------------------------------------------------------------------
// The operators' CUDA kernels (declared in causal_attention_ops.h, registered in
// registration.cpp).

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cuda(const at::Tensor& q_in,
                                                             const at::Tensor& k_in,
                                                             const at::Tensor& v_in) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), T_len = q_in.size(2), D = q_in.size(3);
  at::Tensor out = at::empty({B, H, T_len, D}, q_in.options());
  at::Tensor lse = at::empty({B, H, T_len}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return {out, lse};
  }
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_tiles = static_cast<int>((T_len + kBlockM - 1) / kBlockM);
  dispatch(q.scalar_type(), D, [&](auto type_tag, auto dim) {
    using T = decltype(type_tag);
    constexpr int kD = decltype(dim)::value;
    FwdParams<T, kD> p{view_of<T>(q),
                       view_of<T>(k),
                       view_of<T>(v),
                       reinterpret_cast<T*>(out.mutable_data_ptr()),
                       lse.mutable_data_ptr<float>(),
                       static_cast<int>(H),
                       static_cast<int>(T_len),
                       static_cast<float>(kLog2e / std::sqrt(static_cast<double>(kD)))};
    constexpr int smem = fwd_smem_bytes<kD>();
    set_smem(fwd_kernel<T, kD>, smem);
    const dim3 grid(num_tiles, static_cast<unsigned>(H), static_cast<unsigned>(B));
    fwd_kernel<T, kD><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_qkv(q_in, k_in, v_in);
  check_backward_args(grad_out_in, q_in, out_in, lse_in, at::kFloat);
  const int64_t B = q_in.size(0), H = q_in.size(1), T_len = q_in.size(2), D = q_in.size(3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty({B, H, T_len, D}, q_in.options());
  at::Tensor dk = at::empty({B, H, T_len, D}, q_in.options());
  at::Tensor dv = at::empty({B, H, T_len, D}, q_in.options());
  if (dq.numel() == 0) {
    return {dq, dk, dv};
  }
  const at::Tensor q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const at::Tensor dout = kernel_layout(grad_out_in);
  const at::Tensor out = out_in.stride(3) == 1 ? out_in : out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({B, H, T_len}, q_in.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int num_tiles = static_cast<int>((T_len + kBlockM - 1) / kBlockM);
  const int64_t rows = B * H * T_len;

  dispatch(q.scalar_type(), D, [&](auto type_tag, auto dim) {
    using T = decltype(type_tag);
    constexpr int kD = decltype(dim)::value;
    bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
        view_of<T>(dout), view_of<T>(out), delta.mutable_data_ptr<float>(),
        static_cast<int>(H), static_cast<int>(T_len), kD, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    BwdParams<T, kD> p{view_of<T>(q),
                       view_of<T>(k),
                       view_of<T>(v),
                       view_of<T>(dout),
                       lse.const_data_ptr<float>(),
                       delta.const_data_ptr<float>(),
                       reinterpret_cast<T*>(dq.mutable_data_ptr()),
                       reinterpret_cast<T*>(dk.mutable_data_ptr()),
                       reinterpret_cast<T*>(dv.mutable_data_ptr()),
                       static_cast<int>(H),
                       static_cast<int>(T_len),
                       static_cast<float>(1.0 / std::sqrt(static_cast<double>(kD))),
                       static_cast<float>(kLog2e / std::sqrt(static_cast<double>(kD)))};
    constexpr int smem = bwd_smem_bytes<kD>();
    const dim3 grid(num_tiles, static_cast<unsigned>(H), static_cast<unsigned>(B));
    set_smem(bwd_dkdv_kernel<T, kD>, smem);
    bwd_dkdv_kernel<T, kD><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    set_smem(bwd_dq_kernel<T, kD>, smem);
    bwd_dq_kernel<T, kD><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

// The packed entry points on the same kernels: q, k, v are read in place from the
// (B, T, 3C) projection (kernel_layout keeps aligned views); the (B, H, T, D) results are
// then copied into the packed layouts.
std::tuple<at::Tensor, at::Tensor> causal_attention_qkv_fwd_cuda(const at::Tensor& qkv,
                                                                 int64_t n_head) {
  check_packed_qkv(qkv, n_head);
  const auto [q, k, v] = split_packed_qkv(qkv, n_head);
  const auto [out, lse] = causal_attention_fwd_cuda(q, k, v);
  return {packed_layout(out).contiguous(), lse};
}

at::Tensor causal_attention_qkv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                         const at::Tensor& out, const at::Tensor& lse,
                                         int64_t n_head) {
  check_packed_qkv(qkv, n_head);
  check_packed_outputs(grad_out, out, qkv);
  const auto [q, k, v] = split_packed_qkv(qkv, n_head);
  const auto [dq, dk, dv] = causal_attention_bwd_cuda(
      heads_view(grad_out, n_head), q, k, v, heads_view(out, n_head), lse);
  return at::cat({packed_layout(dq), packed_layout(dk), packed_layout(dv)}, 2);
}

}  // namespace pipeline::attention::cuda
