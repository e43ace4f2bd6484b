// Fused causal attention for CPU: the `pipeline::causal_attention_fwd/bwd` operators.
//
//   out = softmax(Q K^T / sqrt(D) + causal mask) V,   lse = logsumexp of each score row
//
// FlashAttention-style: queries and keys are processed in 64 x 64 tiles with an online
// softmax, so no T x T matrix is ever materialised; tiles above the diagonal are skipped and
// only the diagonal tile is masked. Inputs are float32, float64, bfloat16 or float16; the
// 16-bit types are converted to float32 as tiles are loaded (except bf16 Q and K under
// AVX512_BF16, whose exact products are summed in float32), so all sums, the softmax
// statistics and `lse` are float32 and only `out` (and dq, dk, dv) are rounded back to the
// input type. The forward keeps `out` and the per-row `lse`; the backward recomputes the
// probabilities tile by tile from them. The kernels read and write every (B, H, T, D)
// tensor through its strides (only a non-contiguous last dimension is copied), so the
// packed entry points (`causal_attention_qkv_fwd/bwd`) take the model's (B, T, 3C)
// projection and return a (B, T, C) output and the projection's gradient in place. The tile
// kernels live in causal_attention_kernel.h and are compiled (one file each,
// causal_attention_<isa>.cpp) for baseline x86-64, AVX2 and AVX-512, and for AVX-512 with
// AVX512_BF16, whose bf16 dot products the forward uses for the scores of bf16 inputs, and
// (causal_attention_amx.cpp, built with the AVX-512 unit) an AMX forward and backward for
// bf16 inputs whose products run on AMX tiles, used where Linux grants the tile state; the
// widest one
// the CPU supports and the build has is used (setup.py leaves AVX-512 out on a machine
// without it unless PIPELINE_CPU_ISAS=all; environment variable PIPELINE_CPU_CAPABILITY =
// default | avx2 | avx512 | avx512_bf16 | amx_bf16 caps the choice, e.g. to test the
// narrower code paths).
//
// Work split (at::parallel_for): the forward over (batch*head, query tile) items, the
// backward over batch*head items, or, when there are fewer heads than threads, over
// (batch*head, key tile) items for dK, dV and then (batch*head, query tile) items for dQ.
// Each item is computed by one thread in a fixed order, and both backward splits sum in
// the same order, so results are bitwise identical from run to run and for any number of
// threads. The AMX backward splits a head only where its dQ products are kept (see
// run_backward_amx).
//
// The operators' schemas and all their registrations are in registration.cpp; the CPU
// functions it registers are the ones at the end of this file (causal_attention_ops.h).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include "causal_attention_checks.h"
#include "causal_attention_amx.h"
#include "causal_attention_kernel.h"
#include "causal_attention_ops.h"

namespace pipeline::attention {
namespace {

// ----------------------------------------------------------------------------------------
// Run-time choice of the instruction set.

enum class Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmxBf16 = 4 };

#ifdef PIPELINE_WITH_AVX512
// AMX (compiled with the AVX-512 kernels): where the CPU has its bf16 tiles and Linux grants
// this process the tile state (without which a tile instruction would fault).
bool amx_usable() {
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         amx_tile_state_granted();
}
#endif

// The widest instruction set both the CPU and this build have.
Capability supported_capability() {
  static const Capability supported = [] {
    __builtin_cpu_init();
#ifdef PIPELINE_WITH_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma")) {
      if (!__builtin_cpu_supports("avx512bf16")) {
        return Capability::kAvx512;
      }
      return amx_usable() ? Capability::kAmxBf16 : Capability::kAvx512Bf16;
    }
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Capability::kAvx2;
    }
    return Capability::kDefault;
  }();
  return supported;
}

// The supported capability, capped by PIPELINE_CPU_CAPABILITY (read on every call so that
// tests can switch code paths).
Capability active_capability() {
  const Capability supported = supported_capability();
  const char* requested = std::getenv("PIPELINE_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') {
    return supported;
  }
  Capability cap = supported;
  if (std::strcmp(requested, "default") == 0) {
    cap = Capability::kDefault;
  } else if (std::strcmp(requested, "avx2") == 0) {
    cap = Capability::kAvx2;
  } else if (std::strcmp(requested, "avx512") == 0) {
    cap = Capability::kAvx512;
  } else if (std::strcmp(requested, "avx512_bf16") == 0) {
    cap = Capability::kAvx512Bf16;
  } else if (std::strcmp(requested, "amx_bf16") == 0) {
    cap = Capability::kAmxBf16;
  } else {
    TORCH_CHECK(false,
                "PIPELINE_CPU_CAPABILITY must be one of default, avx2, avx512, avx512_bf16, "
                "amx_bf16; got '",
                requested, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(supported) ? cap : supported;
}

const char* capability_name(Capability cap) {
  switch (cap) {
    case Capability::kAmxBf16:
      return "amx_bf16";
    case Capability::kAvx512Bf16:
      return "avx512_bf16";
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

// ----------------------------------------------------------------------------------------
// Work split: at::parallel_for runs ranges smaller than its grain size on the calling
// thread. Give every chunk at least this many multiply-adds (~20-40 us of work) so that tiny
// problems (gradcheck, decoding) skip the cost of waking threads, which is large when the
// cores are busy.
constexpr int64_t kMinParallelWork = int64_t{1} << 21;

// Most acc_t elements the split backward keeps its dQ products in, all heads together (64 MiB
// of float32; one head: up to T = 5760 at D64); beyond, it computes them again instead.
constexpr int64_t kMaxDqPartials = int64_t{1} << 24;

int64_t grain_size(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

// Item j of num_tiles, as a tile index that interleaves cheap and expensive tiles
// (0, n-1, 1, n-2, ...), so that contiguous chunks of items balance across threads.
int64_t interleaved_tile(int64_t j, int64_t num_tiles) {
  return j % 2 == 0 ? j / 2 : num_tiles - 1 - j / 2;
}

// ----------------------------------------------------------------------------------------
// Scratch memory: one 64-byte aligned block per thread, carved into tiles.

struct AlignedFree {
  void operator()(void* ptr) const { std::free(ptr); }
};

class ScratchArena {
 public:
  // Bytes that take<T>(n) uses, padding included.
  template <typename T>
  static int64_t footprint(int64_t n) {
    return round_up(n * static_cast<int64_t>(sizeof(T)), kAlign);
  }

  explicit ScratchArena(int64_t capacity_bytes)
      : capacity_(round_up(std::max<int64_t>(capacity_bytes, 1), kAlign)),
        data_(static_cast<char*>(std::aligned_alloc(kAlign, capacity_))) {
    TORCH_CHECK(data_ != nullptr, "causal_attention: out of memory for scratch buffers");
  }

  // The next n elements of type T, 64-byte aligned.
  template <typename T>
  T* take(int64_t n) {
    T* ptr = reinterpret_cast<T*>(data_.get() + used_);
    used_ += footprint<T>(n);
    TORCH_INTERNAL_ASSERT(used_ <= capacity_, "causal_attention: scratch arena too small");
    return ptr;
  }

 private:
  static constexpr int64_t kAlign = 64;
  int64_t capacity_;  // a multiple of kAlign bytes, as aligned_alloc requires
  std::unique_ptr<char, AlignedFree> data_;
  int64_t used_ = 0;
};

// ----------------------------------------------------------------------------------------
// Input checks.

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

// score_type (causal_attention_softmax.h): double for float32 and float64 inputs.
at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat ? at::kDouble : at::kFloat;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv_shapes(q, k, v);
  TORCH_CHECK(q.device().is_cpu(),
              "causal_attention: the CPU kernel needs CPU tensors, got one on ", q.device());
  TORCH_CHECK(is_supported_dtype(q.scalar_type()),
              "causal_attention: dtype must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());
}

// ----------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
using ForwardFn = void (*)(const ForwardArgs<scalar_t>&, int64_t, int64_t,
                           const ForwardScratch<scalar_t>&);

template <typename scalar_t>
ForwardFn<scalar_t> forward_kernel(Capability cap) {
  switch (cap) {
#ifdef PIPELINE_WITH_AVX512
    case Capability::kAmxBf16:  // bf16 runs run_forward_amx; the other dtypes as here
    case Capability::kAvx512Bf16:
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        return &forward_tile_avx512_bf16;
      }
      return &forward_tile_avx512<scalar_t>;
    case Capability::kAvx512:
      return &forward_tile_avx512<scalar_t>;
#endif
    case Capability::kAvx2:
      return &forward_tile_avx2<scalar_t>;
    default:
      return &forward_tile_default<scalar_t>;
  }
}

template <typename scalar_t>
void run_forward(const ForwardArgs<scalar_t>& args, int64_t BH) {
  using acc_t = acc_type<scalar_t>;
  using score_t = score_type<scalar_t>;
  const ForwardFn<scalar_t> kernel = forward_kernel<scalar_t>(active_capability());
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t Dp = round_up(args.D, kColBlock);
  using Arena = ScratchArena;
  const int64_t scratch_size =
      2 * Arena::footprint<score_t>(kTile * Dp) + 2 * Arena::footprint<acc_t>(kTile * Dp) +
      Arena::footprint<score_t>(kTile * kTile) + Arena::footprint<acc_t>(kTile * kTile) +
      Arena::footprint<score_t>(kTile) + Arena::footprint<acc_t>(kTile) +
      2 * Arena::footprint<uint32_t>(kTile * Dp / 2);

  // Per item: on average (num_tiles + 1) / 2 key tiles, two matmuls each.
  const int64_t work = (num_tiles + 1) * kTile * kTile * Dp;
  at::parallel_for(0, BH * num_tiles, grain_size(work), [&](int64_t begin, int64_t end) {
    Arena arena(scratch_size);
    ForwardScratch<scalar_t> scratch{};
    scratch.qt = arena.take<score_t>(kTile * Dp);
    scratch.k = arena.take<score_t>(kTile * Dp);
    scratch.v = arena.take<acc_t>(kTile * Dp);
    scratch.o = arena.take<acc_t>(kTile * Dp);
    scratch.sst = arena.take<score_t>(kTile * kTile);
    scratch.st = arena.take<acc_t>(kTile * kTile);
    scratch.row_max = arena.take<score_t>(kTile);
    scratch.row_sum = arena.take<acc_t>(kTile);
    scratch.qw = arena.take<uint32_t>(kTile * Dp / 2);
    scratch.kw = arena.take<uint32_t>(kTile * Dp / 2);
    for (const auto item : c10::irange(begin, end)) {
      // Query tile i costs i + 1 key tiles.
      const int64_t bh = item / num_tiles;
      const int64_t j = item % num_tiles;
      kernel(args, bh, interleaved_tile(j, num_tiles), scratch);
    }
  });
}

#ifdef PIPELINE_WITH_AVX512
// The AMX forward of bf16 inputs (causal_attention_amx.h): the keys' operands packed once,
// then the same items as run_forward, each thread with its own tile configuration.
void run_forward_amx(const ForwardArgs<c10::BFloat16>& args, int64_t BH) {
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t Dp = round_up(args.D, kAmxDepth);
  const at::Tensor packed = at::empty({BH * num_tiles * kTile * Dp}, at::kInt);
  const AmxKeys keys{reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>()),
                     num_tiles, Dp};
  // Packing a tile (scalar transposes) costs about what one tile pair's products do.
  const int64_t pack_work = kTile * kTile * Dp;
  at::parallel_for(0, BH * num_tiles, grain_size(pack_work), [&](int64_t begin, int64_t end) {
    for (const auto item : c10::irange(begin, end)) {
      amx_pack_keys(args, keys, item / num_tiles, item % num_tiles);
    }
  });
  using Arena = ScratchArena;
  const int64_t scratch_size =
      Arena::footprint<uint32_t>(kTile * Dp / 2) + Arena::footprint<float>(2 * kTile * kTile) +
      Arena::footprint<uint32_t>(kTile * kTile) + 2 * Arena::footprint<float>(kTile * Dp) +
      3 * Arena::footprint<float>(kTile);
  const int64_t work = (num_tiles + 1) * kTile * kTile * Dp;
  at::parallel_for(0, BH * num_tiles, grain_size(work), [&](int64_t begin, int64_t end) {
    Arena arena(scratch_size);
    AmxForwardScratch scratch{};
    scratch.q = arena.take<uint32_t>(kTile * Dp / 2);
    scratch.s = arena.take<float>(2 * kTile * kTile);
    scratch.p = arena.take<uint32_t>(kTile * kTile);
    scratch.o = arena.take<float>(kTile * Dp);
    scratch.pv = arena.take<float>(kTile * Dp);
    scratch.row_max = arena.take<float>(kTile);
    scratch.row_sum = arena.take<float>(kTile);
    scratch.alpha = arena.take<float>(kTile);
    amx_tiles_begin();
    for (const auto item : c10::irange(begin, end)) {
      const int64_t bh = item / num_tiles;
      forward_tile_amx(args, keys, bh, interleaved_tile(item % num_tiles, num_tiles), scratch);
    }
    amx_tiles_end();
  });
}
#endif

// run_forward, or the AMX forward for bf16 where the capability is amx_bf16.
template <typename scalar_t>
void run_forward_any(const ForwardArgs<scalar_t>& args, int64_t BH) {
#ifdef PIPELINE_WITH_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (active_capability() == Capability::kAmxBf16) {
      run_forward_amx(args, BH);
      return;
    }
  }
#endif
  run_forward(args, BH);
}

// The tensor itself when its last dimension is contiguous (the kernels read any other
// strides), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous();
}

template <typename T>
HeadView<T> head_view(const at::Tensor& t, T* data) {
  return HeadView<T>{data, t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename scalar_t>
HeadView<const scalar_t> input_view(const at::Tensor& t) {
  return head_view(t, t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
HeadView<scalar_t> output_view(const at::Tensor& t) {
  return head_view(t, t.mutable_data_ptr<scalar_t>());
}

template <typename acc_t>
acc_t softmax_scale(int64_t D) {
  return static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(D)));
}

// The forward on (B, H, T, D) tensors with a contiguous last dimension (out and lse
// allocated by the caller: out in any such layout, lse contiguous).
void forward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse) {
  if (out.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_fwd", [&] {
        using acc_t = acc_type<scalar_t>;
        ForwardArgs<scalar_t> args{};
        args.q = input_view<scalar_t>(q);
        args.k = input_view<scalar_t>(k);
        args.v = input_view<scalar_t>(v);
        args.out = output_view<scalar_t>(out);
        args.lse = lse.mutable_data_ptr<score_type<scalar_t>>();
        args.T = q.size(2);
        args.D = q.size(3);
        args.scale = softmax_scale<acc_t>(args.D);
        run_forward_any(args, q.size(0) * q.size(1));
      });
}

// The packed projection (B, T, 3C) the kernels read (contiguous along C) and its q, k, v
// as (B, H, T, D) views, checked.
std::tuple<at::Tensor, std::array<at::Tensor, 3>> packed_inputs(const at::Tensor& qkv_in,
                                                                int64_t n_head) {
  check_packed_qkv(qkv_in, n_head);
  at::Tensor qkv = qkv_in.stride(2) == 1 ? qkv_in : qkv_in.contiguous();
  std::array<at::Tensor, 3> heads = split_packed_qkv(qkv, n_head);
  check_qkv(heads[0], heads[1], heads[2]);
  return {std::move(qkv), std::move(heads)};
}

// ----------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t>
using BackwardFn = void (*)(const BackwardArgs<scalar_t>&, BackwardItem, int64_t, int64_t,
                            const BackwardScratch<scalar_t>&);

template <typename scalar_t>
BackwardFn<scalar_t> backward_kernel(Capability cap) {
  switch (cap) {
#ifdef PIPELINE_WITH_AVX512
    case Capability::kAmxBf16:  // bf16 runs run_backward_amx; the other dtypes as here
    case Capability::kAvx512Bf16:
    case Capability::kAvx512:
      return &backward_item_avx512<scalar_t>;
#endif
    case Capability::kAvx2:
      return &backward_item_avx2<scalar_t>;
    default:
      return &backward_item_default<scalar_t>;
  }
}

template <typename scalar_t>
void run_backward(BackwardArgs<scalar_t>& args, int64_t BH) {
  using acc_t = acc_type<scalar_t>;
  const BackwardFn<scalar_t> kernel = backward_kernel<scalar_t>(active_capability());
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t Dp = round_up(args.D, kColBlock);
  using score_t = score_type<scalar_t>;
  using Arena = ScratchArena;
  const int64_t scratch_size = 4 * Arena::footprint<acc_t>(kTile * Dp) +
                               Arena::footprint<score_t>(kTile * Dp) +
                               Arena::footprint<acc_t>(key_operands_size<scalar_t>(Dp)) +
                               Arena::footprint<acc_t>(2 * Dp * kTile) +
                               Arena::footprint<score_t>(kTile * kTile) +
                               2 * Arena::footprint<acc_t>(kTile * kTile) +
                               Arena::footprint<acc_t>(num_tiles * kTile * Dp);
  auto for_items = [&](BackwardItem kind, int64_t num_items, int64_t work_per_item) {
    at::parallel_for(0, num_items, grain_size(work_per_item), [&](int64_t begin, int64_t end) {
      Arena arena(scratch_size);
      BackwardScratch<scalar_t> scratch{};
      scratch.q = arena.take<acc_t>(kTile * Dp);
      if constexpr (std::is_same_v<acc_t, score_t>) {
        scratch.qs = scratch.q;
      } else {
        scratch.qs = arena.take<score_t>(kTile * Dp);
      }
      scratch.dout = arena.take<acc_t>(kTile * Dp);
      scratch.keys = arena.take<acc_t>(key_operands_size<scalar_t>(Dp));
      scratch.dt = arena.take<acc_t>(2 * Dp * kTile);
      scratch.dk = arena.take<acc_t>(kTile * Dp);
      scratch.dv = arena.take<acc_t>(kTile * Dp);
      scratch.sp = arena.take<score_t>(kTile * kTile);
      scratch.p = arena.take<acc_t>(kTile * kTile);
      scratch.ds = arena.take<acc_t>(kTile * kTile);
      scratch.dq = arena.take<acc_t>(num_tiles * kTile * Dp);
      for (const auto i : c10::irange(begin, end)) {
        if (kind == BackwardItem::kHead) {
          kernel(args, kind, i, 0, scratch);
        } else {
          kernel(args, kind, i / num_tiles, interleaved_tile(i % num_tiles, num_tiles),
                 scratch);
        }
      }
    });
  };

  // Per head: num_tiles (num_tiles + 1) / 2 tile pairs, five matmuls each.
  const int64_t pair_work = kTile * kTile * Dp;
  const int64_t head_work = num_tiles * (num_tiles + 1) / 2 * 5 * pair_work;
  const int64_t threads = at::get_num_threads();
  args.key_operands = nullptr;
  args.tile_norms_sq = nullptr;
  args.dq_partials = nullptr;
  if (BH >= threads || BH * head_work < 2 * threads * kMinParallelWork) {
    for_items(BackwardItem::kHead, BH, head_work);
    return;
  }
  // Fewer heads than threads: split each head by tiles (same results). The dQ products are
  // kept where they fit kMaxDqPartials (5 matmuls per pair, as unsplit), else computed
  // again (7).
  const at::TensorOptions acc_options =
      at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor key_operands =
      at::empty({BH * num_tiles * key_operands_size<scalar_t>(Dp)}, acc_options);
  args.key_operands = key_operands.mutable_data_ptr<acc_t>();
  const at::Tensor tile_norms_sq = at::empty({BH * num_tiles * 2}, acc_options);
  args.tile_norms_sq = tile_norms_sq.mutable_data_ptr<acc_t>();
  at::Tensor dq_partials;
  const int64_t partials_size = BH * dq_partials_size(num_tiles, Dp);
  if (partials_size <= kMaxDqPartials) {
    dq_partials = at::empty({partials_size}, acc_options);
    args.dq_partials = dq_partials.mutable_data_ptr<acc_t>();
  }
  const bool kept = args.dq_partials != nullptr;
  for_items(BackwardItem::kPrepare, BH * num_tiles, 5 * kTile * Dp);
  // Matmuls per pair: kKeys 5 (dQ kept) or 4, kQueries none (a sum) or 3.
  const int64_t pairs_per_tile = (num_tiles + 1) / 2;
  for_items(BackwardItem::kKeys, BH * num_tiles, pairs_per_tile * (kept ? 5 : 4) * pair_work);
  for_items(BackwardItem::kQueries, BH * num_tiles,
            pairs_per_tile * (kept ? kTile * Dp : 3 * pair_work));
}

#ifdef PIPELINE_WITH_AVX512
// The AMX backward of bf16 inputs (causal_attention_amx.h): batch*head items, or with fewer
// heads than threads the split items of backward_item_amx (same bits) where the dQ products
// fit kMaxDqPartials; beyond, one item per head even then (the split that computes P and dS
// again has no AMX version).
void run_backward_amx(const BackwardArgs<c10::BFloat16>& args, int64_t BH) {
  const int64_t num_tiles = (args.T + kTile - 1) / kTile;
  const int64_t Tp = num_tiles * kTile;
  const int64_t Dp = round_up(args.D, kAmxDepth);
  const int64_t block = kTile * Dp / 2;
  const int64_t pair_work = kTile * kTile * Dp;
  const int64_t head_work = num_tiles * (num_tiles + 1) / 2 * 5 * pair_work;
  const int64_t threads = at::get_num_threads();
  const int64_t partials_size = BH * dq_partials_size(num_tiles, Dp);
  const bool split = BH < threads && BH * head_work >= 2 * threads * kMinParallelWork &&
                     partials_size <= kMaxDqPartials;
  using Arena = ScratchArena;
  // Per thread: the pair's buffers, and for whole heads the head's operands and dQ^T.
  const int64_t pair_size =
      2 * Arena::footprint<float>(kTile * kTile) + Arena::footprint<uint32_t>(kTile * kTile / 2) +
      2 * Arena::footprint<uint32_t>(kTile * kTile) + 3 * Arena::footprint<float>(kTile * Dp);
  const int64_t head_size =
      Arena::footprint<uint32_t>(num_tiles * 4 * block) + 2 * Arena::footprint<float>(Tp) +
      Arena::footprint<uint32_t>(3 * block) + Arena::footprint<float>(Dp * amx_dqt_stride(args.T));
  AmxBackwardScratch shared{};
  at::Tensor shared_queries, shared_lse, shared_keys, partials;
  if (split) {
    shared_queries = at::empty({BH * num_tiles * 4 * block}, at::kInt);
    shared_lse = at::empty({2 * BH * Tp}, at::kFloat);
    shared_keys = at::empty({BH * num_tiles * 3 * block}, at::kInt);
    partials = at::empty({partials_size}, at::kFloat);
    shared.queries = reinterpret_cast<uint32_t*>(shared_queries.mutable_data_ptr<int32_t>());
    shared.lse = shared_lse.mutable_data_ptr<float>();
    shared.delta = shared.lse + BH * Tp;
    shared.keys = reinterpret_cast<uint32_t*>(shared_keys.mutable_data_ptr<int32_t>());
  }
  auto for_items = [&](BackwardItem kind, int64_t num_items, int64_t work_per_item) {
    at::parallel_for(0, num_items, grain_size(work_per_item), [&](int64_t begin, int64_t end) {
      Arena arena(pair_size + (split ? 0 : head_size));
      AmxBackwardScratch scratch = shared;
      if (!split) {
        scratch.queries = arena.take<uint32_t>(num_tiles * 4 * block);
        scratch.lse = arena.take<float>(Tp);
        scratch.delta = arena.take<float>(Tp);
        scratch.keys = arena.take<uint32_t>(3 * block);
        scratch.dqt = arena.take<float>(Dp * amx_dqt_stride(args.T));
      }
      scratch.s = arena.take<float>(kTile * kTile);
      scratch.dp = arena.take<float>(kTile * kTile);
      scratch.p_rows = arena.take<uint32_t>(kTile * kTile / 2);
      scratch.ds_rows = arena.take<uint32_t>(kTile * kTile);
      scratch.ds_pairs = arena.take<uint32_t>(kTile * kTile);
      scratch.dk = arena.take<float>(kTile * Dp);
      scratch.dv = arena.take<float>(kTile * Dp);
      scratch.dq_pair = arena.take<float>(kTile * Dp);
      amx_tiles_begin();
      for (const auto i : c10::irange(begin, end)) {
        if (kind == BackwardItem::kHead) {
          backward_head_amx(args, i, Dp, scratch);
        } else {
          const int64_t tile = kind == BackwardItem::kPrepare
                                   ? i % num_tiles
                                   : interleaved_tile(i % num_tiles, num_tiles);
          backward_item_amx(args, kind, i / num_tiles, tile, Dp, scratch,
                            split ? partials.mutable_data_ptr<float>() : nullptr);
        }
      }
      amx_tiles_end();
    });
  };
  if (!split) {
    for_items(BackwardItem::kHead, BH, head_work);
    return;
  }
  const int64_t pairs_per_tile = (num_tiles + 1) / 2;
  for_items(BackwardItem::kPrepare, BH * num_tiles, 5 * kTile * Dp);
  for_items(BackwardItem::kKeys, BH * num_tiles, pairs_per_tile * 5 * pair_work);
  for_items(BackwardItem::kQueries, BH * num_tiles, pairs_per_tile * kTile * Dp);
}
#endif

// run_backward, or the AMX backward for bf16 where the capability is amx_bf16.
template <typename scalar_t>
void run_backward_any(BackwardArgs<scalar_t>& args, int64_t BH) {
#ifdef PIPELINE_WITH_AVX512
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (active_capability() == Capability::kAmxBf16) {
      run_backward_amx(args, BH);
      return;
    }
  }
#endif
  run_backward(args, BH);
}

// The backward on (B, H, T, D) tensors with a contiguous last dimension (dq, dk, dv
// allocated by the caller in any such layout).
void backward_into(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  if (dq.numel() == 0) {
    return;
  }
  // delta is acc_t: float32 for every input dtype but float64.
  const at::Tensor delta = at::empty(
      lse.sizes(), lse.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention_bwd", [&] {
        using acc_t = acc_type<scalar_t>;
        BackwardArgs<scalar_t> args{};
        args.grad_out = input_view<scalar_t>(grad_out);
        args.q = input_view<scalar_t>(q);
        args.k = input_view<scalar_t>(k);
        args.v = input_view<scalar_t>(v);
        args.out = input_view<scalar_t>(out);
        args.lse = lse.const_data_ptr<score_type<scalar_t>>();
        args.delta = delta.mutable_data_ptr<acc_t>();
        args.dq = output_view<scalar_t>(dq);
        args.dk = output_view<scalar_t>(dk);
        args.dv = output_view<scalar_t>(dv);
        args.T = q.size(2);
        args.D = q.size(3);
        args.scale = softmax_scale<acc_t>(args.D);
        run_backward_any(args, q.size(0) * q.size(1));
      });
}

}  // namespace

// ----------------------------------------------------------------------------------------
// The operators' CPU kernels (declared in causal_attention_ops.h, registered in
// registration.cpp).

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, H, T, D}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options().dtype(lse_dtype(q.scalar_type())));
  forward_into(rows_contiguous(q), rows_contiguous(k), rows_contiguous(v), out, lse);
  return {out, lse};
}

// The packed entry point: q, k, v are read in place from the (B, T, 3C) projection and the
// output is written as (B, T, C), the layout the output projection takes.
std::tuple<at::Tensor, at::Tensor> causal_attention_qkv_fwd_cpu(const at::Tensor& qkv_in,
                                                                int64_t n_head) {
  const auto [qkv, heads] = packed_inputs(qkv_in, n_head);
  const auto& [q, k, v] = heads;
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  at::Tensor out = at::empty({B, T, C}, qkv.options());
  at::Tensor lse = at::empty({B, n_head, T}, qkv.options().dtype(lse_dtype(qkv.scalar_type())));
  forward_into(q, k, v, heads_view(out, n_head), lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse) {
  check_qkv(q, k, v);
  check_backward_args(grad_out, q, out, lse, lse_dtype(q.scalar_type()));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  backward_into(rows_contiguous(grad_out), rows_contiguous(q), rows_contiguous(k),
                rows_contiguous(v), rows_contiguous(out), lse.contiguous(), dq, dk, dv);
  return {dq, dk, dv};
}

// The packed backward: the gradient of the (B, T, 3C) projection, dq, dk and dv written in
// place into one tensor.
at::Tensor causal_attention_qkv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv_in,
                                        const at::Tensor& out, const at::Tensor& lse,
                                        int64_t n_head) {
  const auto [qkv, heads] = packed_inputs(qkv_in, n_head);
  const auto& [q, k, v] = heads;
  check_packed_outputs(grad_out, out, qkv);
  const at::Tensor grad_out_heads = heads_view(grad_out, n_head);
  const at::Tensor out_heads = heads_view(out, n_head);
  check_backward_args(grad_out_heads, q, out_heads, lse, lse_dtype(q.scalar_type()));
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options());
  const auto [dq, dk, dv] = split_packed_qkv(dqkv, n_head);
  backward_into(rows_contiguous(grad_out_heads), q, k, v, rows_contiguous(out_heads),
                lse.contiguous(), dq, dk, dv);
  return dqkv;
}

std::string cpu_capability() {
  return capability_name(active_capability());
}

}  // namespace pipeline::attention
