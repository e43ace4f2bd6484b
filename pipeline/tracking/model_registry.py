"""The MLflow model registry: each training adds its logged model as a new version of its stage's
registered model (`<stage>.registered_model_name`, default `gpt-pipeline-<stage>`), linked to the
stage's run and tagged with the pipeline's parent run and the stage's headline metric.

`@latest` is MLflow's own alias: it always resolves to the newest version (MLflow reserves the
name, so it is never set here). `@champion` moves to a new version only when its headline metric
beats the value tagged on the current champion; a NaN or missing value never becomes champion.
Two trainings that register one model at the same time both get their version (the second
create of the registered model is ignored). When both create `@champion` at once (there was
none), the one whose insert fails decides again against the champion the other set; when both
move an existing one, the last write wins. Which of them ends as champion is not guaranteed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.tracking import PARENT_RUN_ENV, _client
from pipeline.tracking.headline import Headline

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger("pipeline.tracking")

CHAMPION = "champion"
PARENT_TAG = "pipeline.parent_run_id"
METRIC_TAG, VALUE_TAG = "headline_metric", "headline_value"
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


def _champion_version(client, name: str) -> str | None:
    """The version `@champion` points at, None when there is none."""
    return client.get_registered_model(name).aliases.get(CHAMPION)


def _champion(client, name: str, metric: str) -> tuple[str | None, float]:
    """The champion version and its headline value: NaN when there is none, or when its tags
    lack the value or measured another metric."""
    version = _champion_version(client, name)
    if version is None:
        return None, math.nan
    tags = client.get_model_version(name, version).tags
    try:
        value = float(tags[VALUE_TAG]) if tags.get(METRIC_TAG) == metric else math.nan
    except (KeyError, ValueError):
        value = math.nan
    return version, value


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


def _move_champion(
    client, name: str, version: str, headline: Headline, value: float
) -> tuple[str | None, float, bool]:
    """Point `@champion` at `version` if `value` beats the champion's: (the champion it was
    compared with, its value, whether it moved). Two processes creating the alias at once make
    one insert fail (a unique constraint); that one decides again against the new champion.
    A failure that leaves the champion as it was is not a race and is raised; one that left it
    at `version` (the write went through) is a move."""
    # deferred: mlflow takes ~3 s to import; pipeline.tracking stays light without it
    from mlflow.exceptions import MlflowException

    last_error: MlflowException | None = None
    for _ in range(_CHAMPION_ATTEMPTS):
        champion, best = _champion(client, name, headline.metric)
        if not headline.beats(value, best):
            return champion, best, False
        try:
            client.set_registered_model_alias(name, CHAMPION, version)
            return champion, best, True
        except MlflowException as error:
            now = _champion_version(client, name)
            if str(now) == str(version):
                return champion, best, True
            if now == champion:
                raise
            last_error = error
            log.info("%s: @champion was set meanwhile (to version %s); deciding again", name, now)
    raise MlflowException(
        f"registered model {name!r}: @champion was moved by another process during each of "
        f"{_CHAMPION_ATTEMPTS} attempts to point it at version {version}"
    ) from last_error


def _outcome(metric: str, value: float, champion: str | None, best: float, moved: bool) -> str:
    """What became of `@champion`, for the log."""
    if champion is None:
        return "@champion set to it" if moved else f"no @champion yet ({metric} is {value})"
    verb = "moved to it from" if moved else "kept at"
    return f"@champion {verb} version {champion} ({metric} {best:.6g} there, {value:.6g} here)"


def register_stage_model(
    uri: str, model_uri: str, name: str, run_id: str, parent_run_id: str | None,
    headline: Headline, value: float,
) -> ModelVersion:  # fmt: skip
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`, tagged with the
    parent run and `headline`'s `value`; `@champion` moves to it only if `value` beats the
    champion's. Returns the new version."""
    client = _client(uri)
    _ensure_registered_model(client, name)
    tags = {METRIC_TAG: headline.metric, VALUE_TAG: repr(float(value))}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    version = _create_version(client, name, model_uri, run_id, tags)
    champion, best, moved = _move_champion(client, name, version.version, headline, value)
    log.info("registered %s version %s (%s %.6g): %s", name, version.version, headline.metric,
             value, _outcome(headline.metric, value, champion, best, moved))  # fmt: skip
    return version


def register_stage(
    uri: str, stage: str, name: str | None, model_uri: str | None, run_id: str,
    headline: Headline, metrics: Mapping[str, Any],
) -> ModelVersion | None:  # fmt: skip
    """A finished training's registration in the store at `uri`, as the stage's registered model
    (`name`, its `registered_model_name` setting), ranked by `headline`: None when no model was
    logged (`model_uri` None)."""
    if model_uri is None:
        log.info("%s: no model logged (tracking.log_model false), so none registered", stage)
        return None
    parent = os.environ.get(PARENT_RUN_ENV) or None
    return register_stage_model(
        uri, model_uri, registered_model_name(stage, name), run_id, parent, headline,
        headline.value(metrics),
    )  # fmt: skip
