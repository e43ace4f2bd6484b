"""Benchmark the CUDA fused causal attention op against PyTorch's FlashAttention-2 SDPA.

    python benchmarks/attention_cuda.py [--dtype bfloat16|float16] [--head-dim 64]

For B16 H12 and T in {1024, 2048} it times, in the same process, the forward and the
forward+backward of `pipeline.kernels.causal_attention` and of
`F.scaled_dot_product_attention(..., is_causal=True)` restricted to the FLASH_ATTENTION
backend (CUDA events, warmup, median of repeats), and prints milliseconds, the ratio
(SDPA time / ours; > 1 means ours is faster) and TFLOP/s over the causal half
(forward: 4 * B * H * D * T(T+1)/2 FLOPs; forward+backward: 3.5x that, as in the
FlashAttention papers — our deterministic backward actually does 7 matmuls, not 5).
Exits with a message (status 0) when there is no GPU or the CUDA kernels are not built.
benchmarks/device_check.py times its grid with these functions (and SDPA's efficient backend).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import AttentionFn, Case, attention_passes  # noqa: E402  (benchmarks/attention.py)

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
Timer = Callable[[Callable[[], object], int, int], float]


def sdpa_with(backend: SDPBackend) -> AttentionFn:
    """Causal SDPA restricted to one backend (an error, not a silent fallback, if it cannot run)."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attention


sdpa_flash = sdpa_with(SDPBackend.FLASH_ATTENTION)


def cuda_kernels_built() -> bool:
    """Whether the loaded pipeline.kernels._C has CUDA kernels (a CPU torch builds none)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pipeline::causal_attention_fwd", "CUDA")


def case_tensors(case: Case, dtype: torch.dtype, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient of `case`, seeded: every contender gets the same values."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    return tuple(torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(4))


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_fn(
    attention: AttentionFn,
    tensors: tuple[torch.Tensor, ...],
    warmup: int,
    repeats: int,
    timer: Timer = median_ms,
) -> tuple[float, float]:
    """Median ms of the forward and of the forward + backward (`timer`: CUDA events by default)."""
    forward, forward_backward = attention_passes(attention, *tensors)
    return timer(forward, warmup, repeats), timer(forward_backward, warmup, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device available: nothing to benchmark")
        return 0
    from pipeline.kernels import causal_attention

    if not cuda_kernels_built():
        print(
            "pipeline.kernels._C has no CUDA kernels (built with a CPU-only torch or "
            "PIPELINE_NO_CUDA=1): rebuild with `python setup.py build_ext --inplace`"
        )
        return 0

    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, "
        f"median of {args.repeats} (CUDA events); ratio = SDPA flash time / ours"
    )
    header = (
        f"{'case':<22}{'pass':<10}{'ours ms':>10}{'sdpa ms':>10}{'ratio':>8}"
        f"{'ours TF/s':>11}{'sdpa TF/s':>11}"
    )
    print(header)
    for seq_len in args.seq_lens:
        case = Case(args.batch, args.heads, seq_len, args.head_dim)
        tensors = case_tensors(case, dtype)
        ours = time_fn(causal_attention, tensors, warmup=5, repeats=args.repeats)
        base = time_fn(sdpa_flash, tensors, warmup=5, repeats=args.repeats)
        fwd_flops = case.forward_flops()
        name = str(case)
        for label, flops, mine, theirs in (
            ("fwd", fwd_flops, ours[0], base[0]),
            ("fwd+bwd", 3.5 * fwd_flops, ours[1], base[1]),
        ):
            print(
                f"{name:<22}{label:<10}{mine:>10.3f}{theirs:>10.3f}{theirs / mine:>8.2f}"
                f"{flops / mine / 1e9:>11.1f}{flops / theirs / 1e9:>11.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
