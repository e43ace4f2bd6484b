"""Time-to-loss: how long our default pretraining takes to reach the val loss that the default
of before issue 16 reached at its last step, both measured in one run.

    python benchmarks/time_to_loss.py [--workdir DIR] [--mirror DIR] [--chunk 30]
        [--threads N] [--eval-every 25] [--set KEY.PATH=VALUE ...]

In a fresh work directory this script runs our `download` and `prepare` (Tiny Shakespeare, from
the mirror), then two pretrainings in turns of `--chunk` seconds (the other one stopped by
SIGSTOP, as benchmarks/nanogpt_side_by_side.py does), so that load hits both alike:

- `before`: the default as it was when issue 16 was filed: AdamW, lr 1e-3 -> 1e-4 over 250
  steps, warmup 20, and the LM head's loss through materialised logits (`F.cross_entropy` of
  `lm_head(hidden)`, this script's `materialised_head_loss`) instead of the fused head;
- `default`: config.yaml as it is (with `--set` overrides).

Both evaluate every `--eval-every` steps on 272 windows spread evenly over the whole val split
(all of Tiny Shakespeare's 34k val tokens). The target is `before`'s val loss at
its last step; each trainer's time to it is the sum of its step times (logged every step,
evaluations and logging left out) up to its first evaluation at or below the target. A step
whose log line shows it straddled the other trainer's turn gets the median step time instead.
The goal (issue 16): default / before <= 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nanogpt_side_by_side import (  # noqa: E402
    OUR_STEP,
    Trainer,
    add_turn_arguments,
    empty_workdir,
    environment,
    evaluated,
    machine,
    pipeline_command,
    run_in_turns,
    scratch_config,
    step_seconds,
)

from pipeline.model.head_loss import IGNORE_INDEX  # noqa: E402
from pipeline.settings.load import load_config, typed_config  # noqa: E402
from pipeline.stages.pretrain import model_config  # noqa: E402

BEFORE = [
    "pretrain.train.max_steps=250",
    "pretrain.train.lr=0.001",
    "pretrain.train.min_lr=0.0001",
    "pretrain.train.warmup_steps=20",
    "pretrain.train.optimizer=adamw",
    "pretrain.train.batch_size=16",
    "model.preset=tiny",
]
"""The pretraining default before issue 16 (with the materialised head, below)."""

EVAL_WINDOWS = 272
"""272 windows of 128 tokens spread evenly over 34k val tokens: the whole split (17 batches of
16, 34 of 8)."""


def materialised_head_loss(self, hidden, targets, reduction="mean"):
    """The LM head's loss as it was before the fused head: logits, then cross-entropy."""
    logits = self.lm_head(hidden).float()
    if reduction == "mean":
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    logprobs = torch.log_softmax(logits, -1)
    picked = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(targets == IGNORE_INDEX, 0.0)


def run_materialised(argv: list[str]) -> None:
    """`python -m pipeline <argv>` with the materialised head (the `before` trainer)."""
    from pipeline.cli import main
    from pipeline.model.gpt import GPT

    GPT.head_loss = materialised_head_loss
    main(argv)


def evaluations(trainer: Trainer) -> dict[int, float]:
    return evaluated(trainer, "val_loss")


def time_to(trainer: Trainer, target: float, tokens_per_step: int) -> tuple[float, int] | None:
    """(seconds, step) of the first evaluation at or below `target`; None if never reached."""
    reached = [s for s, loss in sorted(evaluations(trainer).items()) if loss <= target]
    if not reached:
        return None
    clean, _ = step_seconds(trainer, OUR_STEP, tokens_per_step)
    median = statistics.median(clean.values())
    return sum(clean.get(s, median) for s in range(1, reached[0] + 1)), reached[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_turn_arguments(parser, "both trainers", "override for the default trainer")
    parser.add_argument("--eval-every", type=int, default=25)
    args = parser.parse_args(argv)
    workdir = empty_workdir(parser, args.workdir, "time-to-loss-")
    mirror = args.mirror.resolve()
    sets = {}
    for name, extra in (("before", BEFORE), ("default", args.overrides)):
        batch = load_config([ROOT / "config.yaml"], extra)["pretrain"]["train"]["batch_size"]
        evals = [f"pretrain.train.eval_every={args.eval_every}",
                 f"pretrain.train.eval_batches={-(-EVAL_WINDOWS // batch)}",
                 "pretrain.train.checkpoint_every=0"]  # fmt: skip
        sets[name] = scratch_config(workdir / name, mirror, evals + extra)
    env = environment(args.threads)
    print(f"work directory {workdir}\nmachine: {machine()}")
    for name, name_sets in sets.items():
        (workdir / name).mkdir()
        for stage in ("download", "prepare"):
            with open(workdir / name / f"{stage}.log", "w") as log:
                done = subprocess.run(
                    pipeline_command(stage, name_sets),
                    cwd=workdir / name,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if done.returncode:
                raise SystemExit(f"{stage} failed: see {workdir / name / stage}.log")
    before_cmd = pipeline_command("pretrain", sets["before"])
    before_cmd[1:3] = [__file__, "--materialised-head"]  # this script, not `-m pipeline`
    trainers = run_in_turns(
        {
            "before": (before_cmd, workdir / "before"),
            "default": (pipeline_command("pretrain", sets["default"]), workdir / "default"),
        },
        workdir,
        env,
        args.chunk,
    )
    report(trainers, {n: load_config([ROOT / "config.yaml"], s) for n, s in sets.items()})


def report(trainers: dict[str, Trainer], configs: dict) -> None:
    before_evals = evaluations(trainers["before"])
    last = max(before_evals)
    target = before_evals[last]
    print(f"target: before's val loss at its step {last}: {target:.4f}")
    times = {}
    print(
        f"{'trainer':<8} {'steps':>6} {'final val':>9} {'median ms/step':>14} "
        f"{'step reached':>12} {'time to target':>14}"
    )
    for name, trainer in trainers.items():
        train = configs[name]["pretrain"]["train"]
        context = model_config(typed_config(configs[name]).model, vocab_size=50257).context_length
        tokens = train["batch_size"] * context
        clean, _ = step_seconds(trainer, OUR_STEP, tokens)
        evals = evaluations(trainer)
        reached = time_to(trainer, target, tokens)
        times[name] = reached[0] if reached else float("nan")
        print(
            f"{name:<8} {train['max_steps']:>6} {evals[max(evals)]:>9.4f} "
            f"{1000 * statistics.median(clean.values()):>14.1f} "
            f"{reached[1] if reached else '-':>12} "
            f"{(f'{reached[0]:.1f} s' if reached else 'not reached'):>14}"
        )
    print(
        f"time to target, default / before: {times['default'] / times['before']:.2f} (goal <= 0.5)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--materialised-head"]:
        run_materialised(sys.argv[2:])
    else:
        main()
