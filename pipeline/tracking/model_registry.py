"""The MLflow model registry: each training adds its logged model as a new version of its stage's
registered model (`<stage>.registered_model_name`, default `gpt-pipeline-<stage>`), linked to the
stage's run and tagged with the pipeline's parent run and the stage's headline metric.

`@latest` is MLflow's own alias: it always resolves to the newest version (MLflow reserves the
name, so it is never set here). A headline is comparable only on the same data: each version is
tagged with the sha256 of the split it was measured on (`eval_data_sha256`), and each evaluation
data has its own line, `@champion-<its first 12 hex>`. `@champion` is the line of the data its
holder was measured on (the first data that got a champion, unless moved by hand): a version on
other data never moves it. A champion alias moves to a new version only when its headline metric
beats the value tagged on the holder; a NaN or missing value never becomes champion. A version
that records no data (registered before the tag) is compared as before, with any.
Two trainings that register one model at the same time both get their version (the second
create of the registered model is ignored). When both create an alias at once (there was none),
the one whose insert fails decides again against the champion the other set; when both move an
existing one, the last write wins. Which of them ends as champion is not guaranteed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.tracking import PARENT_RUN_ENV, _client
from pipeline.tracking.headline import Headline

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("pipeline.tracking")

CHAMPION = "champion"
PARENT_TAG = "pipeline.parent_run_id"
METRIC_TAG, VALUE_TAG = "headline_metric", "headline_value"
DATA_TAG = "eval_data_sha256"
"""The sha256 of the data the headline was measured on, on the version and on its run."""
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
_CHAMPION_ATTEMPTS = 5


def registered_model_name(stage: str, name: str | None) -> str:
    """The registered model a stage's trainings go to: its `registered_model_name` setting."""
    return name or f"gpt-pipeline-{stage}"


def _ensure_registered_model(client, name: str) -> None:
    """Create it unless it exists; another process creating it meanwhile is fine."""
    # deferred: mlflow takes ~3 s to import; pipeline.tracking stays light without it
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in _EXISTS:
            raise


def _logged_model_id(model_uri: str) -> str | None:
    """`m-...` of a `models:/<model_id>` URI (what MLflow 3's log_model returns), else None."""
    # deferred: mlflow takes ~3 s to import; pipeline.tracking stays light without it
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    return _parse_model_id_if_present(model_uri)


def data_alias(eval_data: str) -> str:
    """The champion alias of one evaluation data's line: `champion-<its sha256's first 12>`."""
    return f"{CHAMPION}-{eval_data[:12]}"


def _comparable(data: str, other: str) -> bool:
    """Whether headlines measured on `data` and `other` compare: unless both are known and
    differ ('' is a version registered before `DATA_TAG`)."""
    return not (data and other and data != other)


def _alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, None when there is none."""
    return client.get_registered_model(name).aliases.get(alias)


def _champion(client, name: str, alias: str, metric: str) -> tuple[str | None, float, str]:
    """The version `alias` points at, its headline value (NaN when there is none, or when its
    tags lack the value or measured another metric) and its evaluation data ('' if unknown)."""
    version = _alias_version(client, name, alias)
    if version is None:
        return None, math.nan, ""
    tags = client.get_model_version(name, version).tags
    try:
        value = float(tags[VALUE_TAG]) if tags.get(METRIC_TAG) == metric else math.nan
    except (KeyError, ValueError):
        value = math.nan
    return version, value, tags.get(DATA_TAG, "")


def _create_version(client, name: str, model_uri: str, run_id: str, tags: Mapping[str, str]):
    """A new version of `name` from `model_uri`. A logged model's URI is resolved to its
    artifact location here, through our client (MLflow's store would look it up through the
    process-wide tracking URI), and the logged model is tagged with the version, as
    `mlflow.register_model` does, so each page links to the other."""
    # deferred: mlflow takes ~3 s to import; pipeline.tracking stays light without it
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = _logged_model_id(model_uri)
    logged = client.get_logged_model(model_id) if model_id else None
    source = logged.artifact_location if logged else model_uri
    version = client.create_model_version(
        name, source, run_id=run_id, tags=dict(tags), model_id=model_id
    )
    if logged:
        earlier = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        linked = [*earlier, {"name": name, "version": version.version}]
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    return version


@dataclass(frozen=True)
class _Outcome:
    """What became of one champion alias: the version it was compared with (None when there was
    none), that version's value and evaluation data, and whether it moved."""

    alias: str
    champion: str | None
    best: float
    data: str
    moved: bool

    def describe(self, metric: str, value: float, data: str) -> str:
        """For the log."""
        alias = f"@{self.alias}"
        if self.champion is None:
            return f"{alias} set to it" if self.moved else f"no {alias} yet ({metric} is {value})"
        if not _comparable(data, self.data):
            return f"{alias} stays at version {self.champion} (measured on other data)"
        verb = "moved to it from" if self.moved else "kept at"
        values = f"{metric} {self.best:.6g} there, {value:.6g} here"
        return f"{alias} {verb} version {self.champion} ({values})"


def _move_champion(
    client, name: str, alias: str, version: str, headline: Headline, value: float, data: str
) -> _Outcome:
    """Point `alias` at `version` if `value`, measured on `data`, beats its holder's on the same
    data. Two processes creating the alias at once make one insert fail (a unique constraint);
    that one decides again against the new holder. A failure that leaves the alias as it was
    is not a race and is raised; one that left it at `version` (the write went through) is a
    move."""
    # deferred: mlflow takes ~3 s to import; pipeline.tracking stays light without it
    from mlflow.exceptions import MlflowException

    last_error: MlflowException | None = None
    for _ in range(_CHAMPION_ATTEMPTS):
        champion, best, theirs = _champion(client, name, alias, headline.metric)
        if not _comparable(data, theirs) or not headline.beats(value, best):
            return _Outcome(alias, champion, best, theirs, moved=False)
        try:
            client.set_registered_model_alias(name, alias, version)
            return _Outcome(alias, champion, best, theirs, moved=True)
        except MlflowException as error:
            now = _alias_version(client, name, alias)
            if str(now) == str(version):
                return _Outcome(alias, champion, best, theirs, moved=True)
            if now == champion:
                raise
            last_error = error
            log.info("%s: @%s was set meanwhile (to version %s); deciding again", name, alias, now)
    raise MlflowException(
        f"registered model {name!r}: @{alias} was moved by another process during each of "
        f"{_CHAMPION_ATTEMPTS} attempts to point it at version {version}"
    ) from last_error


def register_stage_model(
    uri: str, model_uri: str, name: str, run_id: str, parent_run_id: str | None,
    headline: Headline, value: float, eval_data: str = "",
) -> ModelVersion:  # fmt: skip
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`, tagged with the
    parent run, `headline`'s `value` and `eval_data` (the sha256 of the data it was measured on;
    '' when unknown); `@champion` and its data's `@champion-<sha12>` move to it only if `value`
    beats their holder's on the same data. Returns the new version."""
    client = _client(uri)
    _ensure_registered_model(client, name)
    tags = {METRIC_TAG: headline.metric, VALUE_TAG: repr(float(value))}
    if eval_data:
        tags[DATA_TAG] = eval_data
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    version = _create_version(client, name, model_uri, run_id, tags)
    aliases = [CHAMPION, *([data_alias(eval_data)] if eval_data else [])]
    outcomes = [
        _move_champion(client, name, alias, version.version, headline, value, eval_data)
        for alias in aliases
    ]
    said = "; ".join(o.describe(headline.metric, value, eval_data) for o in outcomes)
    on = f" on eval data {eval_data[:12]}" if eval_data else ""
    log.info("registered %s version %s (%s %.6g%s): %s", name, version.version, headline.metric,
             value, on, said)  # fmt: skip
    return version


def register_stage(
    uri: str, stage: str, name: str | None, model_uri: str | None, run_id: str,
    headline: Headline, metrics: Mapping[str, Any], eval_data: str,
) -> ModelVersion | None:  # fmt: skip
    """A finished training's registration in the store at `uri`, as the stage's registered model
    (`name`, its `registered_model_name` setting), ranked by `headline` among the versions
    measured on `eval_data` (a sha256): None when no model was logged (`model_uri` None)."""
    if model_uri is None:
        log.info("%s: no model logged (tracking.log_model false), so none registered", stage)
        return None
    parent, model_name = os.environ.get(PARENT_RUN_ENV) or None, registered_model_name(stage, name)
    earlier = _version_of_run(uri, model_name, run_id)
    if earlier is not None:  # a retried job, whose earlier attempt was killed after registering
        log.info("%s version %s is this run's already (an earlier attempt registered it)",
                 model_name, earlier.version)  # fmt: skip
        return earlier
    return register_stage_model(
        uri, model_uri, model_name, run_id, parent, headline, headline.value(metrics), eval_data
    )


def _version_of_run(uri: str, name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` that run `run_id` registered, if any: one training, one version."""
    found = _client(uri).search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return found[0] if found else None
