"""Pretraining-step throughput of a GPT: two attention backends, or two LM-loss paths.

    python benchmarks/pretrain_throughput.py [--compare attention|loss] [--preset P]
        [--batch B] [--context T] [--steps N] [--warmup N] [--bf16] [--compile] [--profile]
        [--device cpu|cuda]

One step is what pretraining does per batch: forward, next-token cross-entropy, backward,
AdamW update, on random token ids (batch 16, context 128 by default). `--compare attention`:
the `fused` vs the `sdpa` attention (both with the fused loss). `--compare loss`: `logits`,
today's path before the fused head (F.cross_entropy of the materialised (tokens × vocab)
logits), vs `fused` (`GPT.head_loss`, pipeline/model/head_loss.py), both with the fused
attention. Both contenders start from the same weights, see the same batches and are timed in
the same process, alternating step by step so that load from other processes hits both alike.
Prints the median tokens/s of each and their ratio (> 1: the second is slower). --device cuda
runs the steps on the GPU (each step timed to its end: the device is synchronised);
benchmarks/device_check.py measures gpt2-124m that way.

With --compare loss it also prints each loss path's peak memory: the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) over one forward + backward of
the loss alone on the same hidden states, so it counts the logits, their softmax and gradients
(every large tensor is its own mmap, given back on free). --profile prints the share of a
step's CPU time by category (torch.profiler, self time of each op) for each contender. Both
need --device cpu.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import cpu_capability  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402

CONTENDERS = {"attention": ("fused", "sdpa"), "loss": ("logits", "fused")}


class Trainer:
    """One model and its optimizer; `step` runs one pretraining step and returns seconds."""

    def __init__(self, attention: str, loss: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)  # same initial weights for every contender
        self.device = torch.device(args.device)
        model = GPT(GPTConfig.from_preset(args.preset), attention=attention)
        self.model = model.to(self.device).train()
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.bf16 = args.bf16
        self.loss = loss

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, idx: torch.Tensor) -> float:
        start = time.perf_counter()
        inputs, targets = idx[:, :-1], idx[:, 1:]
        with self.autocast():
            if self.loss == "logits":
                logits = self.forward(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            else:
                loss = self.forward(inputs, targets=targets)
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels, not only their launches
        return time.perf_counter() - start

    def loss_peak_bytes(self, idx: torch.Tensor) -> int:
        """Peak RSS growth over the loss alone (forward + backward) on fixed hidden states."""
        with torch.no_grad(), self.autocast():
            hidden = self.model.hidden_states(idx[:, :-1])
        hidden.requires_grad_()
        targets = idx[:, 1:]
        before = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        with self.autocast():
            if self.loss == "logits":
                logits = self.model.lm_head(hidden)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            else:
                loss = self.model.head_loss(hidden, targets)
        loss.backward()
        peak = _rss("VmHWM") - before
        self.model.zero_grad(set_to_none=True)
        return peak


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def category(event, vocab: int) -> str:
    """The step-profile bucket of one profiler event (by its name, shapes and parents)."""
    name, parent = event.name, event.cpu_parent
    while parent is not None:
        if parent.name == "optimizer":
            return "optimizer"
        parent = parent.cpu_parent
    if "attention" in name or "attend" in name or name.startswith("pipeline::"):
        return "attention"
    if any(s in name for s in ("mm", "linear", "matmul")):
        shapes = [d for s in (event.input_shapes or []) for d in s]
        return "head matmuls" if vocab in shapes else "other matmuls"
    if any(s in name for s in ("softmax", "nll", "cross_entropy", "exp", "index", "gather")):
        return "softmax/CE"
    return "other"


def profile(trainer: Trainer, idx: torch.Tensor, vocab: int) -> dict[str, float]:
    """Share of one step's self CPU time per category."""
    with torch.profiler.profile(record_shapes=True) as prof:
        trainer.step(idx)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        totals[category(event, vocab)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def report_rates(times: dict[str, list[float]], tokens: int) -> None:
    """Median ms/step and tokens/s of each contender, and the second's over the first's."""
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    first, second = names = tuple(times)
    for name in names:
        ms = 1e3 * statistics.median(times[name])
        print(f"{name:<6} {ms:8.1f} ms/step {rate[name]:10.0f} tokens/s")
    ratios = [a / b for a, b in zip(times[first], times[second], strict=True)]
    print(
        f"{second} / {first} tokens/s: {rate[second] / rate[first]:.3f} "
        f"(median of per-step ratios {statistics.median(ratios):.3f})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The options; benchmarks/device_check.py parses its runs with them too."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=tuple(CONTENDERS), default="loss")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--steps", type=int, default=20, help="timed steps per contender (0: memory only)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as precision: bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--profile", action="store_true", help="print a step profile of each")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    return parser


def make_batches(args: argparse.Namespace, seed: int = 0) -> list[torch.Tensor]:
    """Random token ids for the warmup and timed steps, on the device (`seed`: per process)."""
    config = GPTConfig.from_preset(args.preset)
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, config.vocab_size, (args.batch, args.context + 1), generator=gen).to(
            args.device
        )
        for _ in range(max(1, args.warmup + args.steps))
    ]


def make_trainers(args: argparse.Namespace) -> dict[str, Trainer]:
    """One trainer per contender of `args.compare`, in the order their ratio is taken."""
    names = CONTENDERS[args.compare]
    if args.compare == "attention":
        return {n: Trainer(n, "fused", args) for n in names}
    return {n: Trainer("fused", n, args) for n in names}


def time_steps(
    trainers: dict[str, Trainer], batches: list[torch.Tensor], warmup: int
) -> dict[str, list[float]]:
    """Seconds of each timed step per contender, alternating step by step."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for i, idx in enumerate(batches):
        for name, trainer in trainers.items():
            seconds = trainer.step(idx)
            if i >= warmup:
                times[name].append(seconds)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = GPTConfig.from_preset(args.preset)
    if args.context > config.context_length:
        parser.error(f"--context {args.context} > context_length {config.context_length}")
    if torch.device(args.device).type != "cpu" and (args.profile or args.compare == "loss"):
        parser.error("--profile and --compare loss (its memory peaks) need --device cpu")
    batches = make_batches(args)
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        "kernel ISA: "
        f"{cpu_capability()}, load average {load:.1f}, preset {args.preset} (n_layer "
        f"{config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}), batch {args.batch}, "
        f"context {args.context}, {'bf16 autocast' if args.bf16 else 'float32'}"
        f"{', compiled' if args.compile else ''}, median of {args.steps} steps"
    )
    if load > os.cpu_count():
        print(f"warning: load average {load:.1f} > {os.cpu_count()} cores; ratios only")
    names = CONTENDERS[args.compare]
    trainers = make_trainers(args)
    times = time_steps(trainers, batches, args.warmup)

    if args.steps:
        report_rates(times, args.batch * args.context)
    if args.compare == "loss":
        first, second = names
        peaks = {n: t.loss_peak_bytes(batches[0]) for n, t in trainers.items()}
        for name in names:
            print(f"{name:<6} loss peak memory {peaks[name] / 2**20:8.1f} MiB")
        print(f"{second} / {first} loss peak memory: {peaks[second] / peaks[first]:.3f}")
    if args.profile:
        for name, trainer in trainers.items():
            shares = profile(trainer, batches[0], config.vocab_size)
            print(f"{name} step profile: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
