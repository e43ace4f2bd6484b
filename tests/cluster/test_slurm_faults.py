"""Faults under the scheduler, on tests/cluster's SLURM, each run as the README runs the DAG
(`snakemake --profile profiles/slurm`, retries 2): the pretrain job scancelled in the middle of
training and again just after its work, before Snakemake took its outputs; the login-side
Snakemake killed and restarted while its job runs; a job over its time and over its memory limit;
pretraining across two nodes. Each that finishes ends with the loss of the uninterrupted local run
in one MLflow run. All run without job accounting (the profile reads job states with squeue, the
same with and without it; test_slurm_dag.py runs with accounting)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from slurm_runs import MAX_STEPS, SNAKEMAKE, squeue_state, start_slurm_run, wait_until

from pipeline.train import read_resume_meta

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TARGET = "results/pretrain/metrics.json"


@pytest.fixture
def prepared(local_run, repo, tmp_path) -> Path:
    """The local run's work directory up to its tokens (and their Snakemake records), with no
    pretraining, MLflow store or logs: only pretrain is left to run."""
    skipped = shutil.ignore_patterns("pretrain", "mlflow.db", "mlartifacts", ".resume", "logs")
    workdir = Path(shutil.copytree(local_run, tmp_path / "work", ignore=skipped, symlinks=True))
    shutil.copytree(repo / "profiles", workdir / "profiles")
    return workdir


def pretrain_log(workdir: Path) -> str:
    path = workdir / "logs" / "pretrain.log"
    return path.read_text() if path.exists() else ""


def scancel(job: str) -> float:
    subprocess.run(["scancel", job], check=True)
    return time.monotonic()


def pretrain_runs(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline").experiment_id
    return client.search_runs([experiment], "tags.`pipeline.stage` = 'pretrain'")


def assert_ends_as_the_local_run(workdir: Path, local: Path) -> None:
    ours = json.loads((workdir / TARGET).read_text())
    reference = json.loads((local / TARGET).read_text())
    assert ours["steps"] == MAX_STEPS
    assert (ours["val_loss"], ours["train_loss"]) == (
        reference["val_loss"],
        reference["train_loss"],
    )
    [run] = pretrain_runs(workdir)
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'gpt-pipeline-pretrain'")) == 1
    assert not (workdir / ".resume" / "pretrain").exists()  # deleted once accepted


def test_a_cancelled_pretrain_job_resumes_and_one_killed_after_its_work_evaluates_only(
    slurm_cluster, prepared, local_run, capsys
):
    run = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
    # attempt 1: cancelled two steps past a checkpoint
    [first] = wait_until(lambda: run.job_ids("pretrain"), "the pretrain job")
    resume = prepared / ".resume" / "pretrain"

    def past_a_checkpoint() -> bool:
        meta = read_resume_meta(resume)
        return meta is not None and f"step {meta['step'] + 2}/" in pretrain_log(prepared)

    wait_until(past_a_checkpoint, "a resume checkpoint", timeout=600)
    checkpoint = read_resume_meta(resume)["step"]
    cancelled = scancel(first)
    second = wait_until(lambda: run.job_ids("pretrain")[1:], "the resubmission")[0]
    noticed = time.monotonic() - cancelled
    # attempt 2: resumes; cancelled once its outputs are written, before they are accepted
    wait_until(lambda: (prepared / TARGET).exists(), "attempt 2's outputs", timeout=600)
    scancel(second)
    run.finish()

    with capsys.disabled():
        print(f"\nscancel -> resubmitted in {noticed:.1f} s")
    assert len(run.job_ids("pretrain")) == 3
    logs = prepared / "logs"
    first_log = (logs / "attempts" / "pretrain.1.log").read_text()
    second_log = (logs / "attempts" / "pretrain.2.log").read_text()
    assert (logs / "attempts" / "pretrain.3.log").read_text() == pretrain_log(prepared)
    assert f"resumed from step {checkpoint}/{MAX_STEPS}" not in first_log
    assert f"resumed from step {checkpoint}/{MAX_STEPS}" in second_log
    assert "evaluating only" in pretrain_log(prepared)  # attempt 3: no training again
    assert "CANCELLED" in run.text() and "Error in rule pretrain" in run.text()
    assert_ends_as_the_local_run(prepared, local_run)


def test_a_restarted_snakemake_waits_for_the_job_still_running(slurm_cluster, prepared, local_run):
    """The login-side Snakemake SIGKILLed while its pretrain job runs, unlocked and started
    again: it submits no second pretrain job while the first is queued."""
    run = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
    [job] = wait_until(lambda: run.job_ids("pretrain"), "the pretrain job")
    wait_until(lambda: "step 20/" in pretrain_log(prepared), "pretraining", timeout=600)
    os.kill(run.process.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert squeue_state(job) == "RUNNING"  # the job goes on without its Snakemake
    unlock = [SNAKEMAKE, "--unlock", "--profile", "profiles/slurm", "--configfile", "tiny.yaml"]
    subprocess.run(unlock, cwd=prepared, env=slurm_cluster.env(), check=True, capture_output=True)

    again = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
    output = again.finish()
    assert f"waiting for SLURM jobs an earlier Snakemake left in {prepared.resolve()}: {job} " in (
        output
    )
    for resubmitted in again.job_ids("pretrain"):  # only once the first left the queue
        assert int(resubmitted) > int(job)
    assert squeue_state(job) in ("", "COMPLETED")
    assert_ends_as_the_local_run(prepared, local_run)


def with_pretrain(workdir: Path, train: dict, resources: dict) -> None:
    """The work directory's tiny.yaml with pretrain's train and resources sections updated."""
    config = yaml.safe_load((workdir / "tiny.yaml").read_text())
    config["pretrain"]["train"].update(train)
    config["resources"]["pretrain"].update(resources)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))


def assert_no_half_written_results(workdir: Path) -> None:
    leftovers = [p.name for p in (workdir / "results").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_job_over_its_time_limit_resumes_in_a_longer_one(slurm_cluster, prepared):
    """runtime 1 (minute) for about two minutes of pretraining: SLURM kills attempt 1, the
    failure names the stage and the limit, attempt 2 asks for 2 minutes and resumes."""
    steps = 2000
    with_pretrain(prepared, {"max_steps": steps, "checkpoint_every": 100, "eval_every": steps},
                  {"runtime": 1})  # fmt: skip
    run = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
    output = run.finish(timeout=900)
    first, second = run.job_ids("pretrain")
    assert f"SLURM-job '{first}' failed, SLURM status is: 'TIMEOUT'" in output
    assert "Error in rule pretrain:" in output
    assert (
        "TIME LIMIT"
        in (prepared / ".snakemake/slurm_logs/rule_pretrain" / f"{first}.log").read_text()
    )
    assert "runtime=2" in output.split(f"SLURM jobid {second}")[0].rsplit("rule pretrain:", 1)[1]
    resumed = (prepared / "logs" / "attempts" / "pretrain.2.log").read_text()
    assert re.search(rf"resumed from step \d+/{steps}", resumed)
    assert json.loads((prepared / TARGET).read_text())["steps"] == steps
    [run_] = pretrain_runs(prepared)
    assert run_.info.status == "FINISHED"
    assert_no_half_written_results(prepared)


def test_a_job_over_its_memory_limit_is_resubmitted_with_more_and_named(slurm_cluster, prepared):
    """mem_mb 150 is too little for even a job's Snakemake: SLURM kills each attempt (150, 300,
    then 450 MB), and the run ends naming the stage, the limit and the memory used."""
    with_pretrain(prepared, {}, {"mem_mb": 150})
    run = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
    assert run.wait() != 0
    output = run.text()
    first, _, third = run.job_ids("pretrain")
    assert f"SLURM-job '{first}' failed" in output and "Error in rule pretrain:" in output
    assert "mem_mb=300" in output and "mem_mb=450" in output
    limit = r"went over its memory limit \(--mem 450 MB; it used \d+ MB\)"
    named = rf"^pretrain: SLURM job {third} {limit}$"
    assert re.search(named, output, flags=re.MULTILINE), output[-2000:]
    assert not (prepared / "results" / "pretrain").exists()
    assert_no_half_written_results(prepared)


def test_pretrain_across_two_nodes_ends_as_the_local_two_process_run(
    slurm_cluster, prepared, local_run
):
    """train.nnodes 2 (one process per node) on two slurmd of this host: one job on both
    nodes, `srun` starting a torchrun per node at a c10d rendezvous, the same world of 2 as
    the local run's 2 processes, so the same loss."""
    slurm_cluster.nodes(2)
    try:
        with_pretrain(prepared, {"nproc_per_node": 1, "nnodes": 2}, {})
        run = start_slurm_run(prepared, slurm_cluster.env(), TARGET)
        run.finish()
        [job] = run.job_ids("pretrain")
        shown = subprocess.run(
            ["scontrol", "show", "job", job], capture_output=True, text=True, check=True
        ).stdout
    finally:
        slurm_cluster.nodes(1)
    assert "NumNodes=2 " in shown and "JobState=COMPLETED" in shown, shown
    assert "srun --nodes 2 --ntasks 2 --ntasks-per-node 1" in run.text()
    assert "--rdzv-backend c10d" in run.text()
    assert_ends_as_the_local_run(prepared, local_run)
