// Tiles of the CPU attention kernels: their layout (kTile, kColBlock, HeadView), element types
// and conversions (acc_type, to_acc, from_acc), the loads and transposes that fill them, and
// the matrix products on them (matmul; matmul_bf16 for AVX512_BF16). Apart from the softmax
// (causal_attention_softmax.h) and the kernels that drive both (causal_attention_kernel.h),
// so that how tiles are stored and multiplied can be read and tuned on its own.
//
// Layout conventions. A "tile" is up to kTile = 64 rows of a (T, D) matrix, copied into an
// accumulation-type buffer of shape (kTile, Dp) where Dp is D rounded up to kColBlock (or read
// in place where the input already has that layout, tile_operand); a transposed tile has
// shape (Dp, kTile). Padding is zero-filled, so the matrix products below never need tail
// loops. Score tiles (S, P, dP, dS) are (kTile, kTile), row = query.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "causal_attention_isa.h"

PIPELINE_KERNEL_OPTIONS_BEGIN

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

// Shape of a register tile of C (kRows x kCols accumulators of type T), sized so that the
// accumulators fill 12 of the 16 vector registers (SSE2, AVX2: the other 4 hold the two
// vectors of B's row and a broadcast of A) or 16 of the 32 (AVX-512). Two vectors per row:
// each k step then costs 2 loads and kRows broadcasts for 2 kRows multiply-adds. kCols
// divides kColBlock or is a multiple of it.
template <typename T, typename Isa>
struct TileShape {
  static constexpr int kLanes = Isa::kVectorBytes / static_cast<int>(sizeof(T));
  static constexpr int kCols = 2 * kLanes;
  static constexpr int kRows = Isa::kRegisters >= 32 ? 8 : 6;
  static_assert(kCols % kColBlock == 0 || kColBlock % kCols == 0);
};

// ----------------------------------------------------------------------------------------
// Small matrix products on tiles: C (+)= A * B with A (M x K), B (K x N) row-major and
// N a multiple of kColBlock (any M). kTransA reads A from its transpose (At is K x M,
// element (m, k) at a[k * lda + m]).
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
// error of long accumulations (dK, dV over many query tiles) small. Otherwise C is
// written as (acc * scale), rounded once to C's type (the scores: T = double, C = float).
template <int kRows, int kCols, bool kTransA, bool kAccumulate, typename T, typename C>
PIPELINE_ALWAYS_INLINE void register_tile(
    int64_t k_begin, int64_t k_end, const T* __restrict a, int64_t lda,
    const T* __restrict b, int64_t ldb, C* __restrict c, int64_t ldc, T scale) {
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
    C* __restrict ci = c + i * ldc;
    if constexpr (kAccumulate) {
      static_assert(std::is_same_v<T, C>);
#pragma omp simd
      for (int j = 0; j < kCols; ++j) {
        ci[j] += acc[i][j];
      }
    } else {
#pragma omp simd
      for (int j = 0; j < kCols; ++j) {
        ci[j] = static_cast<C>(acc[i][j] * scale);
      }
    }
  }
}

// The register tiles of rows [m0, m0 + kRows) of C. Tiles are kCols wide, and kColBlock
// wide for the last columns when kCols is wider.
template <int kRows, int kCols, Causal kCausal, bool kTransA, bool kAccumulate, typename T,
          typename C>
PIPELINE_ALWAYS_INLINE void row_block(
    int64_t m0, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, C* c,
    int64_t ldc, T scale) {
  const T* a_rows = kTransA ? a + m0 : a + m0 * lda;
  int64_t k_begin = 0;
  int64_t k_end = K;
  if constexpr (kCausal == Causal::kLowerA) {
    k_end = std::min(K, m0 + kRows);
  }
  if constexpr (kCausal == Causal::kLowerAT) {
    k_begin = std::min(K, m0);
  }
  auto [n0, n_end] = causal_columns<kCausal>(m0, kRows, N);
  C* c_rows = c + m0 * ldc;
  for (; n0 + kCols <= n_end; n0 += kCols) {
    register_tile<kRows, kCols, kTransA, kAccumulate>(k_begin, k_end, a_rows, lda, b + n0, ldb,
                                                      c_rows + n0, ldc, scale);
  }
  if constexpr (kCols > kColBlock) {
    for (; n0 < n_end; n0 += kColBlock) {
      register_tile<kRows, kColBlock, kTransA, kAccumulate>(k_begin, k_end, a_rows, lda,
                                                            b + n0, ldb, c_rows + n0, ldc, scale);
    }
  }
}

// C (+)= A B in register tiles of the ISA's shape for T (TileShape): full-height row blocks,
// then the last M % kRows rows in blocks of 4, 2 and 1. Every element of C is one
// multiply-add chain over k in increasing order (terms the causal variants skip are exact
// zeros), so results do not depend on the register tile shape.
template <typename Isa, Causal kCausal, bool kTransA, bool kAccumulate, typename T, typename C>
PIPELINE_ALWAYS_INLINE void matmul(
    int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, C* c,
    int64_t ldc, T scale = T(1)) {
  using Shape = TileShape<T, Isa>;
  constexpr int kRows = Shape::kRows;
  constexpr int kCols = Shape::kCols;
  int64_t m0 = 0;
  for (; m0 + kRows <= M; m0 += kRows) {
    row_block<kRows, kCols, kCausal, kTransA, kAccumulate>(m0, N, K, a, lda, b, ldb, c, ldc,
                                                           scale);
  }
  if (M - m0 >= 4) {
    row_block<4, kCols, kCausal, kTransA, kAccumulate>(m0, N, K, a, lda, b, ldb, c, ldc, scale);
    m0 += 4;
  }
  if (M - m0 >= 2) {
    row_block<2, kCols, kCausal, kTransA, kAccumulate>(m0, N, K, a, lda, b, ldb, c, ldc, scale);
    m0 += 2;
  }
  if (M - m0 >= 1) {
    row_block<1, kCols, kCausal, kTransA, kAccumulate>(m0, N, K, a, lda, b, ldb, c, ldc, scale);
  }
}

// Same product, choosing the causal variant at run time (diagonal tile or not).
template <typename Isa, Causal kCausal, bool kTransA, bool kAccumulate, typename T, typename C>
PIPELINE_ALWAYS_INLINE void tile_matmul(
    bool diagonal, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
    int64_t ldb, C* c, int64_t ldc, T scale = T(1)) {
  if (diagonal) {
    matmul<Isa, kCausal, kTransA, kAccumulate>(M, N, K, a, lda, b, ldb, c, ldc, scale);
  } else {
    matmul<Isa, Causal::kNone, kTransA, kAccumulate>(M, N, K, a, lda, b, ldb, c, ldc, scale);
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

// The other way, when storing results: bfloat16 rounded to nearest even on the raw bits, as
// c10::BFloat16(float) does (NaN -> 0x7FC0), but inlined (c10's constructor, compiled outside
// the kernels' optimize options, is not); the rest through the ordinary conversion.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE scalar_t from_acc(acc_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16;
    return __builtin_bit_cast(c10::BFloat16, static_cast<uint16_t>(x != x ? 0x7FC0 : rounded));
  } else {
    return static_cast<scalar_t>(x);
  }
}

// ----------------------------------------------------------------------------------------
// AVX2 helpers for float data, where GCC does not vectorise the plain loops: an 8 x 8
// transpose (transposed tile loads, else one scalar load and store per element). Like
// matmul_bf16 they carry their own target; the outer one (transpose_blocks_avx2) is not
// forced inline, since GCC inlines a function with a target only into one with that target
// (or a superset, as in the AVX-512 entry points); callers use it only where
// Isa::kVectorBytes >= 32. The AVX2 row norms are in causal_attention_softmax.h.

// Eight consecutive elements as floats (a bf16 is the high half of a float).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AVX2 __m256 load8_avx2(const float* src) {
  return _mm256_loadu_ps(src);
}
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AVX2 __m256 load8_avx2(const c10::BFloat16* src) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8, as floats.
template <typename T>
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AVX2 void transpose_8x8(
    const T* __restrict src, int64_t ld_src, float* __restrict dst, int64_t ld_dst) {
  __m256 r[8];
  __m256 t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = load8_avx2(src + i * ld_src);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved: a0 b0 a1 b1 | a4 b4 a5 b5, ...
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // columns of 4 rows: a0 b0 c0 d0 | a4 b4 c4 d4, ...
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // the two halves of 8 rows: columns j and j + 4
    _mm256_storeu_ps(dst + j * ld_dst, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ld_dst, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

// dst[d][r] = src[r][d] for r < rows8, d < D8 (both multiples of 8), dst (D8, kTile).
template <typename T>
PIPELINE_TARGET_AVX2 inline void transpose_blocks_avx2(const T* __restrict src, int64_t ld,
                                                      int64_t rows8, int64_t D8,
                                                      float* __restrict dst) {
  for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
    for (int64_t d0 = 0; d0 < D8; d0 += 8) {
      transpose_8x8(src + r0 * ld + d0, ld, dst + d0 * kTile + r0, kTile);
    }
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

// dst[d][r] = src[r][d], shape (Dp, kTile), zero-padded. float or bf16 to float on AVX2 and
// wider: 8 x 8 blocks transposed in registers, the edges element by element.
template <typename Isa, typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE void load_tile_transposed(
    const scalar_t* __restrict src, int64_t ld, int64_t rows, int64_t D, int64_t Dp,
    acc_t* __restrict dst) {
  int64_t rows8 = 0;  // rows [0, rows8) of columns [0, D8) are done in blocks
  int64_t D8 = 0;
  if constexpr (Isa::kVectorBytes >= 32 &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) &&
                std::is_same_v<acc_t, float>) {
    rows8 = rows / 8 * 8;
    D8 = D / 8 * 8;
    transpose_blocks_avx2(src, ld, rows8, D8, dst);
  }
  for (int64_t d = 0; d < Dp; ++d) {
    acc_t* __restrict col = dst + d * kTile;
    const int64_t valid = d < D ? rows : 0;
    for (int64_t r = d < D8 ? rows8 : 0; r < valid; ++r) {
      col[r] = to_acc<acc_t>(src, r * ld + d);
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

// A tile as a matmul operand (pointer, leading dimension): read in place where the input
// already is what load_tile would make of it (same type, D a multiple of kColBlock: the
// products read only the tile's `rows` rows and Dp = D columns), else loaded into dst.
template <typename scalar_t, typename acc_t>
PIPELINE_ALWAYS_INLINE std::pair<const acc_t*, int64_t> tile_operand(
    const HeadView<const scalar_t>& x, int64_t bh, int64_t row0, int64_t rows, int64_t D,
    int64_t Dp, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (D == Dp) {
      return {x.row(bh, row0), x.row_stride};
    }
  }
  load_tile(x.row(bh, row0), x.row_stride, rows, D, Dp, dst);
  return {dst, Dp};
}

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
