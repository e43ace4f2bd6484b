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
// is 16 rows of 32 words per step (ldb bytes apart; 16 columns per tile).
template <bool kAccumulate>
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void tile_block_32x32(
    const void* a, int64_t lda, const void* b, int64_t ldb, int64_t steps, float* c,
    int64_t ldc) {
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
  _tile_stored(0, c_bytes, ldc);
  _tile_stored(1, c_bytes + 64, ldc);
  _tile_stored(2, c_bytes + 16 * ldc, ldc);
  _tile_stored(3, c_bytes + 16 * ldc + 64, ldc);
}

// V rows [0, rows) (ld apart) transposed, (Dp, kTile) bf16, zero-padded: as words, keys 2j
// and 2j + 1 of column d at [d][j] (the low half is the even key), V^T's A operand layout.
PIPELINE_ALWAYS_INLINE void load_transposed_bf16(const c10::BFloat16* src, int64_t ld,
                                                 int64_t rows, int64_t D, int64_t Dp,
                                                 uint32_t* dst) {
  const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(src);
  uint16_t* __restrict out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t d = 0; d < Dp; ++d) {
    const int64_t valid = d < D ? rows : 0;
    for (int64_t r = 0; r < valid; ++r) {
      out[d * kTile + r] = bits[r * ld + d];
    }
    fill(out + d * kTile + valid, kTile - valid, uint16_t{0});
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

// The online softmax of one key tile on S^T (row = key n, column = query m), vectorised
// across queries as in forward_tile_scores: keys after a query on the diagonal set to -inf,
// running max and sums, the factors of O^T's columns (s.alpha), and P^T written as bf16 word
// pairs (s.p, (kTile / 2, kTile), zero for keys >= cols). The scale (> 0) is applied to the
// tile's largest score and inside the exp's argument, not in a pass of its own.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void softmax_columns(
    bool diagonal, int64_t cols, int64_t q_cols, float scale, const AmxForwardScratch& s) {
  float m_new[kTile];
  float sum[kTile];
  fill(m_new, q_cols, -std::numeric_limits<float>::infinity());
  fill(sum, q_cols, 0.0f);
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
#pragma omp simd
  for (int64_t m = 0; m < q_cols; ++m) {
    const float tile_max = m_new[m] * scale;
    m_new[m] = s.row_max[m] < tile_max ? tile_max : s.row_max[m];
  }
  for (int64_t n = 0; n < cols; ++n) {
    float* __restrict st = s.s + n * kTile;
    const int64_t first = diagonal ? n / 16 * 16 : 0;
    fill(st, first, 0.0f);
#pragma omp simd
    for (int64_t m = first; m < q_cols; ++m) {
      const float e = softmax_exp(st[m] * scale - m_new[m]);
      st[m] = e;
      sum[m] += e;
    }
  }
  fill(s.s + cols * kTile, (kTile - cols) * kTile, 0.0f);
  for (int64_t j = 0; j < kTile / 2; ++j) {
    for (int64_t m = 0; m < q_cols; m += 16) {
      _mm512_storeu_si512(s.p + j * kTile + m,
                          interleave_bf16(s.s + 2 * j * kTile + m, s.s + (2 * j + 1) * kTile + m));
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

// Key tile kv_tile's step for the query tile at row0: S^T = K Q^T, the softmax, O^T += V^T
// P^T. On the diagonal, 32-query blocks skip the key blocks after them.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void forward_key_tile(
    const ForwardArgs<c10::BFloat16>& args, const AmxKeys& keys, int64_t bh, int64_t row0,
    int64_t kv_tile, int64_t query_blocks, const AmxForwardScratch& s) {
  const int64_t Dp = keys.Dp;
  const int64_t col0 = kv_tile * kTile;
  const bool diagonal = col0 == row0;
  const int64_t cols = std::min(kTile, args.T - col0);
  const int64_t key_blocks = (cols + 31) / 32;
  const uint32_t* k_words = keys.block(bh, kv_tile);
  const uint32_t* vt_pairs = k_words + kTile * Dp / 2;
  for (int64_t nb = 0; nb < key_blocks; ++nb) {
    for (int64_t mb = diagonal ? nb : 0; mb < query_blocks; ++mb) {
      tile_block_32x32<false>(k_words + nb * 32 * (Dp / 2), Dp * 2, s.q + mb * 32, kTile * 4,
                              Dp / kAmxDepth, s.s + nb * 32 * kTile + mb * 32, kTile * 4);
    }
  }
  softmax_columns(diagonal, cols, query_blocks * 32, args.scale, s);
  for (int64_t db = 0; db < Dp / 32; ++db) {
    for (int64_t mb = 0; mb < query_blocks; ++mb) {
      const int64_t steps = diagonal ? std::min(mb + 1, key_blocks) : key_blocks;
      tile_block_32x32<false>(vt_pairs + db * 32 * (kTile / 2), kTile * 2, s.p + mb * 32,
                              kTile * 4, steps, s.pv + db * 32 * kTile + mb * 32, kTile * 4);
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
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* __restrict out = reinterpret_cast<uint16_t*>(args.out.row(bh, row0 + r));
    for (int64_t d = 0; d < args.D; ++d) {
      out[d] = rounded[d * kTile + r];
    }
  }
  float* __restrict lse = args.lse + bh * args.T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    lse[r] = s.row_max[r] + std::log(s.row_sum[r]);
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
  load_words<true>(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.q);
  fill(s.o, kTile * Dp, 0.0f);
  fill(s.row_max, kTile, -std::numeric_limits<float>::infinity());
  fill(s.row_sum, kTile, 0.0f);
  const int64_t query_blocks = (rows + 31) / 32;
  for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
    forward_key_tile(args, keys, bh, row0, kv_tile, query_blocks, s);
  }
  store_output(args, bh, row0, rows, query_blocks * 32, s);
}

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
