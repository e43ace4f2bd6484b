"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

Snakemake's `onstart` creates the store, the experiment and the parent run once, before any job
runs (concurrent first use of one sqlite file corrupts it), and hands the parent's id to the jobs
in `PIPELINE_PARENT_RUN_ID`. A stage run on its own gets a top-level run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline.io import atomic_write_json
from pipeline.settings import TrackingSettings

log = logging.getLogger("pipeline.tracking")

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
_PARENT_TAG = "mlflow.parentRunId"
_HOST_TAG, _PID_TAG = "pipeline.host", "pipeline.pid"
"""Where a stage run's process runs, so a later start can tell that it died."""
WARNING_TAG = "pipeline.warning"
"""The MLflow tag a stage sets when an output looks wrong (collapsed answers, a val split far
from prepare.val_fraction)."""
WARNINGS_FILE = "warnings.json"
"""A stage's warnings (`StageRun.warn`) as a JSON list in its results/<stage>/: what the
Snakefile shows at the end of the run that ran the stage."""
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's experiment kind: model training ("Machine learning"), not a GenAI app. (The UI of
MLflow 3.17 follows its own switch instead: `runs_page`.)"""
RUN_FACTS = frozenset({
    "steps", "epochs", "tokens_seen", "parameters", "trainable_parameters", "trainable_fraction",
    "skipped_records", "truncated_train", "truncated_val", "truncated_test", "test_responses",
    "beta",
})  # fmt: skip
"""The numbers of a stage's results that say what the run was (its length, its model's size, its
data's counts) rather than measure it: MLflow params, not metrics the UI draws as one-point
charts."""


def _client(uri: str):
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a sqlite store (`mlflow.db` -> `mlartifacts/`); a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def _mark_training(client, experiment) -> None:
    """Give an experiment without a kind (one made before this tag) the model-training kind; a
    kind chosen in the UI stays. Another process setting it at the same time is fine."""
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.exceptions import MlflowException

    if KIND_TAG in experiment.tags:
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, TRAINING_KIND)
    except MlflowException:
        if KIND_TAG not in client.get_experiment(experiment.experiment_id).tags:
            raise


def ensure_experiment(uri: str, experiment: str) -> str:
    """Create the store and the experiment, of the model-training kind, if needed; returns the
    experiment id. On a shared server another pipeline may create it between our lookup and our
    create: that one is used."""
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        _mark_training(client, found)
        return found.experiment_id
    try:
        return client.create_experiment(
            experiment, artifact_location=_artifact_location(uri), tags={KIND_TAG: TRAINING_KIND}
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        created = client.get_experiment_by_name(experiment)
        if created is None:  # created, then deleted meanwhile
            raise
        return created.experiment_id


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


def runs_page(uri: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow's UI: the server at `uri`, or for a file store
    `make mlflow-ui`'s. The UI of MLflow 3.17 opens an experiment on the GenAI or the model
    training tabs as its GenAI / Model training switch says (GenAI unless switched), not as the
    experiment's kind: `workflowType` sets the switch."""
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def start_parent_run(uri: str, experiment: str, name: str = "pipeline") -> str:
    """A run for one Snakemake invocation; `name` says what it runs (the Snakefile gives its
    stages and the UTC start time)."""
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    run = client.create_run(
        experiment_id, run_name=name, tags={**git_tags(), "pipeline.role": "parent"}
    )
    log.info("MLflow parent run %s (%s) in experiment %r (%s); its runs in the UI: %s",
             run.info.run_id, name, experiment, uri, runs_page(uri, experiment_id))  # fmt: skip
    return run.info.run_id


def facts_and_metrics(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """The numbers of a stage's results (metrics.json) as (RUN_FACTS, the other metrics)."""
    numbers = {
        k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    facts = {k: v for k, v in numbers.items() if k in RUN_FACTS}
    return facts, {k: float(v) for k, v in numbers.items() if k not in RUN_FACTS}


def end_parent_run(
    uri: str, run_id: str, success: bool, metrics_files: Mapping[str, Path] = {}
) -> None:
    """Close the parent run, copying as `<stage>.<key>` the numbers of each stage's metrics.json
    given (RUN_FACTS as params, the others as metrics): the caller passes only the stages its
    invocation ran, since a concurrent invocation may write other stages' files meanwhile."""
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.entities import Metric, Param

    client = _client(uri)
    now = int(time.time() * 1000)
    for stage, path in metrics_files.items():
        if Path(path).is_file():
            facts, metrics = facts_and_metrics(json.loads(Path(path).read_text()))
            client.log_batch(
                run_id,
                metrics=[Metric(f"{stage}.{k}", v, now, 0) for k, v in metrics.items()],
                params=[Param(f"{stage}.{k}", str(v)) for k, v in facts.items()],
            )
    client.set_terminated(run_id, "FINISHED" if success else "FAILED")


class StageRun:
    """A stage's MLflow run; also the training loop's logger."""

    def __init__(self, client, run_id: str, logged: Mapping[str, int] = {}) -> None:
        self.client = client
        self.run_id = run_id
        self.logged = dict(logged)
        """Each metric's last step logged by an earlier process of this run (a resumed
        training): the steps it repeats after its checkpoint are not logged twice."""
        self.warnings: list[str] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and step > self.logged.get(k, -1)
        ]
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

    def log_params(self, params: Mapping[str, Any]) -> None:
        """One-value facts of the run (RUN_FACTS) as params; a continued run keeps those it
        has."""
        known = self.client.get_run(self.run_id).data.params
        _log_params(self.client, self.run_id, known, params, "")

    def warn(self, message: str, logger: logging.Logger = log) -> None:
        """A warning the user must see (an output that looks wrong): in the log, on the run as
        WARNING_TAG, and in the stage's WARNINGS_FILE (`stage_run` writes it)."""
        logger.warning(message)
        self.warnings.append(message)
        self.set_tags({WARNING_TAG: "\n".join(self.warnings)})

    def log_datasets(self, files: Iterable[Mapping[str, Any]], context: str) -> None:
        """Files the stage read, as MLflow dataset inputs, a thousand a request: each a mapping of
        `name`, `source` (a path), `digest` (its sha256) and `profile` (its counts);
        `context` (training / validation / test) is their role."""
        # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
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


@contextmanager
def system_metrics(tracker: StageRun, uri: str, interval: float | None) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where present) use as the run's `system/*` metrics,
    sampled every `interval` seconds by MLflow's monitor on a background thread; none when
    `interval` is 0 or null, or on ranks other than 0. A continued run goes on from its last
    sample's step."""
    if not interval or not tracker.run_id:
        yield
        return
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        tracker.run_id,
        # annotated int, but it is only slept on: a fraction of a second works as given
        sampling_interval=interval,  # pyright: ignore[reportArgumentType]
        resume_logging=bool(tracker.logged),
        tracking_uri=uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


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

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_datasets(self, files: Iterable[Mapping[str, Any]], context: str) -> None:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _end_dead_runs(client, experiment_id: str, stage: str, keep: str, abandoned: str) -> None:
    """Mark KILLED the stage's runs that a dead process left RUNNING: those whose process on
    this host is gone, and `abandoned` (a killed training that will not be resumed), but not
    `keep` (the one about to be resumed)."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id], f"tags.`pipeline.stage` = '{stage}' and attributes.status = 'RUNNING'"
    )
    for run in running:
        run_id, tags = run.info.run_id, run.data.tags
        pid = tags.get(_PID_TAG, "")
        dead = tags.get(_HOST_TAG) == host and pid.isdigit() and not _alive(int(pid))
        if run_id != keep and (dead or run_id == abandoned):
            client.set_terminated(run_id, "KILLED")
            log.warning("MLflow run %s (%s) was left RUNNING by a killed job: marked KILLED",
                        run_id, stage)  # fmt: skip


def _reopen(client, run_id: str, experiment_id: str, tags: Mapping[str, str]):
    """`run_id` set RUNNING again with the new process's tags, or None when it cannot be
    continued (deleted, or in another store or experiment)."""
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run


def flatten(config: Mapping[str, Any] | Sequence[Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [x, y]}` -> `{"a.b": 1, "c.0": x, "c.1": y}` (MLflow params)."""
    flat: dict[str, Any] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _log_params(client, run_id: str, known: Mapping[str, str], params: Mapping[str, Any],
                note: str) -> None:  # fmt: skip
    """`params` on the run, a hundred a request. Those it has (`known`: a continued run) keep
    their value (MLflow forbids changing one): a changed value is logged as a warning, with
    `note`."""
    # deferred: mlflow takes ~3 s to import; the Snakefile imports this module
    from mlflow.entities import Param

    new = [Param(k, str(v)) for k, v in params.items() if k not in known]
    changed = [k for k, v in params.items() if known.get(k, str(v)) != str(v)]
    if changed:
        log.warning("resumed run %s keeps its first values of %s%s", run_id, ", ".join(changed),
                    note)  # fmt: skip
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


def _log_config(client, run, config: Mapping[str, Any]) -> None:
    """The resolved config as params and `config.yaml`."""
    run_id = run.info.run_id
    _log_params(client, run_id, run.data.params, flatten(config), " (config.yaml has the new ones)")
    client.log_text(run_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")


@contextmanager
def stage_run(
    tracking: TrackingSettings,
    stage: str,
    config: Mapping[str, Any],
    resume: str = "",
    abandoned: str = "",
    warnings_file: Path | None = None,
) -> Iterator[StageRun]:
    """A child run of the invocation's parent (or a top-level run) in the `tracking` store,
    holding `config` (the resolved config) as params and as `config.yaml`; it ends FAILED if
    the stage raises (KILLED if interrupted). Once the stage succeeds, its warnings (an empty
    list when none) are written to `warnings_file`.

    `resume`: the run of an interrupted training this job continues (RUNNING again; metrics go
    on from the steps it reached); `abandoned`: one the training will not continue. Runs of the
    stage left RUNNING by a dead process are first marked KILLED. Under torchrun only rank 0
    creates and logs to the run."""
    # deferred: pipeline.train imports torch (~3 s); the Snakefile imports this module
    from pipeline.train.distributed import is_main_process

    if not is_main_process():
        yield _RankRun()
        return

    uri, experiment = tracking.uri, tracking.experiment
    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    _end_dead_runs(client, experiment_id, stage, resume, abandoned)
    tags = {**git_tags(), "pipeline.stage": stage, _HOST_TAG: socket.gethostname(),
            _PID_TAG: str(os.getpid())}  # fmt: skip
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags[_PARENT_TAG] = parent
    run = _reopen(client, resume, experiment_id, tags) if resume else None
    logged = {}
    if run is None:
        run = client.create_run(experiment_id, run_name=stage, tags=tags)
    else:
        logged = {
            key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
    run_id = run.info.run_id
    log.info(
        "MLflow run %s (%s)%s%s", run_id, stage, " continued" if logged else "",
        f" under parent {parent}" if parent else "",
    )  # fmt: skip
    tracker = StageRun(client, run_id, logged)
    try:
        _log_config(client, run, config)
        yield tracker
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise
    if warnings_file is not None:
        atomic_write_json(warnings_file, tracker.warnings)
    client.set_terminated(run_id, "FINISHED")


def read_warnings(stage_dir: Path) -> list[str]:
    """The warnings a stage wrote in `stage_dir` (none when it wrote no WARNINGS_FILE)."""
    path = stage_dir / WARNINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def warnings_block(warnings: Mapping[str, Sequence[str]]) -> str:
    """Each stage's warnings as lines for the end of a run (`stage: message`), or ''."""
    lines = [
        f"  {stage}: {message.removeprefix(f'{stage}: ')}"
        for stage, messages in warnings.items()
        for message in messages
    ]
    return "\n".join([f"warnings ({len(lines)}; the logs/ say more):", *lines]) if lines else ""
