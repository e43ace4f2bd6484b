"""Tokenizer vocabulary: pretraining `tiny` on Tiny Shakespeare with GPT-2's 50,257 ids against
tokenizers trained on the corpus (issue 29), all measured in one run; and the tokenizer stage's
own time and memory on a large corpus.

    python benchmarks/tokenizer_vocab.py [--workdir DIR] [--mirror DIR] [--chunk 30]
        [--threads N] [--eval-every 25] [--vocab 2048 4096 8192 16384] [--set KEY=VALUE ...]
    python benchmarks/tokenizer_vocab.py --tokenizer-only [--chars 100000000]

Each contender gets a fresh work directory where our `download`, `tokenizer` and `prepare`
run (`tokenizer.kind: gpt2`, or `trained` with `tokenizer.vocab_size` V), then the pretrainings
run in turns of `--chunk` seconds (the others stopped by SIGSTOP, as time_to_loss.py does), so
load hits all alike. Every pretraining evaluates every `--eval-every` steps on the whole val
split. Per contender the report gives the parameters, tokens/s and bytes/s (tokens/s times the
corpus's bytes per token), val bits per byte at equal wall time (the step time at which the
quickest run ended; step times as time_to_loss.py counts them), the final val_bpb, and the time
to reach GPT-2's final val_bpb (bits per byte is the one unit fair across tokenizers; val_loss
is per token). The goal (issue 29): a trained tokenizer reaches it in <= 0.4x GPT-2's time.

`--tokenizer-only`: the tokenizer stage alone, learning `--chars` characters (default 100 M)
from this environment's Python sources (site-packages' *.py, real text with many distinct
words, read in path order), 8,192 ids: seconds and peak memory as the stage reports them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nanogpt_side_by_side as turns  # noqa: E402

from pipeline.model import GPT  # noqa: E402
from pipeline.settings.load import load_config, typed_config  # noqa: E402
from pipeline.stages.pretrain import model_config  # noqa: E402

EVAL_TOKENS = 40_000
"""More than any contender's val split: every evaluation covers the whole split."""


def contenders(vocabs: list[int]) -> dict[str, list[str]]:
    """Name -> the tokenizer settings of each contender."""
    sets = {"gpt2": ["tokenizer.kind=gpt2"]}
    for vocab in vocabs:
        sets[f"trained-{vocab}"] = ["tokenizer.kind=trained", f"tokenizer.vocab_size={vocab}"]
    return sets


def evaluations(trainer: turns.Trainer) -> dict[int, float]:
    return turns.evaluated(trainer, "val_bpb")


def elapsed(trainer: turns.Trainer, tokens_per_step: int) -> dict[int, float]:
    """Step -> the step time spent up to its end (a step that straddled another's turn counts
    the median)."""
    clean, _ = turns.step_seconds(trainer, turns.OUR_STEP, tokens_per_step)
    median = statistics.median(clean.values())
    total, out = 0.0, {}
    for step in range(1, max(evaluations(trainer)) + 1):
        total += clean.get(step, median)
        out[step] = total
    return out


def prepare(workdir: Path, sets: list[str], env: dict) -> None:
    for stage in ("download", "tokenizer", "prepare"):
        with open(workdir / f"{stage}.log", "w") as log:
            done = subprocess.run(turns.pipeline_command(stage, sets), cwd=workdir, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{stage} failed: see {workdir / stage}.log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    turns.add_turn_arguments(parser, "every trainer", "override for every contender")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--tokenizer-only", action="store_true")
    parser.add_argument("--chars", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    workdir = turns.empty_workdir(parser, args.workdir, "tokenizer-vocab-")
    env = turns.environment(args.threads)
    print(f"work directory {workdir}\nmachine: {turns.machine()}", flush=True)
    if args.tokenizer_only:
        tokenizer_only(workdir, args.mirror.resolve(), args.chars, env)
        return
    batch = load_config([ROOT / "config.yaml"], args.overrides)["pretrain"]["train"]["batch_size"]
    evals = [f"pretrain.train.eval_every={args.eval_every}",
             f"pretrain.train.eval_batches={-(-EVAL_TOKENS // (batch * 128))}",
             "pretrain.train.checkpoint_every=0"]  # fmt: skip
    sets = {}
    for name, tokenizer in contenders(args.vocab).items():
        (workdir / name).mkdir()
        sets[name] = turns.scratch_config(workdir / name, args.mirror.resolve(),
                                    [*tokenizer, *evals, *args.overrides])  # fmt: skip
        prepare(workdir / name, sets[name], env)
    trainers = turns.run_in_turns(
        {n: (turns.pipeline_command("pretrain", s), workdir / n) for n, s in sets.items()},
        workdir, env, args.chunk,
    )  # fmt: skip
    report(trainers, {n: load_config([ROOT / "config.yaml"], s) for n, s in sets.items()},
           workdir)  # fmt: skip


def report(trainers: dict[str, turns.Trainer], configs: dict, workdir: Path) -> None:
    rows = {}
    for name, trainer in trainers.items():
        config = configs[name]
        meta = json.loads((workdir / name / "data" / "tokens" / "meta.json").read_text())
        model = model_config(typed_config(config).model, vocab_size=meta["vocab_size"])
        tokens_per_step = config["pretrain"]["train"]["batch_size"] * model.context_length
        clean, _ = turns.step_seconds(trainer, turns.OUR_STEP, tokens_per_step)
        tokens = meta["train_tokens"] + meta["val_tokens"]
        bytes_per_token = sum(r["bytes"] for r in meta["inputs"]) / tokens
        rows[name] = {
            "parameters": GPT(model).num_parameters(),
            "vocab": meta["vocab_size"],
            "bytes_per_token": bytes_per_token,
            "tokens_per_s": tokens_per_step / statistics.median(clean.values()),
            "evals": evaluations(trainer),
            "elapsed": elapsed(trainer, tokens_per_step),
        }
    budget = min(max(r["elapsed"].values()) for r in rows.values())
    target = rows["gpt2"]["evals"][max(rows["gpt2"]["evals"])]
    gpt2_time = max(rows["gpt2"]["elapsed"].values())
    print(f"equal wall time: {budget:.1f} s of steps (the quickest run's); target: GPT-2's final "
          f"val_bpb {target:.4f} at {gpt2_time:.1f} s")  # fmt: skip
    print(
        f"{'contender':<14} {'ids':>6} {'params':>10} {'B/token':>7} {'tokens/s':>9} "
        f"{'bytes/s':>9} {'bpb@equal':>9} {'final bpb':>9} {'to target':>10} {'x GPT-2':>7}"
    )
    for name, r in rows.items():
        at_budget = [b for s, b in sorted(r["evals"].items()) if r["elapsed"][s] <= budget + 1e-9]
        reached = [s for s, b in sorted(r["evals"].items()) if b <= target]
        to_target = r["elapsed"][reached[0]] if reached else None
        print(f"{name:<14} {r['vocab']:>6} {r['parameters']:>10,} {r['bytes_per_token']:>7.3f} "
              f"{r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] * r['bytes_per_token']:>9,.0f} "
              f"{at_budget[-1] if at_budget else float('nan'):>9.4f} "
              f"{r['evals'][max(r['evals'])]:>9.4f} "
              f"{(f'{to_target:.1f} s' if to_target else 'not reached'):>10} "
              f"{(f'{to_target / gpt2_time:.2f}' if to_target else '-'):>7}")  # fmt: skip


def tokenizer_only(workdir: Path, mirror: Path, chars: int, env: dict) -> None:
    """The tokenizer stage on this environment's Python sources, `chars` characters."""
    sources = Path(sysconfig.get_paths()["purelib"])
    (workdir / "corpus.yaml").write_text(
        "prepare:\n  corpus:\n"
        f"    - {{path: '{sources}/**/*.py', format: text}}\n  val_split: documents\n"
        "  on_bad_record: skip\n"
    )
    sets = turns.scratch_config(workdir, mirror, ["tokenizer.kind=trained",
                                            "tokenizer.vocab_size=8192",
                                            f"tokenizer.max_chars={chars}"])  # fmt: skip
    command = turns.pipeline_command("tokenizer", sets)
    command[6:6] = ["--config", str(workdir / "corpus.yaml")]
    with open(workdir / "tokenizer.log", "w") as log:
        done = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"tokenizer failed: see {workdir / 'tokenizer.log'}")
    training = json.loads((workdir / "results" / "tokenizer" / "training.json").read_text())
    print(f"tokenizer stage, {training['n_vocab']:,} ids from {training['chars']:,} characters "
          f"of {sources}/**/*.py: {training['seconds']:.1f} s learning, peak memory "
          f"{training['peak_rss_mb']:.0f} MB (the whole process)")  # fmt: skip


if __name__ == "__main__":
    main()
