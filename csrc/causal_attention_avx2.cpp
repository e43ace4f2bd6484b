// The CPU attention kernels for AVX2 + FMA, every dtype: see causal_attention_kernel.h.
#include "causal_attention_kernel.h"

namespace pipeline::attention {
PIPELINE_DEFINE_ENTRY_POINTS(avx2, PIPELINE_TARGET_AVX2, IsaAvx2)
}  // namespace pipeline::attention
