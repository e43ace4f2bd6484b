"""How a training stage is launched: one process, `torchrun` on one node, or `srun` + `torchrun`
across SLURM nodes, and what its Snakemake rule asks the scheduler for.

The Snakefile's training rules and the config validation both come here, so the command, the
resources and the checks that keep them consistent are defined once and unit-tested without
running Snakemake.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline.settings import LAUNCH_KEYS, PREPARE_RUN_KEYS, StageResources, TrainSettings

RENDEZVOUS_PORT = 29500


def _sorted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _sorted(value[key]) for key in sorted(value)}
    return value


def prepare_params(section: Mapping[str, Any]) -> dict[str, Any]:
    """The prepare section as a rule param, without how it runs (workers, scatter)."""
    return _sorted({k: v for k, v in section.items() if k not in PREPARE_RUN_KEYS})


SAMPLE_SPLIT_KEYS = ("data", "labels", "balance", "split", "template", "skip_invalid")
"""What decides a fine-tuning stage's training split, which a trained tokenizer may learn from."""


def split_params(config: Mapping[str, Any], stages: Iterable[str]) -> dict[str, Any]:
    """What decides each of `stages`' splits and texts, as a rule param, keys sorted (see
    `stage_params`). A preference section without a template is written with
    finetune-instruct's (pipeline/data/tokenizer_sample.py), so that one counts."""
    splits = {s: {k: v for k, v in config[s].items() if k in SAMPLE_SPLIT_KEYS} for s in stages}
    for split in splits.values():
        if "template" in split and split["template"] is None:
            split["template"] = config.get("finetune-instruct", {}).get("template")
    return _sorted(splits)


def tokenizer_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the tokenizer's files depend on, as a rule param: GPT-2's, on nothing more; a
    trained one's, on its section, the corpus and its split, and the split of each fine-tuning
    stage it learns from (with the seed). Nothing else reruns it."""
    section = config["tokenizer"]
    if section["kind"] == "gpt2":
        return {"kind": "gpt2"}
    prepare = config["prepare"]
    splits = split_params(config, section["fine_tuning"])
    return _sorted({
        "tokenizer": section,
        "corpus": {k: prepare[k] for k in ("corpus", "val_fraction", "val_split", "on_bad_record")},
        **({"fine_tuning": splits, "seed": config["seed"]} if splits else {}),
    })  # fmt: skip


def stage_params(section: Mapping[str, Any]) -> dict[str, Any]:
    """A stage section as a rule param, which Snakemake reruns the stage for when it changes.

    `train.{nproc_per_node,nnodes,parallelism}` are dropped: they change how a stage runs, not
    what it computes. Keys are sorted because Snakemake compares params by their repr and a
    `--configfile` merge reorders keys, which alone would rerun the stage.
    """
    stripped = dict(section)
    if isinstance(section.get("train"), Mapping):
        stripped["train"] = {k: v for k, v in section["train"].items() if k not in LAUNCH_KEYS}
    return _sorted(stripped)


CLUSTER_THREADS_PER_PROCESS = 2
"""A cluster job's CPU cores per process when `resources.<stage>.threads` is null: the default
config's laptop size, so the default config runs under the SLURM profile as written."""


def cluster_threads(train: TrainSettings | None = None) -> int:
    """A stage's threads on a cluster (no --cores to take them all from) when its
    `resources.<stage>.threads` is null: CLUSTER_THREADS_PER_PROCESS per process of a node."""
    return CLUSTER_THREADS_PER_PROCESS * (train.nproc_per_node if train else 1)


def threads_per_process(threads: int, train: TrainSettings) -> int:
    """The rule's threads shared among the processes of one node (torchrun would set 1)."""
    return max(1, threads // train.nproc_per_node)


def single_node_launcher(nproc: int, python: str = "python") -> list[str]:
    """The argv that starts `-m pipeline ...` as `nproc` processes on this node: the interpreter
    itself, or torch's launcher (the module, not the `torchrun` script, so the interpreter on
    PATH, or the one given, decides)."""
    if nproc == 1:
        return [python, "-m", "pipeline"]
    return [
        python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(nproc), "-m", "pipeline",
    ]  # fmt: skip


def stage_command(
    stage: str,
    train: TrainSettings,
    threads: int,
    config_path: str,
    gpus_per_node: int = 0,
) -> str:
    """The shell command that runs `python -m pipeline <stage>` with `train`'s world size,
    keeping its resume checkpoint for the Snakefile to delete once the outputs are accepted.

    One node: `single_node_launcher`. Several nodes: `srun` starts one torchrun per node of the
    SLURM allocation, meeting at a c10d rendezvous on the batch host (the allocation's first node,
    where the job's shell runs); the job step is spelt out in full because the SLURM executor
    plugin removes the allocation's SLURM_* variables before running the job's shell.
    """
    per_process = threads_per_process(threads, train)
    args = (
        f"{stage} --config {shlex.quote(config_path)} --threads {per_process} --keep-resume-state"
    )
    nproc, nodes = train.nproc_per_node, train.nnodes
    if nodes == 1:
        return f"{shlex.join(single_node_launcher(nproc))} {args}"
    step = (
        f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --cpus-per-task {threads}"
        + (f" --gpus-per-node {gpus_per_node}" if gpus_per_node else "")
        + " --kill-on-bad-exit=1"
    )
    return (
        f"{step} python -m torch.distributed.run --nnodes {nodes} --nproc-per-node {nproc} "
        f"--rdzv-backend c10d --rdzv-endpoint $(hostname):{RENDEZVOUS_PORT} "
        f"--rdzv-id $SLURM_JOB_ID -m pipeline {args}"
    )


def attempt_log(log: str, attempt: int | str) -> str:
    """Where an attempt of a training job writes its log too: `logs/attempts/<name>.<N>.log`.
    Snakemake deletes a job's declared log before each attempt, so only these keep a retried
    job's earlier attempts. `attempt` is a number or a shell word that expands to one."""
    directory, name = log.rsplit("/", 1) if "/" in log else (".", log)
    return f"{directory}/attempts/{name.removesuffix('.log')}.{attempt}.log"


def keep_attempt_logs(log: str, attempt: int | str) -> str:
    """The shell run before each attempt: makes attempt_log's folder and, at attempt 1, removes
    the attempts of an earlier run, so those left are this run's."""
    folder = shlex.quote(attempt_log(log, 0).rsplit("/", 1)[0])
    earlier = shlex.quote(attempt_log(log, "").removesuffix(".log"))
    return f'mkdir -p {folder}; if [ "{attempt}" -eq 1 ]; then rm -f {earlier}*.log; fi'


def progress_filter(stage: str) -> str:
    """A `sed` that passes on only the training loop's step lines (`step 40/300 | loss .. |
    .. tok/s | eta 5m02s`, from the `pipeline.train` logger), each prefixed by `stage`: a training
    rule tees its job's whole output to its log file and shows these lines on the terminal."""
    return f"sed -un 's/.* pipeline\\.train: \\(step .*\\)/{stage}: \\1/p'"


def per_attempt(amount: int) -> Callable[[Any, int], int]:
    """A resource that grows with the attempt (Snakemake passes it): a job SLURM killed over its
    --mem or --time is resubmitted with twice as much, then three times (and resumes from its
    checkpoint); attempt 1 asks for `amount`."""
    return lambda wildcards, attempt: amount * attempt


def rule_resources(stage_resources: StageResources, train: TrainSettings | None = None) -> dict:
    """A training rule's Snakemake `resources` (the SLURM executor plugin's names; a
    `partition` becomes `slurm_partition`, else the profile's default applies; memory and time
    `per_attempt`).

    One node: `gpu` (sbatch --gpus). Several nodes: one task per node (`nodes`, `tasks`) and
    `gres=gpu:N` per node, because the plugin's `gpu` is a total, not a per-node count;
    `mpi` tells the plugin that the job's shell starts its own `srun` step, and `tasks_per_gpu:
    0` keeps it from turning `tasks` into `--ntasks-per-gpu`.
    """
    resources: dict[str, Any] = {
        "mem_mb": per_attempt(stage_resources.mem_mb),
        "runtime": per_attempt(stage_resources.runtime),
    }
    if stage_resources.partition:
        resources["slurm_partition"] = stage_resources.partition
    gpu = stage_resources.gpu
    nodes = 1 if train is None else train.nnodes
    if nodes == 1:
        return {**resources, "gpu": gpu}
    resources.update(nodes=nodes, tasks=nodes, mpi="srun")
    if gpu:
        resources.update(gres=f"gpu:{gpu}", tasks_per_gpu=0)
    return resources
