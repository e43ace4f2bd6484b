"""The stages' MLflow pyfunc models, loaded in process: nothing pickled, signatures and input
examples logged, and the same answers as the command line's for the same inputs and seed."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main

CODE_FILES = {
    "pretrain": "language_model.py",
    "finetune-classifier": "classifier.py",
    "finetune-instruct": "chat.py",
    "align-dpo": "chat.py",
}


@pytest.fixture(scope="module")
def tracking(store):
    """The process-wide tracking URI set to the test store, then put back exactly as it was
    (unset included, so later tests' MLFLOW_TRACKING_URI still counts)."""
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri
    mlflow.set_tracking_uri(store)
    yield MlflowClient(store)
    utils._tracking_uri = previous


def model_directory(client: MlflowClient, uri: str) -> Path:
    """Where the sqlite store keeps a logged model's files (a local folder)."""
    location = client.get_logged_model(uri.removeprefix("models:/")).artifact_location
    return Path(location.removeprefix("file://"))


@pytest.mark.parametrize("stage", sorted(CODE_FILES))
def test_a_logged_model_holds_no_pickle_and_loads_and_predicts_its_example(
    stage, logged_models, tracking
):
    directory = model_directory(tracking, logged_models[stage])
    files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {CODE_FILES[stage], "MLmodel", "input_example.json", "serving_input_example.json",
            "artifacts/" + stage + "/model.safetensors", "artifacts/" + stage + "/config.json",
            "artifacts/" + stage + "/tokenizer/encoder.json"} <= files  # fmt: skip

    model = mlflow.pyfunc.load_model(logged_models[stage])
    assert model.metadata.signature.inputs is not None
    params = model.metadata.signature.params
    assert (params is None) == (stage == "finetune-classifier")
    if params:
        assert {p.name for p in params.params} == {
            "max_new_tokens", "temperature", "top_k", "top_p", "seed",
        }  # fmt: skip
    example = json.loads((directory / "serving_input_example.json").read_text())
    data = example.get("inputs", {k: v for k, v in example.items() if k != "params"})
    assert model.predict(data, params=example.get("params")) is not None


def test_the_run_lists_its_models_as_outputs(logged_models, tracking):
    model_ids = {uri.removeprefix("models:/") for uri in logged_models.values()}
    run_id = tracking.get_logged_model(next(iter(model_ids))).source_run_id
    outputs = tracking.get_run(run_id).outputs.model_outputs
    assert {o.model_id for o in outputs} == model_ids
    assert {str(tracking.get_logged_model(m).status) for m in model_ids} == {"READY"}


def cli_output(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_the_language_model_completes_as_generate_does(logged_models, checkpoints, capsys):
    model = mlflow.pyfunc.load_model(logged_models["pretrain"])
    sampled = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 50, "seed": 7}
    completions = model.predict(["Every effort moves", "Hello"], params=sampled)
    for prompt, completion in zip(["Every effort moves", "Hello"], completions, strict=True):
        printed = cli_output(capsys, "generate", "--checkpoint", str(checkpoints["pretrain"]),
                             "--prompt", prompt, "--max-new-tokens", "12", "--temperature",
                             "0.9", "--top-k", "50", "--seed", "7")  # fmt: skip
        assert printed == prompt + completion + "\n"
    as_frame = pd.DataFrame({"prompt": ["Hello"]})  # a string or a DataFrame's `prompt`
    short = {"max_new_tokens": 3}
    assert model.predict("Hello", short) == model.predict(as_frame, short)


def test_the_classifier_labels_as_classify_does(logged_models, checkpoints, capsys):
    texts = ["WINNER!! Claim your free prize now", "see you at lunch", "ok"]
    predicted = mlflow.pyfunc.load_model(logged_models["finetune-classifier"]).predict(texts)
    printed = cli_output(capsys, "classify", "--checkpoint",
                         str(checkpoints["finetune-classifier"]), *texts)  # fmt: skip
    rows = [line.split("\t") for line in printed.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (label, f"{p:.4f}", text)
        for label, p, text in zip(predicted["label"], predicted["probability"], texts, strict=True)
    ]


@pytest.mark.parametrize(("stage", "column"), [("finetune-classifier", "text"),
                                              ("pretrain", "prompt")])  # fmt: skip
def test_a_request_in_a_form_the_model_does_not_take_gets_the_forms_it_takes(
    stage, column, logged_models, tracking
):
    """MLflow's server hands `{"input": [...]}` (its unwrapped embeddings request) over as a
    column `input`, and would answer with a bare list instead of `{"predictions": ...}`."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged_models[stage])
    params = {"max_new_tokens": 1} if stage == "pretrain" else None
    for name, body in (("input", {"input": ["hello"]}), ("other", pd.DataFrame({"other": ["a"]}))):
        with pytest.raises(MlflowException) as refused:
            model.predict(body, params=params)
        message = refused.value.message
        assert message.startswith("send ") and '{"inputs": [' in message, message
        assert f'a DataFrame column "{column}"' in message, message
        assert message.endswith(f'not as "{name}"'), message
    assert len(model.predict(pd.DataFrame({column: ["hello"]}), params=params)) == 1


@pytest.mark.parametrize("stage", ["finetune-instruct", "align-dpo"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_the_chat_model_answers_as_chat_does(stage, sampling, logged_models, checkpoints, capsys):
    """In the template the checkpoint was tuned with (alpaca, phi3)."""
    params = {"max_new_tokens": 10, **sampling}
    request = {"messages": [{"role": "user", "content": "Name a primary color."}]}
    completion = mlflow.pyfunc.load_model(logged_models[stage]).predict(request, params=params)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    printed = cli_output(capsys, "chat", "--checkpoint", str(checkpoints[stage]),
                         "--instruction", "Name a primary color.", *options)  # fmt: skip
    assert completion["object"] == "chat.completion"
    (choice,) = completion["choices"]
    assert choice["message"] == {"role": "assistant", "content": printed.removesuffix("\n")}
    usage = completion["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_new_tokens_defaults_to_the_context_when_shorter_and_may_not_exceed_it(
    logged_models, checkpoints
):
    from mlflow.exceptions import MlflowException

    from pipeline.model.checkpoint import load_checkpoint_config

    context = load_checkpoint_config(checkpoints["pretrain"])["model"]["context_length"]
    assert context < 100  # the commands' default
    model = mlflow.pyfunc.load_model(logged_models["pretrain"])
    assert len(model.predict(["Hello"])) == 1
    with pytest.raises(MlflowException, match=f"max_new_tokens .* context length {context}"):
        model.predict(["Hello"], params={"max_new_tokens": context + 1})


def test_finish_stage_logs_the_checkpoint_as_the_runs_model_and_returns_its_uri(
    tmp_path, checkpoints, default_config, monkeypatch
):
    import shutil

    from pipeline.settings import TrackingSettings
    from pipeline.stages.training import finish_stage
    from pipeline.tracking import PARENT_RUN_ENV, stage_run

    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shutil.copytree(checkpoints["finetune-classifier"], tmp_path / "out" / "model")
    for log_model in (False, True):
        config = {**default_config, "tracking": {"uri": uri, "experiment": "t",
                                                 "log_model": log_model}}  # fmt: skip
        tracking = TrackingSettings(**config["tracking"])
        with stage_run(tracking, "finetune-classifier", config) as tracker:
            model_uri = finish_stage(tracker, tmp_path / "out", {"test_f1": 0.5}, 3, [],
                                     "finetune-classifier", log_model=log_model)  # fmt: skip
        outputs = MlflowClient(uri).get_run(tracker.run_id).outputs.model_outputs
        if not log_model:
            assert model_uri is None and not outputs
            continue
        assert [(f"models:/{o.model_id}", o.step) for o in outputs] == [(model_uri, 3)]
        assert not MlflowClient(uri).list_artifacts(tracker.run_id, "model")  # no plain copy
        directory = model_directory(MlflowClient(uri), model_uri)  # in this test's store
        predicted = mlflow.pyfunc.load_model(str(directory)).predict(["hello there"])
        assert list(predicted.columns) == ["label", "probability"]
