"""Tracking for a team: the pipeline logs through an `mlflow server` on 127.0.0.1 backed by a real
PostgreSQL server, with artifacts proxied by the server; stages logging at the same time lose
nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from snakemake_runs import make_workdir, snakemake, tiny_config

from pipeline.tracking import (
    PARENT_RUN_ENV,
    end_parent_run,
    ensure_experiment,
    facts_and_metrics,
    start_parent_run,
)

pytestmark = pytest.mark.slow

FINE_TUNING = ("finetune-classifier", "finetune-instruct")
TRAIN_LINE = re.compile(r"step (\d+)/\d+ \| loss ([0-9.]+)")


def runs_in_postgres(postgres, experiment: str) -> dict[str, tuple[str, int]]:
    """run id -> (status, rows in `metrics`), read from the database itself."""
    with closing(postgres.connect()) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT r.run_uuid, r.status, (SELECT count(*) FROM metrics m"
            " WHERE m.run_uuid = r.run_uuid) FROM runs r JOIN experiments e"
            " ON r.experiment_id = e.experiment_id WHERE e.name = %s",
            (experiment,),
        )
        return {run_id: (status, count) for run_id, status, count in cursor.fetchall()}


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, repo, mirror, mlflow_server) -> Path:
    """The tiny DAG up to both fine-tuning stages, which run at the same time (one thread each
    out of `--cores 2`), tracked by the server; pretrain and finetune-classifier run as two
    processes under torchrun, of which only rank 0 may log."""
    config = tiny_config(mirror, nproc_per_node=2)
    config["finetune-classifier"]["train"]["nproc_per_node"] = 2
    config["tracking"] = {"uri": mlflow_server.uri, "experiment": "team-dag"}
    workdir = make_workdir(tmp_path_factory.mktemp("team-dag"), repo, config)
    targets = [f"results/{stage}/metrics.json" for stage in FINE_TUNING]
    threads = ("--set-threads", "finetune_classifier=1", "finetune_instruct=1")
    snakemake(workdir, *threads, "--", *targets)
    return workdir


def test_pipeline_logs_parent_child_runs_metrics_and_artifacts_through_the_server(
    pipeline_run, mlflow_server, tmp_path
):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("team-dag")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {
        r.data.tags["pipeline.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    # the targets are the fine-tuning stages' metrics: no tokenizer_report, so no tokenizer run
    assert set(children) == {"download", "prepare", "pretrain", *FINE_TUNING}
    assert len(runs) == 1 + len(children)
    assert all(r.info.status == "FINISHED" for r in children.values())

    for stage in ("pretrain", "finetune-classifier"):
        assert "rank 0 of 2 (gloo)" in (pipeline_run / "logs" / f"{stage}.log").read_text()
    windows = {s: (children[s].info.start_time, children[s].info.end_time) for s in FINE_TUNING}
    assert overlap(*windows.values()), f"the fine-tuning stages did not overlap: {windows}"

    for stage in ("pretrain", *FINE_TUNING):
        run = children[stage]
        out = pipeline_run / "results" / stage
        log = (pipeline_run / "logs" / f"{stage}.log").read_text()
        logged = [(int(step), float(loss)) for step, loss in TRAIN_LINE.findall(log)]
        metrics = json.loads((out / "metrics.json").read_text())
        assert [step for step, _ in logged] == list(range(1, metrics["steps"] + 1))
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [step for step, _ in logged]
        assert [round(m.value, 4) for m in history] == [loss for _, loss in logged]
        facts, numeric = facts_and_metrics(metrics)
        assert {k: run.data.metrics[k] for k in numeric} == pytest.approx(numeric)  # no final_*
        assert {k: parent.data.metrics[f"{stage}.{k}"] for k in numeric} == pytest.approx(numeric)
        assert {k: run.data.params[k] for k in facts} == {k: str(v) for k, v in facts.items()}
        assert {k: parent.data.params[f"{stage}.{k}"] for k in facts} == {
            k: str(v) for k, v in facts.items()
        }

        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        listed = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "loss.png", "config.yaml"} <= listed
        (output,) = client.get_run(run.info.run_id).outputs.model_outputs  # its pyfunc model
        model = client.get_logged_model(output.model_id)
        assert model.source_run_id == run.info.run_id
        assert model.artifact_location.startswith("mlflow-artifacts:/")
        (version,) = client.search_model_versions(f"name = 'gpt-pipeline-{stage}'")
        assert version.run_id == run.info.run_id
        fetched = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path)))
        assert fetched.read_bytes() == (out / "metrics.json").read_bytes()
        stored = list(mlflow_server.artifacts.rglob(f"{run.info.run_id}/artifacts/loss.png"))
        assert len(stored) == 1 and stored[0].read_bytes() == (out / "loss.png").read_bytes()

    in_postgres = runs_in_postgres(mlflow_server.postgres, "team-dag")
    assert set(in_postgres) == {r.info.run_id for r in runs}
    assert {status for status, _ in in_postgres.values()} == {"FINISHED"}
    pretrain = children["pretrain"]
    assert in_postgres[pretrain.info.run_id][1] == sum(
        len(client.get_metric_history(pretrain.info.run_id, key)) for key in pretrain.data.metrics
    )
    assert not (pipeline_run / "mlflow.db").exists() and not (pipeline_run / "mlartifacts").exists()


WRITER = """
import sys, time
from pathlib import Path
from pipeline.settings import TrackingSettings
from pipeline.tracking import stage_run

uri, experiment, stage, steps, go, files = sys.argv[1:]
tracking = TrackingSettings(uri=uri, experiment=experiment, log_model=False)
with stage_run(tracking, stage, {}) as run:
    print(run.run_id, flush=True)
    while not Path(go).exists():
        time.sleep(0.01)
    for step in range(1, int(steps) + 1):
        run.log_metrics({"loss": 1000.0 * len(stage) + step, "lr": step / 1e4}, step)
        if step % 100 == 0:
            run.log_text(f"{stage} at {step}", f"samples/step_{step:06d}.txt")
    run.log_artifact(files, "model")
"""


def test_stages_logging_at_the_same_time_lose_nothing(mlflow_server, tmp_path, monkeypatch):
    """Separate processes, released together, each log every step of two series and their
    artifacts under one parent run."""
    steps, stages = 300, ("stage-a", "stage-bb")
    parent = start_parent_run(mlflow_server.uri, "team-concurrent")
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    go = tmp_path / "go"
    files = {}
    for stage in stages:
        files[stage] = tmp_path / stage
        files[stage].mkdir()
        for i in range(3):
            (files[stage] / f"shard-{i}.bin").write_bytes(f"{stage}/{i}".encode() * 20_000)
    writers = {
        stage: subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                mlflow_server.uri,
                "team-concurrent",
                stage,
                str(steps),
                str(go),
                str(files[stage]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for stage in stages
    }
    run_ids = {stage: writer.stdout.readline().strip() for stage, writer in writers.items()}
    go.touch()
    for stage, writer in writers.items():
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0 and run_ids[stage], f"{stage} failed:\n{err}"

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    spans = {}
    for stage, run_id in run_ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        loss = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [
            (step, 1000.0 * len(stage) + step) for step in range(1, steps + 1)
        ]
        lr = client.get_metric_history(run_id, "lr")
        assert sorted(m.step for m in lr) == list(range(1, steps + 1))
        assert run.data.metrics == {"loss": 1000.0 * len(stage) + steps, "lr": steps / 1e4}
        spans[stage] = (min(m.timestamp for m in loss), max(m.timestamp for m in loss))
        samples = {a.path for a in client.list_artifacts(run_id, "samples")}
        assert samples == {f"samples/step_{s:06d}.txt" for s in (100, 200, 300)}
        fetched = Path(client.download_artifacts(run_id, "model", str(tmp_path / run_id)))
        for shard in files[stage].iterdir():
            assert (fetched / shard.name).read_bytes() == shard.read_bytes()
    assert all(overlap(spans[a], spans[b]) for a in stages for b in stages if a < b), spans

    end_parent_run(mlflow_server.uri, parent, True)
    in_postgres = runs_in_postgres(mlflow_server.postgres, "team-concurrent")
    assert in_postgres == {
        parent: ("FINISHED", 0),
        **{run_id: ("FINISHED", 2 * steps) for run_id in run_ids.values()},
    }


def test_experiment_created_by_another_client_in_between_is_reused(mlflow_server, monkeypatch):
    """Two pipelines starting together may both find no experiment; the second create must
    not fail the run."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    existing = client.create_experiment("team-race")
    lookup, lookups = MlflowClient.get_experiment_by_name, []

    def first_lookup_misses(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_lookup_misses)
    assert ensure_experiment(mlflow_server.uri, "team-race") == existing
