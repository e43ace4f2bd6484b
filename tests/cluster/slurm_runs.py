"""Snakemake on tests/cluster's SLURM, as the README runs it (`snakemake --profile
profiles/slurm --configfile ...`): a work directory with the workflow and the profile, the run
in the background (its output in a file), the SLURM jobs it submitted, and what SLURM says of
them."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from snakemake_runs import SNAKEMAKE, make_workdir, tiny_config

TRAINING = {  # rule: (stage, CPUs, MB, minutes) as cluster_config asks
    "pretrain": ("pretrain", 2, 3000, 10),
    "finetune_classifier": ("finetune-classifier", 2, 2500, 9),
    "finetune_instruct": ("finetune-instruct", 2, 2600, 8),
    "align_dpo": ("align-dpo", 2, 2700, 7),
}
MAX_STEPS = 120


def cluster_config(mirror: Path) -> dict:
    """The tests' tiny DAG, with two corpus files tokenized in two jobs and pretraining long
    enough (120 steps, a checkpoint every 10) to be cancelled in the middle."""
    config = tiny_config(
        mirror, max_steps=MAX_STEPS, checkpoint_every=10, eval_every=60, nproc_per_node=2
    )
    config["prepare"] = {
        "corpus": ["the-verdict.txt", "tinyshakespeare.txt"],
        "scatter": 2,
        "val_split": "tail",
    }
    # threads for pretrain (2 processes would ask 4 by default, more than the node's 2 cores);
    # the fine-tuning stages get the cluster default (2 per process)
    config["resources"] = {
        stage: {"mem_mb": mb, "runtime": minutes, **({"threads": 2} if rule == "pretrain" else {})}
        for rule, (stage, _, mb, minutes) in TRAINING.items()
    }
    return config


SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/")


def slurm_workdir(path: Path, repo: Path, config: dict) -> Path:
    """The workflow, its config.yaml, the SLURM profile and the test's config (tiny.yaml)."""
    workdir = make_workdir(path, repo, config)
    shutil.copytree(repo / "profiles", workdir / "profiles", dirs_exist_ok=True)
    return workdir


@dataclass
class SlurmRun:
    """One `snakemake --profile profiles/slurm` in the background."""

    workdir: Path
    process: subprocess.Popen
    output: Path

    def text(self) -> str:
        return self.output.read_text()

    def jobs(self) -> list[tuple[str, str]]:
        """(rule, SLURM job id) of each submission, in order."""
        return [(rule, job) for job, rule in SUBMITTED.findall(self.text())]

    def job_ids(self, rule: str) -> list[str]:
        return [job for name, job in self.jobs() if name == rule]

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            message = f"snakemake still running after {timeout} s:\n{self.text()}"
            raise AssertionError(message) from None

    def finish(self, timeout: float = 900) -> str:
        """Wait for the run, failing with its output and logs unless it succeeded."""
        if self.wait(timeout) != 0:
            logs = sorted((self.workdir / "logs").glob("*.log"))
            slurm = sorted((self.workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
            shown = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in [*logs, *slurm])
            raise AssertionError(f"snakemake failed:\n{self.text()}{shown}")
        return self.text()


def start_slurm_run(workdir: Path, env: Mapping[str, str], *targets: str) -> SlurmRun:
    output = workdir / f"snakemake-{time.monotonic_ns()}.out"
    command = [SNAKEMAKE, *targets, "--profile", "profiles/slurm", "--configfile", "tiny.yaml"]
    with open(output, "w") as out:
        process = subprocess.Popen(
            command, cwd=workdir, env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )
    return SlurmRun(workdir, process, output)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 300) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def squeue_state(job: str) -> str:
    """The job's state while squeue knows it (MinJobAge after its end), else ''."""
    result = subprocess.run(
        ["squeue", "-h", "-j", job, "--states=all", "-o", "%T"], capture_output=True, text=True
    )
    return result.stdout.strip()


def sacct_jobs(jobs: list[str]) -> dict[str, dict[str, str]]:
    """What job accounting recorded of each job (its allocation, not its steps)."""
    fields = ("JobIDRaw", "State", "AllocCPUS", "ReqMem", "Timelimit", "ElapsedRaw")
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(jobs), f"--format={','.join(fields)}"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [dict(zip(fields, line.split("|"), strict=True)) for line in result.stdout.split()]
    return {row["JobIDRaw"]: row for row in rows}
