// The CPU attention kernels for AVX-512, every dtype, and the bf16 forward for AVX512_BF16:
// see causal_attention_kernel.h. setup.py compiles this file only where it may run (see
// PIPELINE_CPU_ISAS there); the dispatcher then defines PIPELINE_WITH_AVX512.
#include "causal_attention_kernel.h"

namespace pipeline::attention {
PIPELINE_DEFINE_ENTRY_POINTS(avx512, PIPELINE_TARGET_AVX512, IsaAvx512)

PIPELINE_TARGET_AVX512_BF16 void forward_tile_avx512_bf16(
    const ForwardArgs<c10::BFloat16>& args, int64_t bh, int64_t tile,
    const ForwardScratch<c10::BFloat16>& s) {
  forward_tile<c10::BFloat16, IsaAvx512Bf16>(args, bh, tile, s);
}
}  // namespace pipeline::attention
