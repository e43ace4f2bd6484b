// Tile kernels of the CPU causal attention op (FlashAttention-style, see causal_attention.cpp).
//
// Everything here is a header-only template that is force-inlined into the per-ISA entry
// points at the bottom of this file (forward_tile_<isa>, backward_head_<isa>). Those carry
// `__attribute__((target(...)))`, so GCC compiles the same plain C++ loops three times:
// for baseline x86-64 (SSE2), for AVX2+FMA and for AVX-512; causal_attention.cpp picks one
// at run time. The code contains no intrinsics: the loops are written so that the compiler
// vectorises them (fixed-size register tiles, contiguous inner loops, `omp simd` reductions).
//
// Layout conventions. A "tile" is up to kTile = 64 rows of a (T, D) matrix, copied into an
// accumulation-type buffer of shape (kTile, Dp) where Dp is D rounded up to kColBlock; a
// transposed tile has shape (Dp, kTile). Padding is zero-filled, so the matrix products
// below never need tail loops. Score tiles (S, P, dP, dS) are (kTile, kTile), row = query.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#define PIPELINE_ALWAYS_INLINE inline __attribute__((always_inline))

namespace pipeline::attention {

constexpr int64_t kTile = 64;     // query rows and keys per tile
constexpr int64_t kColBlock = 16; // columns of a register tile; Dp is a multiple of this

// Type used for accumulation, softmax statistics and lse. (bf16 -> float will go here.)
template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// ----------------------------------------------------------------------------------------
// Instruction sets: vector width and register count decide the register-tile height.
struct IsaDefault {  // baseline x86-64: SSE2
  static constexpr int kVectorBytes = 16;
  static constexpr int kRegisters = 16;
};
struct IsaAvx2 {
  static constexpr int kVectorBytes = 32;
  static constexpr int kRegisters = 16;
};
struct IsaAvx512 {
  static constexpr int kVectorBytes = 64;
  static constexpr int kRegisters = 32;
};

// Rows of a register tile (kRows x kColBlock accumulators): about half of the vector
// registers hold accumulators, the rest are free for loads and broadcasts. Always a power
// of two that divides kColBlock (so tile heights rounded up to kColBlock are multiples).
template <typename acc_t, typename Isa>
constexpr int register_rows() {
  constexpr int regs_per_row =
      std::max<int>(1, static_cast<int>(kColBlock * sizeof(acc_t)) / Isa::kVectorBytes);
  return std::max(1, (Isa::kRegisters / 2) / regs_per_row);
}

// ----------------------------------------------------------------------------------------
// exp for the softmax. std::exp does not vectorise without -ffast-math, so float uses a
// branch-free Cephes-style expf (range reduction by ln 2, degree-6 polynomial; max error
// about 2 ulp), which the compiler turns into SIMD code inside loops. Arguments here are
// <= ~0; below -87.3 (where expf underflows to subnormals) it returns 0, above 88 it
// saturates at exp(88). float64 (gradcheck, references) keeps std::exp.
PIPELINE_ALWAYS_INLINE float softmax_exp(float x) {
  constexpr float kMin = -87.3f;
  constexpr float kMax = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split in two for exact range reduction
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < kMin ? kMin : (x > kMax ? kMax : x);
  const float n = (xc * kLog2e + kRound) - kRound;  // round(x / ln 2)
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;   // |r| <= ln(2) / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;  // exp(r)
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < kMin ? 0.0f : er * two_n;
}

PIPELINE_ALWAYS_INLINE double softmax_exp(double x) {
  return std::exp(x);
}

// ----------------------------------------------------------------------------------------
// Small matrix products on tiles: C (+)= A * B with A (M x K), B (K x N) row-major and
// M a multiple of kRows, N a multiple of kColBlock. kTransA reads A from its transpose
// (At is K x M, element (m, k) at a[k * lda + m]).
//
// Which parts the causal structure lets us skip, on diagonal tiles (row m = query m,
// column/key n of the same tile):
enum class Causal {
  kNone,       // full product
  kLowerC,     // only C[m][n] with n <= m is needed: skip register tiles above the diagonal
  kLowerA,     // A[m][k] == 0 for k > m: stop the k loop at the end of the row block
  kLowerAT,    // A = transpose of a lower-triangular matrix (A[m][k] == 0 for k < m)
};

// One kRows x kColBlock register tile of C; the fixed-size accumulator array lives in
// vector registers once the loops are unrolled. With kAccumulate the product is summed
// from zero and then added to C (like BLAS beta = 1): blocked summation, which keeps the
// rounding error of long accumulations (dK, dV over many query tiles) small.
template <int kRows, bool kTransA, bool kAccumulate, typename T>
PIPELINE_ALWAYS_INLINE void register_tile(
    int64_t k_begin, int64_t k_end, const T* __restrict a, int64_t lda,
    const T* __restrict b, int64_t ldb, T* __restrict c, int64_t ldc) {
  T acc[kRows][kColBlock];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma omp simd
    for (int j = 0; j < kColBlock; ++j) {
      acc[i][j] = T(0);
    }
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T* __restrict bk = b + k * ldb;
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const T aik = kTransA ? a[k * lda + i] : a[i * lda + k];
#pragma omp simd
      for (int j = 0; j < kColBlock; ++j) {
        acc[i][j] += aik * bk[j];
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma omp simd
    for (int j = 0; j < kColBlock; ++j) {
      c[i * ldc + j] = kAccumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
    }
  }
}

template <int kRows, Causal kCausal, bool kTransA, bool kAccumulate, typename T>
PIPELINE_ALWAYS_INLINE void matmul(
    int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
    T* c, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const T* a_rows = kTransA ? a + m0 : a + m0 * lda;
    int64_t k_begin = 0;
    int64_t k_end = K;
    if constexpr (kCausal == Causal::kLowerA) {
      k_end = std::min(K, m0 + kRows);
    }
    if constexpr (kCausal == Causal::kLowerAT) {
      k_begin = std::min(K, m0);
    }
    for (int64_t n0 = 0; n0 < N; n0 += kColBlock) {
      if (kCausal == Causal::kLowerC && n0 >= m0 + kRows) {
        break;
      }
      register_tile<kRows, kTransA, kAccumulate>(
          k_begin, k_end, a_rows, lda, b + n0, ldb, c + m0 * ldc + n0, ldc);
    }
  }
}

// Same product, choosing the causal variant at run time (diagonal tile or not).
template <int kRows, Causal kCausal, bool kTransA, bool kAccumulate, typename T>
PIPELINE_ALWAYS_INLINE void tile_matmul(
    bool diagonal, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
    int64_t ldb, T* c, int64_t ldc) {
  if (diagonal) {
    matmul<kRows, kCausal, kTransA, kAccumulate>(M, N, K, a, lda, b, ldb, c, ldc);
  } else {
    matmul<kRows, Causal::kNone, kTransA, kAccumulate>(M, N, K, a, lda, b, ldb, c, ldc);
  }
}

// ----------------------------------------------------------------------------------------
// Tile loads: rows [0, rows) of a row-major (rows, D) block into zero-padded tiles.

// dst[r][d] = src[r][d] * scale, shape (kTile, Dp), zero-padded.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void load_tile(
    const scalar_t* __restrict src, int64_t rows, int64_t D, int64_t Dp,
    acc_t* __restrict dst, acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < kTile; ++r) {
    acc_t* __restrict row = dst + r * Dp;
    const int64_t valid = r < rows ? D : 0;
    for (int64_t d = 0; d < valid; ++d) {
      row[d] = static_cast<acc_t>(src[r * D + d]) * scale;
    }
    for (int64_t d = valid; d < Dp; ++d) {
      row[d] = acc_t(0);
    }
  }
}

// dst[d][r] = src[r][d], shape (Dp, kTile), zero-padded.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void load_tile_transposed(
    const scalar_t* __restrict src, int64_t rows, int64_t D, int64_t Dp,
    acc_t* __restrict dst) {
  for (int64_t d = 0; d < Dp; ++d) {
    acc_t* __restrict col = dst + d * kTile;
    const int64_t valid = d < D ? rows : 0;
    for (int64_t r = 0; r < valid; ++r) {
      col[r] = static_cast<acc_t>(src[r * D + d]);
    }
    for (int64_t r = valid; r < kTile; ++r) {
      col[r] = acc_t(0);
    }
  }
}

template <typename T>
PIPELINE_ALWAYS_INLINE void fill(T* __restrict dst, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = value;
  }
}

// ----------------------------------------------------------------------------------------
// Problem description shared by the entry points. All tensors are contiguous; q, k, v,
// out, grad_out are (BH, T, D) and lse is (BH, T).

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* out;
  acc_t* lse;
  int64_t T;
  int64_t D;
  acc_t scale;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grad_out;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* out;
  const acc_t* lse;
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  int64_t T;
  int64_t D;
  acc_t scale;
};

// Per-thread scratch: pointers into one aligned allocation owned by the caller.
template <typename acc_t>
struct ForwardScratch {
  acc_t* q;        // (kTile, Dp) queries times the softmax scale
  acc_t* kt;       // (Dp, kTile)
  acc_t* v;        // (kTile, Dp)
  acc_t* s;        // (kTile, kTile) scores, overwritten by probabilities
  acc_t* o;        // (kTile, Dp) unnormalised output
  acc_t* row_max;  // (kTile)
  acc_t* row_sum;  // (kTile)
};

template <typename acc_t>
struct BackwardScratch {
  acc_t* q;       // (kTile, Dp) queries times the softmax scale
  acc_t* dout;    // (kTile, Dp)
  acc_t* k;       // (kTile, Dp)
  acc_t* kt;      // (Dp, kTile)
  acc_t* vt;      // (Dp, kTile)
  acc_t* dk;      // (kTile, Dp)
  acc_t* dv;      // (kTile, Dp)
  acc_t* p;       // (kTile, kTile)
  acc_t* ds;      // (kTile, kTile) dP, overwritten by dS
  acc_t* dq;      // (round_up(T, kTile), Dp)
  acc_t* delta;   // (T): rowsum(dO * O)
};

// ----------------------------------------------------------------------------------------
// Forward of one (batch*head, query tile): online softmax over key tiles 0..tile.

template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void forward_tile(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRows = register_rows<acc_t, Isa>();
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const acc_t scale = args.scale;

  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  const int64_t m_rows = round_up(rows, kRows);  // register-tile rows actually computed
  const int64_t head = bh * T * D;

  // Scaling Q (not S) makes the largest score of a row give exactly exp(0) = 1.
  load_tile(args.q + head + row0 * D, rows, D, Dp, s.q, scale);
  fill(s.o, kTile * Dp, acc_t(0));
  fill(s.row_max, kTile, -std::numeric_limits<acc_t>::infinity());
  fill(s.row_sum, kTile, acc_t(0));

  for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
    const bool diagonal = kv_tile == tile;
    const int64_t col0 = kv_tile * kTile;
    const int64_t cols = std::min(kTile, T - col0);
    const int64_t n_cols = round_up(cols, kColBlock);
    load_tile_transposed(args.k + head + col0 * D, cols, D, Dp, s.kt);
    load_tile(args.v + head + col0 * D, cols, D, Dp, s.v);

    // S = (scale Q) K^T
    tile_matmul<kRows, Causal::kLowerC, false, false>(
        diagonal, m_rows, n_cols, Dp, s.q, Dp, s.kt, kTile, s.s, kTile);

    // Online softmax: P = exp(S - m_new), rescale the running sum and output.
    for (int64_t r = 0; r < m_rows; ++r) {
      acc_t* __restrict p = s.s + r * kTile;
      if (r >= rows) {
        fill(p, n_cols, acc_t(0));
        continue;
      }
      const int64_t valid = diagonal ? r + 1 : cols;
      acc_t s_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : s_max)
      for (int64_t c = 0; c < valid; ++c) {
        s_max = std::max(s_max, p[c]);
      }
      const acc_t m_old = s.row_max[r];
      const acc_t m_new = std::max(m_old, s_max);
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < valid; ++c) {
        const acc_t e = softmax_exp(p[c] - m_new);
        p[c] = e;
        sum += e;
      }
      fill(p + valid, n_cols - valid, acc_t(0));
      const acc_t alpha = std::exp(m_old - m_new);  // 0 on the first tile (m_old = -inf)
      s.row_max[r] = m_new;
      s.row_sum[r] = s.row_sum[r] * alpha + sum;
      if (alpha != acc_t(1)) {
        acc_t* __restrict o = s.o + r * Dp;
#pragma omp simd
        for (int64_t d = 0; d < Dp; ++d) {
          o[d] *= alpha;
        }
      }
    }

    // O += P V
    tile_matmul<kRows, Causal::kLowerA, false, true>(
        diagonal, m_rows, Dp, cols, s.s, kTile, s.v, Dp, s.o, Dp);
  }

  scalar_t* __restrict out = args.out + head + row0 * D;
  acc_t* __restrict lse = args.lse + bh * T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t inv_sum = acc_t(1) / s.row_sum[r];
    const acc_t* __restrict o = s.o + r * Dp;
    for (int64_t d = 0; d < D; ++d) {
      out[r * D + d] = static_cast<scalar_t>(o[d] * inv_sum);
    }
    lse[r] = s.row_max[r] + std::log(s.row_sum[r]);
  }
}

// ----------------------------------------------------------------------------------------
// Backward of one batch*head: loops over key tiles (dK, dV accumulated in scratch tiles)
// and, inside, over the query tiles at or below the diagonal (dQ accumulated in a scratch
// buffer for the whole head). One thread owns the head, so the summation order is fixed
// and the result deterministic.

template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_head(
    const BackwardArgs<scalar_t>& args, int64_t bh,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRows = register_rows<acc_t, Isa>();
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  const acc_t scale = args.scale;
  const int64_t head = bh * T * D;
  const acc_t* __restrict lse = args.lse + bh * T;

  // delta_i = rowsum(dO_i * O_i), computed like the matmul dP = dO V^T below computes each
  // element (one multiply-add chain over d, vectorised across rows, not a tree reduction
  // over d): where one key dominates a row, O_i ~ V_j, and the rounding errors of dP_ij and
  // delta_i then cancel in dS = P (dP - delta) (exactly for the first row, where O_0 = V_0).
  for (int64_t q_tile = 0; q_tile < num_tiles; ++q_tile) {
    const int64_t row0 = q_tile * kTile;
    const int64_t rows = std::min(kTile, T - row0);
    acc_t* __restrict dout_t = s.kt;  // free until the key loop: (Dp, kTile) each
    acc_t* __restrict out_t = s.vt;
    load_tile_transposed(args.grad_out + head + row0 * D, rows, D, Dp, dout_t);
    load_tile_transposed(args.out + head + row0 * D, rows, D, Dp, out_t);
    acc_t delta[kTile] = {};
    for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) {
        delta[r] += dout_t[d * kTile + r] * out_t[d * kTile + r];
      }
    }
    std::copy(delta, delta + rows, s.delta + row0);
  }
  fill(s.dq, num_tiles * kTile * Dp, acc_t(0));

  for (int64_t kv_tile = 0; kv_tile < num_tiles; ++kv_tile) {
    const int64_t col0 = kv_tile * kTile;
    const int64_t cols = std::min(kTile, T - col0);
    const int64_t n_cols = round_up(cols, kColBlock);
    load_tile(args.k + head + col0 * D, cols, D, Dp, s.k);
    load_tile_transposed(args.k + head + col0 * D, cols, D, Dp, s.kt);
    load_tile_transposed(args.v + head + col0 * D, cols, D, Dp, s.vt);
    fill(s.dk, kTile * Dp, acc_t(0));
    fill(s.dv, kTile * Dp, acc_t(0));

    for (int64_t q_tile = kv_tile; q_tile < num_tiles; ++q_tile) {
      const bool diagonal = q_tile == kv_tile;
      const int64_t row0 = q_tile * kTile;
      const int64_t rows = std::min(kTile, T - row0);
      const int64_t m_rows = round_up(rows, kRows);
      load_tile(args.q + head + row0 * D, rows, D, Dp, s.q, scale);
      load_tile(args.grad_out + head + row0 * D, rows, D, Dp, s.dout);

      // P = exp((scale Q) K^T - lse)
      tile_matmul<kRows, Causal::kLowerC, false, false>(
          diagonal, m_rows, n_cols, Dp, s.q, Dp, s.kt, kTile, s.p, kTile);
      for (int64_t r = 0; r < m_rows; ++r) {
        acc_t* __restrict p = s.p + r * kTile;
        const int64_t valid = r >= rows ? 0 : (diagonal ? r + 1 : cols);
        const acc_t row_lse = r >= rows ? acc_t(0) : lse[row0 + r];
#pragma omp simd
        for (int64_t c = 0; c < valid; ++c) {
          p[c] = softmax_exp(p[c] - row_lse);
        }
        fill(p + valid, n_cols - valid, acc_t(0));
      }

      // dV += P^T dO
      tile_matmul<kRows, Causal::kLowerAT, true, true>(
          diagonal, n_cols, Dp, rows, s.p, kTile, s.dout, Dp, s.dv, Dp);

      // dP = dO V^T;  dS = P * (dP - delta)
      tile_matmul<kRows, Causal::kLowerC, false, false>(
          diagonal, m_rows, n_cols, Dp, s.dout, Dp, s.vt, kTile, s.ds, kTile);
      for (int64_t r = 0; r < m_rows; ++r) {
        acc_t* __restrict ds = s.ds + r * kTile;
        const acc_t* __restrict p = s.p + r * kTile;
        const int64_t valid = r >= rows ? 0 : (diagonal ? r + 1 : cols);
        const acc_t delta = r >= rows ? acc_t(0) : s.delta[row0 + r];
#pragma omp simd
        for (int64_t c = 0; c < valid; ++c) {
          ds[c] = p[c] * (ds[c] - delta);
        }
        fill(ds + valid, n_cols - valid, acc_t(0));
      }

      // dK += dS^T (scale Q);  dQ += dS K (times scale at the end)
      tile_matmul<kRows, Causal::kLowerAT, true, true>(
          diagonal, n_cols, Dp, rows, s.ds, kTile, s.q, Dp, s.dk, Dp);
      tile_matmul<kRows, Causal::kLowerA, false, true>(
          diagonal, m_rows, Dp, cols, s.ds, kTile, s.k, Dp, s.dq + row0 * Dp, Dp);
    }

    scalar_t* __restrict dk = args.dk + head + col0 * D;
    scalar_t* __restrict dv = args.dv + head + col0 * D;
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t d = 0; d < D; ++d) {
        dk[c * D + d] = static_cast<scalar_t>(s.dk[c * Dp + d]);
        dv[c * D + d] = static_cast<scalar_t>(s.dv[c * Dp + d]);
      }
    }
  }

  scalar_t* __restrict dq = args.dq + head;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      dq[t * D + d] = static_cast<scalar_t>(s.dq[t * Dp + d] * scale);
    }
  }
}

// ----------------------------------------------------------------------------------------
// Per-ISA entry points. The bodies above are always_inline, so each of these is compiled
// entirely with its own target options.

#define PIPELINE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PIPELINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))

template <typename scalar_t>
void forward_tile_default(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<acc_type<scalar_t>>& s) {
  forward_tile<scalar_t, IsaDefault>(args, bh, tile, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX2 void forward_tile_avx2(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<acc_type<scalar_t>>& s) {
  forward_tile<scalar_t, IsaAvx2>(args, bh, tile, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX512 void forward_tile_avx512(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<acc_type<scalar_t>>& s) {
  forward_tile<scalar_t, IsaAvx512>(args, bh, tile, s);
}

template <typename scalar_t>
void backward_head_default(
    const BackwardArgs<scalar_t>& args, int64_t bh,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_head<scalar_t, IsaDefault>(args, bh, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX2 void backward_head_avx2(
    const BackwardArgs<scalar_t>& args, int64_t bh,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_head<scalar_t, IsaAvx2>(args, bh, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX512 void backward_head_avx512(
    const BackwardArgs<scalar_t>& args, int64_t bh,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_head<scalar_t, IsaAvx512>(args, bh, s);
}

}  // namespace pipeline::attention
