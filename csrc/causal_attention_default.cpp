// The CPU attention kernels for baseline x86-64 (SSE2), every dtype: see
// causal_attention_kernel.h. One translation unit per instruction set, compiled in parallel.
#include "causal_attention_kernel.h"

namespace pipeline::attention {
PIPELINE_DEFINE_ENTRY_POINTS(default, PIPELINE_TARGET_DEFAULT, IsaDefault)
}  // namespace pipeline::attention
