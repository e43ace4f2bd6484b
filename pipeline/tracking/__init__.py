"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

Snakemake's `onstart` creates the store, the experiment and the parent run once, before any job
runs (concurrent first use of one sqlite file corrupts it), and hands the parent's id to the jobs
in `PIPELINE_PARENT_RUN_ID`. A stage run on its own gets a top-level run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import flatten

log = logging.getLogger("pipeline.tracking")

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
_PARENT_TAG = "mlflow.parentRunId"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (`mlflow.db` -> `mlartifacts/`); a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(uri: str, experiment: str) -> str:
    """Create the store and the experiment if needed; returns the experiment id. On a shared
    server another pipeline may create it between our lookup and our create: that one is used."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(experiment).experiment_id


def git_tags(cwd: Path | str = ".") -> dict[str, str]:
    """The commit the code came from, and whether tracked files differed from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def start_parent_run(uri: str, experiment: str, name: str = "pipeline") -> str:
    """A run for one Snakemake invocation; `name` says what it runs (the Snakefile gives its
    stages and the UTC start time)."""
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    run = client.create_run(
        experiment_id, run_name=name, tags={**git_tags(), "pipeline.role": "parent"}
    )
    log.info(
        "MLflow parent run %s (%s) in experiment %r (%s)", run.info.run_id, name, experiment, uri
    )
    return run.info.run_id


def end_parent_run(
    uri: str, run_id: str, success: bool, metrics_files: Mapping[str, Path] = {}
) -> None:
    """Close the parent run, copying as `<stage>.<metric>` the numbers of each stage's
    metrics.json given: the caller passes only the stages its invocation ran, since a concurrent
    invocation may write other stages' files meanwhile."""
    client = _client(uri)
    for stage, path in metrics_files.items():
        if Path(path).is_file():
            values = json.loads(Path(path).read_text())
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    client.log_metric(run_id, f"{stage}.{key}", float(value))
    client.set_terminated(run_id, "FINISHED" if success else "FAILED")


class StageRun:
    """A stage's MLflow run; also the training loop's logger."""

    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def latest_metrics(self) -> dict[str, float]:
        """Each metric's value at its last step, as the runs table shows it."""
        return dict(self.client.get_run(self.run_id).data.metrics)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        """Columns of equal length, shown as a table in the MLflow UI's artifact view."""
        self.client.log_table(self.run_id, data=dict(table), artifact_file=artifact_file)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_datasets(self, files: Iterable[Mapping[str, Any]], context: str) -> None:
        """Files the stage read, as MLflow dataset inputs, a thousand a request: each a mapping of
        `name`, `source` (a path), `digest` (its sha256) and `profile` (its counts);
        `context` (training / validation / test) is their role."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        tag = InputTag(key="mlflow.data.context", value=context)
        inputs = [
            DatasetInput(
                Dataset(
                    name=f["name"],
                    digest=f["digest"][:36],
                    source_type="local",
                    source=json.dumps({"uri": str(Path(f["source"]).resolve())}),
                    profile=json.dumps(dict(f["profile"])),
                ),
                tags=[tag],
            )
            for f in files
        ]
        for start in range(0, len(inputs), 1000):  # a few requests, however many files
            self.client.log_inputs(self.run_id, datasets=inputs[start : start + 1000])


class _RankRun(StageRun):
    """What a multi-process stage's processes other than rank 0 log to: nothing (rank 0 logs)."""

    def __init__(self) -> None:
        super().__init__(None, "")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def latest_metrics(self) -> dict[str, float]:
        return {}

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_table(self, table: Mapping[str, list], artifact_file: str) -> None:
        pass

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_datasets(self, files: Iterable[Mapping[str, Any]], context: str) -> None:
        pass


@contextmanager
def stage_run(config: Mapping[str, Any], stage: str) -> Iterator[StageRun]:
    """A child run of the invocation's parent (or a top-level run) holding the resolved config
    as params and as `config.yaml`; it ends FAILED if the stage raises. Under torchrun only
    rank 0 creates and logs to it."""
    import yaml

    from pipeline.train.distributed import is_main_process

    if not is_main_process():
        yield _RankRun()
        return

    uri, experiment = config["tracking"]["uri"], config["tracking"]["experiment"]
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    tags = {**git_tags(), "pipeline.stage": stage}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags[_PARENT_TAG] = parent
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    stage_run_ = StageRun(client, run.info.run_id)
    log.info(
        "MLflow run %s (%s)%s", run.info.run_id, stage, f" under parent {parent}" if parent else ""
    )
    try:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        stage_run_.log_text(yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")
        yield stage_run_
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
