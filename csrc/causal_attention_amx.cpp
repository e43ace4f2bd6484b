// The AMX bf16 forward (see causal_attention_amx.h). setup.py compiles this file with the
// AVX-512 one; the dispatcher uses it only where the CPU has AMX and Linux grants the tile
// state (amx_tile_state_granted).
#include "causal_attention_amx.h"

#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <limits>

PIPELINE_KERNEL_OPTIONS_BEGIN

namespace pipeline::attention {
namespace {

// Tile registers: 0-3 a 32 x 32 float block of C, 4-5 two 16-row blocks of A, 6-7 two
// 16-column blocks of B. All are 16 rows of 64 bytes (the largest tile).
struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// C (32 x 32 floats, ldc bytes apart) = or += A B, over `steps` products of depth kAmxDepth:
// A is 32 rows of bf16 pairs (lda bytes apart; a step is the next 64 bytes of each row), B
// is 16 rows of 32 words per step (ldb bytes apart; 16 columns per tile). Where a2 is not
// null, then += A2 B2 (same shapes) before C is stored.
template <bool kAccumulate>
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void tile_block_32x32(
    const void* a, int64_t lda, const void* b, int64_t ldb, int64_t steps, float* c,
    int64_t ldc, const void* a2 = nullptr, const void* b2 = nullptr) {
  const char* a_bytes = static_cast<const char*>(a);
  const char* b_bytes = static_cast<const char*>(b);
  char* c_bytes = reinterpret_cast<char*>(c);
  if constexpr (kAccumulate) {
    _tile_loadd(0, c_bytes, ldc);
    _tile_loadd(1, c_bytes + 64, ldc);
    _tile_loadd(2, c_bytes + 16 * ldc, ldc);
    _tile_loadd(3, c_bytes + 16 * ldc + 64, ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t part = 0; part < (a2 == nullptr ? 1 : 2); ++part) {
    if (part == 1) {
      a_bytes = static_cast<const char*>(a2);
      b_bytes = static_cast<const char*>(b2);
    }
    for (int64_t step = 0; step < steps; ++step) {
      _tile_loadd(4, a_bytes + 64 * step, lda);
      _tile_loadd(5, a_bytes + 16 * lda + 64 * step, lda);
      _tile_loadd(6, b_bytes + 16 * ldb * step, ldb);
      _tile_loadd(7, b_bytes + 16 * ldb * step + 64, ldb);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c_bytes, ldc);
  _tile_stored(1, c_bytes + 64, ldc);
  _tile_stored(2, c_bytes + 16 * ldc, ldc);
  _tile_stored(3, c_bytes + 16 * ldc + 64, ldc);
}

// Byte offsets of 16 rows ld elements apart, for gathers; the gathers below need them in
// int32 (ld below 2^25) and whole words (D even), else the scalar loops run.
PIPELINE_ALWAYS_INLINE bool gathers_fit(int64_t ld, int64_t D) {
  return D % 2 == 0 && ld < (int64_t{1} << 25);
}

PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 __m512i row_offsets(int64_t ld) {
  return _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int32_t>(ld * 2)));
}

// Word p (elements 2p, 2p + 1) of rows [r0, r0 + 16), 0 for rows past `rows` and words past
// D / 2 (D even).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 __m512i gather_words(
    const c10::BFloat16* src, int64_t ld, __m512i offsets, int64_t r0, int64_t rows, int64_t D,
    int64_t p) {
  const int64_t left = 2 * p < D ? rows - r0 : 0;
  if (left <= 0) {
    return _mm512_setzero_si512();
  }
  const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets,
                                     src + r0 * ld + 2 * p, 1);
}

// load_words<true> (Q^T as words, (Dp / 2, kTile)) with gathers, 16 rows at a time.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void load_words_transposed(
    const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, uint32_t* dst) {
  if (!gathers_fit(ld, D)) {
    load_words<true>(src, ld, rows, D, Dp, dst);
    return;
  }
  const __m512i offsets = row_offsets(ld);
  for (int64_t p = 0; p < Dp / 2; ++p) {
    for (int64_t r0 = 0; r0 < kTile; r0 += 16) {
      _mm512_storeu_si512(dst + p * kTile + r0, gather_words(src, ld, offsets, r0, rows, D, p));
    }
  }
}

// V rows [0, rows) (ld apart) transposed, (Dp, kTile) bf16, zero-padded: as words, keys 2j
// and 2j + 1 of column d at [d][j] (the low half is the even key), V^T's A operand layout.
// Gathers a word (two columns) of 16 rows at a time and splits its halves.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void load_transposed_bf16(
    const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, uint32_t* dst) {
  uint16_t* __restrict out = reinterpret_cast<uint16_t*>(dst);
  if (!gathers_fit(ld, D)) {
    const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < Dp; ++d) {
      const int64_t valid = d < D ? rows : 0;
      for (int64_t r = 0; r < valid; ++r) {
        out[d * kTile + r] = bits[r * ld + d];
      }
      fill(out + d * kTile + valid, kTile - valid, uint16_t{0});
    }
    return;
  }
  const __m512i offsets = row_offsets(ld);
  for (int64_t p = 0; p < Dp / 2; ++p) {
    for (int64_t r0 = 0; r0 < kTile; r0 += 16) {
      const __m512i words = gather_words(src, ld, offsets, r0, rows, D, p);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * p * kTile + r0),
                          _mm512_cvtepi32_epi16(words));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (2 * p + 1) * kTile + r0),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)));
    }
  }
}

// Two rows of P^T (keys 2j and 2j + 1, queries [m0, m0 + 16)) as bf16 word pairs, the B
// operand layout of O^T += V^T P^T.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 __m512i interleave_bf16(const float* even,
                                                                        const float* odd) {
  // cvtne2ps puts `even` in the low 16 bf16, `odd` in the high 16; then even[i], odd[i].
  const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(odd), _mm512_loadu_ps(even));
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(order, pairs);
}

// m_new (kTile) = the largest of each column of rows [0, cols) of scores (cols even), in
// registers: in memory each row's maxima waited for the previous row's stores.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void column_max(const float* scores,
                                                                int64_t cols, float* m_new) {
  constexpr int kVectors = kTile / 16;
  __m512 even[kVectors];
  __m512 odd[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    even[v] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    odd[v] = even[v];
  }
  for (int64_t n = 0; n < cols; n += 2) {
    const float* row = scores + n * kTile;
    for (int v = 0; v < kVectors; ++v) {
      even[v] = _mm512_max_ps(_mm512_loadu_ps(row + 16 * v), even[v]);
      odd[v] = _mm512_max_ps(_mm512_loadu_ps(row + kTile + 16 * v), odd[v]);
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    _mm512_storeu_ps(m_new + 16 * v, _mm512_max_ps(odd[v], even[v]));
  }
}

// The online softmax of one step's keys (one key tile, or two) on S^T (row = key n, column =
// query m), vectorised across queries as in forward_tile_scores: keys after a query on the
// diagonal set to -inf, running max and sums, the factors of O^T's columns (s.alpha), and
// P^T written as bf16 word pairs (s.p, (kTile / 2, kTile) per key tile, zero for keys >=
// cols). The scale (> 0) is applied to the step's largest score and inside the exp's
// argument, not in a pass of its own.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void softmax_columns(
    bool diagonal, int64_t cols, int64_t q_cols, float scale, const AmxForwardScratch& s) {
  float m_new[kTile];
  float sum[kTile];
  fill(sum, q_cols, 0.0f);
  if (!diagonal && q_cols == kTile && cols % 2 == 0) {  // whole tiles: most steps
    column_max(s.s, cols, m_new);
  } else {
    fill(m_new, q_cols, -std::numeric_limits<float>::infinity());
    for (int64_t n = 0; n < cols; ++n) {
      float* __restrict st = s.s + n * kTile;
      const int64_t first = diagonal ? n / 16 * 16 : 0;  // the columns computed for key n
      if (diagonal) {
        fill(st + first, n - first, -std::numeric_limits<float>::infinity());
      }
#pragma omp simd
      for (int64_t m = first; m < q_cols; ++m) {
        m_new[m] = m_new[m] < st[m] ? st[m] : m_new[m];
      }
    }
  }
#pragma omp simd
  for (int64_t m = 0; m < q_cols; ++m) {
    const float tile_max = m_new[m] * scale;
    m_new[m] = s.row_max[m] < tile_max ? tile_max : s.row_max[m];
  }
  const int64_t key_rows = round_up(cols, kTile);
  // Keys 2j and 2j + 1 at once: their exps are packed as bf16 pairs as soon as they are
  // stored, in the same pass over S^T.
  for (int64_t j = 0; j < key_rows / 2; ++j) {
    float* __restrict even = s.s + 2 * j * kTile;
    float* __restrict odd = even + kTile;
    if (2 * j >= cols) {
      fill(s.p + j * kTile, q_cols, uint32_t{0});
      continue;
    }
    const bool has_odd = 2 * j + 1 < cols;
    const int64_t first = diagonal ? 2 * j / 16 * 16 : 0;
    fill(even, first, 0.0f);
    fill(odd, first, 0.0f);
#pragma omp simd
    for (int64_t m = first; m < q_cols; ++m) {
      const float e0 = softmax_exp(even[m] * scale - m_new[m]);
      const float e1 = has_odd ? softmax_exp(odd[m] * scale - m_new[m]) : 0.0f;
      even[m] = e0;
      odd[m] = e1;
      sum[m] += e0;
      sum[m] += e1;
    }
    for (int64_t m = 0; m < q_cols; m += 16) {
      _mm512_storeu_si512(s.p + j * kTile + m, interleave_bf16(even + m, odd + m));
    }
  }
#pragma omp simd
  for (int64_t m = 0; m < q_cols; ++m) {
    s.alpha[m] = softmax_exp(s.row_max[m] - m_new[m]);  // 0 on the first key tile
    s.row_sum[m] = s.row_sum[m] * s.alpha[m] + sum[m];
    s.row_max[m] = m_new[m];
  }
}

// O^T = O^T alpha + (V^T P^T), column m scaled by alpha[m]: the tile pair's product is summed
// from zero on the tiles and added once (blocked, as the other kernels accumulate).
PIPELINE_ALWAYS_INLINE void rescale_and_add(int64_t Dp, int64_t q_cols,
                                            const AmxForwardScratch& s) {
  for (int64_t d = 0; d < Dp; ++d) {
    float* __restrict ot = s.o + d * kTile;
    const float* __restrict pv = s.pv + d * kTile;
#pragma omp simd
    for (int64_t m = 0; m < q_cols; ++m) {
      ot[m] = ot[m] * s.alpha[m] + pv[m];
    }
  }
}

// The step of `tiles` key tiles from kv_tile (2 only before the diagonal, where both are
// whole) for the query tile at row0: S^T = K Q^T, the softmax, O^T += V^T P^T. Two tiles
// at once give each block of P V 4 products of depth 32 between loading and storing its C
// tiles, and halve the rescaling of O^T. On the diagonal, 32-query blocks skip the key blocks
// after them.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void forward_key_tiles(
    const ForwardArgs<c10::BFloat16>& args, const AmxKeys& keys, int64_t bh, int64_t row0,
    int64_t kv_tile, int64_t tiles, int64_t query_blocks, const AmxForwardScratch& s) {
  const int64_t Dp = keys.Dp;
  const int64_t col0 = kv_tile * kTile;
  const bool diagonal = col0 == row0;
  const int64_t cols = std::min(tiles * kTile, args.T - col0);
  const int64_t key_blocks = (cols + 31) / 32;
  for (int64_t nb = 0; nb < key_blocks; ++nb) {
    const uint32_t* k_words = keys.block(bh, kv_tile + nb / 2) + nb % 2 * 32 * (Dp / 2);
    for (int64_t mb = diagonal ? nb : 0; mb < query_blocks; ++mb) {
      tile_block_32x32<false>(k_words, Dp * 2, s.q + mb * 32, kTile * 4, Dp / kAmxDepth,
                              s.s + nb * 32 * kTile + mb * 32, kTile * 4);
    }
  }
  softmax_columns(diagonal, cols, query_blocks * 32, args.scale, s);
  const uint32_t* vt_pairs = keys.block(bh, kv_tile) + kTile * Dp / 2;
  const uint32_t* vt_pairs2 = keys.block(bh, kv_tile + tiles - 1) + kTile * Dp / 2;
  for (int64_t db = 0; db < Dp / 32; ++db) {
    const int64_t a_offset = db * 32 * (kTile / 2);
    for (int64_t mb = 0; mb < query_blocks; ++mb) {
      const int64_t steps = diagonal ? std::min(mb + 1, key_blocks) : key_blocks;
      float* pv = s.pv + db * 32 * kTile + mb * 32;
      if (tiles == 2) {
        tile_block_32x32<false>(vt_pairs + a_offset, kTile * 2, s.p + mb * 32, kTile * 4, 2, pv,
                                kTile * 4, vt_pairs2 + a_offset,
                                s.p + kTile / 2 * kTile + mb * 32);
      } else {
        tile_block_32x32<false>(vt_pairs + a_offset, kTile * 2, s.p + mb * 32, kTile * 4, steps,
                                pv, kTile * 4);
      }
    }
  }
  rescale_and_add(Dp, query_blocks * 32, s);
}

// out = O^T / row sums, rounded once to bf16 (to nearest even, in vectors down O^T's rows;
// float subnormals flush to 0) and transposed back to rows; lse = max + log(sum).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void store_output(
    const ForwardArgs<c10::BFloat16>& args, int64_t bh, int64_t row0, int64_t rows,
    int64_t q_cols, const AmxForwardScratch& s) {
  float* __restrict inv_sum = s.alpha;  // free after the last key tile, as is s.pv
#pragma omp simd
  for (int64_t m = 0; m < q_cols; ++m) {
    inv_sum[m] = 1.0f / s.row_sum[m];
  }
  uint16_t* __restrict rounded = reinterpret_cast<uint16_t*>(s.pv);  // (D, kTile) bf16
  for (int64_t d = 0; d < args.D; ++d) {
    for (int64_t m = 0; m < q_cols; m += 16) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s.o + d * kTile + m),
                                     _mm512_loadu_ps(inv_sum + m));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + d * kTile + m),
                          (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
  // Column r of `rounded` by gathers of 16 words at bf16 r of rows d..d + 15: the low half
  // is the element, the high half (the next one; past the last row, still inside s.pv) is
  // dropped.
  const __m512i offsets = row_offsets(kTile);
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* __restrict out = reinterpret_cast<uint16_t*>(args.out.row(bh, row0 + r));
    for (int64_t d0 = 0; d0 < args.D; d0 += 16) {
      const int64_t n = std::min<int64_t>(16, args.D - d0);
      const __mmask16 mask = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets,
                                                        rounded + d0 * kTile + r, 1);
      _mm256_mask_storeu_epi16(out + d0, mask, _mm512_cvtepi32_epi16(words));
    }
  }
  float* __restrict lse = args.lse + bh * args.T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    lse[r] = s.row_max[r] + std::log(s.row_sum[r]);
  }
}

// ----------------------------------------------------------------------------------------
// Backward. Each (query tile, key tile) pair on S^T as in the forward (row = key): S^T = K
// Q^T and dP^T = V dO^T on the tiles, P^T = exp(scale S^T - lse) and dS^T = P^T (dP^T -
// delta) in AVX-512 float32 vectorised across queries, then dV += P^T dO, dK += dS^T Q and
// dQ^T += K^T dS^T on the tiles, P^T and dS^T rounded to bf16 for them (all sums float32).

// Rows [0, rows) of a (rows, D) bf16 matrix (ld apart) as pairs of rows, (kTile / 2, Dp)
// words, zero-padded: rows 2j and 2j + 1 of column d at [j][d] (the low half is the even
// row), the B operand layout of a product contracted over those rows. 32 columns at a time.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void load_row_pairs(
    const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, uint32_t* dst) {
  alignas(64) uint16_t low[32];
  alignas(64) uint16_t high[32];
  for (int i = 0; i < 16; ++i) {  // even[i], odd[i] from the even row (0-31), the odd (32-63)
    low[2 * i] = static_cast<uint16_t>(i);
    low[2 * i + 1] = static_cast<uint16_t>(32 + i);
    high[2 * i] = static_cast<uint16_t>(16 + i);
    high[2 * i + 1] = static_cast<uint16_t>(48 + i);
  }
  const __m512i low_order = _mm512_load_si512(low);
  const __m512i high_order = _mm512_load_si512(high);
  for (int64_t j = 0; j < kTile / 2; ++j) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
      const int64_t n = std::min<int64_t>(32, std::max<int64_t>(0, D - d0));
      const __mmask32 cols = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
      const __mmask32 even_cols = 2 * j < rows ? cols : 0;
      const __mmask32 odd_cols = 2 * j + 1 < rows ? cols : 0;
      const __m512i even = _mm512_maskz_loadu_epi16(even_cols, src + 2 * j * ld + d0);
      const __m512i odd = _mm512_maskz_loadu_epi16(odd_cols, src + (2 * j + 1) * ld + d0);
      _mm512_storeu_si512(dst + j * Dp + d0, _mm512_permutex2var_epi16(even, low_order, odd));
      _mm512_storeu_si512(dst + j * Dp + d0 + 16,
                          _mm512_permutex2var_epi16(even, high_order, odd));
    }
  }
}

// The query tile operands of a head (AmxBackwardScratch::queries), its lse and delta.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void backward_pack_queries(
    const BackwardArgs<c10::BFloat16>& args, int64_t bh, int64_t tile, int64_t Dp,
    const AmxBackwardScratch& s) {
  const int64_t D = args.D;
  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, args.T - row0);
  const int64_t block = kTile * Dp / 2;
  uint32_t* ops = s.queries + tile * 4 * block;
  load_words_transposed(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, ops);
  load_row_pairs(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, ops + block);
  load_words_transposed(args.grad_out.row(bh, row0), args.grad_out.row_stride, rows, D, Dp,
                        ops + 2 * block);
  load_row_pairs(args.grad_out.row(bh, row0), args.grad_out.row_stride, rows, D, Dp,
                 ops + 3 * block);
  const float* lse = args.lse + bh * args.T + row0;
  for (int64_t r = 0; r < kTile; ++r) {
    float delta = 0.0f;
    if (r < rows) {
      const c10::BFloat16* g = args.grad_out.row(bh, row0 + r);
      const c10::BFloat16* o = args.out.row(bh, row0 + r);
#pragma omp simd reduction(+ : delta)
      for (int64_t d = 0; d < D; ++d) {
        delta += to_acc<float>(g, d) * to_acc<float>(o, d);
      }
    }
    s.delta[row0 + r] = delta;
    s.lse[row0 + r] = r < rows ? lse[r] : 0.0f;
  }
}

// The key tile operands (AmxBackwardScratch::keys) into keys.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void backward_pack_keys(
    const BackwardArgs<c10::BFloat16>& args, int64_t bh, int64_t tile, int64_t Dp,
    uint32_t* keys) {
  const int64_t col0 = tile * kTile;
  const int64_t cols = std::min(kTile, args.T - col0);
  const int64_t block = kTile * Dp / 2;
  load_words<false>(args.k.row(bh, col0), args.k.row_stride, cols, args.D, Dp, keys);
  load_words<false>(args.v.row(bh, col0), args.v.row_stride, cols, args.D, Dp, keys + block);
  load_transposed_bf16(args.k.row(bh, col0), args.k.row_stride, cols, args.D, Dp,
                       keys + 2 * block);
}

// (kTile, kTile) floats as bf16 rows, to nearest even.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void round_rows_bf16(const float* src,
                                                                     uint32_t* dst) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < kTile * kTile; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  }
}

// P^T and dS^T of one pair from S^T (s.s) and dP^T (s.dp), in place; zero outside the
// causal mask and the ragged tiles' rows and columns (selected, so that what the products
// computed there, even NaN, does not reach the sums). Where one key holds most of a query's
// probability, dS is formed as dO . (V_j - O) as in the avx512 backward (backward_pair).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void backward_softmax(
    const BackwardArgs<c10::BFloat16>& args, int64_t bh, int64_t row0, int64_t col0,
    const AmxBackwardScratch& s) {
  const bool diagonal = row0 == col0;
  const int64_t rows = std::min(kTile, args.T - row0);
  const int64_t cols = std::min(kTile, args.T - col0);
  const float* __restrict lse = s.lse + row0;
  const float* __restrict delta = s.delta + row0;
  const float scale = args.scale;
  float p_max[kTile];
  fill(p_max, kTile, 0.0f);
  if (!diagonal && rows == kTile && cols == kTile) {  // no mask (most pairs)
    for (int64_t n = 0; n < kTile; ++n) {
      float* __restrict st = s.s + n * kTile;
      float* __restrict dpt = s.dp + n * kTile;
#pragma omp simd
      for (int64_t m = 0; m < kTile; ++m) {
        const float p = softmax_exp(st[m] * scale - lse[m]);
        st[m] = p;
        dpt[m] = p * (dpt[m] - delta[m]);
        p_max[m] = p > p_max[m] ? p : p_max[m];
      }
    }
  } else {
    for (int64_t n = 0; n < kTile; ++n) {
      float* __restrict st = s.s + n * kTile;
      float* __restrict dpt = s.dp + n * kTile;
      const int64_t first = n >= cols ? kTile : (diagonal ? n : 0);  // the queries key n sees
#pragma omp simd
      for (int64_t m = 0; m < kTile; ++m) {
        const bool valid = m >= first && m < rows;
        const float p = valid ? softmax_exp(st[m] * scale - lse[m]) : 0.0f;
        st[m] = p;
        dpt[m] = valid ? p * (dpt[m] - delta[m]) : 0.0f;
        p_max[m] = p > p_max[m] ? p : p_max[m];
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    if (p_max[m] > 0.5f) {
      int64_t n = 0;
      while (s.s[n * kTile + m] != p_max[m]) {
        ++n;
      }
      s.dp[n * kTile + m] =
          p_max[m] * dot_with_difference(args.grad_out.row(bh, row0 + m),
                                         args.v.row(bh, col0 + n), args.out.row(bh, row0 + m),
                                         args.D);
    }
  }
  round_rows_bf16(s.s, s.p_rows);
  float* residual = s.s;  // free once P^T is rounded
  for (int64_t i = 0; i < kTile * kTile; i += 16) {
    const __m512 x = _mm512_loadu_ps(s.dp + i);
    const __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(s.ds_rows) + i),
                        hi);
    const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
    _mm512_storeu_ps(residual + i, _mm512_sub_ps(x, back));
  }
  round_rows_bf16(residual, s.ds_rows + kTile * kTile / 2);
  for (int64_t j = 0; j < kTile / 2; ++j) {
    for (int64_t m = 0; m < kTile; m += 16) {
      _mm512_storeu_si512(s.ds_pairs + j * kTile + m,
                          interleave_bf16(s.dp + 2 * j * kTile + m,
                                          s.dp + (2 * j + 1) * kTile + m));
      _mm512_storeu_si512(s.ds_pairs + (kTile / 2 + j) * kTile + m,
                          interleave_bf16(residual + 2 * j * kTile + m,
                                          residual + (2 * j + 1) * kTile + m));
    }
  }
}

// One (query tile, key tile) pair, the key operands at `keys`: dV and dK of the key tile
// accumulated on the tiles into s.dv, s.dk, and the pair's dQ^T product (Dp, kTile) summed
// from zero into dq (its columns past the query tile's last 32-query block untouched), which
// the caller adds to dQ^T (so that the split adds the same blocks in the same order). 32 x 32
// blocks that the causal mask or a ragged tile leaves all zero are skipped (in S^T and dP^T
// what they would hold is masked by backward_softmax).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void backward_pair_amx(
    const BackwardArgs<c10::BFloat16>& args, int64_t bh, int64_t q_tile, int64_t kv_tile,
    int64_t Dp, const uint32_t* keys, const AmxBackwardScratch& s, float* dq) {
  const int64_t block = kTile * Dp / 2;
  const uint32_t* qt_words = s.queries + q_tile * 4 * block;
  const uint32_t* q_pairs = qt_words + block;
  const uint32_t* dot_words = qt_words + 2 * block;
  const uint32_t* do_pairs = qt_words + 3 * block;
  const uint32_t* k_words = keys;
  const uint32_t* v_words = keys + block;
  const uint32_t* kt_rows = keys + 2 * block;
  const int64_t depth = Dp / kAmxDepth;
  const bool diagonal = q_tile == kv_tile;
  const int64_t query_blocks = (std::min(kTile, args.T - q_tile * kTile) + 31) / 32;
  const int64_t key_blocks = (std::min(kTile, args.T - kv_tile * kTile) + 31) / 32;
  for (int64_t nb = 0; nb < key_blocks; ++nb) {
    for (int64_t mb = diagonal ? nb : 0; mb < query_blocks; ++mb) {
      tile_block_32x32<false>(k_words + nb * 32 * (Dp / 2), Dp * 2, qt_words + mb * 32,
                              kTile * 4, depth, s.s + nb * 32 * kTile + mb * 32, kTile * 4);
      tile_block_32x32<false>(v_words + nb * 32 * (Dp / 2), Dp * 2, dot_words + mb * 32,
                              kTile * 4, depth, s.dp + nb * 32 * kTile + mb * 32, kTile * 4);
    }
  }
  backward_softmax(args, bh, q_tile * kTile, kv_tile * kTile, s);
  // dV += P^T dO, dK += dS^T Q: key block nb over the query blocks it sees.
  for (int64_t nb = 0; nb < key_blocks; ++nb) {
    const int64_t first = diagonal ? nb : 0;
    const int64_t steps = query_blocks - first;
    const int64_t a_offset = nb * 32 * (kTile / 2) + first * 16;  // words
    for (int64_t db = 0; db < Dp / 32; ++db) {
      const int64_t b_offset = first * 16 * Dp + db * 32;
      float* dv = s.dv + nb * 32 * Dp + db * 32;
      float* dk = s.dk + nb * 32 * Dp + db * 32;
      tile_block_32x32<true>(s.p_rows + a_offset, kTile * 2, do_pairs + b_offset, Dp * 4,
                             steps, dv, Dp * 4);
      // dS^T's bf16, then its residual's
      tile_block_32x32<true>(s.ds_rows + a_offset, kTile * 2, q_pairs + b_offset, Dp * 4, steps,
                             dk, Dp * 4, s.ds_rows + kTile * kTile / 2 + a_offset,
                             q_pairs + b_offset);
    }
  }
  // K^T dS^T: query block mb over the key blocks it sees.
  for (int64_t db = 0; db < Dp / 32; ++db) {
    for (int64_t mb = 0; mb < query_blocks; ++mb) {
      const int64_t steps = diagonal ? std::min(mb + 1, key_blocks) : key_blocks;
      const uint32_t* a = kt_rows + db * 32 * (kTile / 2);
      float* c = dq + db * 32 * kTile + mb * 32;
      tile_block_32x32<false>(a, kTile * 2, s.ds_pairs + mb * 32, kTile * 4, steps, c,
                              kTile * 4, a, s.ds_pairs + kTile * kTile / 2 + mb * 32);
    }
  }
}

// dst (Dp columns ld apart) += src (Dp, kTile), columns [0, cols).
PIPELINE_ALWAYS_INLINE void add_columns(const float* src, int64_t Dp, int64_t cols, float* dst,
                                        int64_t ld) {
  for (int64_t d = 0; d < Dp; ++d) {
    const float* __restrict from = src + d * kTile;
    float* __restrict to = dst + d * ld;
#pragma omp simd
    for (int64_t m = 0; m < cols; ++m) {
      to[m] += from[m];
    }
  }
}

// dK and dV of key tile kv_tile over query tiles kv_tile..; each pair's dQ^T product into
// `partials` (blocks of (Dp, kTile), query tile kv_tile first) where it is not null, else
// added to s.dqt (the whole head's dQ^T).
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void backward_keys_amx(
    const BackwardArgs<c10::BFloat16>& args, int64_t bh, int64_t kv_tile, int64_t Dp,
    const uint32_t* keys, const AmxBackwardScratch& s, float* partials) {
  const int64_t T = args.T;
  const int64_t num_tiles = (T + kTile - 1) / kTile;
  const int64_t ldq = amx_dqt_stride(T);
  fill(s.dk, kTile * Dp, 0.0f);
  fill(s.dv, kTile * Dp, 0.0f);
  for (int64_t q_tile = kv_tile; q_tile < num_tiles; ++q_tile) {
    float* dq = partials != nullptr ? partials + (q_tile - kv_tile) * kTile * Dp : s.dq_pair;
    backward_pair_amx(args, bh, q_tile, kv_tile, Dp, keys, s, dq);
    if (partials == nullptr) {
      const int64_t cols = round_up(std::min(kTile, T - q_tile * kTile), int64_t{32});
      add_columns(dq, Dp, cols, s.dqt + q_tile * kTile, ldq);
    }
  }
  const int64_t col0 = kv_tile * kTile;
  const int64_t cols = std::min(kTile, T - col0);
  store_tile(s.dk, cols, args.D, Dp, args.dk.row(bh, col0), args.dk.row_stride, args.scale);
  store_tile(s.dv, cols, args.D, Dp, args.dv.row(bh, col0), args.dv.row_stride);
}

// dq rows [row0, row0 + rows) from dQ^T (src, columns ld apart, the first one row0's).
PIPELINE_ALWAYS_INLINE void store_dq(const BackwardArgs<c10::BFloat16>& args, int64_t bh,
                                     int64_t row0, int64_t rows, const float* src, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    c10::BFloat16* dq = args.dq.row(bh, row0 + r);
    for (int64_t d = 0; d < args.D; ++d) {
      dq[d] = from_acc<c10::BFloat16>(src[d * ld + r] * args.scale);
    }
  }
}

}  // namespace

bool amx_tile_state_granted() {
#if defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}

PIPELINE_TARGET_AMX_BF16 void amx_tiles_begin() {
  // Static: GCC 12 does not see ldtilecfg read the object and drops stores to a local one.
  alignas(64) static const TileConfig config{};
  _tile_loadconfig(&config);
}

PIPELINE_TARGET_AMX_BF16 void amx_tiles_end() {
  _tile_release();
}

PIPELINE_TARGET_AMX_BF16 void amx_pack_keys(const ForwardArgs<c10::BFloat16>& args,
                                            const AmxKeys& keys, int64_t bh, int64_t tile) {
  const int64_t col0 = tile * kTile;
  const int64_t cols = std::min(kTile, args.T - col0);
  uint32_t* kt = keys.block(bh, tile);
  load_words<false>(args.k.row(bh, col0), args.k.row_stride, cols, args.D, keys.Dp, kt);
  load_transposed_bf16(args.v.row(bh, col0), args.v.row_stride, cols, args.D, keys.Dp,
                       kt + kTile * keys.Dp / 2);
}

PIPELINE_TARGET_AMX_BF16 void forward_tile_amx(const ForwardArgs<c10::BFloat16>& args,
                                               const AmxKeys& keys, int64_t bh, int64_t tile,
                                               const AmxForwardScratch& s) {
  const int64_t D = args.D;
  const int64_t Dp = keys.Dp;
  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, args.T - row0);
  load_words_transposed(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.q);
  fill(s.o, kTile * Dp, 0.0f);
  fill(s.row_max, kTile, -std::numeric_limits<float>::infinity());
  fill(s.row_sum, kTile, 0.0f);
  const int64_t query_blocks = (rows + 31) / 32;
  for (int64_t kv_tile = 0; kv_tile <= tile;) {
    const int64_t tiles = kv_tile + 1 < tile ? 2 : 1;
    forward_key_tiles(args, keys, bh, row0, kv_tile, tiles, query_blocks, s);
    kv_tile += tiles;
  }
  store_output(args, bh, row0, rows, query_blocks * 32, s);
}

PIPELINE_TARGET_AMX_BF16 void backward_head_amx(const BackwardArgs<c10::BFloat16>& args,
                                                int64_t bh, int64_t Dp,
                                                const AmxBackwardScratch& s) {
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    backward_pack_queries(args, bh, tile, Dp, s);
  }
  fill(s.dqt, Dp * amx_dqt_stride(args.T), 0.0f);
  for (int64_t kv_tile = 0; kv_tile < num_tiles; ++kv_tile) {
    backward_pack_keys(args, bh, kv_tile, Dp, s.keys);
    backward_keys_amx(args, bh, kv_tile, Dp, s.keys, s, nullptr);
  }
  store_dq(args, bh, 0, args.T, s.dqt, amx_dqt_stride(args.T));
}

PIPELINE_TARGET_AMX_BF16 void backward_item_amx(const BackwardArgs<c10::BFloat16>& args,
                                                BackwardItem item, int64_t bh, int64_t tile,
                                                int64_t Dp, const AmxBackwardScratch& shared,
                                                float* partials) {
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t block = kTile * Dp / 2;
  AmxBackwardScratch s = shared;  // the head's part of the op-wide operands
  s.queries += bh * num_tiles * 4 * block;
  s.lse += bh * num_tiles * kTile;
  s.delta += bh * num_tiles * kTile;
  uint32_t* keys = shared.keys + (bh * num_tiles + tile) * 3 * block;
  switch (item) {
    case BackwardItem::kPrepare:
      backward_pack_queries(args, bh, tile, Dp, s);
      backward_pack_keys(args, bh, tile, Dp, keys);
      break;
    case BackwardItem::kKeys:
      backward_keys_amx(args, bh, tile, Dp, keys, s,
                        dq_partials_block(partials, bh, tile, num_tiles, Dp));
      break;
    case BackwardItem::kQueries: {  // the kept products, in the order backward_head_amx adds
      fill(s.dq_pair, Dp * kTile, 0.0f);
      for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
        const float* part = dq_partials_block(partials, bh, kv_tile, num_tiles, Dp) +
                            (tile - kv_tile) * kTile * Dp;
        add_columns(part, Dp, kTile, s.dq_pair, kTile);
      }
      const int64_t rows = std::min(kTile, args.T - tile * kTile);
      store_dq(args, bh, tile * kTile, rows, s.dq_pair, kTile);
      break;
    }
    case BackwardItem::kHead:  // backward_head_amx
      break;
  }
}

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
