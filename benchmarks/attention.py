"""Benchmark the fused causal attention op against PyTorch's SDPA on CPU.

    python benchmarks/attention.py [--quick] [--dtype float32|float64|bfloat16|float16]

For each case it times the forward and forward+backward of `pipeline.kernels.causal_attention`
and of `F.scaled_dot_product_attention(..., is_causal=True)` in the same process (warmup, then
the median of several repeats; torch's default thread count), and prints milliseconds, the
speed-up (SDPA time / ours; > 1 means ours is faster) and GFLOP/s. With a 16-bit --dtype ours
runs in that dtype and SDPA runs twice, in float32 and in the 16-bit dtype, and both ratios
are printed (on CPUs without native bf16 matmuls SDPA is usually slower in bf16 than in
float32, so the float32 ratio is the one that says whether bf16 is worth it).

FLOPs count only the causal half: the forward does 2 matmuls over the T(T+1)/2 visible
(query, key) pairs, 4 * B * H * D * T(T+1)/2 FLOPs; forward+backward counts 3.5x that (the
backward's 5 matmuls, the recomputation of Q K^T included, as in the FlashAttention papers).

Cases come in groups: the model shapes, head dimension at B4 H12 T256, sequence length at
B1 H12 D64 (forward+backward only up to T2048, to keep the run short) and few (batch, head)
pairs at T1024 D64, where the work must be split inside a head to keep every core busy.

A last table times what the model's attention layer does between its two projections, from
the packed (B, T, 3C) qkv to the (B, T, C) input of the output projection, forward+backward:
the packed entry point (`causal_attention_qkv`, what the model runs) against the same op
behind the split / transpose / merge copies (the unpacked path) and against SDPA behind them.
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

from pipeline.kernels import causal_attention, causal_attention_qkv, cpu_capability  # noqa: E402
from pipeline.model.attention import merge_heads, split_heads  # noqa: E402


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    backward: bool = True  # also time forward+backward

    def __str__(self) -> str:
        return f"B{self.batch} H{self.heads} T{self.seq_len} D{self.head_dim}"

    def forward_flops(self) -> float:
        pairs = self.seq_len * (self.seq_len + 1) / 2
        return 4.0 * self.batch * self.heads * self.head_dim * pairs


GROUPS: dict[str, list[Case]] = {
    "model shapes": [
        Case(16, 4, 128, 32),
        Case(16, 4, 128, 64),
        Case(4, 12, 256, 64),
        Case(2, 12, 1024, 64),
    ],
    "head dim (B4 H12 T256)": [Case(4, 12, 256, d) for d in (32, 64, 128)],
    "sequence length (B1 H12 D64)": [
        Case(1, 12, t, 64, backward=t <= 2048) for t in (256, 1024, 2048, 4096)
    ],
    "few heads (T1024 D64)": [Case(1, 1, 1024, 64), Case(1, 2, 1024, 64), Case(1, 4, 1024, 64)],
}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float) -> float:
    """Median of up to `repeats` timed calls; stops early (after at least 3) once the timed
    calls have taken `budget_s`, so that the long cases do not dominate the run."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def attention_passes(
    attention: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two timed passes: forward without autograd, and forward + backward to q, k, v."""

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v)

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def forward_backward() -> None:
        out = attention(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), grad)

    return forward, forward_backward


def time_case(
    attention: AttentionFn,
    case: Case,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    budget_s: float,
) -> tuple[float, float | None]:
    """Median milliseconds of (forward, forward + backward or None)."""
    gen = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    # Same values whatever the dtype (drawn in float32, then rounded).
    q, k, v, grad = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    forward, forward_backward = attention_passes(attention, q, k, v, grad)
    fwd = median_ms(forward, warmup, repeats, budget_s)
    if not case.backward:
        return fwd, None
    return fwd, median_ms(forward_backward, warmup, repeats, budget_s)


PACKED_CASES = [
    Case(16, 4, 128, 32),
    Case(16, 4, 128, 64),
    Case(4, 12, 256, 64),
    Case(2, 12, 1024, 64),
]

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]


def unpacked(attention: AttentionFn) -> LayerFn:
    """The layer path around a (B, H, T, D) op: split the heads, attend, merge them back."""
    return lambda qkv, n_head: merge_heads(attention(*split_heads(qkv, n_head)))


def time_layer(
    layer: LayerFn, case: Case, dtype: torch.dtype, warmup: int, repeats: int, budget_s: float
) -> float:
    """Median milliseconds of forward + backward from the packed qkv to (B, T, C)."""
    gen = torch.Generator().manual_seed(0)
    c = case.heads * case.head_dim
    qkv = torch.randn(case.batch, case.seq_len, 3 * c, generator=gen).to(dtype)
    grad = torch.randn(case.batch, case.seq_len, c, generator=gen).to(dtype)
    qkv.requires_grad_()

    def forward_backward() -> None:
        torch.autograd.grad(layer(qkv, case.heads), qkv, grad)

    return median_ms(forward_backward, warmup, repeats, budget_s)


def print_packed_table(dtype: torch.dtype, warmup: int, repeats: int, budget_s: float) -> None:
    print("-- layer path, packed qkv (B, T, 3C) -> (B, T, C), fwd+bwd " + "-" * 30)
    print(
        f"{'case':<22} {'packed ms':>10} {'unpacked ms':>12} {'/packed':>8} "
        f"{'SDPA unpacked ms':>17} {'/packed':>8}"
    )
    for case in PACKED_CASES:
        ours = time_layer(causal_attention_qkv, case, dtype, warmup, repeats, budget_s)
        split = time_layer(unpacked(causal_attention), case, dtype, warmup, repeats, budget_s)
        theirs = time_layer(unpacked(sdpa), case, dtype, warmup, repeats, budget_s)
        print(
            f"{case!s:<22} {ours:10.2f} {split:12.2f} {split / ours:8.2f} "
            f"{theirs:17.2f} {theirs / ours:8.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 30 s)")
    parser.add_argument(
        "--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    half = dtype in (torch.bfloat16, torch.float16)
    warmup, repeats, budget_s = (1, 5, 0.3) if args.quick else (3, 10, 2.0)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ours in {args.dtype}, "
        f"kernel ISA: {cpu_capability()}, median of up to {repeats}"
    )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} before starting; timings may be noisy")
    # SDPA baselines: the same dtype, and float32 too when ours runs in 16 bits.
    short = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
    baselines = [torch.float32, dtype] if half else [dtype]
    names = [short.get(d, "f16") for d in baselines]
    header = f"{'case':<22} {'pass':<8} {'ours ms':>9}"
    for name in names:
        header += f" {'SDPA-' + name + ' ms':>13} {'/ours':>6}"
    header += f" {'ours GF/s':>10}" + "".join(f" {'SDPA-' + n + ' GF/s':>15}" for n in names)
    print(header)
    for group, cases in GROUPS.items():
        print(f"-- {group} " + "-" * (len(header) - len(group) - 4))
        for case in cases:
            ours = time_case(causal_attention, case, dtype, warmup, repeats, budget_s)
            theirs = [time_case(sdpa, case, d, warmup, repeats, budget_s) for d in baselines]
            for i, (name, factor) in enumerate((("fwd", 1.0), ("fwd+bwd", 3.5))):
                ours_ms = ours[i]
                if ours_ms is None:
                    continue
                gflop = factor * case.forward_flops() / 1e9
                line = f"{case!s:<22} {name:<8} {ours_ms:9.2f}"
                sdpa_ms = [ms for t in theirs if (ms := t[i]) is not None]
                for ms in sdpa_ms:
                    line += f" {ms:13.2f} {ms / ours_ms:6.2f}"
                line += f" {gflop / (ours_ms / 1e3):10.1f}"
                line += "".join(f" {gflop / (ms / 1e3):15.1f}" for ms in sdpa_ms)
                print(line)
    print_packed_table(dtype, warmup, repeats, budget_s)


if __name__ == "__main__":
    main()
