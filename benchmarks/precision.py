"""A pretraining step in fp32 vs under bf16 autocast (`train.precision`), on this machine.

    python benchmarks/precision.py [--preset tiny] [--batch 16] [--context 128] [--steps 20]

One step is what `fit` does per batch: forward (the configured attention, `lm_loss`), backward,
AdamW update. Both contenders start from the same weights, see the same random batches and
are timed in one process, alternating step by step so that load from other processes hits both
alike. Prints the CPU's flags, the median ms/step of each and the median of the per-step ratios
(bf16 / fp32 time; < 1 means bf16 is faster), and checks that bf16 autocast kept the master
weights and the optimizer state in fp32. `train.precision: auto` picks bf16 only where the
hardware multiplies bf16 natively (`pipeline.train.device.native_bf16`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import cpu_capability  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402
from pipeline.model.attention import choose_attention  # noqa: E402
from pipeline.settings import TrainSettings  # noqa: E402
from pipeline.train.device import native_bf16  # noqa: E402
from pipeline.train.loop import autocast  # noqa: E402
from pipeline.train.losses import lm_loss  # noqa: E402
from pipeline.train.optim import configure_optimizer  # noqa: E402

CONTENDERS = ("fp32", "bf16")
CPU = torch.device("cpu")


def cpu_flags() -> str:
    """The CPU model and the flags that decide bf16's speed (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "?")  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    wanted = [f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx"))]
    return f"{model}; flags: {' '.join(sorted(set(wanted)))}"


class Trainer:
    """One model and its optimizer at one precision; `step` returns its seconds."""

    def __init__(self, config: GPTConfig, precision: str) -> None:
        torch.manual_seed(0)  # the same initial weights for both
        self.model = GPT(config).train()
        self.model.set_attention(choose_attention("auto", CPU, config.attn_dropout).name)
        self.optimizer = configure_optimizer(self.model, TrainSettings(lr=3e-4), CPU)
        self.precision = precision

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        start = time.perf_counter()
        with autocast(CPU, self.precision):
            loss = lm_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def master_dtypes(self) -> set[torch.dtype]:
        """The dtypes of the parameters and of every optimizer state tensor."""
        states = [v for s in self.optimizer.state.values() for v in s.values()]
        tensors = [*self.model.parameters(), *(v for v in states if v.dim() > 0)]
        return {t.dtype for t in tensors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    args = parser.parse_args(argv)

    config = GPTConfig.from_preset(args.preset)
    if args.context > config.context_length:
        parser.error(f"--context {args.context} > context_length {config.context_length}")
    print(f"CPU: {cpu_flags()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, kernel ISA {cpu_capability()}, native "
        f"bf16: {native_bf16(CPU)}; preset {args.preset}, batch {args.batch} x context "
        f"{args.context}, median of {args.steps} steps"
    )
    gen = torch.Generator().manual_seed(0)
    trainers = {name: Trainer(config, name) for name in CONTENDERS}
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for i in range(args.warmup + args.steps):
        idx = torch.randint(0, config.vocab_size, (args.batch, args.context + 1), generator=gen)
        batch = (idx[:, :-1], idx[:, 1:])
        order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]
        seconds = {name: trainers[name].step(batch) for name in order}
        if i >= args.warmup:
            for name in CONTENDERS:
                times[name].append(seconds[name])
        print(f"step {i + 1}: " + ", ".join(f"{n} {1e3 * s:.0f} ms" for n, s in seconds.items()),
              flush=True)  # fmt: skip

    tokens = args.batch * args.context
    for name in CONTENDERS:
        ms = 1e3 * statistics.median(times[name])
        print(f"{name:<5} {ms:9.1f} ms/step {tokens / (ms / 1e3):9.0f} tokens/s")
    ratios = [b / f for b, f in zip(times["bf16"], times["fp32"], strict=True)]
    print(f"bf16 / fp32 step time: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    kept = trainers["bf16"].master_dtypes()
    print(f"bf16 autocast: parameters and optimizer state are {sorted(map(str, kept))}")


if __name__ == "__main__":
    main()
