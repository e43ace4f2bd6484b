// Tile kernels of the CPU causal attention op (FlashAttention-style, see causal_attention.cpp):
// the forward of a query tile, the backward's work items, and the per-ISA entry points the
// dispatcher calls. What they are built from has a header each: causal_attention_tiles.h
// (tile layouts, loads, transposes, matrix products), causal_attention_softmax.h (exp, score
// precision) and causal_attention_isa.h (instruction sets, target attributes).
//
// Everything here and in those headers is a header-only template that is force-inlined into
// the per-ISA entry points declared at the bottom of this file (forward_tile_<isa>,
// backward_item_<isa>) and defined in causal_attention_<isa>.cpp. Those carry
// `__attribute__((target(...)))`, so GCC compiles the same plain C++ loops three times: for
// baseline x86-64 (SSE2), for AVX2+FMA and for AVX-512; causal_attention.cpp picks one at run
// time. The loops are written so that the compiler vectorises them (fixed-size register tiles,
// contiguous inner loops, `omp simd` reductions). The one exception is the bf16 dot-product
// microkernel (register_tile_bf16, AVX512_BF16 intrinsics), which a fourth forward entry point
// uses for the scores of bf16 inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>

#include "causal_attention_isa.h"
#include "causal_attention_softmax.h"
#include "causal_attention_tiles.h"

PIPELINE_KERNEL_OPTIONS_BEGIN

namespace pipeline::attention {

// ----------------------------------------------------------------------------------------
// Problem description shared by the entry points. q, k, v, out, grad_out, dq, dk, dv are
// HeadViews of (B, H, T, D) tensors; lse and delta are contiguous (BH, T).

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
        // std::max's semantics, written out: std::max, defined outside the kernels'
        // optimize options, would not be inlined here (nor vectorised).
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
// (and the kernels' no-trapping-math, causal_attention_isa.h: callgrind counts the same
// instructions for the AVX2 forward as when the entry points were defined inside this
// header). Declarations carry the same target attribute as the definitions (GCC would
// otherwise take a differently-targeted definition for a second version of the function).

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

PIPELINE_KERNEL_OPTIONS_END
