// The softmax of the CPU attention kernels: its exp (softmax_exp) and the precision of the
// scores it is taken of (score_type; needs_wide_scores, which decides per query tile or head
// whether float32 scores may be summed in float). Kept together because the accuracy argument
// (ScoreType) spans both. The online softmax built on them (running max, rescaling of O) is
// the loop body of forward_tile_scores, and the backward's P = exp(s - lse) that of
// backward_pair (causal_attention_kernel.h), each a pass over its kernel's scratch tiles.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <immintrin.h>

#include "causal_attention_tiles.h"

PIPELINE_KERNEL_OPTIONS_BEGIN

namespace pipeline::attention {

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
// Whether the scores may be summed in float: bounds from the largest row norms of Q and K.
// The AVX2 norms (float data, where GCC does not vectorise the plain loop) carry their own
// target and are not forced inline, like the AVX2 transposes (causal_attention_tiles.h);
// max_row_norm_sq calls them only where Isa::kVectorBytes >= 32.

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

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
