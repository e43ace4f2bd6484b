"""The whole DAG as real sbatch jobs (`snakemake --profile profiles/slurm`, as the README runs
it) on tests/cluster's SLURM, with job accounting: scattered tokenize jobs whose tokens are the
local run's bytes, each training stage a job with the threads, memory and time its config asks
for (read back from sacct), pretrain under torchrun with 2 processes ending as the local
2-process run, and one MLflow parent run with a child per stage, in the sqlite store of the
work directory, which the jobs reach through the file system they share with Snakemake."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient
from slurm_runs import (
    MAX_STEPS,
    TRAINING,
    cluster_config,
    sacct_jobs,
    slurm_workdir,
    start_slurm_run,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster, tmp_path_factory, repo, mirror):
    """The whole DAG as SLURM jobs, with job accounting on; (workdir, output, seconds)."""
    slurm_cluster.accounting(True)
    workdir = slurm_workdir(tmp_path_factory.mktemp("slurm"), repo, cluster_config(mirror))
    try:
        started = time.monotonic()
        run = start_slurm_run(workdir, slurm_cluster.env())
        run.finish()
        yield workdir, run, time.monotonic() - started
    finally:
        slurm_cluster.accounting(False)


def test_tokenize_runs_as_two_jobs_each_declaring_the_files_it_reads(cluster_run, local_run):
    workdir, run, _ = cluster_run
    assert len(run.job_ids("tokenize")) == 2 and len(run.job_ids("prepare")) == 1
    declared = dict(
        re.findall(
            r"input: (data/raw/\S+), data/tokenizer\n\s+output: data/token-parts/(\S+)", run.text()
        )  # fmt: skip
    )
    assert {part: path for path, part in declared.items()} == {
        "1-of-2": "data/raw/the-verdict.txt",
        "2-of-2": "data/raw/tinyshakespeare.txt",
    }
    for part in ("1-of-2", "2-of-2"):
        assert f"part {part}: 1 files" in (workdir / "logs" / f"prepare-{part}.log").read_text()
    tokens = sorted(p.relative_to(workdir) for p in (workdir / "data" / "tokens").rglob("*"))
    reference = sorted(p.relative_to(local_run) for p in (local_run / "data/tokens").rglob("*"))
    assert tokens == reference
    for path in tokens:
        if (workdir / path).is_file():
            assert (workdir / path).read_bytes() == (local_run / path).read_bytes(), path


def test_each_training_stage_is_a_job_with_the_resources_its_config_asks(cluster_run):
    _, run, _ = cluster_run
    jobs = {rule: run.job_ids(rule) for rule in TRAINING}
    assert all(len(ids) == 1 for ids in jobs.values()), jobs
    accounted = sacct_jobs([ids[0] for ids in jobs.values()])
    for rule, (_, cpus, mb, minutes) in TRAINING.items():
        job = accounted[jobs[rule][0]]
        assert job["State"] == "COMPLETED", (rule, job)
        assert (job["AllocCPUS"], job["ReqMem"]) == (str(cpus), f"{mb}M"), (rule, job)
        assert job["Timelimit"] == f"00:{minutes:02d}:00", (rule, job)


def test_pretrain_runs_two_processes_in_a_job_step_and_ends_as_the_local_run(
    cluster_run, local_run
):
    workdir, run, _ = cluster_run
    [job] = run.job_ids("pretrain")
    steps = subprocess.run(
        ["sacct", "-n", "-P", "-j", job, "--format=JobIDRaw,JobName,State"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert any(re.fullmatch(rf"{job}\.0\|\S+\|COMPLETED", s) for s in steps), steps  # srun's
    launched = "torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 -m pipeline"
    assert launched in run.text()  # the job's shell command, as Snakemake printed it
    ours = json.loads((workdir / "results" / "pretrain" / "metrics.json").read_text())
    local = json.loads((local_run / "results" / "pretrain" / "metrics.json").read_text())
    assert ours["steps"] == local["steps"] == MAX_STEPS
    assert (ours["val_loss"], ours["train_loss"]) == (local["val_loss"], local["train_loss"])


def test_mlflow_holds_one_parent_run_and_a_child_per_stage(cluster_run):
    workdir, _, _ = cluster_run
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline").experiment_id
    runs = client.search_runs([experiment])
    [parent] = [r for r in runs if r.data.tags.get("pipeline.role") == "parent"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags["pipeline.stage"] for r in children)
    expected = ["align-dpo", "download", "finetune-classifier", "finetune-instruct", "prepare",
                "pretrain", "tokenizer"]  # fmt: skip
    assert sorted(set(stages)) == expected
    assert stages.count("pretrain") == 1
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in runs} == {parent.info.run_id, *(r.info.run_id for r in children)}


def test_the_dags_wall_time_against_its_jobs_run_time(cluster_run, capsys):
    """Not a pass/fail figure: printed (pytest -s) for the README's cluster section."""
    _, run, seconds = cluster_run
    accounted = sacct_jobs([job for _, job in run.jobs()])
    busy = sum(int(job["ElapsedRaw"]) for job in accounted.values())
    assert busy > 0
    with capsys.disabled():
        print(f"\nSLURM DAG: {len(accounted)} jobs, {busy} s of job run time, "
              f"{seconds:.0f} s wall time ({seconds / busy:.2f}x)")  # fmt: skip


def test_the_work_directory_keeps_no_resume_state_once_the_outputs_are_accepted(cluster_run):
    workdir, _, _ = cluster_run
    assert not (workdir / ".resume").exists() or not any((workdir / ".resume").iterdir())
