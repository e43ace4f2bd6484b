// The AMX bf16 forward and backward of the CPU attention op (capability amx_bf16). Forward:
// both tile products,
// S = Q K^T and O += P V, run on AMX tiles (_tile_dpbf16ps: bf16 products summed in float32),
// the online softmax in AVX-512 float32 with softmax_exp. A tile product (16 x 16 x 32) was
// measured at 20-35 ns on the 2-core KVM Xeon this was written on (~500-800 GFLOP/s per core,
// against ~250 for AVX512_BF16 dot products): the products of a 64 x 64 tile pair still take
// about half of its time, the softmax, tile loads and stores the rest.
//
// Why a forward of its own rather than another Isa of forward_tile_scores: AMX tiles want
// operands in VNNI layout (two bf16 neighbours along the contracted dimension in one 32-bit
// word) and 16-row blocks, and P must be bf16 for the second product. As in
// forward_tile_scores the scores are computed transposed, S^T = K Q^T (row = key), so the
// softmax runs down columns, vectorised across queries with no horizontal reductions; the
// second product is then O^T += V^T P^T, whose B operand is P^T's rows interleaved in pairs.
// The keys' operands, K's rows as words and V^T as pairs of keys, are packed once per key
// tile for the whole op (amx_pack_keys), not once per tile pair. P is rounded to bf16 for
// P V (as flash attention does on GPUs); the row sums and lse use P in float32, and out is
// rounded to bf16 once.
//
// Shapes: any T (the last tiles ragged), any D (padded with zeros to a multiple of 32, the
// depth of a tile product), strided inputs as HeadView gives them. bf16 only. On the
// diagonal tile a block of 32 queries reads the values of
// the keys up to its end whatever the causal mask: an infinite value there makes the outputs
// of the earlier queries of its block NaN (0 * inf), as in the other kernels' register tiles.
//
// Backward (backward_head_amx): the avx512 kHead item's order (key tiles outer, query tiles
// inner) on S^T as the forward: S^T = K Q^T and dP^T = V dO^T on the tiles, P^T and dS^T =
// P^T (dP^T - delta) in AVX-512 float32 across queries (dS formed as dO . (V_j - O) where
// one key holds most of a query's probability, as backward_pair does), then dV += P^T dO,
// dK += dS^T Q and dQ^T += K^T dS^T on the tiles. P is rounded to bf16 for dV; dS, whose
// rounding to bf16 alone made dq and dk up to 2.4x less accurate than the flash-style
// reference (test_16_bit_gradients_error_is_the_rounded_outputs), as bf16 plus the bf16 of
// what that rounding left (two products each: ~16 bits). The query operands are packed
// once per head, the key operands once per key tile.
//
// Determinism: each (batch*head, query tile) of the forward and each backward item is
// computed by one thread in a fixed order. With fewer heads than threads the backward splits
// each head as the avx512 one does with its dQ products kept (backward_item_amx), and adds
// the same blocks in the same order as per head: the same bits for any number of threads.
// Where those products do not fit (kMaxDqPartials) it runs one item per head even then.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

#include "causal_attention_kernel.h"

PIPELINE_KERNEL_OPTIONS_BEGIN

namespace pipeline::attention {

// Depth of one tile product in bf16 elements: Dp for AMX is D rounded up to it.
constexpr int64_t kAmxDepth = 32;

// The keys' operands of every (batch*head, key tile), one block each of kTile * Dp words: K's
// rows as words, (kTile, Dp / 2), then V^T as pairs of keys, (Dp, kTile / 2) (keys 2j and
// 2j + 1 of column d at [d][j]); zero-padded.
struct AmxKeys {
  uint32_t* data;
  int64_t num_tiles;
  int64_t Dp;  // D rounded up to kAmxDepth

  uint32_t* block(int64_t bh, int64_t tile) const {
    return data + (bh * num_tiles + tile) * kTile * Dp;
  }
};

// Per-thread scratch of forward_tile_amx, sizes in elements.
struct AmxForwardScratch {
  uint32_t* q;      // (Dp / 2, kTile) Q^T as words: word p of query m at [p][m]
  float* s;         // (2 kTile, kTile) S^T, then P^T: row = key (two key tiles at most)
  uint32_t* p;      // (kTile, kTile) P^T as bf16 pairs of keys (rows 2j, 2j + 1 at [j])
  float* o;         // (Dp, kTile) O^T, unnormalised
  float* pv;        // (Dp, kTile) one tile pair's V^T P^T
  float* row_max;   // (kTile) per query
  float* row_sum;   // (kTile)
  float* alpha;     // (kTile) exp(old max - new max), O^T's column factors
};

// Floats between the rows of the backward's dQ^T, (Dp, T) per head: T rounded up to kTile,
// plus a cache line so that its rows do not fall in the same L1 set where T is a power of 2.
inline int64_t amx_dqt_stride(int64_t T) {
  return (T + kTile - 1) / kTile * kTile + 16;
}

// Per-thread scratch of backward_head_amx, sizes in elements (Tp: T rounded up to kTile).
struct AmxBackwardScratch {
  // Per query tile, 4 blocks of kTile * Dp / 2 words: Q^T as words (Dp / 2, kTile), Q as
  // pairs of queries (kTile / 2, Dp), dO^T as words, dO as pairs of queries.
  uint32_t* queries;
  float* lse;         // (Tp) zero-padded
  float* delta;       // (Tp) rowsum(dO * O), zero-padded
  uint32_t* keys;     // 3 blocks of kTile * Dp / 2 words: K and V as words, K^T as bf16
  float* s;           // (kTile, kTile) S^T, then P^T (row = key), then dS^T's residual
  float* dp;          // (kTile, kTile) dP^T, then dS^T
  uint32_t* p_rows;   // (kTile, kTile) P^T as bf16
  uint32_t* ds_rows;  // 2 (kTile, kTile) bf16: dS^T rounded, then what rounding left
  uint32_t* ds_pairs; // 2 (kTile / 2, kTile) words: the same as bf16 pairs of keys
  float* dk;          // (kTile, Dp)
  float* dv;          // (kTile, Dp)
  float* dqt;         // (Dp, amx_dqt_stride(T)) dQ^T of the whole head
  float* dq_pair;     // (Dp, kTile) one pair's dQ^T product, or a query tile's dQ^T
};

// Asks Linux for the AMX tile state (once per process); false where it is refused or the
// CPU or kernel has no AMX, and then no tile instruction may run.
bool amx_tile_state_granted();

// The tile configuration is per thread: every thread loads it before its first tile
// instruction and releases it after its last.
PIPELINE_TARGET_AMX_BF16 void amx_tiles_begin();
PIPELINE_TARGET_AMX_BF16 void amx_tiles_end();

// Packs key tile `tile` of head bh into keys.block(bh, tile).
PIPELINE_TARGET_AMX_BF16 void amx_pack_keys(const ForwardArgs<c10::BFloat16>& args,
                                            const AmxKeys& keys, int64_t bh, int64_t tile);

// The forward of query tile `tile` of head bh (out and lse), from the packed keys.
PIPELINE_TARGET_AMX_BF16 void forward_tile_amx(const ForwardArgs<c10::BFloat16>& args,
                                               const AmxKeys& keys, int64_t bh, int64_t tile,
                                               const AmxForwardScratch& s);

// The whole backward of head bh (dq, dk, dv; key tiles outer, query tiles inner, as the
// avx512 kHead item), Dp = D rounded up to kAmxDepth.
PIPELINE_TARGET_AMX_BF16 void backward_head_amx(const BackwardArgs<c10::BFloat16>& args,
                                                int64_t bh, int64_t Dp,
                                                const AmxBackwardScratch& s);

// An item of the split backward (as the avx512 one's with dQ products kept: kPrepare packs a
// query tile's and a key tile's operands, kKeys is backward_head_amx's work for one key tile
// with each pair's dQ^T product kept in `partials` (dq_partials_block), kQueries sums them in
// backward_head_amx's order: the same bits). `shared` holds the op-wide operands: queries,
// lse and delta for all heads (BH times backward_head_amx's), keys for every (head, key
// tile) (3 * kTile * Dp / 2 words each); its per-thread buffers as backward_head_amx's.
PIPELINE_TARGET_AMX_BF16 void backward_item_amx(const BackwardArgs<c10::BFloat16>& args,
                                                BackwardItem item, int64_t bh, int64_t tile,
                                                int64_t Dp, const AmxBackwardScratch& shared,
                                                float* partials);

}  // namespace pipeline::attention

PIPELINE_KERNEL_OPTIONS_END
