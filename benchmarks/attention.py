"""Benchmark the fused causal attention op against PyTorch's SDPA on CPU.

    python benchmarks/attention.py [--quick] [--dtype float32|float64]

For each case it times the forward and forward+backward of `pipeline.kernels.causal_attention`
and of `F.scaled_dot_product_attention(..., is_causal=True)` in the same process (warmup, then
the median of several repeats; torch's default thread count), and prints milliseconds, the
speed-up (SDPA time / ours; > 1 means ours is faster) and GFLOP/s. FLOPs count only the
causal half: the forward does 2 matmuls over the T(T+1)/2 visible (query, key) pairs,
4 * B * H * D * T(T+1)/2 FLOPs; forward+backward counts 3.5x that (the backward's 5 matmuls,
the recomputation of Q K^T included, as in the FlashAttention papers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import causal_attention, cpu_capability  # noqa: E402


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    head_dim: int

    def __str__(self) -> str:
        return f"B{self.batch} H{self.heads} T{self.seq_len} D{self.head_dim}"

    def forward_flops(self) -> float:
        pairs = self.seq_len * (self.seq_len + 1) / 2
        return 4.0 * self.batch * self.heads * self.head_dim * pairs


CASES = [Case(16, 4, 128, 32), Case(16, 4, 128, 64), Case(4, 12, 256, 64), Case(2, 12, 1024, 64)]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_case(
    attention: AttentionFn, case: Case, dtype: torch.dtype, warmup: int, repeats: int
) -> tuple[float, float]:
    """Median milliseconds of (forward, forward + backward)."""
    gen = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    grad = torch.randn(shape, generator=gen, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v)

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def forward_backward() -> None:
        out = attention(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), grad)

    return median_ms(forward, warmup, repeats), median_ms(forward_backward, warmup, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 20 s)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    warmup, repeats = (1, 3) if args.quick else (3, 10)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"kernel ISA: {cpu_capability()}, median of {repeats}"
    )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} before starting; timings may be noisy")
    header = (
        f"{'case':<22} {'pass':<8} {'ours ms':>9} {'SDPA ms':>9} {'SDPA/ours':>10} "
        f"{'ours GF/s':>10} {'SDPA GF/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for case in CASES:
        ours = time_case(causal_attention, case, dtype, warmup, repeats)
        theirs = time_case(sdpa, case, dtype, warmup, repeats)
        for name, factor, ours_ms, sdpa_ms in (
            ("fwd", 1.0, ours[0], theirs[0]),
            ("fwd+bwd", 3.5, ours[1], theirs[1]),
        ):
            gflop = factor * case.forward_flops() / 1e9
            print(
                f"{case!s:<22} {name:<8} {ours_ms:9.2f} {sdpa_ms:9.2f} {sdpa_ms / ours_ms:10.2f} "
                f"{gflop / (ours_ms / 1e3):10.1f} {gflop / (sdpa_ms / 1e3):10.1f}"
            )


if __name__ == "__main__":
    main()
