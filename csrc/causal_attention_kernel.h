// Tile kernels of the CPU causal attention op (FlashAttention-style, see causal_attention.cpp).
//
// Everything here is a header-only template that is force-inlined into the per-ISA entry
// points declared at the bottom of this file (forward_tile_<isa>, backward_item_<isa>) and
// defined in causal_attention_<isa>.cpp. Those carry `__attribute__((target(...)))`, so GCC
// compiles the same plain C++ loops three times: for baseline x86-64 (SSE2), for AVX2+FMA
// and for AVX-512; causal_attention.cpp picks one at run time. The loops are written so that
// the compiler vectorises them (fixed-size register tiles, contiguous inner loops, `omp simd`
// reductions). The one exception is the bf16 dot-product microkernel (register_tile_bf16,
// AVX512_BF16 intrinsics), which a fourth forward entry point uses for the scores of bf16
// inputs.
//
// Layout conventions. A "tile" is up to kTile = 64 rows of a (T, D) matrix, copied into an
// accumulation-type buffer of shape (kTile, Dp) where Dp is D rounded up to kColBlock (or read
// in place where the input already has that layout, tile_operand); a transposed tile has
// shape (Dp, kTile). Padding is zero-filled, so the matrix products below never need tail
// loops. Score tiles (S, P, dP, dS) are (kTile, kTile), row = query.
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

// The kernels never read floating-point exception flags. Under GCC's default
// -ftrapping-math the selects in softmax_exp stay branches (a comparison might trap), which
// keeps every exp loop scalar; without it they become blends and the loops are vectorised
// (same results: no value changes, only which operations may be speculated).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

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

// Widest type in which the scores Q K^T are summed, and the type of the log-sum-exp `lse`:
// double for float32 (and float64) inputs, float for the 16-bit types. For float32 inputs
// the kernels sum the scores in double only where they may be large (needs_wide_scores),
// else in float (twice the multiply-adds per instruction).
//
// Why double for large float32 scores: there (|s| in the hundreds or thousands, a
// nearly one-hot softmax) the output and gradient errors are set by the absolute error of
// the scores, and a float32 sum of D products is off by about sqrt(D / 2) ulp(|s|), a random
// amount that is as large as SDPA's own error (which sums the same way), so ours would land
// anywhere from 0.1x to 30x of SDPA's. The products of two float32 are exact in double, so
// the scores are summed, scaled and kept in double, and the softmax arguments s - max (and
// s - lse in the backward) are formed in double and rounded to float once: P then has the
// accuracy of exp, whatever |s|. Rounding s itself to float (ulp(|s|) / 2, 5e-4 at
// |s| ~ 1e4) or the lse (the backward recomputes every probability as exp(s - lse)) would
// give that back, so the lse is kept in double too.
// 16-bit inputs carry errors of 2^-8 to 2^-11, far above either effect.
// Where every score of a query tile (forward) or head (backward) is small (|s| <=
// kNarrowScoreBound, by Cauchy-Schwarz on the largest query and key norms), the float sum is
// off by a few ulp of 32 at most, the size of the other float32 errors (the exp, the sums of
// P V), and the kernels sum in float: accuracy stays that of SDPA, which sums all scores in
// float (tests/kernels).
template <typename scalar_t>
struct ScoreType {
  using type = float;
};
template <>
struct ScoreType<float> {
  using type = double;
};
template <>
struct ScoreType<double> {
  using type = double;
};
template <typename scalar_t>
using score_type = typename ScoreType<scalar_t>::type;

// Largest |score| for which float32 inputs have their scores summed in float.
constexpr double kNarrowScoreBound = 32.0;

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
  // Only the upper end is clamped: below kMin the result is selected as 0 at the end, so
  // what the steps compute there is never used (the two-sided clamp cost 3 compares and 6
  // blends per vector). A NaN x passes through and gives NaN.
  const float xc = x > kMax ? kMax : x;
  const float t = xc * kLog2e + kRound;           // 1.5 * 2^23 + round(x / ln 2)
  const float n = t - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;  // |r| <= ln(2) / 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * (r * r) + r + 1.0f;  // exp(r)
  // 2^n from n in t's low mantissa bits, in unsigned arithmetic: defined for any x, where
  // converting an out-of-range n to int would not be.
  const uint32_t n_bits = __builtin_bit_cast(uint32_t, t) - __builtin_bit_cast(uint32_t, kRound);
  const float two_n = __builtin_bit_cast(float, (n_bits + 127u) << 23);
  return x < kMin ? 0.0f : er * two_n;
}

PIPELINE_ALWAYS_INLINE double softmax_exp(double x) {
  return std::exp(x);
}

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
// the optimize pragma above, is not); the rest through the ordinary conversion.
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
// transpose (transposed tile loads, else one scalar load and store per element) and row
// norms. Like matmul_bf16 they carry their own target; the outer ones (transpose_blocks_avx2,
// max_row_norm_sq_avx2) are not forced inline, since GCC inlines a function with a target
// only into one with that target (or a superset, as in the AVX-512 entry points); callers use
// them only where Isa::kVectorBytes >= 32.

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

// Largest squared norm of `rows` rows of length D, `ld` apart: eight rows at a time, one
// multiply-add chain each, the eight sums then reduced together. A NaN norm counts as +inf,
// so that the result does not depend on how the rows are grouped (a head with a NaN is wide).
PIPELINE_TARGET_AVX2 inline float max_row_norm_sq_avx2(
    const float* __restrict x, int64_t ld, int64_t rows, int64_t D) {
  alignas(32) int32_t tail[8];
  for (int j = 0; j < 8; ++j) {
    tail[j] = j < D % 8 ? -1 : 0;
  }
  const __m256i tail_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  __m256 largest = _mm256_setzero_ps();
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    __m256 acc[8];
    const float* row[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      acc[i] = _mm256_setzero_ps();
      row[i] = x + std::min<int64_t>(r0 + i, rows - 1) * ld;  // repeats the last row
    }
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256 v = _mm256_loadu_ps(row[i] + d);
        acc[i] = _mm256_fmadd_ps(v, v, acc[i]);
      }
    }
    if (d < D) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256 v = _mm256_maskload_ps(row[i] + d, tail_mask);
        acc[i] = _mm256_fmadd_ps(v, v, acc[i]);
      }
    }
    // Lane i of `sums`: the sum of acc[i]'s lanes.
    const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]);
    const __m256 h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]);
    const __m256 h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23);
    const __m256 h4567 = _mm256_hadd_ps(h45, h67);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                      _mm256_permute2f128_ps(h0123, h4567, 0x31));
    const __m256 nan = _mm256_cmp_ps(sums, sums, _CMP_UNORD_Q);
    largest = _mm256_max_ps(largest,
                            _mm256_blendv_ps(sums, _mm256_set1_ps(HUGE_VALF), nan));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  float result = 0;
  for (int j = 0; j < 8; ++j) {
    result = lanes[j] <= result ? result : lanes[j];
  }
  return result;
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

// Largest squared norm of rows [begin, end) (length D) of head bh; +inf for a NaN norm.
template <typename Isa, typename scalar_t>
PIPELINE_ALWAYS_INLINE acc_type<scalar_t> max_row_norm_sq(const HeadView<const scalar_t>& x,
                                                          int64_t bh, int64_t begin,
                                                          int64_t end, int64_t D) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (Isa::kVectorBytes >= 32 && std::is_same_v<scalar_t, float>) {
    return end > begin ? max_row_norm_sq_avx2(x.row(bh, begin), x.row_stride, end - begin, D)
                       : 0.0f;
  }
  acc_t largest = 0;
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* __restrict row = x.row(bh, t);
    acc_t norm_sq = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t value = to_acc<acc_t>(row, d);
      norm_sq += value * value;
    }
    if (norm_sq != norm_sq) {
      norm_sq = std::numeric_limits<acc_t>::infinity();
    }
    largest = norm_sq <= largest ? largest : norm_sq;
  }
  return largest;
}

// Whether some |score| may exceed kNarrowScoreBound: |s| <= scale |q| |k| <= scale max |q|
// max |k| (NaN or inf norms: true).
PIPELINE_ALWAYS_INLINE bool exceeds_narrow_bound(double q_norm_sq, double k_norm_sq,
                                                 double scale) {
  return !(q_norm_sq * k_norm_sq * scale * scale <= kNarrowScoreBound * kNarrowScoreBound);
}

// Whether the scores of queries [q_begin, end) of head bh (against keys [0, end), the ones
// they see) need summing in score_type (see ScoreType). One pass over rows that the caller
// loads next anyway. Types whose score_type is their acc_type have no choice.
template <typename Isa, typename scalar_t>
PIPELINE_ALWAYS_INLINE bool needs_wide_scores(const HeadView<const scalar_t>& q,
                                              const HeadView<const scalar_t>& k, int64_t bh,
                                              int64_t q_begin, int64_t end, int64_t D,
                                              double scale) {
  if constexpr (std::is_same_v<acc_type<scalar_t>, score_type<scalar_t>>) {
    return true;
  } else {
    return exceeds_narrow_bound(max_row_norm_sq<Isa>(q, bh, q_begin, end, D),
                                max_row_norm_sq<Isa>(k, bh, 0, end, D), scale);
  }
}

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

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = acc_type<scalar_t>;
  HeadView<const scalar_t> q;
  HeadView<const scalar_t> k;
  HeadView<const scalar_t> v;
  HeadView<scalar_t> out;
  score_type<scalar_t>* lse;
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
  const score_type<scalar_t>* lse;
  // Split backward only (else null): (BH, num_tiles, 2) the largest squared row norms of
  // each tile of Q and of K, which the kPrepare items fill for the others to decide a head's
  // score type from (the same decision as the unsplit backward's, needs_wide_scores).
  acc_t* tile_norms_sq;
  acc_t* delta;  // (BH, T) rowsum(dO * O), filled by the backward itself
  // Split backward only (else null): per key tile, its operands (KeyOperands), prepared
  // once by the kPrepare items instead of by every item that reads them.
  acc_t* key_operands;
  // Split backward, where it fits (else null): per (bh, key tile j), the dS K products of
  // query tiles j..num_tiles-1, (kTile, Dp) each (dq_partials_block).
  acc_t* dq_partials;
  HeadView<scalar_t> dq;
  HeadView<scalar_t> dk;
  HeadView<scalar_t> dv;
  int64_t T;
  int64_t D;
  acc_t scale;
};

// Per-thread scratch: pointers into one aligned allocation owned by the caller, sized for
// score_type; narrow() views the same memory for scores summed in acc_t.
template <typename scalar_t, typename score_t = score_type<scalar_t>>
struct ForwardScratch {
  using acc_t = acc_type<scalar_t>;
  score_t* qt;     // (Dp, kTile) transposed queries
  score_t* k;      // (kTile, Dp)
  acc_t* v;        // (kTile, Dp)
  score_t* sst;    // (kTile, kTile) transposed scores (key, query)
  acc_t* st;       // (kTile, kTile) P^T
  acc_t* o;        // (kTile, Dp) unnormalised output
  score_t* row_max;  // (kTile) running max of each query's scores
  acc_t* row_sum;  // (kTile)
  // bf16 dot products only (uses_bf16_dot): Q and K as word tiles, (Dp / 2, kTile) and
  // (kTile, Dp / 2), in place of qt and k.
  uint32_t* qw;
  uint32_t* kw;

  ForwardScratch<scalar_t, acc_t> narrow() const {
    return {reinterpret_cast<acc_t*>(qt), reinterpret_cast<acc_t*>(k), v,
            reinterpret_cast<acc_t*>(sst), st, o, reinterpret_cast<acc_t*>(row_max),
            row_sum, qw, kw};
  }
};

// Whether the kernels for `Isa` compute the products of two bf16 inputs with bf16 dot
// products (word tiles) instead of converting the inputs to float32 tiles.
template <typename scalar_t, typename Isa>
constexpr bool uses_bf16_dot() {
  return Isa::kBf16Dot && std::is_same_v<scalar_t, c10::BFloat16>;
}

template <typename scalar_t, typename score_t = score_type<scalar_t>>
struct BackwardScratch {
  using acc_t = acc_type<scalar_t>;
  acc_t* q;       // (kTile, Dp) queries (for dK)
  score_t* qs;    // (kTile, Dp) queries for the scores; q itself when score_t is acc_t
  acc_t* dout;    // (kTile, Dp)
  acc_t* keys;    // key_operands_size(Dp): K, K^T, V^T, K^T in acc_t (backward_load_keys)
  acc_t* dt;      // 2 (Dp, kTile): transposed dO and O, for delta
  acc_t* dk;      // (kTile, Dp)
  acc_t* dv;      // (kTile, Dp)
  score_t* sp;    // (kTile, kTile) scores
  acc_t* p;       // (kTile, kTile)
  acc_t* ds;      // (kTile, kTile) dP, overwritten by dS
  acc_t* dq;      // (round_up(T, kTile), Dp) for a whole head, (kTile, Dp) for kQueries

  // The same memory for scores summed in acc_t (q itself is then qs).
  BackwardScratch<scalar_t, acc_t> narrow() const {
    return {q, q, dout, keys, dt, dk, dv, reinterpret_cast<acc_t*>(sp), p, ds, dq};
  }
};

// ----------------------------------------------------------------------------------------
// Forward of one (batch*head, query tile): online softmax over key tiles 0..tile.
//
// Scores are computed transposed, S^T = scale (K Q^T) with keys as rows: Q^T is transposed
// once per query tile (not K once per tile pair), and the softmax statistics of a query are
// then column reductions, which run over contiguous rows of S^T vectorised across queries.
// The products are summed in score_t and scaled before the one rounding to acc_t (see
// ScoreType). O += P V reads P from P^T (kTransA).

template <typename scalar_t, typename Isa, typename score_t>
PIPELINE_ALWAYS_INLINE void forward_tile_scores(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<scalar_t, score_t>& s) {
  using acc_t = acc_type<scalar_t>;
  using lse_t = score_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);

  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  const int64_t q_cols = round_up(rows, kColBlock);  // query columns of S^T computed

  constexpr bool kBf16Dot = uses_bf16_dot<scalar_t, Isa>();
  if constexpr (kBf16Dot) {
    load_words<true>(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.qw);
  } else {
    load_tile_transposed<Isa>(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.qt);
  }
  fill(s.o, kTile * Dp, acc_t(0));
  fill(s.row_max, kTile, -std::numeric_limits<score_t>::infinity());
  fill(s.row_sum, kTile, acc_t(0));

  for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
    const bool diagonal = kv_tile == tile;
    const int64_t col0 = kv_tile * kTile;
    const int64_t cols = std::min(kTile, T - col0);  // keys
    const auto [v_tile, ld_v] = tile_operand(args.v, bh, col0, cols, D, Dp, s.v);

    // S^T = scale (K Q^T). On the diagonal tile, register tiles whose keys all come after
    // their queries are skipped; the loops below never read them (they read query m >= key n
    // rounded down to kColBlock, inside the register tiles computed).
    if constexpr (kBf16Dot) {
      load_words<false>(args.k.row(bh, col0), args.k.row_stride, cols, D, Dp, s.kw);
      tile_matmul_bf16<Causal::kUpperC>(diagonal, round_up(cols, 8), q_cols, Dp / 2, s.kw,
                                        Dp / 2, s.qw, kTile, s.sst, kTile);
      for (int64_t n = 0; n < cols; ++n) {
        score_t* __restrict st = s.sst + n * kTile;
#pragma omp simd
        for (int64_t m = diagonal ? n / kColBlock * kColBlock : 0; m < q_cols; ++m) {
          st[m] *= args.scale;
        }
      }
    } else {
      const auto [k_tile, ld_k] = tile_operand(args.k, bh, col0, cols, D, Dp, s.k);
      tile_matmul<Isa, Causal::kUpperC, false, false>(diagonal, cols, q_cols, Dp, k_tile, ld_k,
                                                      s.qt, kTile, s.sst, kTile,
                                                      static_cast<score_t>(args.scale));
    }

    // Online softmax, one query per column: new running max, P^T = exp(S^T - max), sums.
    // Key n is visible to the queries m >= n of a diagonal tile, to all queries otherwise.
    // The differences s - max are formed in score_t and rounded once to acc_t: P keeps the
    // accuracy of the scores however large they are (see ScoreType). On the diagonal tile,
    // the loops of key n start at the kColBlock boundary below n, in whole vectors, after the
    // scores there of the queries that may not see it (m < n) are set to -inf, whose exp is
    // 0 (started at n, each row ended in a partial vector).
    score_t m_new[kTile];
    acc_t sum[kTile];
    std::copy(s.row_max, s.row_max + q_cols, m_new);
    fill(sum, q_cols, acc_t(0));
    if (diagonal) {
      for (int64_t n = 0; n < cols; ++n) {
        fill(s.sst + n * kTile + n / kColBlock * kColBlock, n % kColBlock,
             -std::numeric_limits<score_t>::infinity());
      }
    }
    for (int64_t n = 0; n < cols; ++n) {
      const score_t* __restrict st = s.sst + n * kTile;
#pragma omp simd
      for (int64_t m = diagonal ? n / kColBlock * kColBlock : 0; m < q_cols; ++m) {
        // std::max's semantics, written out: std::max, defined outside the optimize pragma
        // above, would not be inlined here (nor vectorised).
        m_new[m] = m_new[m] < st[m] ? st[m] : m_new[m];
      }
    }
    for (int64_t n = 0; n < cols; ++n) {
      const score_t* __restrict st = s.sst + n * kTile;
      acc_t* __restrict p = s.st + n * kTile;
      const int64_t first = diagonal ? n / kColBlock * kColBlock : 0;
      fill(p, first, acc_t(0));
      if constexpr (std::is_same_v<score_t, acc_t>) {
#pragma omp simd
        for (int64_t m = first; m < q_cols; ++m) {
          const acc_t e = softmax_exp(st[m] - m_new[m]);
          p[m] = e;
          sum[m] += e;
        }
        continue;
      }
      // Two loops: with score_t and acc_t mixed in one, GCC leaves the exp scalar.
#pragma omp simd
      for (int64_t m = first; m < q_cols; ++m) {
        p[m] = static_cast<acc_t>(st[m] - m_new[m]);
      }
#pragma omp simd
      for (int64_t m = first; m < q_cols; ++m) {
        const acc_t e = softmax_exp(p[m]);
        p[m] = e;
        sum[m] += e;
      }
    }
    // Rescale by alpha = exp(old max - new max), 0 on the first tile (-inf - max).
    acc_t alpha[kTile];
#pragma omp simd
    for (int64_t m = 0; m < rows; ++m) {
      alpha[m] = static_cast<acc_t>(s.row_max[m] - m_new[m]);
    }
#pragma omp simd
    for (int64_t m = 0; m < rows; ++m) {  // apart, as above
      alpha[m] = softmax_exp(alpha[m]);
      s.row_sum[m] = s.row_sum[m] * alpha[m] + sum[m];
    }
    std::copy(m_new, m_new + rows, s.row_max);
    for (int64_t m = 0; m < rows; ++m) {
      if (alpha[m] != acc_t(1)) {
        acc_t* __restrict o = s.o + m * Dp;
        const acc_t a = alpha[m];
#pragma omp simd
        for (int64_t d = 0; d < Dp; ++d) {
          o[d] *= a;
        }
      }
    }

    // O += P V
    tile_matmul<Isa, Causal::kLowerA, true, true>(diagonal, rows, Dp, cols, s.st, kTile, v_tile,
                                                  ld_v, s.o, Dp);
  }

  scalar_t* __restrict out = args.out.row(bh, row0);
  const int64_t ld_out = args.out.row_stride;
  lse_t* __restrict lse = args.lse + bh * T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t inv_sum = acc_t(1) / s.row_sum[r];
    const acc_t* __restrict o = s.o + r * Dp;
    for (int64_t d = 0; d < D; ++d) {
      out[r * ld_out + d] = from_acc<scalar_t>(o[d] * inv_sum);
    }
    lse[r] = static_cast<lse_t>(s.row_max[r]) + std::log(static_cast<lse_t>(s.row_sum[r]));
  }
}

// The forward of a query tile, its scores summed in acc_t where they are small enough.
template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void forward_tile(
    const ForwardArgs<scalar_t>& args, int64_t bh, int64_t tile,
    const ForwardScratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (!std::is_same_v<acc_t, score_type<scalar_t>>) {
    const int64_t end = std::min(args.T, (tile + 1) * kTile);
    if (!needs_wide_scores<Isa>(args.q, args.k, bh, tile * kTile, end, args.D, args.scale)) {
      forward_tile_scores<scalar_t, Isa, acc_t>(args, bh, tile, s.narrow());
      return;
    }
  }
  forward_tile_scores<scalar_t, Isa, score_type<scalar_t>>(args, bh, tile, s);
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
//             dV of one key tile (query tiles in the inner loop), then dQ of one query tile.
//             Where the memory allows (args.dq_partials), a kKeys item also keeps each
//             pair's dS K, and a kQueries item sums them: 5 matmuls per pair. Else a kQueries
//             item computes P and dS again (key tiles in the inner loop): 7 matmuls per pair.
// Every sum runs in the same order in both splits (dK, dV over increasing query tiles, dQ
// over increasing key tiles, one blocked accumulation per pair: a kept product is that
// block), so the results are bitwise identical whichever is used, and do not depend on the
// number of threads.
enum class BackwardItem { kHead, kPrepare, kKeys, kQueries };

// The operands of one key tile, one after the other in a block of acc_t elements: K
// (kTile, Dp) for dQ, K^T (Dp, kTile) in score_type for the scores, V^T (Dp, kTile) for dP
// and, where score_type is wider than acc_t, K^T in acc_t for heads whose scores are summed
// in it (the split backward prepares both: its kPrepare items run before the type of a head
// is known).
template <typename scalar_t>
constexpr int64_t kScoreElements = sizeof(score_type<scalar_t>) / sizeof(acc_type<scalar_t>);

// Elements (acc_t) of the operands of one key tile.
template <typename scalar_t>
inline int64_t key_operands_size(int64_t Dp) {
  return (2 + kScoreElements<scalar_t> + (kScoreElements<scalar_t> > 1 ? 1 : 0)) * kTile * Dp;
}

template <typename scalar_t, typename score_t>
struct KeyOperands {
  const acc_type<scalar_t>* k;
  const score_t* kt;
  const acc_type<scalar_t>* vt;
};

// Where the operands of the block at `base` lie (the block is 64-byte aligned, and so are
// its parts: kTile * Dp * sizeof(acc_t) is a multiple of 64).
template <typename scalar_t, typename score_t>
PIPELINE_ALWAYS_INLINE int64_t key_transpose_offset(int64_t Dp) {
  const int64_t n = kTile * Dp;
  return std::is_same_v<score_t, score_type<scalar_t>> ? n : (2 + kScoreElements<scalar_t>) * n;
}

template <typename scalar_t, typename score_t>
PIPELINE_ALWAYS_INLINE KeyOperands<scalar_t, score_t> key_operands(
    const acc_type<scalar_t>* base, int64_t Dp) {
  const int64_t n = kTile * Dp;
  const acc_type<scalar_t>* kt = base + key_transpose_offset<scalar_t, score_t>(Dp);
  return {base, reinterpret_cast<const score_t*>(kt), base + (1 + kScoreElements<scalar_t>) * n};
}

// delta_i = rowsum(dO_i * O_i) for one query tile, computed like the matmul dP = dO V^T
// computes each element (one multiply-add chain over d, vectorised across rows, not a tree
// reduction over d): where one key dominates a row, O_i ~ V_j, and the rounding errors of
// dP_ij and delta_i then cancel in dS = P (dP - delta) (exactly for the first row, where
// O_0 = V_0).
template <typename Isa, typename scalar_t, typename score_t>
PIPELINE_ALWAYS_INLINE void backward_delta(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile,
    const BackwardScratch<scalar_t, score_t>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  acc_t* __restrict dout_t = s.dt;
  acc_t* __restrict out_t = s.dt + Dp * kTile;
  load_tile_transposed<Isa>(args.grad_out.row(bh, row0), args.grad_out.row_stride, rows, D, Dp,
                            dout_t);
  load_tile_transposed<Isa>(args.out.row(bh, row0), args.out.row_stride, rows, D, Dp, out_t);
  acc_t delta[kTile] = {};
  for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
    for (int64_t r = 0; r < kTile; ++r) {
      delta[r] += dout_t[d * kTile + r] * out_t[d * kTile + r];
    }
  }
  std::copy(delta, delta + rows, args.delta + bh * T + row0);
}

// Key tile operands (KeyOperands) into the block at dst, K^T in each of score_ts.
template <typename Isa, typename scalar_t, typename... score_ts>
PIPELINE_ALWAYS_INLINE void backward_load_keys(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    acc_type<scalar_t>* dst) {
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t col0 = kv_tile * kTile;
  const int64_t cols = std::min(kTile, args.T - col0);
  const scalar_t* k = args.k.row(bh, col0);
  const int64_t n = kTile * Dp;
  load_tile(k, args.k.row_stride, cols, D, Dp, dst);
  (load_tile_transposed<Isa>(
       k, args.k.row_stride, cols, D, Dp,
       reinterpret_cast<score_ts*>(dst + key_transpose_offset<scalar_t, score_ts>(Dp))),
   ...);
  load_tile_transposed<Isa>(args.v.row(bh, col0), args.v.row_stride, cols, D, Dp,
                            dst + (1 + kScoreElements<scalar_t>) * n);
}

// The key operands of a tile: the prepared ones (split backward) or loaded into scratch.
template <typename Isa, typename scalar_t, typename score_t>
PIPELINE_ALWAYS_INLINE const acc_type<scalar_t>* backward_key_operands(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    const BackwardScratch<scalar_t, score_t>& s) {
  if (args.key_operands != nullptr) {
    const int64_t num_tiles = (args.T + kTile - 1) / kTile;
    const int64_t size = key_operands_size<scalar_t>(round_up(args.D, kColBlock));
    return args.key_operands + (bh * num_tiles + kv_tile) * size;
  }
  backward_load_keys<Isa, scalar_t, score_t>(args, bh, kv_tile, s.keys);
  return s.keys;
}

// Query tile operands (tile_operand: read in place or loaded into scratch): Q as acc_t for
// dK and as score_t for the scores, and dO.
template <typename scalar_t, typename score_t>
struct QueryOperands {
  std::pair<const acc_type<scalar_t>*, int64_t> q;
  std::pair<const score_t*, int64_t> qs;
  std::pair<const acc_type<scalar_t>*, int64_t> dout;
};

template <typename scalar_t, typename score_t>
PIPELINE_ALWAYS_INLINE QueryOperands<scalar_t, score_t> backward_load_queries(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile,
    const BackwardScratch<scalar_t, score_t>& s) {
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, args.T - row0);
  QueryOperands<scalar_t, score_t> ops;
  ops.q = tile_operand(args.q, bh, row0, rows, D, Dp, s.q);
  if constexpr (std::is_same_v<acc_type<scalar_t>, score_t>) {
    ops.qs = ops.q;
  } else {
    ops.qs = tile_operand(args.q, bh, row0, rows, D, Dp, s.qs);
  }
  ops.dout = tile_operand(args.grad_out, bh, row0, rows, D, Dp, s.dout);
  return ops;
}

// g . (v - o) for rows of length D, in acc_t.
template <typename scalar_t>
PIPELINE_ALWAYS_INLINE acc_type<scalar_t> dot_with_difference(const scalar_t* __restrict g,
                                                              const scalar_t* __restrict v,
                                                              const scalar_t* __restrict o,
                                                              int64_t D) {
  using acc_t = acc_type<scalar_t>;
  acc_t sum = 0;
  for (int64_t d = 0; d < D; ++d) {
    sum += to_acc<acc_t>(g, d) * (to_acc<acc_t>(v, d) - to_acc<acc_t>(o, d));
  }
  return sum;
}

// One (query tile, key tile) pair, query operands `query` (backward_load_queries) and key
// operands at `keys` (backward_load_keys). kKeys: dV += P^T dO and dK += dS^T Q into s.dv,
// s.dk (dK times scale later); kQueries: dQ += dS K into dq (times scale later).
template <bool kKeys, bool kQueries, typename scalar_t, typename Isa, typename score_t>
PIPELINE_ALWAYS_INLINE void backward_pair(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t q_tile, int64_t kv_tile,
    const QueryOperands<scalar_t, score_t>& query, const acc_type<scalar_t>* keys,
    const BackwardScratch<scalar_t, score_t>& s, acc_type<scalar_t>* dq) {
  using acc_t = acc_type<scalar_t>;
  using lse_t = score_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t Dp = round_up(args.D, kColBlock);
  const bool diagonal = q_tile == kv_tile;
  const int64_t row0 = q_tile * kTile;
  const int64_t rows = std::min(kTile, T - row0);
  const int64_t cols = std::min(kTile, T - kv_tile * kTile);
  const int64_t n_cols = round_up(cols, kColBlock);
  const lse_t* __restrict lse = args.lse + bh * T + row0;
  const acc_t* __restrict delta = args.delta + bh * T + row0;
  const KeyOperands<scalar_t, score_t> key = key_operands<scalar_t, score_t>(keys, Dp);

  // P = exp(scale (Q K^T) - lse), the scores summed and scaled as in the forward and s - lse
  // formed in lse_t before the one rounding to acc_t (see ScoreType). The scale is applied
  // here rather than by the matmul: held in a register through the product, it made GCC
  // spill an accumulator of this one (a store and a reload on every step of the sum).
  tile_matmul<Isa, Causal::kLowerC, false, false>(diagonal, rows, n_cols, Dp, query.qs.first,
                                                  query.qs.second, key.kt, kTile, s.sp, kTile);
  // Row r of a diagonal tile sees keys [0, r + 1); its loops run in whole vectors, to the
  // kColBlock boundary above r (scores the product computed too), and what they compute past
  // r + 1 is then zeroed, in P and in dS.
  const score_t scale = args.scale;
  for (int64_t r = 0; r < rows; ++r) {
    score_t* __restrict sp = s.sp + r * kTile;
    acc_t* __restrict p = s.p + r * kTile;
    const int64_t valid = diagonal ? r + 1 : cols;
    const int64_t computed = diagonal ? round_up(r + 1, kColBlock) : cols;
    const lse_t row_lse = lse[r];
    // Apart: in one expression GCC would fuse the scaling and the subtraction into one
    // multiply-add, which does not round the score as the forward does.
#pragma omp simd
    for (int64_t c = 0; c < computed; ++c) {
      sp[c] *= scale;
    }
#pragma omp simd
    for (int64_t c = 0; c < computed; ++c) {
      p[c] = static_cast<acc_t>(static_cast<lse_t>(sp[c]) - row_lse);
    }
#pragma omp simd
    for (int64_t c = 0; c < computed; ++c) {  // apart: see forward_tile
      p[c] = softmax_exp(p[c]);
    }
    fill(p + valid, n_cols - valid, acc_t(0));
  }

  // dV += P^T dO
  if constexpr (kKeys) {
    tile_matmul<Isa, Causal::kLowerAT, true, true>(diagonal, n_cols, Dp, rows, s.p, kTile,
                                                   query.dout.first, query.dout.second, s.dv,
                                                   Dp);
  }

  // dP = dO V^T;  dS = P * (dP - delta); where one key holds most of a row's probability,
  // dP - delta (delta = dO . O) cancels to a small difference of two sums of D products,
  // each rounded: there it is formed as dO . (V_j - O) instead (same value, no cancellation:
  // V_j - O is small and exact where they are close). At most one key per row qualifies.
  tile_matmul<Isa, Causal::kLowerC, false, false>(diagonal, rows, n_cols, Dp, query.dout.first,
                                                  query.dout.second, key.vt, kTile, s.ds,
                                                  kTile);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* __restrict ds = s.ds + r * kTile;
    const acc_t* __restrict p = s.p + r * kTile;
    const int64_t valid = diagonal ? r + 1 : cols;
    const int64_t computed = diagonal ? round_up(r + 1, kColBlock) : cols;
    const acc_t row_delta = delta[r];
    acc_t p_max = 0;
#pragma omp simd reduction(max : p_max)
    for (int64_t c = 0; c < computed; ++c) {  // P is 0 past `valid`
      ds[c] = p[c] * (ds[c] - row_delta);
      p_max = p_max < p[c] ? p[c] : p_max;
    }
    fill(ds + valid, n_cols - valid, acc_t(0));
    if (p_max > acc_t(0.5)) {
      int64_t c = 0;
      while (p[c] != p_max) {
        ++c;
      }
      ds[c] = p[c] * dot_with_difference(args.grad_out.row(bh, row0 + r),
                                         args.v.row(bh, kv_tile * kTile + c),
                                         args.out.row(bh, row0 + r), args.D);
    }
  }

  // dK += dS^T Q;  dQ += dS K
  if constexpr (kKeys) {
    tile_matmul<Isa, Causal::kLowerAT, true, true>(diagonal, n_cols, Dp, rows, s.ds, kTile,
                                                   query.q.first, query.q.second, s.dk, Dp);
  }
  if constexpr (kQueries) {
    tile_matmul<Isa, Causal::kLowerA, false, true>(diagonal, rows, Dp, cols, s.ds, kTile,
                                                   key.k, Dp, dq, Dp);
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
      dst[r * ld + d] = from_acc<scalar_t>(src[r * Dp + d] * scale);
    }
  }
}

// Elements of the dQ products kept for one head: num_tiles (num_tiles + 1) / 2 tile pairs.
inline int64_t dq_partials_size(int64_t num_tiles, int64_t Dp) {
  return num_tiles * (num_tiles + 1) / 2 * kTile * Dp;
}

// The kept dQ products of key tile kv_tile of head bh: query tiles kv_tile.. in order.
template <typename acc_t>
PIPELINE_ALWAYS_INLINE acc_t* dq_partials_block(acc_t* partials, int64_t bh, int64_t kv_tile,
                                                int64_t num_tiles, int64_t Dp) {
  const int64_t tiles_before = kv_tile * num_tiles - kv_tile * (kv_tile - 1) / 2;
  return partials + bh * dq_partials_size(num_tiles, Dp) + tiles_before * kTile * Dp;
}

// dK, dV of key tile kv_tile over query tiles kv_tile..; with kWithDq also dQ += dS K into
// dq, whose first (kTile, Dp) block is query tile kv_tile's, the next ones the following.
template <bool kWithDq, typename scalar_t, typename Isa, typename score_t>
PIPELINE_ALWAYS_INLINE void backward_keys(
    const BackwardArgs<scalar_t>& args, int64_t bh, int64_t kv_tile,
    const BackwardScratch<scalar_t, score_t>& s, acc_type<scalar_t>* dq) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  const acc_t* keys = backward_key_operands<Isa>(args, bh, kv_tile, s);
  fill(s.dk, kTile * Dp, acc_t(0));
  fill(s.dv, kTile * Dp, acc_t(0));
  for (int64_t q_tile = kv_tile; q_tile < num_tiles; ++q_tile) {
    const QueryOperands<scalar_t, score_t> query = backward_load_queries(args, bh, q_tile, s);
    acc_type<scalar_t>* dq_rows = kWithDq ? dq + (q_tile - kv_tile) * kTile * Dp : nullptr;
    backward_pair<true, kWithDq, scalar_t, Isa, score_t>(args, bh, q_tile, kv_tile, query, keys,
                                                         s, dq_rows);
  }
  const int64_t col0 = kv_tile * kTile;
  const int64_t cols = std::min(kTile, T - col0);
  store_tile(s.dk, cols, D, Dp, args.dk.row(bh, col0), args.dk.row_stride, args.scale);
  store_tile(s.dv, cols, D, Dp, args.dv.row(bh, col0), args.dv.row_stride);
}

template <typename scalar_t, typename Isa, typename score_t>
PIPELINE_ALWAYS_INLINE void backward_item_scores(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<scalar_t, score_t>& s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = args.T;
  const int64_t D = args.D;
  const int64_t Dp = round_up(D, kColBlock);
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  switch (item) {
    case BackwardItem::kHead: {
      for (int64_t q_tile = 0; q_tile < num_tiles; ++q_tile) {
        backward_delta<Isa>(args, bh, q_tile, s);
      }
      fill(s.dq, num_tiles * kTile * Dp, acc_t(0));
      for (int64_t kv_tile = 0; kv_tile < num_tiles; ++kv_tile) {
        backward_keys<true, scalar_t, Isa, score_t>(args, bh, kv_tile, s,
                                                    s.dq + kv_tile * kTile * Dp);
      }
      store_tile(s.dq, T, D, Dp, args.dq.row(bh, 0), args.dq.row_stride, args.scale);
      break;
    }
    case BackwardItem::kPrepare:  // see backward_prepare
      break;
    case BackwardItem::kKeys:
      if (args.dq_partials != nullptr) {
        acc_t* dq = dq_partials_block(args.dq_partials, bh, tile, num_tiles, Dp);
        fill(dq, (num_tiles - tile) * kTile * Dp, acc_t(0));
        backward_keys<true, scalar_t, Isa, score_t>(args, bh, tile, s, dq);
      } else {
        backward_keys<false, scalar_t, Isa, score_t>(args, bh, tile, s, nullptr);
      }
      break;
    case BackwardItem::kQueries: {
      fill(s.dq, kTile * Dp, acc_t(0));
      if (args.dq_partials != nullptr) {  // the kept products, in the order kHead adds them
        for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
          const acc_t* __restrict part =
              dq_partials_block(args.dq_partials, bh, kv_tile, num_tiles, Dp) +
              (tile - kv_tile) * kTile * Dp;
          acc_t* __restrict dq = s.dq;
#pragma omp simd
          for (int64_t i = 0; i < kTile * Dp; ++i) {
            dq[i] += part[i];
          }
        }
      } else {
        const QueryOperands<scalar_t, score_t> query = backward_load_queries(args, bh, tile, s);
        for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
          const acc_t* keys = backward_key_operands<Isa>(args, bh, kv_tile, s);
          backward_pair<false, true, scalar_t, Isa, score_t>(args, bh, tile, kv_tile, query,
                                                             keys, s, s.dq);
        }
      }
      const int64_t rows = std::min(kTile, T - tile * kTile);
      store_tile(s.dq, rows, D, Dp, args.dq.row(bh, tile * kTile), args.dq.row_stride,
                 args.scale);
      break;
    }
  }
}

// A kPrepare item of the split backward: delta and the key operands of one tile (K^T in
// both score types where there are two), and the tile's largest squared row norms of Q and K.
template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_prepare(const BackwardArgs<scalar_t>& args, int64_t bh,
                                             int64_t tile, const BackwardScratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  using score_t = score_type<scalar_t>;
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t size = key_operands_size<scalar_t>(round_up(args.D, kColBlock));
  acc_t* keys = args.key_operands + (bh * num_tiles + tile) * size;
  backward_delta<Isa>(args, bh, tile, s);
  if constexpr (std::is_same_v<acc_t, score_t>) {
    backward_load_keys<Isa, scalar_t, score_t>(args, bh, tile, keys);
  } else {
    backward_load_keys<Isa, scalar_t, score_t, acc_t>(args, bh, tile, keys);
    const int64_t row0 = tile * kTile;
    const int64_t end = std::min(args.T, row0 + kTile);
    acc_t* norms = args.tile_norms_sq + (bh * num_tiles + tile) * 2;
    norms[0] = max_row_norm_sq<Isa>(args.q, bh, row0, end, args.D);
    norms[1] = max_row_norm_sq<Isa>(args.k, bh, row0, end, args.D);
  }
}

// Whether head bh sums its scores in score_type in the backward: from the kPrepare items'
// tile norms in the split backward, else from the rows themselves (the same maxima).
template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE bool backward_wide_scores(const BackwardArgs<scalar_t>& args,
                                                 int64_t bh) {
  if (args.tile_norms_sq == nullptr) {
    return needs_wide_scores<Isa>(args.q, args.k, bh, 0, args.T, args.D, args.scale);
  }
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const acc_type<scalar_t>* norms = args.tile_norms_sq + bh * num_tiles * 2;
  acc_type<scalar_t> q_norm_sq = 0;
  acc_type<scalar_t> k_norm_sq = 0;
  for (int64_t t = 0; t < num_tiles; ++t) {
    q_norm_sq = norms[2 * t] <= q_norm_sq ? q_norm_sq : norms[2 * t];
    k_norm_sq = norms[2 * t + 1] <= k_norm_sq ? k_norm_sq : norms[2 * t + 1];
  }
  return exceeds_narrow_bound(q_norm_sq, k_norm_sq, args.scale);
}

// A backward item, the scores summed in acc_t where every score of the head is small enough
// (one decision per head: the forward's per query tile would need K^T in both types).
template <typename scalar_t, typename Isa>
PIPELINE_ALWAYS_INLINE void backward_item(
    const BackwardArgs<scalar_t>& args, BackwardItem item, int64_t bh, int64_t tile,
    const BackwardScratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  if (item == BackwardItem::kPrepare) {
    backward_prepare<scalar_t, Isa>(args, bh, tile, s);
    return;
  }
  if constexpr (!std::is_same_v<acc_t, score_type<scalar_t>>) {
    if (!backward_wide_scores<scalar_t, Isa>(args, bh)) {
      backward_item_scores<scalar_t, Isa, acc_t>(args, item, bh, tile, s.narrow());
      return;
    }
  }
  backward_item_scores<scalar_t, Isa, score_type<scalar_t>>(args, item, bh, tile, s);
}

// ----------------------------------------------------------------------------------------
// Per-ISA entry points, declared for the dispatcher (causal_attention.cpp) and defined by
// PIPELINE_DEFINE_ENTRY_POINTS in one translation unit per instruction set
// (causal_attention_<isa>.cpp), so that the build compiles them in parallel. The bodies above
// are always_inline, so each entry point is compiled entirely with its own target options
// (and this header's no-trapping-math: callgrind counts the same instructions for the AVX2
// forward as when the entry points were defined inside this header). Declarations carry the
// same target attribute as the definitions (GCC would otherwise take a differently-targeted
// definition for a second version of the function).

#define PIPELINE_TARGET_DEFAULT
#define PIPELINE_DECLARE_ENTRY_POINTS(isa, TARGET)                                       \
  template <typename scalar_t>                                                           \
  TARGET void forward_tile_##isa(const ForwardArgs<scalar_t>& args, int64_t bh,          \
                                 int64_t tile, const ForwardScratch<scalar_t>& s);       \
  template <typename scalar_t>                                                           \
  TARGET void backward_item_##isa(const BackwardArgs<scalar_t>& args, BackwardItem item, \
                                  int64_t bh, int64_t tile,                              \
                                  const BackwardScratch<scalar_t>& s);

PIPELINE_DECLARE_ENTRY_POINTS(default, PIPELINE_TARGET_DEFAULT)
PIPELINE_DECLARE_ENTRY_POINTS(avx2, PIPELINE_TARGET_AVX2)
PIPELINE_DECLARE_ENTRY_POINTS(avx512, PIPELINE_TARGET_AVX512)

// bfloat16 only: the other dtypes have no bf16 products and use forward_tile_avx512.
PIPELINE_TARGET_AVX512_BF16 void forward_tile_avx512_bf16(
    const ForwardArgs<c10::BFloat16>& args, int64_t bh, int64_t tile,
    const ForwardScratch<c10::BFloat16>& s);

// The definitions and their instantiations for every dtype the op takes.
#define PIPELINE_INSTANTIATE_ENTRY_POINTS(isa, TARGET, scalar_t)                           \
  template TARGET void forward_tile_##isa<scalar_t>(                                     \
      const ForwardArgs<scalar_t>&, int64_t, int64_t, const ForwardScratch<scalar_t>&);  \
  template TARGET void backward_item_##isa<scalar_t>(const BackwardArgs<scalar_t>&,      \
                                                     BackwardItem, int64_t, int64_t,     \
                                                     const BackwardScratch<scalar_t>&);
#define PIPELINE_DEFINE_ENTRY_POINTS(isa, TARGET, Isa)                                    \
  template <typename scalar_t>                                                           \
  TARGET void forward_tile_##isa(const ForwardArgs<scalar_t>& args, int64_t bh,          \
                                 int64_t tile, const ForwardScratch<scalar_t>& s) {      \
    forward_tile<scalar_t, Isa>(args, bh, tile, s);                                      \
  }                                                                                      \
  template <typename scalar_t>                                                           \
  TARGET void backward_item_##isa(const BackwardArgs<scalar_t>& args, BackwardItem item, \
                                  int64_t bh, int64_t tile,                              \
                                  const BackwardScratch<scalar_t>& s) {                  \
    backward_item<scalar_t, Isa>(args, item, bh, tile, s);                               \
  }                                                                                      \
  PIPELINE_INSTANTIATE_ENTRY_POINTS(isa, TARGET, float)                                  \
  PIPELINE_INSTANTIATE_ENTRY_POINTS(isa, TARGET, double)                                 \
  PIPELINE_INSTANTIATE_ENTRY_POINTS(isa, TARGET, c10::BFloat16)                          \
  PIPELINE_INSTANTIATE_ENTRY_POINTS(isa, TARGET, c10::Half)

}  // namespace pipeline::attention

#pragma GCC pop_options
