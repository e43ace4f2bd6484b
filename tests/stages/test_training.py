"""The training skeleton as a user meets it: what it leaves on the stage's MLflow run (a real
sqlite store); `python -m pipeline pretrain` killed with SIGKILL and rerun is one MLflow run with
continuous curves; a killed run that is not resumed ends KILLED; and results/<stage>/ always holds
one complete run, even after a stage that failed."""

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from snakemake_runs import make_workdir, tiny_config

from pipeline.settings import TrackingSettings
from pipeline.settings.load import load_config, stage_config
from pipeline.stages import pretrain, training
from pipeline.stages.training import finish_stage
from pipeline.tracking import PARENT_RUN_ENV, stage_run
from pipeline.tracking.model_registry import CHAMPION, DATA_TAG, data_alias
from pipeline.train import read_resume_meta

MAX_STEPS = 120
CONFIGS = ("--config", "config.yaml", "--config", "tiny.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, repo, mirror) -> Path:
    """A work directory with the tiny config, downloaded and prepared once."""
    config = tiny_config(mirror, max_steps=MAX_STEPS, checkpoint_every=10, eval_every=60)
    workdir = make_workdir(tmp_path_factory.mktemp("training"), repo, config)
    for stage in ("download", "tokenizer", "prepare"):
        command = [sys.executable, "-m", "pipeline", stage, *CONFIGS]
        done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return workdir


@pytest.fixture
def workdir(prepared, tmp_path) -> Path:
    """The prepared directory without its MLflow store: each test starts with no runs."""
    ignore = shutil.ignore_patterns("mlflow.db", "mlartifacts")
    return Path(shutil.copytree(prepared, tmp_path / "work", ignore=ignore))


def pretrain_job(workdir: Path, log: str, *sets: str, keep: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "pretrain", *CONFIGS]
    command += [f"--set={s}" for s in sets] + (["--keep-resume-state"] if keep else [])
    with open(workdir / log, "w") as out:
        return subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)


def kill_after_a_checkpoint(workdir: Path, *sets: str) -> int:
    """Start pretraining, SIGKILL it once a resume checkpoint exists and it trained on past it;
    returns the checkpoint's step."""
    job = pretrain_job(workdir, "killed.log", *sets)
    resume, log = workdir / ".resume" / "pretrain", workdir / "killed.log"
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        meta = read_resume_meta(resume)
        if meta is not None and f"step {meta['step'] + 2}/" in log.read_text():
            break
        time.sleep(0.02)
    assert job.poll() is None, f"pretraining ended before it was killed:\n{log.read_text()}"
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL
    step = read_resume_meta(resume)["step"]
    assert 0 < step < MAX_STEPS
    return step


def pretrain_runs(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline").experiment_id
    return client.search_runs(
        [experiment], "tags.`pipeline.stage` = 'pretrain'", order_by=["attributes.start_time"]
    )


def rerun(workdir: Path, *sets: str, keep: bool = False) -> str:
    """Pretraining run again to its end; returns its log."""
    returncode = pretrain_job(workdir, "rerun.log", *sets, keep=keep).wait(timeout=600)
    log = (workdir / "rerun.log").read_text()
    assert returncode == 0, log
    return log


@pytest.mark.slow
def test_a_killed_training_resumes_in_its_own_mlflow_run(workdir):
    """One run, its curves and system metrics going on, its dataset inputs listed once."""
    sampling = "tracking.system_metrics_interval=0.2"
    killed_at = kill_after_a_checkpoint(workdir, sampling)
    [killed] = pretrain_runs(workdir)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves
    assert read_resume_meta(workdir / ".resume" / "pretrain")["tracking_run"] == (
        killed.info.run_id
    )

    log = rerun(workdir, sampling)
    assert f"resumed from step {killed_at}/{MAX_STEPS}" in log
    [run] = pretrain_runs(workdir)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert steps == list(range(1, MAX_STEPS + 1))  # no gap, no restart, nothing twice
    metrics = json.loads((workdir / "results" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and run.data.metrics["val_loss"] == metrics["val_loss"]
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    steps = [m.step for m in sorted(cpu, key=lambda m: m.timestamp)]
    assert steps and steps == sorted(set(steps))  # the rerun's samples go on after the killed's
    assert_token_datasets(run, workdir / "data" / "tokens")


def test_a_job_killed_after_its_work_reruns_only_the_evaluation(workdir):
    """--keep-resume-state (what a Snakemake job runs with) leaves the last step's resume state:
    a job whose outputs Snakemake deleted (killed before they were accepted) writes them again
    without training, in the same MLflow run, registering no second version."""
    rerun(workdir, keep=True)
    resume = workdir / ".resume" / "pretrain"
    assert read_resume_meta(resume)["step"] == MAX_STEPS
    finished = json.loads((workdir / "results" / "pretrain" / "metrics.json").read_text())
    shutil.rmtree(workdir / "results" / "pretrain")

    log = rerun(workdir, keep=True)
    assert f"resume state is at step {MAX_STEPS} >= max_steps; evaluating only" in log
    assert f"step 1/{MAX_STEPS}" not in log
    again = json.loads((workdir / "results" / "pretrain" / "metrics.json").read_text())
    assert again["val_loss"] == finished["val_loss"] and again["steps"] == MAX_STEPS
    [run] = pretrain_runs(workdir)
    assert run.info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'gpt-pipeline-pretrain'")) == 1
    assert run.data.tags["attention"] == "fused"  # model.attention: auto, and why
    assert (
        run.data.tags["attention_reason"] == "the fused op's CPU kernels (faster than SDPA on CPUs)"
    )

    rerun(workdir)  # run alone, without Snakemake: nobody else deletes it
    assert not resume.exists()


def assert_token_datasets(run, token_dir: Path) -> None:
    """The run's inputs: the token files' train and val splits, each once, with their counts and
    a digest of what made them (the inputs' sha256s and the split)."""
    meta = json.loads((token_dir / "meta.json").read_text())
    inputs = {i.dataset.name: (i.tags[0].value, i.dataset) for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["tokenizer", "tokens/train", "tokens/val"]
    assert inputs["tokenizer"][1].digest == meta["tokenizer"]["sha256"][:36]
    made_of = [[r["file"], r["sha256"]] for r in meta["inputs"]]
    for split, context in (("train", "training"), ("val", "validation")):
        logged_context, dataset = inputs[f"tokens/{split}"]
        assert logged_context == context
        assert json.loads(dataset.source) == {"uri": str((token_dir / "meta.json").resolve())}
        assert json.loads(dataset.profile) == {
            "tokens": meta[f"{split}_tokens"], "shards": len(meta["shards"][split]),
            "input_files": 1,
        }  # fmt: skip
        recipe = [split, meta["tokenizer"], meta["split"], meta["val_fraction"], made_of]
        assert dataset.digest == hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:36]


def val_sha256(workdir: Path) -> str:
    """The sha256 of the prepared val tokens, their shards end to end."""
    tokens = workdir / "data" / "tokens"
    shards = json.loads((tokens / "meta.json").read_text())["shards"]["val"]
    return hashlib.sha256(b"".join((tokens / s["file"]).read_bytes() for s in shards)).hexdigest()


@pytest.mark.slow
def test_a_model_pretrained_on_other_data_starts_its_own_champion_line(workdir):
    """Its val_loss is not compared with the first data's champion: the run and the version
    name the val tokens they were measured on, and each data has its `@champion-<sha12>`;
    `@champion` stays with the first data's line."""
    rerun(workdir, "pretrain.train.max_steps=2")
    first = val_sha256(workdir)
    other_split = "--set=prepare.val_fraction=0.3"
    command = [sys.executable, "-m", "pipeline", "prepare", *CONFIGS, other_split]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rerun(workdir, "pretrain.train.max_steps=2")
    other = val_sha256(workdir)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = pretrain_runs(workdir)
    assert [run.data.tags[DATA_TAG] for run in runs] == [first, other] and first != other
    versions = client.search_model_versions("name = 'gpt-pipeline-pretrain'")
    assert {str(v.version): v.tags[DATA_TAG] for v in versions} == {"1": first, "2": other}
    aliases = client.get_registered_model("gpt-pipeline-pretrain").aliases
    assert aliases == {CHAMPION: 1, data_alias(first): 1, data_alias(other): 2}


@pytest.mark.slow
def test_a_killed_training_that_is_not_resumed_ends_killed(workdir):
    kill_after_a_checkpoint(workdir)
    log = rerun(workdir, "pretrain.train.lr=0.002")  # another run: the checkpoint does not fit
    assert "discarding resume state" in log and "marked KILLED" in log
    killed, fresh = pretrain_runs(workdir)
    assert killed.info.status == "KILLED" and fresh.info.status == "FINISHED"
    assert fresh.data.params["pretrain.train.lr"] == "0.002"


def folder(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["plot_training_curves", "atomic_write_json"])
def test_a_failed_stage_leaves_the_previous_complete_folder(workdir, monkeypatch, failing):
    """A full disk while writing the loss plot (after the new samples.txt) or metrics.json
    (after the new model): the folder is still the first run's, byte for byte."""
    monkeypatch.chdir(workdir)
    config = load_config([workdir / "config.yaml", workdir / "tiny.yaml"])
    config["pretrain"]["train"]["max_steps"] = 4
    pretrain.main(stage_config(config, "pretrain"))
    results = workdir / "results"
    complete = folder(results / "pretrain")
    assert {"metrics.json", "loss.png", "samples.txt", "model/model.safetensors"} <= set(complete)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, failing, disk_full)
    config["seed"] = 7  # another model, other samples
    with pytest.raises(OSError, match="(?i)no space left"):
        pretrain.main(stage_config(config, "pretrain"))
    assert folder(results / "pretrain") == complete
    # no temp folder left (results/prepare holds prepare's warnings.json, results/tokenizer
    # the tokenizer's training.json)
    assert sorted(p.name for p in results.iterdir()) == ["prepare", "pretrain", "tokenizer"]


def test_final_metrics_end_their_series_and_are_not_copied_as_final(
    tmp_path, default_config, monkeypatch
):
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {**default_config, "tracking": {"uri": uri, "experiment": "t", "log_model": False}}
    metrics = {
        "val_loss": 0.5,  # its series already ends with it
        "tokens_per_second": 100.0,  # the run's mean: differs from the last step's rate
        "test_accuracy": 0.9,  # only known at the end
        "test_roc_auc": math.nan,
        "method": "lora",
        "epochs": 1.5,  # what the run was, one value each: params, not one-point charts
        "trainable_parameters": 1024,
    }
    with stage_run(TrackingSettings(**config["tracking"]), "finetune-instruct", config) as tracker:
        tracker.log_metrics({"val_loss": 0.7, "tokens_per_second": 80.0}, step=1)
        tracker.log_metrics({"val_loss": 0.5, "tokens_per_second": 90.0}, step=2)
        finish_stage(tracker, tmp_path, metrics, 2, [], "finetune-instruct", log_model=False)

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert not [k for k in run.data.metrics if k.startswith("final_")]
    assert run.data.metrics["val_loss"] == 0.5 and run.data.metrics["test_accuracy"] == 0.9
    assert run.data.metrics["tokens_per_second"] == 100.0
    assert {k: run.data.params[k] for k in ("epochs", "trainable_parameters")} == {
        "epochs": "1.5", "trainable_parameters": "1024"
    }  # fmt: skip
    assert not {"epochs", "trainable_parameters"} & run.data.metrics.keys()

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, key)]

    assert history("val_loss") == [(1, 0.7), (2, 0.5)]  # not a second point at step 2
    assert history("tokens_per_second") == [(1, 80.0), (2, 90.0), (2, 100.0)]
    assert history("test_accuracy") == [(2, 0.9)]
    assert math.isnan(run.data.metrics["test_roc_auc"])
    assert json.loads((tmp_path / "metrics.json").read_text())["test_roc_auc"] is None
