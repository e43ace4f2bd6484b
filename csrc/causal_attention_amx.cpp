// The AMX bf16 forward (see causal_attention_amx.h). setup.py compiles this file with the
// AVX-512 one; the dispatcher uses it only where the CPU has AMX and Linux grants the tile
// state (amx_tile_state_granted).
// GCC 12's AVX-512 intrinsics (masked loads, shuffles) start from _mm512_undefined values,
// which -Wmaybe-uninitialized reports once inlined here: false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "causal_attention_amx.h"

#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>
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

// V rows [0, rows) (ld apart) as pairs of rows, (kTile / 2, Dp) words, zero-padded.
PIPELINE_ALWAYS_INLINE void load_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t rows,
                                           int64_t D, int64_t Dp, uint32_t* __restrict dst) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < kTile / 2; ++j) {
    uint32_t* __restrict out = dst + j * Dp;
    const int64_t valid = 2 * j < rows ? D : 0;
    const uint16_t* __restrict even = bits + 2 * j * ld;
    if (2 * j + 1 < rows) {
      const uint16_t* __restrict odd = bits + (2 * j + 1) * ld;
#pragma omp simd
      for (int64_t d = 0; d < valid; ++d) {
        out[d] = even[d] | static_cast<uint32_t>(odd[d]) << 16;
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < valid; ++d) {
        out[d] = even[d];
      }
    }
    fill(out + valid, Dp - valid, 0u);
  }
}

// One query row's step of the online softmax over a key tile: scores scaled (keys from
// `valid` on set to -inf, whose exp is 0), running max and sum updated, the output row
// rescaled, and the probabilities written as bf16 to p. Whole vectors only, in a fixed order.
// A NaN or infinite score makes the row's output NaN, as elsewhere.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void softmax_row(
    float* __restrict s, int64_t valid, float scale, float& row_max, float& row_sum,
    float* __restrict o, int64_t Dp, uint16_t* __restrict p) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 largest = minus_inf;
  for (int64_t n = 0; n < kTile; n += 16) {
    const int64_t visible = std::clamp<int64_t>(valid - n, 0, 16);
    const __mmask16 lanes = _cvtu32_mask16(static_cast<uint32_t>((1ull << visible) - 1));
    const __m512 x =
        _mm512_mask_mul_ps(minus_inf, lanes, _mm512_loadu_ps(s + n), _mm512_set1_ps(scale));
    _mm512_storeu_ps(s + n, x);
    largest = _mm512_max_ps(largest, x);
  }
  // All lanes the largest (_mm512_reduce_max_ps trips GCC 12's -Wmaybe-uninitialized).
  largest = _mm512_max_ps(largest, _mm512_shuffle_f32x4(largest, largest, 0x4E));
  largest = _mm512_max_ps(largest, _mm512_shuffle_f32x4(largest, largest, 0xB1));
  largest = _mm512_max_ps(largest, _mm512_permute_ps(largest, 0x4E));
  largest = _mm512_max_ps(largest, _mm512_permute_ps(largest, 0xB1));
  const float old_max = row_max;
  const float tile_max = _mm512_cvtss_f32(largest);
  const float new_max = old_max < tile_max ? tile_max : old_max;
#pragma omp simd
  for (int64_t n = 0; n < kTile; ++n) {
    s[n] = softmax_exp(s[n] - new_max);
  }
  __m512 sums = _mm512_setzero_ps();
  for (int64_t n = 0; n < kTile; n += 32) {
    const __m512 low = _mm512_loadu_ps(s + n);
    const __m512 high = _mm512_loadu_ps(s + n + 16);
    sums = _mm512_add_ps(_mm512_add_ps(sums, low), high);
    _mm512_storeu_si512(p + n, (__m512i)_mm512_cvtne2ps_pbh(high, low));
  }
  const float alpha = softmax_exp(old_max - new_max);  // 0 on the first key tile
  row_sum = row_sum * alpha + _mm512_reduce_add_ps(sums);
  row_max = new_max;
  if (alpha != 1.0f) {
#pragma omp simd
    for (int64_t d = 0; d < Dp; ++d) {
      o[d] *= alpha;
    }
  }
}

// Key tile kv_tile's step for the query tile at row0: S = Q K^T, the softmax, O += P V. On
// the diagonal, 32-row blocks skip the key blocks after them.
PIPELINE_ALWAYS_INLINE PIPELINE_TARGET_AMX_BF16 void forward_key_tile(
    const ForwardArgs<c10::BFloat16>& args, const AmxKeys& keys, int64_t bh, int64_t row0,
    int64_t kv_tile, int64_t query_blocks, const AmxForwardScratch& s) {
  const int64_t Dp = keys.Dp;
  const int64_t col0 = kv_tile * kTile;
  const bool diagonal = col0 == row0;
  const int64_t cols = std::min(kTile, args.T - col0);
  const int64_t key_blocks = (cols + 31) / 32;
  const uint32_t* kt = keys.block(bh, kv_tile);
  const uint32_t* v_pairs = kt + kTile * Dp / 2;
  for (int64_t mb = 0; mb < query_blocks; ++mb) {
    for (int64_t nb = 0; nb < (diagonal ? std::min(mb + 1, key_blocks) : key_blocks); ++nb) {
      tile_block_32x32<false>(s.q + mb * 32 * (Dp / 2), Dp * 2, kt + nb * 32, kTile * 4,
                              Dp / kAmxDepth, s.s + mb * 32 * kTile + nb * 32, kTile * 4);
    }
  }
  for (int64_t r = 0; r < query_blocks * 32; ++r) {
    const int64_t valid = diagonal ? std::min(r + 1, cols) : cols;
    softmax_row(s.s + r * kTile, valid, args.scale, s.row_max[r], s.row_sum[r], s.o + r * Dp,
                Dp, s.p + r * kTile);
  }
  for (int64_t mb = 0; mb < query_blocks; ++mb) {
    const int64_t steps = diagonal ? std::min(mb + 1, key_blocks) : key_blocks;
    for (int64_t db = 0; db < Dp / 32; ++db) {
      tile_block_32x32<true>(s.p + mb * 32 * kTile, kTile * 2, v_pairs + db * 32, Dp * 4, steps,
                             s.o + mb * 32 * Dp + db * 32, Dp * 4);
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
  load_words<true>(args.k.row(bh, col0), args.k.row_stride, cols, args.D, keys.Dp, kt);
  load_row_pairs(args.v.row(bh, col0), args.v.row_stride, cols, args.D, keys.Dp,
                 kt + kTile * keys.Dp / 2);
}

PIPELINE_TARGET_AMX_BF16 void forward_tile_amx(const ForwardArgs<c10::BFloat16>& args,
                                               const AmxKeys& keys, int64_t bh, int64_t tile,
                                               const AmxForwardScratch& s) {
  const int64_t D = args.D;
  const int64_t Dp = keys.Dp;
  const int64_t row0 = tile * kTile;
  const int64_t rows = std::min(kTile, args.T - row0);
  load_words<false>(args.q.row(bh, row0), args.q.row_stride, rows, D, Dp, s.q);
  fill(s.o, kTile * Dp, 0.0f);
  fill(s.row_max, kTile, -std::numeric_limits<float>::infinity());
  fill(s.row_sum, kTile, 0.0f);
  const int64_t query_blocks = (rows + 31) / 32;
  for (int64_t kv_tile = 0; kv_tile <= tile; ++kv_tile) {
    forward_key_tile(args, keys, bh, row0, kv_tile, query_blocks, s);
  }
  c10::BFloat16* out = args.out.row(bh, row0);
  float* lse = args.lse + bh * args.T + row0;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv_sum = 1.0f / s.row_sum[r];
    const float* __restrict o = s.o + r * Dp;
    c10::BFloat16* __restrict out_row = out + r * args.out.row_stride;
    for (int64_t d = 0; d < D; ++d) {
      out_row[d] = from_acc<c10::BFloat16>(o[d] * inv_sum);
    }
    lse[r] = s.row_max[r] + std::log(s.row_sum[r]);
  }
}

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
