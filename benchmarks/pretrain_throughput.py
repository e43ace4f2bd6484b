"""Pretraining-step throughput of the `tiny` GPT with the `fused` vs the `sdpa` attention.

    python benchmarks/pretrain_throughput.py [--steps N] [--warmup N] [--bf16] [--compile]

One step is what pretraining does per batch: forward, next-token cross-entropy, backward,
AdamW update, on random token ids (batch 16, context 128 by default). Both backends start from
the same weights and see the same batches, and are timed in the same process, alternating
between them step by step so that load from other processes hits both alike. Prints the
median tokens/s of each and their ratio (fused / sdpa; > 1 means fused is faster). With
--bf16 the forward runs under bf16 autocast (the `fused` op then gets bfloat16 q, k, v).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import cpu_capability  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402

BACKENDS = ("fused", "sdpa")


class Trainer:
    """One model and its optimizer; `step` runs one pretraining step and returns seconds."""

    def __init__(self, attention: str, preset: str, bf16: bool, compile_model: bool) -> None:
        torch.manual_seed(0)  # same initial weights for every backend
        self.model = GPT(GPTConfig.from_preset(preset), attention=attention).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.bf16 = bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, idx: torch.Tensor) -> float:
        start = time.perf_counter()
        with self.autocast():
            logits = self.forward(idx[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per backend")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as precision: bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args(argv)

    config = GPTConfig.from_preset(args.preset)
    if args.context > config.context_length:
        parser.error(f"--context {args.context} > context_length {config.context_length}")
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.context + 1), generator=gen)
        for _ in range(args.warmup + args.steps)
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel ISA: "
        f"{cpu_capability()}, preset {args.preset} (n_layer {config.n_layer}, n_head "
        f"{config.n_head}, head_dim {config.head_dim}), batch {args.batch}, context "
        f"{args.context}, {'bf16 autocast' if args.bf16 else 'float32'}"
        f"{', compiled' if args.compile else ''}, median of {args.steps} steps"
    )
    trainers = {name: Trainer(name, args.preset, args.bf16, args.compile) for name in BACKENDS}
    times: dict[str, list[float]] = {name: [] for name in BACKENDS}
    for i, idx in enumerate(batches):
        for name, trainer in trainers.items():
            seconds = trainer.step(idx)
            if i >= args.warmup:
                times[name].append(seconds)

    tokens = args.batch * args.context
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name in BACKENDS:
        ms = 1e3 * statistics.median(times[name])
        print(f"{name:<6} {ms:8.1f} ms/step {rate[name]:10.0f} tokens/s")
    print(f"fused / sdpa tokens/s: {rate['fused'] / rate['sdpa']:.3f}")


if __name__ == "__main__":
    main()
