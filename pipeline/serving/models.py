"""A stage's checkpoint as an MLflow pyfunc model ("models from code": nothing is pickled).

The model directory holds the code file of its kind (`language_model.py`, `classifier.py`,
`chat.py`), MLmodel with the signature and input example, and the checkpoint as the `checkpoint`
artifact: `model.safetensors`, `config.json` and the tokenizer files. The code imports the
installed `pipeline` package (`pip install -e .`, as `make setup` does), so a model is served
from this project's environment: `mlflow models serve --env-manager local`.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MODEL_KINDS = {
    "pretrain": "language-model",
    "finetune-classifier": "classifier",
    "finetune-instruct": "chat",
    "align-dpo": "chat",
}
"""Which served model each training stage's checkpoint becomes."""
_CODE = {"language-model": "language_model.py", "classifier": "classifier.py", "chat": "chat.py"}
_REQUIREMENTS = ("mlflow", "torch", "tiktoken", "safetensors", "numpy", "pandas")
"""What the model code imports beside `pipeline`: stated, so MLflow need not load the model in a
subprocess to find out."""


def _requirements() -> list[str]:
    pinned = []
    for name in _REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def save_stage_model(stage: str, checkpoint: Path, path: Path, mlflow_model=None) -> None:
    """Write `stage`'s checkpoint as an MLflow model directory at `path`."""
    import mlflow  # deferred: mlflow takes ~3 s to import, needed only when a model is logged

    from pipeline.serving.schema import INPUT_EXAMPLES, SIGNATURES  # deferred: imports mlflow

    kind = MODEL_KINDS[stage]
    mlflow.pyfunc.save_model(
        path,
        python_model=str(Path(__file__).with_name(_CODE[kind])),
        artifacts={"checkpoint": str(checkpoint)},
        signature=SIGNATURES[kind],
        input_example=INPUT_EXAMPLES[kind],
        pip_requirements=_requirements(),
        metadata={"pipeline.stage": stage, "pipeline.model_kind": kind},
        mlflow_model=mlflow_model,
    )


def log_stage_model(tracker, stage: str, checkpoint: Path, step: int = 0) -> str:
    """Log `stage`'s checkpoint as an MLflow logged model, an output of the stage's run (at
    `step`); returns its URI (`models:/<model_id>`), which `mlflow models serve -m` and the
    model registry take. Through the run's client, as everything the stage logs."""
    # deferred: mlflow takes ~3 s to import, needed only when a model is logged
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client, run_id = tracker.client, tracker.run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id, name=stage, source_run_id=run_id, model_type=MODEL_KINDS[stage]
    )
    try:
        with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
            described = Model(artifact_path=logged.artifact_location, run_id=run_id,
                              model_uuid=logged.model_id, model_id=logged.model_id)  # fmt: skip
            save_stage_model(stage, checkpoint, Path(tmp) / "model", described)
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"
