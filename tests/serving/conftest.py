"""Tiny random-weight checkpoints of each training stage, as the stages save them (GPT-2's
tokenizer files, the stage's metadata), logged as MLflow models to a real sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest

STAGE_METADATA = {
    "pretrain": {},
    "finetune-classifier": {"classifier": {"labels": ["ham", "spam"], "temperature": 1.5}},
    "finetune-instruct": {"instruct": {"template": "alpaca"}},
    "align-dpo": {"instruct": {"template": "phi3"}},
}
CONTEXT_LENGTH = 64


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, mirror) -> dict[str, Path]:
    """Each training stage's checkpoint directory, by stage name."""
    import torch

    from pipeline.model import GPT, GPTConfig, save_checkpoint
    from pipeline.model.checkpoint import tokenizer_extra_files
    from pipeline.model.classifier import GPTClassifier

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=50257, context_length=CONTEXT_LENGTH, n_layer=1, n_head=2, n_embd=16
    )
    model = GPT(config)
    tokenizer = tokenizer_extra_files(mirror / "gpt2-bpe")
    made = {}
    for stage, metadata in STAGE_METADATA.items():
        labels = metadata.get("classifier", {}).get("labels")
        saved = GPTClassifier.from_language_model(model, labels) if labels else model
        made[stage] = save_checkpoint(saved, root / stage, {"stage": stage, **metadata}, tokenizer)
    return made


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """A sqlite tracking store, its artifacts beside it as the pipeline keeps them."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def logged_models(checkpoints, store) -> dict[str, str]:
    """Each stage's model URI, logged as `finish_stage` logs it, to one run."""
    from pipeline.serving.models import log_stage_model
    from pipeline.settings import TrackingSettings
    from pipeline.tracking import stage_run

    with stage_run(TrackingSettings(uri=store, experiment="serving"), "models", {}) as tracker:
        return {
            stage: log_stage_model(tracker, stage, path, step=1)
            for stage, path in checkpoints.items()
        }
