// The instruction sets the CPU attention kernels are compiled for, and how: the target
// attributes of the per-ISA entry points, the always_inline that carries every kernel body
// into them, the optimize options of the kernel headers, and the Isa tag types the kernel
// templates take (vector width, register count, bf16 dot products). One file says what each
// instruction set gives, so that the tiles and the softmax stay plain C++ templates on an Isa
// parameter; causal_attention.cpp picks one of the compiled sets at run time.
#pragma once

#include <type_traits>

#include <c10/util/BFloat16.h>

#define PIPELINE_ALWAYS_INLINE inline __attribute__((always_inline))
#define PIPELINE_TARGET_DEFAULT
#define PIPELINE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PIPELINE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#define PIPELINE_TARGET_AVX512_BF16                                                         \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,"          \
                        "prefer-vector-width=512")))
// AVX512_BF16 plus the AMX tiles and their bf16 products (causal_attention_amx.h).
#define PIPELINE_TARGET_AMX_BF16                                                          \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,"         \
                        "amx-tile,amx-bf16,prefer-vector-width=512")))

// The kernels never read floating-point exception flags. Under GCC's default
// -ftrapping-math the selects in softmax_exp stay branches (a comparison might trap), which
// keeps every exp loop scalar; without it they become blends and the loops are vectorised
// (same results: no value changes, only which operations may be speculated). Each header
// with kernel code puts that code (after its #includes) between these two, so that all kernel
// functions share one set of options: GCC may not inline across different ones.
#define PIPELINE_KERNEL_OPTIONS_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define PIPELINE_KERNEL_OPTIONS_END _Pragma("GCC pop_options")

namespace pipeline::attention {

// Instruction sets: vector width and register count decide the register-tile height
// (TileShape, causal_attention_tiles.h). kBf16Dot: the AVX512_BF16 dot products are
// available (see register_tile_bf16).
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

// Whether the kernels for `Isa` compute the products of two bf16 inputs with bf16 dot
// products (word tiles) instead of converting the inputs to float32 tiles.
template <typename scalar_t, typename Isa>
constexpr bool uses_bf16_dot() {
  return Isa::kBf16Dot && std::is_same_v<scalar_t, c10::BFloat16>;
}

}  // namespace pipeline::attention
