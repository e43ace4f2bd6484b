import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import (
    PARENT_RUN_ENV,
    end_parent_run,
    ensure_experiment,
    git_tags,
    stage_run,
    start_parent_run,
)


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
    with stage_run(tracked_config, "pretrain") as run:
        run.log_metrics({"loss": 2.5, "lr": 1e-3}, step=10)
        run.log_metrics({"loss": 2.0}, step=20)
        run.log_text("hello", "samples/step_000010.txt")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"val_loss": 1.5, "note": "text is skipped"}))
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
    assert parent_run.info.run_name == "pretrain 2026-01-01 10:00:00Z"
    assert (tmp_path / "mlartifacts").is_dir()


def test_failing_stage_marks_its_run_failed(tracked_config):
    with pytest.raises(RuntimeError, match="boom"), stage_run(tracked_config, "prepare") as run:
        raise RuntimeError("boom")
    client = MlflowClient(tracked_config["tracking"]["uri"])
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert "mlflow.parentRunId" not in client.get_run(run.run_id).data.tags


def test_experiment_is_created_once(tracked_config):
    uri = tracked_config["tracking"]["uri"]
    assert ensure_experiment(uri, "x") == ensure_experiment(uri, "x")


def test_git_tags_outside_a_repository(tmp_path):
    assert git_tags(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_git_tags_in_the_project(repo):
    tags = git_tags(repo)
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
