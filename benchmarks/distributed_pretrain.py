"""Pretraining with one process vs several under torchrun (DDP, FSDP), same global batch.

    python benchmarks/distributed_pretrain.py [--steps N] [--processes P] [--threads T]

Runs `python -m pipeline pretrain` on the default config (the token files must exist: `make
pipeline`, or `python -m pipeline download && python -m pipeline prepare`) once in one process
with T threads, then under `torchrun --nproc-per-node P` with T/P threads per process, for each
parallelism. Everything a run writes goes to a temporary directory. Prints each run's time per
optimizer step (the loop's own step timer: compute and gradient communication, not evaluation or
logging), tokens/s, the ratio to the one-process run, and how far its per-step loss curve (read
back from MLflow) is from the one-process curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.launch import single_node_launcher  # noqa: E402


def pretrain(workdir: Path, name: str, processes: int, threads: int, parallelism: str) -> dict:
    launch = single_node_launcher(processes, sys.executable)
    overrides = {
        "paths.results": str(workdir / name),
        "paths.resume": str(workdir / f"resume-{name}"),
        "pretrain.train.parallelism": parallelism,
        "pretrain.train.nproc_per_node": processes,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    command = [
        *launch, "pretrain", "--config", str(REPO / "config.yaml"),
        "--config", str(workdir / "benchmark.yaml"), "--threads", str(threads), *sets,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-4000:]}")
    return json.loads((workdir / name / "pretrain" / "metrics.json").read_text())


def loss_curves(uri: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gpt-pipeline")
    curves = {}
    for run in client.search_runs([experiment.experiment_id]):
        name = Path(run.data.params["paths.results"]).name
        history = client.get_metric_history(run.info.run_id, "loss")
        curves[name] = {m.step: m.value for m in history}
    return curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in all")
    parser.add_argument("--parallelism", nargs="+", default=["ddp", "fsdp"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        settings = {
            "pretrain": {
                "peak_flops": 1.0e11,
                "sample_tokens": 1,
                "train": {"max_steps": args.steps, "eval_every": args.steps, "log_every": 1,
                          "checkpoint_every": 0, "warmup_steps": min(20, args.steps // 2)},
            },
            "tracking": {"uri": uri, "log_model": False},
        }  # fmt: skip
        (workdir / "benchmark.yaml").write_text(yaml.safe_dump(settings))
        runs = [("1 process", "one", pretrain(workdir, "one", 1, args.threads, "ddp"))]
        per_process = max(1, args.threads // args.processes)
        for parallelism in args.parallelism:
            name = f"p{args.processes}-{parallelism}"
            metrics = pretrain(workdir, name, args.processes, per_process, parallelism)
            runs.append((f"{args.processes} processes {parallelism}", name, metrics))
        curves = loss_curves(uri)

    reference = runs[0][2]
    print(
        f"pretrain, default config, {args.steps} steps, same global batch, "
        f"{args.threads} threads in all"
    )
    print(f"{'run':<22} {'ms/step':>9} {'tokens/s':>10} {'vs 1 process':>13} {'loss rel diff':>14}")
    for label, name, metrics in runs:
        ms = 1e3 * metrics["train_time_s"] / metrics["steps"]
        ratio = metrics["tokens_per_second"] / reference["tokens_per_second"]
        diff = max(abs(curves[name][s] - v) / abs(v) for s, v in curves["one"].items())
        print(
            f"{label:<22} {ms:9.1f} {metrics['tokens_per_second']:10.0f} {ratio:12.2f}x "
            f"{diff:14.1e}"
        )


if __name__ == "__main__":
    main()
