"""Our default pretraining side by side with karpathy/nanoGPT's train.py, in one run.

    python benchmarks/nanogpt_side_by_side.py --nanogpt /path/to/nanoGPT [--chunk 30]
        [--workdir DIR] [--mirror DIR] [--threads N] [--set KEY.PATH=VALUE ...]

`--nanogpt` is a snapshot of https://github.com/karpathy/nanoGPT (a checkout outside this
repository; none of its code is ours to commit). In a fresh work directory this script
1. runs our `python -m pipeline download` and `prepare` (Tiny Shakespeare, from the mirror) and
   hands nanoGPT the same ids: its `train.bin` / `val.bin` are our shards, concatenated (the same
   uint16 format), with a `meta.pkl` giving our vocabulary size, 50,257, so both heads are alike;
2. starts our `python -m pipeline pretrain` (the default config, with `--set` overrides, logging
   every step) and nanoGPT's `train.py` with the same shape and schedule (layers, heads, width,
   context, batch, lr -> min_lr, warmup, steps, weight decay, betas, clipping, fp32, no dropout,
   biases, CPU, no compile; one evaluation at the end, which saves its ckpt.pt) and lets them run
   in turns of `--chunk` seconds (the other one stopped by SIGSTOP), so that load from other
   processes hits both alike; a step whose log line shows it began before the turn it ended in
   (its time counts the other's turn) is left out of the timing;
3. loads both final models into our GPT (nanoGPT's ckpt.pt with `torch.load(weights_only=True)`,
   mapped by `state_dict_from_nanogpt`, with nanoGPT's exact GELU) and scores them with one
   function on the whole val split (every non-overlapping context window), checking the mapped
   model against nanoGPT's own `model.py` on one batch;
4. prints one table: median ms/step (each trainer's own per-step timing: nanoGPT's `time` is the
   wall time from one iteration's end to the next, ours the step's time without its logging and
   evaluations; its first step and last (nanoGPT's evaluation) left out), tokens/s, their ratio
   (ours / nanoGPT; the goal is >= 2) and both val losses (the goal: ours <= nanoGPT's), with the
   CPU's flags, torch's threads and the load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.loader import windows_to_batch  # noqa: E402
from pipeline.data.tokens import load_tokens  # noqa: E402
from pipeline.model import GPT, GPTConfig, load_checkpoint  # noqa: E402
from pipeline.model.checkpoint import TIED_KEY  # noqa: E402
from pipeline.model.gpt2_tensors import map_tensors, name_table, our_shapes, unchanged  # noqa: E402
from pipeline.model.hf import HF_LM_HEAD, HF_MASK_BUFFERS, HF_PREFIX, untie_lm_head  # noqa: E402
from pipeline.settings.load import load_config, typed_config  # noqa: E402
from pipeline.stages.pretrain import model_config  # noqa: E402
from pipeline.train.losses import learned_targets, lm_loss  # noqa: E402

OUR_STEP = re.compile(r"step (\d+)/\d+ \| loss [^|]+\|[^|]+\|[^|]+\| ([\d,.]+) tok/s")
NANOGPT_STEP = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")
EVAL_ATTENTION = "sdpa"
"""Both models are scored with the same attention backend."""


def scratch_config(workdir: Path, mirror: Path, overrides: Sequence[str]) -> list[str]:
    """Our `--set` overrides: every path in `workdir`, the mirror, a log line every step."""
    return [
        f"paths.data={workdir / 'data'}",
        f"paths.results={workdir / 'results'}",
        f"paths.resume={workdir / '.resume'}",
        f"data.mirrors=[{mirror}]",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        "pretrain.train.log_every=1",
        *overrides,
    ]


def pipeline_command(stage: str, sets: Sequence[str]) -> list[str]:
    args = [sys.executable, "-m", "pipeline", stage, "--config", str(ROOT / "config.yaml")]
    return args + [a for s in sets for a in ("--set", s)]


def environment(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def nanogpt_dataset(token_dir: Path, dest: Path, vocab_size: int) -> None:
    """nanoGPT's data directory: train.bin and val.bin (our shards joined) and meta.pkl."""
    dest.mkdir(parents=True, exist_ok=True)
    meta = json.loads((token_dir / "meta.json").read_text())
    for split in ("train", "val"):
        with open(dest / f"{split}.bin", "wb") as out:
            for shard in meta["shards"][split]:
                out.write((token_dir / shard["file"]).read_bytes())
    with open(dest / "meta.pkl", "wb") as f:  # nanoGPT's format: read by its train.py only
        pickle.dump({"vocab_size": vocab_size}, f)


def nanogpt_command(nanogpt: Path, config: Mapping[str, Any], data: Path, out: Path) -> list[str]:
    """nanoGPT's train.py with our model shape and `pretrain.train` schedule (its config
    overrides). It runs steps 0..max_iters and evaluates (and saves ckpt.pt) before the last,
    so max_iters = max_steps and eval_interval = max_steps give a checkpoint after max_steps
    updates, as ours."""
    train = config["pretrain"]["train"]
    cfg = model_config(typed_config(config).model, vocab_size=50257)
    if train["grad_accum_steps"] != 1 or train["precision"] != "fp32":
        print("note: nanoGPT runs grad_accum 1, float32 whatever our config says")
    steps = train["max_steps"]
    values = {
        "out_dir": out, "dataset": data, "device": "cpu", "dtype": "float32", "compile": False,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "block_size": cfg.context_length, "bias": cfg.qkv_bias, "dropout": cfg.dropout,
        "batch_size": train["batch_size"], "gradient_accumulation_steps": 1,
        "learning_rate": train["lr"], "min_lr": train["min_lr"],
        "warmup_iters": train["warmup_steps"], "max_iters": steps, "lr_decay_iters": steps,
        "weight_decay": train["weight_decay"], "beta1": train["beta1"], "beta2": train["beta2"],
        "grad_clip": train["grad_clip"], "eval_interval": steps, "eval_iters": 4,
        "always_save_checkpoint": True, "log_interval": 1, "wandb_log": False,
    }  # fmt: skip
    return [sys.executable, str(nanogpt / "train.py"), *(f"--{k}={v}" for k, v in values.items())]


@dataclass
class Trainer:
    """A trainer's process and its log's lines, each with when it arrived and when the turn it
    arrived in began (`perf_counter` seconds)."""

    proc: subprocess.Popen
    log: Path
    running: float = 0.0
    lines: list[tuple[float, float, str]] = field(default_factory=list)
    partial: str = ""

    def read(self, reader: TextIO, turn_start: float) -> None:
        *complete, self.partial = (self.partial + reader.read()).split("\n")
        now = time.perf_counter()
        self.lines += [(turn_start, now, line) for line in complete]

    def take_turn(self, reader: TextIO, seconds: float) -> None:
        """Run for `seconds` (or to its end), then stop; its log is read as it grows."""
        os.killpg(self.proc.pid, signal.SIGCONT)
        start = time.perf_counter()
        while self.proc.poll() is None and time.perf_counter() - start < seconds:
            time.sleep(0.05)
            self.read(reader, start)
        self.running += time.perf_counter() - start
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
        self.read(reader, start)


def run_in_turns(
    commands: Mapping[str, tuple[list[str], Path]], logs: Path, env: dict, chunk: float
) -> dict[str, Trainer]:
    """Run the commands (name -> (argv, cwd)) one at a time in turns of `chunk` seconds, the
    others stopped (SIGSTOP). Fails, showing its log, if one fails."""
    trainers: dict[str, Trainer] = {}
    with contextlib.ExitStack() as files:
        try:
            for name, (argv, cwd) in commands.items():
                log = files.enter_context(open(logs / f"{name}.log", "w"))
                proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                os.killpg(proc.pid, signal.SIGSTOP)
                trainers[name] = Trainer(proc, logs / f"{name}.log")
            readers = {n: files.enter_context(open(t.log)) for n, t in trainers.items()}
            while live := [n for n, t in trainers.items() if t.proc.poll() is None]:
                for name in live:
                    if trainers[name].proc.poll() is None:
                        trainers[name].take_turn(readers[name], chunk if len(live) > 1 else 1e9)
        finally:
            for trainer in trainers.values():
                if trainer.proc.poll() is None:
                    os.killpg(trainer.proc.pid, signal.SIGKILL)
    for name, trainer in trainers.items():
        if trainer.proc.returncode != 0:
            tail = trainer.log.read_text()[-3000:]
            raise SystemExit(f"{name} failed (exit {trainer.proc.returncode}):\n{tail}")
    return trainers


def step_seconds(
    trainer: Trainer, pattern: re.Pattern, tokens_per_step: int | None
) -> tuple[dict[int, float], int]:
    """Each step's seconds, from a trainer's log lines (nanoGPT prints ms, ours tokens/s), and
    how many steps were left out: those that began before the turn their line came in (their
    time counts the other trainer's turn)."""
    clean, straddled = {}, 0
    for turn_start, arrived, line in trainer.lines:
        if (match := pattern.search(line)) is None:
            continue
        value = float(match.group(2).replace(",", ""))
        seconds = value / 1000 if tokens_per_step is None else tokens_per_step / value
        if arrived - seconds >= turn_start:
            clean[int(match.group(1))] = seconds
        else:
            straddled += 1
    return clean, straddled


NANOGPT_COMPILED_PREFIX = "_orig_mod."
"""What `torch.compile` puts before every name in the state dict nanoGPT's train.py saves."""


def state_dict_from_nanogpt(
    tensors: Mapping[str, Tensor], config: GPTConfig, source: str | Path = "nanoGPT checkpoint"
) -> dict[str, Tensor]:
    """Our state dict (without the tied lm_head) from karpathy/nanoGPT's `model` state dict.

    nanoGPT keeps Hugging Face's names ("transformer.h.0.attn.c_attn.weight", ...) but stores
    nn.Linear weights, (out, in), as we do: renaming only, no transpose. A compiled model's
    "_orig_mod." prefixes are stripped, and the causal-mask buffers of its non-flash attention
    skipped. It must have biases (nanoGPT's `bias=True`): our GPT has them everywhere.
    """
    names = {key: key.removeprefix(NANOGPT_COMPILED_PREFIX) for key in tensors}
    plain = {
        name: tensors[key]
        for key, name in names.items()
        if not HF_MASK_BUFFERS.fullmatch(name.removeprefix(HF_PREFIX))
    }
    shapes = our_shapes(config)
    expected = {
        HF_PREFIX + hf: (ours, shapes[ours], unchanged)
        for ours, hf, _, _ in name_table(config.n_layer)
    }
    expected[HF_LM_HEAD] = (HF_LM_HEAD, shapes["tok_emb.weight"], unchanged)
    return untie_lm_head(map_tensors(plain, expected, config, source), source, HF_PREFIX)


def nanogpt_model(checkpoint: Path, our_config: Any) -> GPT:
    """nanoGPT's final weights in our GPT, with nanoGPT's exact GELU (ours is the tanh one)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    args = saved["model_args"]
    config = dataclasses.replace(
        our_config,
        vocab_size=args["vocab_size"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        n_embd=args["n_embd"],
        context_length=args["block_size"],
    )
    model = GPT(config)
    state = state_dict_from_nanogpt(saved["model"], config, checkpoint)
    result = model.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == [TIED_KEY] and not result.unexpected_keys, result
    for block in model.blocks:
        block.mlp.gelu = nn.GELU(approximate="none")
    return model


@torch.no_grad()
def whole_split_loss(model: nn.Module, tokens: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Mean next-token loss (our `lm_loss`) over every non-overlapping context window of
    `tokens`, and the number of targets scored: the one evaluation both models get."""
    model.eval()
    ctx = model.config.context_length
    starts = np.arange(0, len(tokens) - ctx, ctx)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        batch = windows_to_batch(tokens, starts[i : i + batch_size], ctx)
        n = learned_targets(batch)
        total += lm_loss(model, batch).item() * n
        count += n
    return total / count, count


@torch.no_grad()
def cross_check(nanogpt: Path, checkpoint: Path, mapped: GPT, tokens: np.ndarray) -> float:
    """|loss difference| on one val batch between nanoGPT's own model and the mapped one."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT as NanoGPT  # noqa: PLC0415  (nanoGPT's model.py, not ours)
    from model import GPTConfig as NanoConfig  # noqa: PLC0415

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    theirs = NanoGPT(NanoConfig(**saved["model_args"]))
    theirs.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    ctx = mapped.config.context_length
    batch = windows_to_batch(tokens, np.arange(0, 8 * ctx, ctx), ctx)
    _, their_loss = theirs.eval()(*batch)
    return abs(their_loss.item() - lm_loss(mapped.eval(), batch).item())


def add_turn_arguments(parser: argparse.ArgumentParser, trainers: str, overrides: str) -> None:
    """The options of every benchmark that runs trainers in turns."""
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp one)")
    parser.add_argument("--mirror", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--chunk", type=float, default=30.0, help="seconds per turn")
    parser.add_argument("--threads", type=int, help=f"OMP_NUM_THREADS for {trainers}")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY.PATH=VALUE", help=overrides)  # fmt: skip


def empty_workdir(parser: argparse.ArgumentParser, given: Path | None, prefix: str) -> Path:
    """`--workdir`, which must be empty (a pretrain there would resume), or a new temp one."""
    workdir = (given or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        parser.error(f"--workdir {workdir} is not empty (a pretrain there would resume)")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def evaluated(trainer: Trainer, metric: str) -> dict[int, float]:
    """Step -> `metric` at each of our evaluations in the trainer's log."""
    line = re.compile(rf"step (\d+)/\d+ \| eval \|.*\| {metric} ([\d.]+)")
    return {
        int(m.group(1)): float(m.group(2))
        for _, _, text in trainer.lines
        if (m := line.search(text))
    }


def machine() -> str:
    """The CPU's vector flags, torch's kernel ISA and threads, and the load."""
    flags: set[str] = set()
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and model == "?":
            model = line.split(":", 1)[1].strip()
    vector = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    return (
        f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(vector) or 'none'}; torch "
        f"{torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def median_ms(seconds: Mapping[int, float], first: int, last: int) -> float:
    """The median over steps first..last (the first and the evaluation steps left out)."""
    picked = [s for step, s in seconds.items() if first <= step <= last]
    if not picked:
        raise SystemExit(f"no step timings between steps {first} and {last} in the logs")
    return 1000 * statistics.median(picked)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    add_turn_arguments(parser, "both trainers", "our config override (both follow it)")
    args = parser.parse_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no train.py there (a karpathy/nanoGPT checkout?)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nanogpt-side-by-side-"))
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        parser.error(f"--workdir {workdir} is not empty (a pretrain there would resume)")
    workdir.mkdir(parents=True, exist_ok=True)
    sets = scratch_config(workdir, args.mirror.resolve(), args.overrides)
    config = load_config([ROOT / "config.yaml"], sets)
    env = environment(args.threads)
    print(f"work directory {workdir}\nmachine: {machine()}")

    for stage in ("download", "prepare"):
        with open(workdir / f"{stage}.log", "w") as log:
            done = subprocess.run(pipeline_command(stage, sets), cwd=workdir, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{stage} failed: see {workdir / stage}.log")
    token_dir = workdir / "data" / "tokens"
    vocab = json.loads((token_dir / "meta.json").read_text())["vocab_size"]
    nanogpt_dataset(token_dir, workdir / "nanogpt-data", vocab)
    commands = {
        "ours": (pipeline_command("pretrain", sets), workdir),
        "nanoGPT": (
            nanogpt_command(args.nanogpt.resolve(), config, workdir / "nanogpt-data",
                            workdir / "nanogpt-out"),
            args.nanogpt.resolve(),
        ),
    }  # fmt: skip
    load_before = os.getloadavg()
    trainers = run_in_turns(commands, workdir, env, args.chunk)
    report(args.nanogpt.resolve(), workdir, config, trainers, load_before)


def report(nanogpt: Path, workdir: Path, config: Mapping[str, Any],
           trainers: Mapping[str, Trainer], load_before: tuple[float, ...]) -> None:  # fmt: skip
    """Time and score both runs, and print the table."""
    train = config["pretrain"]["train"]
    steps, batch = train["max_steps"], train["batch_size"]
    ours_model = load_checkpoint(workdir / "results" / "pretrain" / "model")
    tokens_per_step = batch * train["grad_accum_steps"] * ours_model.config.context_length
    ours, straddled = step_seconds(trainers["ours"], OUR_STEP, tokens_per_step)
    theirs, their_straddled = step_seconds(trainers["nanoGPT"], NANOGPT_STEP, None)
    # nanoGPT's iter i is our step i + 1; its iter 0 and max_iters include its evaluation.
    seconds = {"ours": ours, "nanoGPT": {i + 1: s for i, s in theirs.items()}}
    left_out = {"ours": straddled, "nanoGPT": their_straddled}
    ms = {name: median_ms(s, 2, steps - 1) for name, s in seconds.items()}
    checkpoint = workdir / "nanogpt-out" / "ckpt.pt"
    their_model = nanogpt_model(checkpoint, ours_model.config)
    val = np.asarray(load_tokens(workdir / "data" / "tokens", "val"))
    models = {"ours": ours_model, "nanoGPT": their_model}
    for model in models.values():
        model.set_attention(EVAL_ATTENTION)
    losses = {name: whole_split_loss(model, val, batch) for name, model in models.items()}
    mismatch = cross_check(nanogpt, checkpoint, their_model, val)

    print(f"\nmachine: {machine()} (load before: {' '.join(f'{x:.2f}' for x in load_before)})")
    print(
        f"{steps} steps of {tokens_per_step:,} tokens each; in turns, ms/step medians of steps "
        f"2..{steps - 1}; val loss over all {losses['ours'][1]:,} targets of the val split "
        f"(non-overlapping {ours_model.config.context_length}-token windows)"
    )
    print("\n| trainer | ms/step | tokens/s | steps timed (left out) | running s | val loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        timed = sum(2 <= step <= steps - 1 for step in seconds[name])
        print(
            f"| {name} | {ms[name]:.1f} | {tokens_per_step / ms[name] * 1000:,.0f} | "
            f"{timed} ({left_out[name]}) | {trainers[name].running:.1f} | {losses[name][0]:.4f} |"
        )
    print(
        f"\ntokens/s ours / nanoGPT: {ms['nanoGPT'] / ms['ours']:.2f}x (goal >= 2); val loss "
        f"ours - nanoGPT: {losses['ours'][0] - losses['nanoGPT'][0]:+.4f} (goal <= 0)"
    )
    print(
        f"mapped nanoGPT model vs its own model.py, one val batch: |loss difference| {mismatch:.2e}"
    )


if __name__ == "__main__":
    main()
