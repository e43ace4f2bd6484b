"""What the pipeline reads from SLURM: the jobs an earlier Snakemake left in the queue of this
work directory, and the limit a killed job went over.

A login-side Snakemake that is killed (a closed terminal, a lost tmux) leaves its jobs running.
Restarted, it would submit the unfinished ones again, and two jobs of one stage would write one
output and one resume checkpoint. So a new invocation waits for them to leave the queue first;
a training job it then reruns resumes from the checkpoint the earlier one left.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pipeline")

QUEUED = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"})
SQUEUE_FORMAT = "%i|%T|%k|%Z"  # id, state, comment (the plugin's rule_<name>...), work dir


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    state: str
    rule: str


def parse_squeue(listing: str, workdir: str) -> list[QueuedJob]:
    """The Snakemake jobs (comment `rule_<name>[_wildcards_...]`) of `workdir` still queued,
    from `squeue -h -o SQUEUE_FORMAT` lines."""
    jobs = []
    for line in listing.splitlines():
        fields = line.split("|")
        if len(fields) != 4:
            continue
        job_id, state, comment, directory = fields
        ours = comment.startswith("rule_") and os.path.realpath(directory) == workdir
        if state in QUEUED and ours:
            jobs.append(QueuedJob(job_id, state, comment.removeprefix("rule_")))
    return jobs


def queued_jobs(workdir: str) -> list[QueuedJob]:
    """This user's Snakemake jobs of `workdir` in SLURM's queue (none where squeue is missing
    or fails: then nothing can be waited for)."""
    if shutil.which("squeue") is None:
        return []
    result = subprocess.run(
        ["squeue", "--me", "-h", "-o", SQUEUE_FORMAT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return parse_squeue(result.stdout, workdir) if result.returncode == 0 else []


def wait_for_earlier_jobs(
    workdir: str | None = None,
    poll_seconds: float = 10.0,
    say: Callable[[str], None] = print,
) -> None:
    """Return once no Snakemake job of `workdir` (default: here) is queued, saying which ones
    it waits for: called before this invocation submits any, so each is an earlier one's."""
    workdir = os.path.realpath(workdir or os.getcwd())
    waited: set[str] = set()
    while jobs := queued_jobs(workdir):
        new = [job for job in jobs if job.job_id not in waited]
        if new:
            listed = ", ".join(f"{job.job_id} ({job.rule}, {job.state})" for job in new)
            say(
                f"waiting for SLURM jobs an earlier Snakemake left in {workdir}: {listed}; "
                "they are not submitted again (scancel them to stop waiting)"
            )
            waited.update(job.job_id for job in new)
        time.sleep(poll_seconds)


SLURM_LOGS = Path(
    ".snakemake/slurm_logs"
)  # the executor plugin's: rule_<name>/[wildcards/]<id>.log
MEMORY = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")
OOM_KILL = re.compile(r"Detected \d+ oom[-_]kill event")  # where cgroups enforce --mem
TIME = re.compile(r"CANCELLED AT \S+ DUE TO TIME LIMIT")


def limit_hit(slurm_log: str) -> str | None:
    """The limit SLURM killed a job for, from the job's SLURM log, in words; None if neither."""
    if match := MEMORY.search(slurm_log):
        used, limit = (int(n) // 2**20 for n in match.groups())
        return f"went over its memory limit (--mem {limit} MB; it used {used} MB)"
    if OOM_KILL.search(slurm_log):
        return "went over its memory limit (--mem)"
    if TIME.search(slurm_log):
        return "went over its time limit (--time)"
    return None


def killed_for(rule: str, logs: Path = SLURM_LOGS) -> str | None:
    """Why SLURM killed the latest job of `rule`, from its log (the plugin keeps a failed job's
    log): `SLURM job <id> <limit_hit>`, or None."""
    found = sorted((logs / f"rule_{rule}").rglob("*.log"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    reason = limit_hit(found[-1].read_text(errors="replace"))
    return f"SLURM job {found[-1].stem} {reason}" if reason else None
