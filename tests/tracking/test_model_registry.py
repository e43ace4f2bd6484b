"""The model registry on a real sqlite store: each training is a new version linked to its run,
`@latest` is always the newest, `@champion` moves only when the headline metric improves (NaN
never), the config can turn it off, and the MLflow UI (a real server, a real headless Chromium)
shows the versions, the aliases and the way from a version to its run and its datasets."""

import json
import logging
import math
import re
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from headless_browser import SKIP_REASON, browser, dump_dom, screenshot, visible_text
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.stages.registry import STAGES
from pipeline.tracking import PARENT_RUN_ENV, StageRun, ensure_experiment
from pipeline.tracking.headline import Headline
from pipeline.tracking.model_registry import (
    CHAMPION,
    DATA_TAG,
    METRIC_TAG,
    PARENT_TAG,
    VALUE_TAG,
    register_stage,
    register_stage_model,
)

NAN = math.nan
VAL_LOSS, F1 = Headline("val_loss"), Headline("test_f1", higher_is_better=True)
SHAKESPEARE, OWN_TEXT = "5a" * 32, "0c" * 32  # two evaluation data's sha256

# A models-from-code model (nothing pickled) that answers with its model_config's `reply`.
MODEL_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Reply(PythonModel):
    def load_context(self, context):
        self.reply = context.model_config["reply"]

    def predict(self, context, model_input, params=None):
        return [self.reply for _ in range(len(model_input))]


mlflow.models.set_model(Reply())
"""


@dataclass
class Store:
    uri: str
    client: MlflowClient
    experiment_id: str
    code: Path

    def log_model(self, reply: str = "hi", run_name: str = "stage") -> tuple[str, str]:
        """A run with a logged model, as a training leaves it: (run id, model URI)."""
        run = self.client.create_run(self.experiment_id, run_name=run_name)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(self.code), model_config={"reply": reply},
                pip_requirements=["mlflow"], input_example=pd.DataFrame({"text": ["x"]}),
            )  # fmt: skip
        return run.info.run_id, info.model_uri

    def aliases(self, name: str) -> tuple[str, str | None]:
        """(`@latest`'s version, `@champion`'s version or None)."""
        latest = self.client.get_model_version_by_alias(name, "latest").version
        champion = self.client.get_registered_model(name).aliases.get(CHAMPION)
        return str(latest), None if champion is None else str(champion)


def make_store(uri: str, tmp_path: Path, monkeypatch) -> Store:
    """`uri`, also the process's tracking URI (log_model and load_model use it), with an
    experiment and the model's code."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # an earlier test may have set the process-wide URI, which outranks the environment
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    code = tmp_path / "reply_model.py"
    code.write_text(textwrap.dedent(MODEL_CODE))
    experiment_id = ensure_experiment(uri, f"registry-{tmp_path.name}")
    return Store(uri, MlflowClient(uri), experiment_id, code)


@pytest.fixture
def store(sqlite_uri, tmp_path, monkeypatch) -> Store:
    return make_store(sqlite_uri, tmp_path, monkeypatch)


def register_series(store, headline, values, parent=None, name="m") -> list[tuple]:
    """Register one logged model once per value; (latest, champion) after each."""
    run_id, model_uri = store.log_model()
    seen = []
    for value in values:
        register_stage_model(store.uri, model_uri, name, run_id, parent, headline, value)
        seen.append(store.aliases(name))
    return seen


def test_lower_is_better_champion_moves_only_on_improvement(store, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    seen = register_series(store, VAL_LOSS, [2.0, 2.5, 1.5, NAN, 1.5, 1.0], parent="p-1")
    log = caplog.text
    assert seen == [("1", "1"), ("2", "1"), ("3", "3"), ("4", "3"), ("5", "3"), ("6", "6")]
    assert "m version 1 (val_loss 2): @champion set to it" in log
    assert "m version 2 (val_loss 2.5): @champion kept at version 1 (val_loss 2 there, 2.5 " in log
    assert "m version 3 (val_loss 1.5): @champion moved to it from version 1 (val_loss 2 " in log
    fourth = store.client.get_model_version("m", "4")
    assert fourth.tags == {METRIC_TAG: "val_loss", VALUE_TAG: "nan", PARENT_TAG: "p-1"}
    assert store.client.get_model_version("m", "6").tags[VALUE_TAG] == "1.0"


def test_higher_is_better_and_nan_never_becomes_champion(store, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    seen = register_series(store, F1, [NAN, NAN, 0.5, 0.4, 0.9, 0.9])
    assert "m version 1 (test_f1 nan): no @champion yet (test_f1 is nan)" in caplog.text
    assert seen == [("1", None), ("2", None), ("3", "3"), ("4", "3"), ("5", "5"), ("6", "5")]
    assert PARENT_TAG not in store.client.get_model_version("m", "1").tags  # no pipeline run


def test_a_champion_tagged_with_another_metric_or_no_value_is_beaten(store):
    run_id, model_uri = store.log_model()
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 1.0)
    store.client.delete_model_version_tag("m", "1", VALUE_TAG)  # edited by hand in the UI
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 3.0)
    assert store.aliases("m") == ("2", "2")
    register_stage_model(store.uri, model_uri, "m", run_id, None, F1, 0.1)
    assert store.aliases("m") == ("3", "3")  # not comparable with a val_loss: this one counts


def champions(store, name: str = "m") -> dict[str, str]:
    """Each champion alias and its version."""
    aliases = store.client.get_registered_model(name).aliases
    return {alias: str(v) for alias, v in aliases.items() if alias.startswith(CHAMPION)}


def test_a_champion_is_compared_only_with_versions_measured_on_the_same_data(store, caplog):
    """A model pretrained on the user's own text is not ranked against the Shakespeare one by
    val_loss: its data starts a line of its own, `@champion-<sha12>`; `@champion` stays with
    the data of its holder (the first that got one)."""
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    run_id, model_uri = store.log_model()
    for value, data in ((4.0, SHAKESPEARE), (2.0, OWN_TEXT), (3.5, SHAKESPEARE), (2.5, OWN_TEXT)):
        register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, value, data)
    shakespeare, own = f"{CHAMPION}-{SHAKESPEARE[:12]}", f"{CHAMPION}-{OWN_TEXT[:12]}"
    assert champions(store) == {CHAMPION: "3", shakespeare: "3", own: "2"}
    assert store.client.get_model_version("m", "2").tags[DATA_TAG] == OWN_TEXT
    assert (
        "m version 2 (val_loss 2 on eval data 0c0c0c0c0c0c): @champion stays at version 1 "
        "(measured on other data); @champion-0c0c0c0c0c0c set to it"
    ) in caplog.text
    assert "@champion-0c0c0c0c0c0c kept at version 2 (val_loss 2 there, 2.5 here)" in caplog.text
    model_input = pd.DataFrame({"text": ["a"]})
    assert mlflow.pyfunc.load_model(f"models:/m@{own}").predict(model_input) == ["hi"]


def test_a_champion_registered_before_its_data_was_recorded_is_compared_as_before(store):
    run_id, model_uri = store.log_model()
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 3.0)  # no data tag
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 4.0, SHAKESPEARE)
    assert champions(store) == {CHAMPION: "1", f"{CHAMPION}-{SHAKESPEARE[:12]}": "2"}
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 2.0, SHAKESPEARE)
    assert champions(store) == {CHAMPION: "3", f"{CHAMPION}-{SHAKESPEARE[:12]}": "3"}
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 1.0, OWN_TEXT)
    assert champions(store)[CHAMPION] == "3"  # now its line is Shakespeare's


def test_version_links_to_its_run_and_logged_model_and_loads_by_alias(store):
    first_run, first = store.log_model(reply="first")
    second_run, second = store.log_model(reply="second")
    register_stage_model(store.uri, first, "m", first_run, None, F1, 0.9)
    version = register_stage_model(store.uri, second, "m", second_run, None, F1, 0.8)
    assert (str(version.version), version.run_id) == ("2", second_run)
    logged = store.client.get_logged_model(second.removeprefix("models:/"))
    assert version.source == logged.artifact_location
    assert logged.tags["mlflow.modelVersions"] == '[{"name": "m", "version": 2}]'
    model_input = pd.DataFrame({"text": ["a", "b"]})
    assert mlflow.pyfunc.load_model("models:/m@champion").predict(model_input) == ["first"] * 2
    assert mlflow.pyfunc.load_model("models:/m@latest").predict(model_input) == ["second"] * 2


@pytest.mark.slow
def test_a_team_tracking_server_registers_the_same_way(mlflow_server, tmp_path, monkeypatch):
    """Through `mlflow server` (PostgreSQL, proxied artifacts), which checks each version's
    source against its logged model."""
    store = make_store(mlflow_server.uri, tmp_path, monkeypatch)
    name = f"served-{tmp_path.name}"
    run_id, model_uri = store.log_model()
    for value, aliases in ((0.5, ("1", "1")), (0.4, ("2", "1")), (0.6, ("3", "3"))):
        register_stage_model(store.uri, model_uri, name, run_id, "p", F1, value)
        assert store.aliases(name) == aliases
    assert store.client.get_model_version(name, "3").source.startswith("mlflow-artifacts:/")
    linked = store.client.get_logged_model(model_uri.removeprefix("models:/")).tags
    versions = [str(v["version"]) for v in json.loads(linked["mlflow.modelVersions"])]
    assert versions == ["1", "2", "3"]  # each once, though the server records them too
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.predict(pd.DataFrame({"text": ["a"]})) == ["hi"]


def test_register_stage_names_the_model_and_tags_its_headline(store, monkeypatch):
    run_id, model_uri = store.log_model()
    f1, accuracy = STAGES["finetune-classifier"].headline, STAGES["align-dpo"].headline
    none = register_stage(
        store.uri, "pretrain", None, None, run_id, Headline("val_loss"), {}, SHAKESPEARE
    )
    assert none is None  # no model logged
    assert store.client.search_registered_models() == []

    monkeypatch.setenv(PARENT_RUN_ENV, "parent-9")
    metrics = {"test_f1": 0.75, "val_loss": 0.2, "labels": ["ham", "spam"]}
    version = register_stage(
        store.uri, "finetune-classifier", None, model_uri, run_id, f1, metrics, SHAKESPEARE
    )
    assert version.name == "gpt-pipeline-finetune-classifier"
    assert version.tags == {METRIC_TAG: "test_f1", VALUE_TAG: "0.75", PARENT_TAG: "parent-9",
                            DATA_TAG: SHAKESPEARE}  # fmt: skip
    dpo = register_stage(
        store.uri, "align-dpo", "spam filter", model_uri, run_id, accuracy,
        {"val_reward_accuracy": 0.5}, OWN_TEXT,
    )  # fmt: skip
    assert (dpo.name, dpo.tags[METRIC_TAG]) == ("spam filter", "val_reward_accuracy")
    assert store.aliases("spam filter") == ("1", "1")


def test_a_retried_training_keeps_the_version_its_killed_attempt_registered(store):
    run_id, model_uri = store.log_model()
    other_run, other_uri = store.log_model()
    first = register_stage(store.uri, "pretrain", None, model_uri, run_id, VAL_LOSS,
                           {"val_loss": 2.0}, SHAKESPEARE)  # fmt: skip
    again = register_stage(store.uri, "pretrain", None, model_uri, run_id, VAL_LOSS,
                           {"val_loss": 2.0}, SHAKESPEARE)  # fmt: skip
    other = register_stage(store.uri, "pretrain", None, other_uri, other_run, VAL_LOSS,
                           {"val_loss": 3.0}, SHAKESPEARE)  # fmt: skip
    assert [int(v.version) for v in (first, again, other)] == [1, 1, 2]
    versions = store.client.search_model_versions("name = 'gpt-pipeline-pretrain'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_concurrent_trainings_each_get_a_version_of_one_new_model(store):
    run_id, model_uri = store.log_model()
    start = threading.Barrier(4)

    def register(value: float) -> str:
        start.wait()  # all create the registered model at once
        version = register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, value)
        return str(version.version)

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(register, [1.0, 2.0, 3.0, 4.0]))
    assert sorted(versions) == ["1", "2", "3", "4"]
    assert [m.name for m in store.client.search_registered_models()] == ["m"]
    assert store.aliases("m")[1] in versions


def race_for_champion(store, monkeypatch, other_version: str | None) -> list[str]:
    """Make the next `@champion` write fail as a concurrent one makes it fail on sqlite: the
    other training's alias (`other_version`, None for no write) lands first, then ours raises.
    Returns the versions each attempt tried to set."""
    real = MlflowClient.set_registered_model_alias
    tried = []

    def set_alias(client, name, alias, version):
        tried.append(str(version))
        if len(tried) > 1:
            return real(client, name, alias, version)
        if other_version is not None:
            real(client, name, alias, other_version)
        raise MlflowException("UNIQUE constraint failed: registered_model_aliases.name")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
    return tried


def test_a_champion_set_meanwhile_is_compared_again(store, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    run_id, model_uri = store.log_model()
    for value in (3.0, 1.0):  # version 2 (1.0) will be the other training's champion
        register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, value)
    store.client.set_registered_model_alias("m", CHAMPION, "1")
    tried = race_for_champion(store, monkeypatch, other_version="2")
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 2.0)  # beats 1's 3.0
    assert tried == ["3"]  # and not again: 2.0 does not beat version 2's 1.0
    assert store.aliases("m") == ("3", "2")
    assert "@champion was set meanwhile (to version 2); deciding again" in caplog.text
    assert "@champion kept at version 2 (val_loss 1 there, 2 here)" in caplog.text

    tried = race_for_champion(store, monkeypatch, other_version="1")
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 0.5)
    assert tried == ["4", "4"]  # 0.5 beats both; the second write goes through
    assert store.aliases("m") == ("4", "4")


def test_a_champion_write_that_went_through_before_failing_is_a_move(store, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    run_id, model_uri = store.log_model()
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 3.0)
    tried = race_for_champion(store, monkeypatch, other_version="2")  # our own write, then an error
    register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 1.0)
    assert tried == ["2"]
    assert store.aliases("m") == ("2", "2")
    assert "@champion moved to it from version 1 (val_loss 3 there, 1 here)" in caplog.text


def test_a_failed_champion_write_that_is_no_race_is_raised(store, monkeypatch):
    race_for_champion(store, monkeypatch, other_version=None)
    run_id, model_uri = store.log_model()
    with pytest.raises(MlflowException, match="UNIQUE constraint"):
        register_stage_model(store.uri, model_uri, "m", run_id, None, VAL_LOSS, 1.0)


# The MLflow UI, as a user opens it: a real `mlflow server` over the store, a real Chromium.
NAME = "gpt-pipeline-finetune-classifier"


@pytest.fixture
def registered(store) -> dict[str, str]:
    """Three trainings of the classifier (test F1 0.7, 0.9, 0.8), each run with its dataset:
    version 2 is the champion, 3 the latest. Returns version -> run id."""
    runs = {}
    for f1 in (0.7, 0.9, 0.8):
        run_id, model_uri = store.log_model(run_name="finetune-classifier")
        data = {"name": "SMSSpamCollection", "source": store.code, "digest": "ab" * 32,
                "profile": {"rows": 747}}  # fmt: skip
        StageRun(store.client, run_id).log_datasets([data], "training")
        version = register_stage_model(store.uri, model_uri, NAME, run_id, "p", F1, f1)
        runs[str(version.version)] = run_id
    return runs


def page(url: str, tmp_path: Path, shot: str) -> tuple[str, str]:
    """The page's DOM and visible text once MLflow's scripts built it; a screenshot beside."""
    profile = tmp_path / "chromium"
    dom = dump_dom(url, profile, budget_ms=15000)
    (tmp_path / f"{shot}.html").write_text(dom)
    screenshot(url, tmp_path / f"{shot}.png", profile, budget_ms=15000)
    return dom, visible_text(dom)


@pytest.mark.slow
@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_the_mlflow_ui_shows_versions_aliases_and_the_way_to_runs_and_data(
    registered, store, mlflow_ui, tmp_path
):
    ui = f"{mlflow_ui.uri}/#"
    _, text = page(f"{ui}/models", tmp_path, "models")
    assert f"{NAME} Version 3 @ champion : Version 2" in text  # latest version, aliased ones

    _, text = page(f"{ui}/models/{NAME}", tmp_path, "model")
    row = r"Version (\d) \d\d/\d\d/\d{4}, [\d:]+ [AP]M (.*?)(?= Version \d| Previous)"  # date, tags
    versions = re.findall(row, text)
    assert [v for v, _ in versions] == ["3", "2", "1"]
    for version, rest in versions:
        assert "headline_metric : test_f1" in rest and "pipeline.parent_run_id : p" in rest
        assert ("@ champion" in rest) == (version == "2"), rest

    run_id, experiment_id = registered["2"], store.experiment_id
    dom, text = page(f"{ui}/models/{NAME}/versions/2", tmp_path, "version")
    assert "Source Run : finetune-classifier Aliases : @ champion" in text
    assert f'href="#/experiments/{experiment_id}/runs/{run_id}"' in dom

    _, text = page(f"{ui}/experiments/{experiment_id}/runs/{run_id}", tmp_path, "run")
    assert f"Datasets SMSSpamCollection ({'ab' * 18}) training" in text
    assert f"Registered models {NAME} v2" in text
