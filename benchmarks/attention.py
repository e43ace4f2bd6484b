"""Benchmark the fused causal attention op against PyTorch's SDPA on CPU.

    python benchmarks/attention.py [--quick] [--dtype float32|float64|bfloat16|float16]
        [--case "B2 H12 T1024 D64" ...] [--repeats N]

For each case it times the forward and forward+backward of `pipeline.kernels.causal_attention`
and of `F.scaled_dot_product_attention(..., is_causal=True)` in the same process, in turns
(warmup, then rounds of one call of each contender, torch's default thread count), and prints
each one's median milliseconds, the speed-up (the median over rounds of SDPA time / ours; > 1
means ours is faster: alternating keeps the ratio honest on a loaded machine, where the times
themselves drift) and GFLOP/s. The first line names the kernel's instruction set and the CPU's
vector flags. With a 16-bit --dtype ours runs in that dtype and SDPA runs twice, in float32 and
in the 16-bit dtype, and both ratios are printed (on CPUs without native bf16 matmuls SDPA is
usually slower in bf16 than in float32, so the float32 ratio is the one that says whether bf16
is worth it). The last column, "of mm", is ours' GFLOP/s over float32 torch.mm's, the mm
timed in the same rounds (issue 32's fp32 goal: 0.85 for forward+backward).

FLOPs count only the causal half: the forward does 2 matmuls over the T(T+1)/2 visible
(query, key) pairs, 4 * B * H * D * T(T+1)/2 FLOPs; forward+backward counts 3.5x that (the
backward's 5 matmuls, the recomputation of Q K^T included, as in the FlashAttention papers).

Cases come in groups: the model shapes, head dimension at B4 H12 T256, sequence length at
B1 H12 D64 (T256-4096, the range issue 32's goals name) and few (batch, head)
pairs at T1024 D64, where the work must be split inside a head to keep every core busy.

A last table times what the model's attention layer does between its two projections, from
the packed (B, T, 3C) qkv to the (B, T, C) input of the output projection, forward+backward:
the packed entry point (`causal_attention_qkv`, what the model runs) against the same op
behind the split / transpose / merge copies (the unpacked path) and against SDPA behind them.
"""

from __future__ import annotations

import argparse
import math
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
    "sequence length (B1 H12 D64)": [Case(1, 12, t, 64) for t in (256, 1024, 2048, 4096)],
    "few heads (T1024 D64)": [Case(1, 1, 1024, 64), Case(1, 2, 1024, 64), Case(1, 4, 1024, 64)],
}

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def alternate_ms(
    fns: list[Callable[[], object]], warmup: int, repeats: int, budget_s: float
) -> tuple[list[float], list[float]]:
    """Times the contenders in turns (one call each per round, the order rotating), so that a
    change of load hits them alike: each one's median milliseconds, and the median over the
    rounds of each one's time / the first one's (the ratio a loaded machine keeps). Stops
    early (after at least 3 rounds) once the rounds have taken `budget_s`."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    rounds = 0
    while rounds < repeats and (rounds < 3 or sum(map(sum, times)) < budget_s):
        for j in range(len(fns)):
            i = (j + rounds) % len(fns)
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
        rounds += 1
    medians = [1e3 * statistics.median(t) for t in times]
    ratios = [statistics.median(a / b for a, b in zip(t, times[0], strict=True)) for t in times]
    return medians, ratios


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


def case_passes(
    attention: AttentionFn, case: Case, dtype: torch.dtype
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The forward and forward + backward passes of `attention` on the case's inputs."""
    gen = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    # Same values whatever the dtype (drawn in float32, then rounded).
    q, k, v, grad = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    return attention_passes(attention, q, k, v, grad)


def time_case(
    case: Case, dtype: torch.dtype, baselines: list[torch.dtype], timing: tuple[int, int, float]
) -> list[tuple[list[float], list[float]]]:
    """Per pass (forward, then forward + backward): the medians and the
    ratios to ours (alternate_ms) of ours in `dtype` and SDPA in each of `baselines`."""
    contenders = [case_passes(causal_attention, case, dtype)]
    contenders += [case_passes(sdpa, case, d) for d in baselines]
    matmul = reference_matmul()
    contenders.append((matmul, matmul))  # last: the rate ours is read against, per round
    return [alternate_ms([c[i] for c in contenders], *timing) for i in (0, 1)]


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


def layer_pass(layer: LayerFn, case: Case, dtype: torch.dtype) -> Callable[[], None]:
    """Forward + backward from the packed qkv to (B, T, C)."""
    gen = torch.Generator().manual_seed(0)
    c = case.heads * case.head_dim
    qkv = torch.randn(case.batch, case.seq_len, 3 * c, generator=gen).to(dtype)
    grad = torch.randn(case.batch, case.seq_len, c, generator=gen).to(dtype)
    qkv.requires_grad_()

    def forward_backward() -> None:
        torch.autograd.grad(layer(qkv, case.heads), qkv, grad)

    return forward_backward


def print_packed_table(
    cases: list[Case], dtype: torch.dtype, timing: tuple[int, int, float]
) -> None:
    print("-- layer path, packed qkv (B, T, 3C) -> (B, T, C), fwd+bwd " + "-" * 30)
    print(
        f"{'case':<22} {'packed ms':>10} {'unpacked ms':>12} {'/packed':>8} "
        f"{'SDPA unpacked ms':>17} {'/packed':>8}"
    )
    for case in cases:
        layers = (causal_attention_qkv, unpacked(causal_attention), unpacked(sdpa))
        (ours, split, theirs), ratios = alternate_ms(
            [layer_pass(layer, case, dtype) for layer in layers], *timing
        )
        print(
            f"{case!s:<22} {ours:10.2f} {split:12.2f} {ratios[1]:8.2f} "
            f"{theirs:17.2f} {ratios[2]:8.2f}"
        )


def cpu_flags() -> str:
    """The vector extensions /proc/cpuinfo lists (avx2, fma, avx512*), for the record."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = [f for f in flags if f in ("avx2", "fma") or f.startswith("avx512")]
    return " ".join(sorted(wanted)) or "none of avx2/fma/avx512"


MM_SIZE = 1536


def reference_matmul(size: int = MM_SIZE) -> Callable[[], object]:
    """float32 torch.mm of two size x size matrices: timed in turns with each pass, so that the
    "of mm" column (ours' rate / its rate, median over rounds) keeps on a machine whose speed
    drifts between runs (this VM's moved 1.8x from one minute to the next)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return lambda: torch.mm(a, b)


def matmul_gflops(size: int = MM_SIZE) -> float:
    """float32 torch.mm of two size x size matrices on the same threads, best of 5: what a
    tuned matmul library reaches on this machine, to read the attention's GF/s against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def print_case(
    case: Case, dtype: torch.dtype, baselines: list[torch.dtype], timing: tuple[int, int, float]
) -> None:
    """One line per pass: ours and each SDPA baseline, milliseconds, ratio and GFLOP/s."""
    for (medians, ratios), (name, factor) in zip(
        time_case(case, dtype, baselines, timing), (("fwd", 1.0), ("fwd+bwd", 3.5)), strict=False
    ):
        gflop = factor * case.forward_flops() / 1e9
        line = f"{case!s:<22} {name:<8} {medians[0]:9.2f}"
        for ms, ratio in zip(medians[1:-1], ratios[1:-1], strict=True):
            line += f" {ms:13.2f} {ratio:6.2f}"
        widths = [10] + [15] * len(baselines)
        line += "".join(
            f" {gflop / (ms / 1e3):{w}.1f}" for ms, w in zip(medians, widths, strict=False)
        )
        of_mm = ratios[-1] * gflop / (2 * MM_SIZE**3 / 1e9)  # (ours / t_ours) / (mm / t_mm)
        print(line + f" {of_mm:6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 30 s)")
    parser.add_argument(
        "--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32"
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="CASE",
        help='only this case, e.g. "B2 H12 T1024 D64" (repeatable; default: all)',
    )
    parser.add_argument("--repeats", type=int, help="rounds per case (default 10, --quick 5)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    half = dtype in (torch.bfloat16, torch.float16)
    warmup, repeats, budget_s = (1, 5, 0.3) if args.quick else (3, 10, 2.0)
    if args.repeats:
        repeats, budget_s = args.repeats, float("inf")
    timing = (warmup, repeats, budget_s)
    chosen = set(args.case or [])
    unknown = chosen - {str(c) for cases in GROUPS.values() for c in cases}
    if unknown:
        parser.error(f"unknown --case {sorted(unknown)}; cases are those the full run prints")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ours in {args.dtype}, "
        f"kernel ISA: {cpu_capability()} (CPU flags: {cpu_flags()}), "
        f"contenders alternated, median of up to {repeats} rounds"
    )
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs before starting")
    if load > (os.cpu_count() or 1):
        print("warning: the load exceeds the CPU count; trust the ratios, not the times")
    print(
        f"float32 torch.mm {MM_SIZE} x {MM_SIZE} on the same threads: {matmul_gflops():.1f} "
        "GFLOP/s (a reference rate for the GF/s columns, which count the causal half's FLOPs; "
        "'of mm': ours' rate / torch.mm's, timed in turns with each pass)"
    )
    # SDPA baselines: the same dtype, and float32 too when ours runs in 16 bits.
    short = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
    baselines = [torch.float32, dtype] if half else [dtype]
    names = [short.get(d, "f16") for d in baselines]
    header = f"{'case':<22} {'pass':<8} {'ours ms':>9}"
    for name in names:
        header += f" {'SDPA-' + name + ' ms':>13} {'/ours':>6}"
    header += f" {'ours GF/s':>10}" + "".join(f" {'SDPA-' + n + ' GF/s':>15}" for n in names)
    header += f" {'of mm':>6}"
    print(header)
    for group, cases in GROUPS.items():
        cases = [c for c in cases if not chosen or str(c) in chosen]
        if cases:
            print(f"-- {group} " + "-" * (len(header) - len(group) - 4))
        for case in cases:
            print_case(case, dtype, baselines, timing)
    packed = [c for c in PACKED_CASES if not chosen or str(c) in chosen]
    if packed:
        print_packed_table(packed, dtype, timing)


if __name__ == "__main__":
    main()
