// Tile kernels of the CPU causal attention op (FlashAttention-style, see causal_attention.cpp).
//
// Everything here is a header-only template that is force-inlined into the per-ISA entry
// points at the bottom of this file (forward_tile_<isa>, backward_item_<isa>). Those carry
// `__attribute__((target(...)))`, so GCC compiles the same plain C++ loops three times:
// for baseline x86-64 (SSE2), for AVX2+FMA and for AVX-512; causal_attention.cpp picks one
// at run time. The loops are written so that the compiler vectorises them (fixed-size
// register tiles, contiguous inner loops, `omp simd` reductions). The one exception is the
// bf16 dot-product microkernel (register_tile_bf16, AVX512_BF16 intrinsics), which a fourth
// forward entry point uses for the scores of bf16 inputs.
//
// Layout conventions. A "tile" is up to kTile = 64 rows of a (T, D) matrix, copied into an
// accumulation-type buffer of shape (kTile, Dp) where Dp is D rounded up to kColBlock; a
// transposed tile has shape (Dp, kTile). Padding is zero-filled, so the matrix products
// below never need tail loops. Score tiles (S, P, dP, dS) are (kTile, kTile), row = query.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#define PIPELINE_ALWAYS_INLINE inline __attribute__((always_inline))
#define PIPELINE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PIPELINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#define PIPELINE_TARGET_AVX512_BF16                                                         \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,"          \
                        "prefer-vector-width=512")))

namespace pipeline::attention {

constexpr int64_t kTile = 64;     // query rows and keys per tile
constexpr int64_t kColBlock = 16; // columns of a register tile; Dp is a multiple of this

// Type used for accumulation, softmax statistics and lse: the input type for float and
// double, float for the 16-bit types (tiles are converted when loaded, rounded back once
// when the result is stored).
template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <>
struct AccType<c10::Half> {
  using type = float;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// ----------------------------------------------------------------------------------------
// Instruction sets: vector width and register count decide the register-tile height.
// kBf16Dot: the AVX512_BF16 dot products are available (see register_tile_bf16).
struct IsaDefault {  // baseline x86-64: SSE2
  static constexpr int kVectorBytes = 16;
  static constexpr int kRegisters = 16;
  static constexpr bool kBf16Dot = false;
};
struct IsaAvx2 {
  static constexpr int kVectorBytes = 32;
  static constexpr int kRegisters = 16;
  static constexpr bool kBf16Dot = false;
};
struct IsaAvx512 {
  static constexpr int kVectorBytes = 64;
  static constexpr int kRegisters = 32;
  static constexpr bool kBf16Dot = false;
};
struct IsaAvx512Bf16 : IsaAvx512 {
  static constexpr bool kBf16Dot = true;
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
  kUpperC,     // only C[m][n] with n >= m is needed: skip register tiles below the diagonal
  kLowerA,     // A[m][k] == 0 for k > m: stop the k loop at the end of the row block
  kLowerAT,    // A = transpose of a lower-triangular matrix (A[m][k] == 0 for k < m)
};

// Columns [n0, n_end) of C that rows [m0, m0 + rows) need under kCausal (kLowerC, kUpperC).
template <Causal kCausal>
PIPELINE_ALWAYS_INLINE std::pair<int64_t, int64_t> causal_columns(int64_t m0, int64_t rows,
                                                                  int64_t N) {
  const int64_t n0 = kCausal == Causal::kUpperC ? m0 / kColBlock * kColBlock : 0;
  const int64_t n_end =
      kCausal == Causal::kLowerC ? std::min(N, round_up(m0 + rows, kColBlock)) : N;
  return {n0, n_end};
}

// One kRows x kCols register tile of C; the fixed-size accumulator array lives in vector
// registers once the loops are unrolled. With kAccumulate the product is summed from zero
// and then added to C (like BLAS beta = 1): blocked summation, which keeps the rounding
// error of long accumulations (dK, dV over many query tiles) small.
template <int kRows, int kCols, bool kTransA, bool kAccumulate, typename T>
PIPELINE_ALWAYS_INLINE void register_tile(
    int64_t k_begin, int64_t k_end, const T* __restrict a, int64_t lda,
    const T* __restrict b, int64_t ldb, T* __restrict c, int64_t ldc) {
  T acc[kRows][kCols];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma omp simd
    for (int j = 0; j < kCols; ++j) {
      acc[i][j] = T(0);
    }
  }
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T* __restrict bk = b + k * ldb;
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const T aik = kTransA ? a[k * lda + i] : a[i * lda + k];
#pragma omp simd
      for (int j = 0; j < kCols; ++j) {
        acc[i][j] += aik * bk[j];
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma omp simd
    for (int j = 0; j < kCols; ++j) {
      c[i * ldc + j] = kAccumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
    }
  }
}

// ----------------------------------------------------------------------------------------
// bfloat16 dot products (AVX512_BF16), used for the forward's scores Q K^T of bf16 inputs:
// vdpbf16ps multiplies pairs of bf16 inputs exactly and adds them to float32 accumulators,
// twice the multiply-adds per instruction of the float32 path (it flushes denormals, which
// does not matter for scores). Products with a computed factor (P V) stay in float32, where
// rounding P to bf16 would cost accuracy; the backward does not use them yet.
//
// Operands are "word" tiles: a uint32 holds two bf16 neighbours along the contracted
// dimension, so a contraction over Dp is one over Dp / 2 words. A (M, Dp / 2) is the bf16
// matrix's rows as they are; B (Dp / 2, N) holds at [p][n] the word p of row n of B^T.

// One kRows x (16 kVecs) register tile of C = A B on words, written (not accumulated).
template <int kRows, int kVecs>
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AVX512_BF16 void register_tile_bf16(
    int64_t k_begin, int64_t k_end, const uint32_t* __restrict a, int64_t lda,
    const uint32_t* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc) {
  __m512 acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      acc[i][j] = _mm512_setzero_ps();
    }
  }
  for (int64_t p = k_begin; p < k_end; ++p) {
    __m512bh bp[kVecs];
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      bp[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * j);
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + p]));
#pragma GCC unroll 4
      for (int j = 0; j < kVecs; ++j) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, bp[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
    }
  }
}

// With 32 vector registers (kRows >= 8: AVX-512) the register tiles are half as tall and
// twice as wide, kRows / 2 x 2 kColBlock: 2 vector loads and kRows / 2 broadcasts per
// 2 (kRows / 2) FMAs instead of 1 and kRows per kRows. Every element of C is still one
// multiply-add chain over k in the same order (terms the causal variants skip are exact
// zeros), so results do not depend on the register tile shape.
template <int kRows, Causal kCausal, bool kTransA, bool kAccumulate, typename T>
PIPELINE_ALWAYS_INLINE void matmul(
    int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
    T* c, int64_t ldc) {
  constexpr bool kWide = kRows >= 8;
  constexpr int kTileRows = kWide ? kRows / 2 : kRows;
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    const T* a_rows = kTransA ? a + m0 : a + m0 * lda;
    int64_t k_begin = 0;
    int64_t k_end = K;
    if constexpr (kCausal == Causal::kLowerA) {
      k_end = std::min(K, m0 + kTileRows);
    }
    if constexpr (kCausal == Causal::kLowerAT) {
      k_begin = std::min(K, m0);
    }
    auto [n0, n_end] = causal_columns<kCausal>(m0, kTileRows, N);
    if constexpr (kWide) {
      for (; n0 + 2 * kColBlock <= n_end; n0 += 2 * kColBlock) {
        register_tile<kTileRows, 2 * kColBlock, kTransA, kAccumulate>(
            k_begin, k_end, a_rows, lda, b + n0, ldb, c + m0 * ldc + n0, ldc);
      }
    }
    for (; n0 < n_end; n0 += kColBlock) {
      register_tile<kTileRows, kColBlock, kTransA, kAccumulate>(
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

// C = A B on bf16 word tiles (K counts words), float C, 8 x 32 register tiles; kCausal as
// for matmul (kNone, kLowerC, kUpperC). Not inlined: the intrinsics need this function's
// target, which the ISA-generic callers do not have; one call covers a whole tile product.
template <Causal kCausal>
PIPELINE_TARGET_AVX512_BF16 void matmul_bf16(
    int64_t M, int64_t N, int64_t K, const uint32_t* a, int64_t lda, const uint32_t* b,
    int64_t ldb, float* c, int64_t ldc) {
  constexpr int kTileRows = 8;
  for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
    auto [n0, n_end] = causal_columns<kCausal>(m0, kTileRows, N);
    for (; n0 + 2 * kColBlock <= n_end; n0 += 2 * kColBlock) {
      register_tile_bf16<kTileRows, 2>(0, K, a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0,
                                       ldc);
    }
    for (; n0 < n_end; n0 += kColBlock) {
      register_tile_bf16<kTileRows, 1>(0, K, a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0,
                                       ldc);
    }
  }
}

template <Causal kCausal>
PIPELINE_ALWAYS_INLINE void tile_matmul_bf16(
    bool diagonal, int64_t M, int64_t N, int64_t K, const uint32_t* a, int64_t lda,
    const uint32_t* b, int64_t ldb, float* c, int64_t ldc) {
  if (diagonal) {
    matmul_bf16<kCausal>(M, N, K, a, lda, b, ldb, c, ldc);
  } else {
    matmul_bf16<Causal::kNone>(M, N, K, a, lda, b, ldb, c, ldc);
  }
}

// ----------------------------------------------------------------------------------------
// Element conversion when loading tiles. A bfloat16 is the high half of a float, so a shift
// converts it exactly; written on the raw bits (not through c10's operator float) so that the
// tile loads stay plain integer loops the compiler vectorises. Half and the rest use the
// ordinary (exact) conversion.
template <typename acc_t, typename scalar_t>
PIPELINE_ALWAYS_INLINE acc_t to_acc(const scalar_t* __restrict src, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t bits = reinterpret_cast<const uint16_t*>(src)[i];
    return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
  } else {
    return static_cast<acc_t>(src[i]);
  }
}

// ----------------------------------------------------------------------------------------
// Tile loads: rows [0, rows) of a (rows, D) block whose rows start `ld` elements apart into
// zero-padded tiles.

// dst[r][d] = src[r][d] * scale, shape (kTile, Dp), zero-padded.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void load_tile(
    const scalar_t* __restrict src, int64_t ld, int64_t rows, int64_t D, int64_t Dp,
    acc_t* __restrict dst, acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < kTile; ++r) {
    acc_t* __restrict row = dst + r * Dp;
    const int64_t valid = r < rows ? D : 0;
    for (int64_t d = 0; d < valid; ++d) {
      row[d] = to_acc<acc_t>(src, r * ld + d) * scale;
    }
    for (int64_t d = valid; d < Dp; ++d) {
      row[d] = acc_t(0);
    }
  }
}

// dst[d][r] = src[r][d] * scale, shape (Dp, kTile), zero-padded.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void load_tile_transposed(
    const scalar_t* __restrict src, int64_t ld, int64_t rows, int64_t D, int64_t Dp,
    acc_t* __restrict dst, acc_t scale = acc_t(1)) {
  for (int64_t d = 0; d < Dp; ++d) {
    acc_t* __restrict col = dst + d * kTile;
    const int64_t valid = d < D ? rows : 0;
    for (int64_t r = 0; r < valid; ++r) {
      col[r] = to_acc<acc_t>(src, r * ld + d) * scale;
    }
    for (int64_t r = valid; r < kTile; ++r) {
      col[r] = acc_t(0);
    }
  }
}

// Rows [0, rows) of a bf16 (rows, D) block (rows `ld` apart) as bf16 word tiles, zero-padded:
// (kTile, Dp / 2) with a row's words in a row (the bf16 row itself), or transposed,
// (Dp / 2, kTile).
template <bool kTransposed>
PIPELINE_ALWAYS_INLINE void load_words(
    const c10::BFloat16* __restrict src, int64_t ld, int64_t rows, int64_t D, int64_t Dp,
    uint32_t* __restrict dst) {
  const int64_t words = Dp / 2;
  if constexpr (!kTransposed) {
    for (int64_t r = 0; r < kTile; ++r) {
      char* row = reinterpret_cast<char*>(dst + r * words);
      const int64_t bytes = r < rows ? D * 2 : 0;
      if (bytes > 0) {
        std::memcpy(row, src + r * ld, bytes);
      }
      std::memset(row + bytes, 0, words * 4 - bytes);
    }
  } else {
    const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t r = 0; r < kTile; ++r) {
      if (r >= rows) {
        for (int64_t p = 0; p < words; ++p) {
          dst[p * kTile + r] = 0;
        }
        continue;
      }
      const uint16_t* __restrict row = bits + r * ld;
      for (int64_t p = 0; p < words; ++p) {
        const uint32_t lo = 2 * p < D ? row[2 * p] : 0;
        const uint32_t hi = 2 * p + 1 < D ? row[2 * p + 1] : 0;
        dst[p * kTile + r] = lo | (hi << 16);
      }
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
// Problem description shared by the entry points. q, k, v, out, grad_out, dq, dk, dv are
// HeadViews of (B, H, T, D) tensors; lse and delta are contiguous (BH, T).

// Where each (T, D) head matrix of a (B, H, T, D) tensor lies: elements along D contiguous,
// anything else strided. This covers contiguous tensors, the transposed (B, T, H, D) views
// the model makes from its projections, and q, k, v inside one packed (B, T, 3C) projection,
// so none of them is copied.
template <typename T>
struct HeadView {
  T* data;
  int64_t heads;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;

  // Row t of head bh (= b * heads + h).
  T* row(int64_t bh, int64_t t) const {
    return data + (bh / heads) * batch_stride + (bh % heads) * head_stride + t * row_stride;
  }
};

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  HeadView<const scalar_t> q;
  HeadView<const scalar_t> k;
  HeadView<const scalar_t> v;
  HeadView<scalar_t> out;
  acc_t* lse;
  int64_t T;
  int64_t D;
  acc_t scale;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  HeadView<const scalar_t> grad_out;
  HeadView<const scalar_t> q;
  HeadView<const scalar_t> k;
  HeadView<const scalar_t> v;
  HeadView<const scalar_t> out;
  const acc_t* lse;
  acc_t* delta;  // (BH, T) rowsum(dO * O), filled by the backward itself
  // Split backward only (else null): per key tile, its operands K, K^T and V^T, prepared
  // once by the kPrepare items instead of by every item that reads them.
  acc_t* key_operands;
  HeadView<scalar_t> dq;
  HeadView<scalar_t> dk;
  HeadView<scalar_t> dv;
  int64_t T;
  int64_t D;
  acc_t scale;
};

// Per-thread scratch: pointers into one aligned allocation owned by the caller.
template <typename acc_t>
struct ForwardScratch {
  acc_t* qt;       // (Dp, kTile) transposed queries times the softmax scale
  acc_t* k;        // (kTile, Dp)
  acc_t* v;        // (kTile, Dp)
  acc_t* st;       // (kTile, kTile) transposed scores (key, query), overwritten by P^T
  acc_t* o;        // (kTile, Dp) unnormalised output
  acc_t* row_max;  // (kTile) running max of each query's scores
  acc_t* row_sum;  // (kTile)
  // bf16 dot products only (uses_bf16_dot): Q and K as word tiles, (Dp / 2, kTile) and
  // (kTile, Dp / 2), in place of qt and k.
  uint32_t* qw;
  uint32_t* kw;
};

// Whether the kernels for `Isa` compute the products of two bf16 inputs with bf16 dot
// products (word tiles) instead of converting the inputs to float32 tiles.
template <typename scalar_t, typename Isa>
constexpr bool uses_bf16_dot() {
  return Isa::kBf16Dot && std::is_same_v<scalar_t, c10::BFloat16>;
}

template <typename acc_t>
struct BackwardScratch {
  acc_t* q;       // (kTile, Dp) queries times the softmax scale
  acc_t* dout;    // (kTile, Dp)
  acc_t* keys;    // key_operands_size(Dp): K, K^T, V^T (backward_load_keys)
  acc_t* dt;      // 2 (Dp, kTile): transposed dO and O, for delta
  acc_t* dk;      // (kTile, Dp)
  acc_t* dv;      // (kTile, Dp)
  acc_t* p;       // (kTile, kTile)
  acc_t* ds;      // (kTile, kTile) dP, overwritten by dS
  acc_t* dq;      // (round_up(T, kTile), Dp) for a whole head, (kTile, Dp) for kQueries
};

// ----------------------------------------------------------------------------------------
// Forward of one (batch*head, query tile): online softmax over key tiles 0..tile.
//
// Scores are computed transposed, S^T = K (scale Q)^T with keys as rows: Q^T is transposed
// once per query tile (not K once per tile pair), and the softmax statistics of a query are
// then column reductions, which run over contiguous rows of S^T vectorised across queries.
// O += P V reads P from P^T (kTransA).

template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void forward_tile(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRows = register_rows<acc_t, Isa>();
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);

  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  const int64_t q_cols = round_up(rows, kColBlock);  // query columns of S^T computed
  const int64_t m_rows = round_up(rows, kRows);      // output rows computed (<= q_cols)

  constexpr bool kBf16Dot = uses_bf16_dot<scalar_t, Isa>();
  // Scaling Q (not S) makes the largest score of a row give exactly exp(0) = 1. The bf16
  // dot products take Q as it is and scale S.
  if constexpr (kBf16Dot) {
    load_words<true>(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.qw);
  } else {
    load_tile_transposed(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.qt,
                         args.scale);
  }
  fill(s.o, kTile * Dp, acc_t(0));
  fill(s.row_max, kTile, -std::numeric_limits<acc_t>::infinity());
  fill(s.row_sum, kTile, acc_t(0));

  for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
    const bool diagonal = kv_tile == tile;
    const int64_t col0 = kv_tile * kTile;
    const int64_t cols = std::min(kTile, T - col0);  // keys
    load_tile(args.v.row(bh, col0), args.v.row_stride, cols, D, Dp, s.v);

    // S^T = K (scale Q)^T. On the diagonal tile, register tiles whose keys all come after
    // their queries are skipped; the loops below never read them (query m >= key n).
    if constexpr (kBf16Dot) {
      load_words<false>(args.k.row(bh, col0), args.k.row_stride, cols, D, Dp, s.kw);
      tile_matmul_bf16<Causal::kUpperC>(diagonal, round_up(cols, kRows), q_cols, Dp / 2, s.kw,
                                        Dp / 2, s.qw, kTile, s.st, kTile);
      for (int64_t n = 0; n < cols; ++n) {
        acc_t* __restrict st = s.st + n * kTile;
#pragma omp simd
        for (int64_t m = diagonal ? n / kColBlock * kColBlock : 0; m < q_cols; ++m) {
          st[m] *= args.scale;
        }
      }
    } else {
      load_tile(args.k.row(bh, col0), args.k.row_stride, cols, D, Dp, s.k);
      tile_matmul<kRows, Causal::kUpperC, false, false>(
          diagonal, round_up(cols, kRows), q_cols, Dp, s.k, Dp, s.qt, kTile, s.st, kTile);
    }

    // Online softmax, one query per column: new running max, P^T = exp(S^T - max), sums.
    // Key n is visible to the queries m >= n of a diagonal tile, to all queries otherwise.
    acc_t m_new[kTile];
    acc_t sum[kTile];
    std::copy(s.row_max, s.row_max + q_cols, m_new);
    fill(sum, q_cols, acc_t(0));
    for (int64_t n = 0; n < cols; ++n) {
      const acc_t* __restrict st = s.st + n * kTile;
#pragma omp simd
      for (int64_t m = diagonal ? n : 0; m < q_cols; ++m) {
        m_new[m] = std::max(m_new[m], st[m]);
      }
    }
    for (int64_t n = 0; n < cols; ++n) {
      acc_t* __restrict p = s.st + n * kTile;
      const int64_t first = diagonal ? std::min(n, q_cols) : 0;
      fill(p, first, acc_t(0));
#pragma omp simd
      for (int64_t m = first; m < q_cols; ++m) {
        const acc_t e = softmax_exp(p[m] - m_new[m]);
        p[m] = e;
        sum[m] += e;
      }
    }
    for (int64_t m = 0; m < m_rows; ++m) {
      const acc_t alpha = softmax_exp(s.row_max[m] - m_new[m]);  // 0 on the first tile
      s.row_max[m] = m_new[m];
      s.row_sum[m] = s.row_sum[m] * alpha + sum[m];
      if (alpha != acc_t(1)) {
        acc_t* __restrict o = s.o + m * Dp;
#pragma omp simd
        for (int64_t d = 0; d < Dp; ++d) {
          o[d] *= alpha;
        }
      }
    }

    // O += P V
    tile_matmul<kRows, Causal::kLowerA, true, true>(
        diagonal, m_rows, Dp, cols, s.st, kTile, s.v, Dp, s.o, Dp);
  }

  scalar_t* __restrict out = args.out.row(bh, row0);
  const int64_t ld_out = args.out.row_stride;
  acc_t* __restrict lse = args.lse + bh * T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t inv_sum = acc_t(1) / s.row_sum[r];
    const acc_t* __restrict o = s.o + r * Dp;
    for (int64_t d = 0; d < D; ++d) {
      out[r * ld_out + d] = static_cast<scalar_t>(o[d] * inv_sum);
    }
    lse[r] = s.row_max[r] + std::log(s.row_sum[r]);
  }
}

// ----------------------------------------------------------------------------------------
// Backward. The unit of work is a pair (query tile, key tile at or before it), which adds
// P^T dO to dV and dS^T Q to dK of the key tile and dS K to dQ of the query tile. Work items
// (BackwardItem) are:
//   kHead:    one batch*head: key tiles in the outer loop (dK, dV accumulated in scratch
//             tiles), the query tiles at or below the diagonal inside (dQ accumulated in a
//             scratch buffer for the whole head); 5 matmuls per pair.
//   kPrepare, kKeys, kQueries: the same work split inside a head so that a few heads still
//             keep every thread busy: delta and the key operands of one tile, then dK and
//             dV of one key tile (query tiles in the inner loop), then dQ of one query tile
//             (key tiles in the inner loop). P and dS are computed twice, 7 matmuls per pair.
// Every sum runs in the same order in both splits (dK, dV over increasing query tiles, dQ
// over increasing key tiles, one blocked accumulation per pair), so the results are bitwise
// identical whichever is used, and do not depend on the number of threads.
enum class BackwardItem { kHead, kPrepare, kKeys, kQueries };

// Elements of the operands of one key tile: K (kTile, Dp), K^T and V^T (Dp, kTile).
inline int64_t key_operands_size(int64_t Dp) {
  return 3 * kTile * Dp;
}

// delta_i = rowsum(dO_i * O_i) for one query tile, computed like the matmul dP = dO V^T
// computes each element (one multiply-add chain over d, vectorised across rows, not a tree
// reduction over d): where one key dominates a row, O_i ~ V_j, and the rounding errors of
// dP_ij and delta_i then cancel in dS = P (dP - delta) (exactly for the first row, where
// O_0 = V_0).
template <typename scalar_t>
PIPELINE_ALWAYS_INLINE void backward_delta(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  acc_t* __restrict dout_t = s.dt;
  acc_t* __restrict out_t = s.dt + Dp * kTile;
  load_tile_transposed(args.grad_out.row(bh, row0), args.grad_out.row_stride, rows, D, Dp,
                       dout_t);
  load_tile_transposed(args.out.row(bh, row0), args.out.row_stride, rows, D, Dp, out_t);
  acc_t delta[kTile] = {};
  for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
    for (int64_t r = 0; r < kTile; ++r) {
      delta[r] += dout_t[d * kTile + r] * out_t[d * kTile + r];
    }
  }
  std::copy(delta, delta + rows, args.delta + bh * T + row0);
}

// Key tile operands: K (for dQ), K^T (for S) and V^T (for dP), at dst, dst + kTile * Dp
// and dst + 2 * kTile * Dp.
template <typename scalar_t>
PIPELINE_ALWAYS_INLINE void backward_load_keys(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    acc_type<scalar_t>* dst) {
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t col0 = kv_tile * kTile;
  const int64_t cols = std::min(kTile, args.T - col0);
  const scalar_t* k = args.k.row(bh, col0);
  load_tile(k, args.k.row_stride, cols, D, Dp, dst);
  load_tile_transposed(k, args.k.row_stride, cols, D, Dp, dst + kTile * Dp);
  load_tile_transposed(args.v.row(bh, col0), args.v.row_stride, cols, D, Dp,
                       dst + 2 * kTile * Dp);
}

// The key operands of a tile: the prepared ones (split backward) or loaded into scratch.
template <typename scalar_t>
PIPELINE_ALWAYS_INLINE const acc_type<scalar_t>* backward_key_operands(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  if (args.key_operands != nullptr) {
    const int64_t num_tiles = (args.T + kTile - 1) / kTile;
    const int64_t size = key_operands_size(round_up(args.D, kColBlock));
    return args.key_operands + (bh * num_tiles + kv_tile) * size;
  }
  backward_load_keys(args, bh, kv_tile, s.keys);
  return s.keys;
}

// Query tile operands: scale Q and dO.
template <typename scalar_t>
PIPELINE_ALWAYS_INLINE void backward_load_queries(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, args.T - row0);
  load_tile(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.q, args.scale);
  load_tile(args.grad_out.row(bh, row0), args.grad_out.row_stride, rows, D, Dp, s.dout);
}

// One (query tile, key tile) pair, query operands in s.q, s.dout and key operands at
// `keys` (backward_load_keys). kKeys: dV += P^T dO and dK += dS^T (scale Q) into s.dv, s.dk;
// kQueries: dQ += dS K into dq (times scale later).
template <bool kKeys, bool kQueries, typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_pair(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile, int64_t kv_tile,
    const acc_type<scalar_t>* keys, const BackwardScratch<acc_type<scalar_t>>& s,
    acc_type<scalar_t>* dq) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRows = register_rows<acc_t, Isa>();
  const int64_t T = args.T;
  const int64_t Dp = round_up(args.D, kColBlock);
  const bool diagonal = q_tile == kv_tile;
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  const int64_t m_rows = round_up(rows, kRows);
  const int64_t cols = std::min(kTile, T - kv_tile * kTile);
  const int64_t n_cols = round_up(cols, kColBlock);
  const acc_t* __restrict lse = args.lse + bh * T + row0;
  const acc_t* __restrict delta = args.delta + bh * T + row0;
  const acc_t* k = keys;
  const acc_t* kt = keys + kTile * Dp;
  const acc_t* vt = keys + 2 * kTile * Dp;

  // P = exp((scale Q) K^T - lse)
  tile_matmul<kRows, Causal::kLowerC, false, false>(
      diagonal, m_rows, n_cols, Dp, s.q, Dp, kt, kTile, s.p, kTile);
  for (int64_t r = 0; r < m_rows; ++r) {
    acc_t* __restrict p = s.p + r * kTile;
    const int64_t valid = r >= rows ? 0 : (diagonal ? r + 1 : cols);
    const acc_t row_lse = r >= rows ? acc_t(0) : lse[r];
#pragma omp simd
    for (int64_t c = 0; c < valid; ++c) {
      p[c] = softmax_exp(p[c] - row_lse);
    }
    fill(p + valid, n_cols - valid, acc_t(0));
  }

  // dV += P^T dO
  if constexpr (kKeys) {
    tile_matmul<kRows, Causal::kLowerAT, true, true>(
        diagonal, n_cols, Dp, rows, s.p, kTile, s.dout, Dp, s.dv, Dp);
  }

  // dP = dO V^T;  dS = P * (dP - delta)
  tile_matmul<kRows, Causal::kLowerC, false, false>(
      diagonal, m_rows, n_cols, Dp, s.dout, Dp, vt, kTile, s.ds, kTile);
  for (int64_t r = 0; r < m_rows; ++r) {
    acc_t* __restrict ds = s.ds + r * kTile;
    const acc_t* __restrict p = s.p + r * kTile;
    const int64_t valid = r >= rows ? 0 : (diagonal ? r + 1 : cols);
    const acc_t row_delta = r >= rows ? acc_t(0) : delta[r];
#pragma omp simd
    for (int64_t c = 0; c < valid; ++c) {
      ds[c] = p[c] * (ds[c] - row_delta);
    }
    fill(ds + valid, n_cols - valid, acc_t(0));
  }

  // dK += dS^T (scale Q);  dQ += dS K
  if constexpr (kKeys) {
    tile_matmul<kRows, Causal::kLowerAT, true, true>(
        diagonal, n_cols, Dp, rows, s.ds, kTile, s.q, Dp, s.dk, Dp);
  }
  if constexpr (kQueries) {
    tile_matmul<kRows, Causal::kLowerA, false, true>(
        diagonal, m_rows, Dp, cols, s.ds, kTile, k, Dp, dq, Dp);
  }
}

// Rows [0, rows) of a (kTile, Dp) accumulator tile, times `scale`, to a (rows, D) output
// whose rows start `ld` elements apart.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void store_tile(
    const acc_t* __restrict src, int64_t rows, int64_t D, int64_t Dp, scalar_t* __restrict dst,
    int64_t ld, acc_t scale = acc_t(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) {
      dst[r * ld + d] = static_cast<scalar_t>(src[r * Dp + d] * scale);
    }
  }
}

// dK and dV of key tile kv_tile over the query tiles kv_tile.. (with dQ too when kWithDq:
// accumulated into s.dq, which holds the whole head).
template <bool kWithDq, typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_keys(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  const acc_t* keys = backward_key_operands(args, bh, kv_tile, s);
  fill(s.dk, kTile * Dp, acc_t(0));
  fill(s.dv, kTile * Dp, acc_t(0));
  for (int64_t q_tile = kv_tile; q_tile < num_tiles; ++q_tile) {
    backward_load_queries(args, bh, q_tile, s);
    backward_pair<true, kWithDq, scalar_t, Isa>(
        args, bh, q_tile, kv_tile, keys, s, s.dq + q_tile * kTile * Dp);
  }
  const int64_t col0 = kv_tile * kTile;
  const int64_t cols = std::min(kTile, T - col0);
  store_tile(s.dk, cols, D, Dp, args.dk.row(bh, col0), args.dk.row_stride);
  store_tile(s.dv, cols, D, Dp, args.dv.row(bh, col0), args.dv.row_stride);
}

template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_item(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  switch (item) {
    case BackwardItem::kHead: {
      for (int64_t q_tile = 0; q_tile < num_tiles; ++q_tile) {
        backward_delta(args, bh, q_tile, s);
      }
      fill(s.dq, num_tiles * kTile * Dp, acc_t(0));
      for (int64_t kv_tile = 0; kv_tile < num_tiles; ++kv_tile) {
        backward_keys<true, scalar_t, Isa>(args, bh, kv_tile, s);
      }
      store_tile(s.dq, T, D, Dp, args.dq.row(bh, 0), args.dq.row_stride, args.scale);
      break;
    }
    case BackwardItem::kPrepare: {
      backward_delta(args, bh, tile, s);
      const int64_t size = key_operands_size(Dp);
      backward_load_keys(args, bh, tile, args.key_operands + (bh * num_tiles + tile) * size);
      break;
    }
    case BackwardItem::kKeys:
      backward_keys<false, scalar_t, Isa>(args, bh, tile, s);
      break;
    case BackwardItem::kQueries: {
      backward_load_queries(args, bh, tile, s);
      fill(s.dq, kTile * Dp, acc_t(0));
      for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
        const acc_t* keys = backward_key_operands(args, bh, kv_tile, s);
        backward_pair<false, true, scalar_t, Isa>(args, bh, tile, kv_tile, keys, s, s.dq);
      }
      const int64_t rows = std::min(kTile, T - tile * kTile);
      store_tile(s.dq, rows, D, Dp, args.dq.row(bh, tile * kTile), args.dq.row_stride,
                 args.scale);
      break;
    }
  }
}

// ----------------------------------------------------------------------------------------
// Per-ISA entry points. The bodies above are always_inline, so each of these is compiled
// entirely with its own target options.

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

// bfloat16 only: the other dtypes have no bf16 products and use forward_tile_avx512.
inline PIPELINE_TARGET_AVX512_BF16 void forward_tile_avx512_bf16(
    const ForwardArgs<c10::BFloat16>& args, int64_t bh, int64_t tile,
    const ForwardScratch<float>& s) {
  forward_tile<c10::BFloat16, IsaAvx512Bf16>(args, bh, tile, s);
}

template <typename scalar_t>
void backward_item_default(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_item<scalar_t, IsaDefault>(args, item, bh, tile, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX2 void backward_item_avx2(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_item<scalar_t, IsaAvx2>(args, item, bh, tile, s);
}
template <typename scalar_t>
PIPELINE_TARGET_AVX512 void backward_item_avx512(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<acc_type<scalar_t>>& s) {
  backward_item<scalar_t, IsaAvx512>(args, item, bh, tile, s);
}

}  // namespace pipeline::attention
