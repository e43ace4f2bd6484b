import json
import os
import socket
import subprocess
import sys
import time

import pytest
from headless_browser import SKIP_REASON, browser, dump_dom, visible_text
from mlflow.tracking import MlflowClient

from pipeline.settings import TrackingSettings
from pipeline.tracking import (
    KIND_TAG,
    PARENT_RUN_ENV,
    TRAINING_KIND,
    WARNING_TAG,
    end_parent_run,
    ensure_experiment,
    flatten,
    git_tags,
    read_warnings,
    runs_page,
    stage_run,
    start_parent_run,
    system_metrics,
    warnings_block,
)


def tracked_run(config: dict, stage: str, **kwargs):
    """`stage_run` as a stage opens it: the config's tracking settings, the config as params."""
    return stage_run(TrackingSettings(**config["tracking"]), stage, config, **kwargs)


@pytest.fixture()
def tracked_config(tmp_path, default_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {**default_config, "tracking": {"uri": uri, "experiment": "test", "log_model": False}}


def test_stage_runs_are_children_of_the_invocation_parent(tracked_config, tmp_path, monkeypatch):
    uri = tracked_config["tracking"]["uri"]
    parent = start_parent_run(uri, "test", "pretrain 2026-01-01 10:00:00Z")
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    with tracked_run(tracked_config, "pretrain") as run:
        run.log_metrics({"loss": 2.5, "lr": 1e-3}, step=10)
        run.log_metrics({"loss": 2.0}, step=20)
        run.log_text("hello", "samples/step_000010.txt")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"val_loss": 1.5, "epochs": 2, "note": "text is skipped"}))
    missing = tmp_path / "not-written.json"  # a stage that failed before its metrics
    end_parent_run(uri, parent, True, {"pretrain": metrics, "finetune-classifier": missing})

    client = MlflowClient(uri)
    child = client.get_run(run.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["pipeline.stage"] == "pretrain"
    assert child.data.params["pretrain.train.max_steps"] == str(
        tracked_config["pretrain"]["train"]["max_steps"]
    )
    assert child.data.params["data.sources.0.name"] == "gpt2-bpe/encoder.json"
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 2.0)]
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "samples"} <= artifacts
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics == {"pretrain.val_loss": 1.5}
    assert parent_run.data.params == {"pretrain.epochs": "2"}  # what the run was: a param
    assert parent_run.info.run_name == "pretrain 2026-01-01 10:00:00Z"
    assert (tmp_path / "mlartifacts").is_dir()


def test_failing_stage_marks_its_run_failed(tracked_config):
    with pytest.raises(RuntimeError, match="boom"), tracked_run(tracked_config, "prepare") as run:
        raise RuntimeError("boom")
    client = MlflowClient(tracked_config["tracking"]["uri"])
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert "mlflow.parentRunId" not in client.get_run(run.run_id).data.tags


def test_a_stages_warnings_are_logged_tagged_and_written_once_it_succeeds(
    tracked_config, tmp_path, caplog
):
    """What the Snakefile shows at the end of a run: results/<stage>/warnings.json."""
    done, failed = tmp_path / "done" / "warnings.json", tmp_path / "failed" / "warnings.json"
    with tracked_run(tracked_config, "align-dpo", warnings_file=done) as run:
        run.warn("align-dpo: the test answers collapsed: 91% of the answers are 'The'")
        run.warn("a second look")
    assert json.loads(done.read_text()) == [
        "align-dpo: the test answers collapsed: 91% of the answers are 'The'", "a second look"
    ]  # fmt: skip
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == run.warnings
    tags = MlflowClient(tracked_config["tracking"]["uri"]).get_run(run.run_id).data.tags
    assert tags[WARNING_TAG] == "\n".join(run.warnings)
    with pytest.raises(RuntimeError), tracked_run(tracked_config, "x", warnings_file=failed) as run:
        run.warn("a warning of a stage that then fails")
        raise RuntimeError("boom")
    assert not failed.exists()  # its job failed: its error is shown, not its warnings
    with tracked_run(tracked_config, "prepare", warnings_file=failed):
        pass
    assert read_warnings(failed.parent) == [] and read_warnings(tmp_path / "none") == []
    assert warnings_block({"prepare": [], "align-dpo": json.loads(done.read_text())}) == (
        "warnings (2; the logs/ say more):\n"
        "  align-dpo: the test answers collapsed: 91% of the answers are 'The'\n"
        "  align-dpo: a second look"
    )
    assert warnings_block({"prepare": []}) == ""


def test_experiment_is_created_once(tracked_config):
    uri = tracked_config["tracking"]["uri"]
    assert ensure_experiment(uri, "x") == ensure_experiment(uri, "x")


def test_the_experiment_is_one_of_model_training(tracked_config):
    """MLflow 3's experiment kind: model training, not a GenAI app (whose UI opened on an
    Overview of 0 traces); set on one the pipeline creates, and on one it first uses, unless
    chosen by hand."""
    uri = tracked_config["tracking"]["uri"]
    client = MlflowClient(uri)
    client.create_experiment("made before")
    client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    start_parent_run(uri, "made here")
    with tracked_run({**tracked_config, "tracking": {"uri": uri, "experiment": "made before"}},
                     "pretrain"):  # fmt: skip
        pass
    ensure_experiment(uri, "chosen")
    kinds = {e.name: e.tags.get(KIND_TAG) for e in client.search_experiments()}
    assert kinds == {
        "Default": None, "made here": TRAINING_KIND, "made before": TRAINING_KIND,
        "chosen": "genai_development",
    }  # fmt: skip
    assert TRAINING_KIND == "custom_model_development"


@pytest.mark.slow
@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_the_runs_page_opens_the_ui_on_the_runs_table(mlflow_ui, sqlite_uri, tmp_path):
    """MLflow 3.17's UI opens an experiment as its GenAI / Model training switch says (GenAI
    by default), whatever the experiment's kind: the link the pipeline logs sets the switch."""
    experiment_id = ensure_experiment(sqlite_uri, "gpt-pipeline")
    MlflowClient(sqlite_uri).create_run(experiment_id, run_name="pretrain")
    url = runs_page(mlflow_ui.uri, experiment_id)
    assert url == f"{mlflow_ui.uri}/#/experiments/{experiment_id}?workflowType=machine_learning"
    text = visible_text(dump_dom(url, tmp_path / "chromium", budget_ms=15000))
    assert text.startswith(f"Runs - Experiment {experiment_id} - MLflow"), text[:300]
    assert "pretrain" in text and "Traces 0" not in text
    assert runs_page("sqlite:///mlflow.db", "1") == (
        "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
    )  # `make mlflow-ui`'s


def test_git_tags_outside_a_repository(tmp_path):
    assert git_tags(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_git_tags_in_the_project(repo):
    tags = git_tags(repo)
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")


def test_a_resumed_training_continues_its_run(tracked_config):
    """Same run, RUNNING again then FINISHED; the steps the killed process already logged (after
    its checkpoint) are not logged twice, so each curve goes on without a restart."""
    uri = tracked_config["tracking"]["uri"]
    client = MlflowClient(uri)
    killed = client.create_run(ensure_experiment(uri, "test"), tags={"pipeline.stage": "pretrain"})
    run_id = killed.info.run_id
    for step in range(1, 6):
        client.log_metric(run_id, "loss", 10.0 - step, step=step)
    client.log_param(run_id, "pretrain.train.log_every", "99")  # it may change on resume
    client.set_terminated(run_id, "FAILED")  # its job failed, or was found killed
    with tracked_run(tracked_config, "pretrain", resume=run_id) as run:
        assert run.run_id == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
        for step in range(4, 9):  # the checkpoint was at step 3
            run.log_metrics({"loss": 10.0 - step, "val_loss": 1.0}, step=step)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 10.0 - s) for s in range(1, 9)]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [4, 5, 6, 7, 8]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["pipeline.pid"] == str(os.getpid())
    assert finished.data.params["pretrain.train.log_every"] == "99"  # MLflow keeps a param's
    assert finished.data.params["pretrain.train.max_steps"]  # first value; the rest are added
    experiment = client.get_experiment_by_name("test").experiment_id
    assert len(client.search_runs([experiment])) == 1


def test_a_run_that_cannot_be_continued_gives_a_new_one(tracked_config):
    with tracked_run(tracked_config, "pretrain", resume="0123456789abcdef") as run:
        assert run.run_id != "0123456789abcdef"
    assert MlflowClient(tracked_config["tracking"]["uri"]).get_run(run.run_id).info.status == (
        "FINISHED"
    )


def test_runs_left_running_by_a_dead_process_are_marked_killed(tracked_config):
    """On this host a dead pid is proof; elsewhere only the resume state's word (`abandoned`)."""
    uri = tracked_config["tracking"]["uri"]
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "test")
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    here = socket.gethostname()

    def running(host: str, pid: int, stage: str = "pretrain") -> str:
        tags = {"pipeline.stage": stage, "pipeline.host": host, "pipeline.pid": str(pid)}
        return client.create_run(experiment, tags=tags).info.run_id

    dead = running(here, int(exited.stdout))
    alive = running(here, os.getpid())
    elsewhere = running("another-host", int(exited.stdout))
    abandoned = running("another-host", 1)
    other_stage = running(here, int(exited.stdout), "finetune-classifier")
    with tracked_run(tracked_config, "pretrain", abandoned=abandoned):
        pass
    status = {run: client.get_run(run).info.status for run in (dead, alive, elsewhere, abandoned)}
    assert status == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING", abandoned: "KILLED"}
    assert client.get_run(other_stage).info.status == "RUNNING"


@pytest.mark.parametrize("interval", [0.2, 0, None])
def test_system_metrics_are_sampled_at_the_interval_or_not_at_all(tracked_config, interval):
    """MLflow's monitor on a real store: samples every `interval` s while the block runs (a
    training step's work here is a sleep); 0 or null logs none."""
    uri = tracked_config["tracking"]["uri"]
    client = MlflowClient(uri)
    cpu = "system/cpu_utilization_percentage"
    start = time.monotonic()
    with tracked_run(tracked_config, "pretrain") as run, system_metrics(run, uri, interval):
        # at least 1.5 s, longer (up to 15 s) until two samples are in, as a loaded machine
        # may start the monitor late
        while time.monotonic() - start < 1.5 or (
            interval and time.monotonic() - start < 15
            and len(client.get_metric_history(run.run_id, cpu)) < 2
        ):  # fmt: skip
            time.sleep(0.1)
    ran = time.monotonic() - start
    logged = [k for k in client.get_run(run.run_id).data.metrics if k.startswith("system/")]
    if not interval:
        assert logged == []
        return
    assert {cpu, "system/system_memory_usage_megabytes"} <= set(logged)
    history = client.get_metric_history(run.run_id, cpu)
    assert 2 <= len(history) <= ran / interval + 1  # one sample per interval, none after


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": [{"d": 2}]}, "e": None, "f": []}) == {
        "a.b": 1,
        "a.c.0.d": 2,
        "e": None,
        "f": [],
    }
