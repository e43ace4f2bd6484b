"""What every training stage does the same way: device, train config, init checkpoint, the end."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_write_json, sha256_file
from pipeline.model.checkpoint import WEIGHTS_FILE
from pipeline.paths import Paths
from pipeline.tracking import StageRun
from pipeline.train import TrainConfig, pick_device

log = logging.getLogger("pipeline.stages")

MODEL_STAGES = ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo")
"""Stages whose `model/` a later stage can start from by naming the stage."""


def stage_device(config: Mapping[str, Any]) -> torch.device:
    """The configured device, refusing the CPU-only fused attention elsewhere before any work."""
    device = pick_device(config["device"])
    if config["model"]["attention"] == "fused" and device.type != "cpu":
        raise ValueError(
            f"model.attention: 'fused' has a CPU kernel only, but device is {device.type}; "
            "set `model.attention: sdpa` (or `device: cpu`)"
        )
    return device


def train_config(train_section: Mapping[str, Any], seed: int, **derived: int) -> TrainConfig:
    """A stage's TrainConfig; `derived` values (steps from epochs...) yield to the config's."""
    return TrainConfig.from_dict({**derived, **train_section, "seed": seed})


def init_checkpoint_path(config: Mapping[str, Any], init_from: str) -> Path:
    """Where a fine-tuning stage starts: a stage name's `model/`, or a checkpoint directory."""
    if init_from in MODEL_STAGES:
        return Paths.from_config(config).stage(init_from) / "model"
    return Path(init_from)


def init_checkpoint(config: Mapping[str, Any], init_from: str) -> Path:
    """`init_checkpoint_path`, checked to hold weights."""
    directory = init_checkpoint_path(config, init_from)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"init_from {init_from!r}: no checkpoint at {directory} (expected {WEIGHTS_FILE}); "
            "run that stage first or give a checkpoint directory"
        )
    return directory


def weights_sha256(checkpoint: Path) -> str:
    """Identity of a starting checkpoint, for the resume fingerprint."""
    return sha256_file(checkpoint / WEIGHTS_FILE)


def finish_stage(
    tracker: StageRun,
    config: Mapping[str, Any],
    out_dir: Path,
    metrics: Mapping[str, Any],
    step: int,
    artifacts: Iterable[str],
) -> None:
    """Write metrics.json last (it is the stage's completion marker), log it, the artifacts and
    the model directory to the stage's MLflow run."""
    atomic_write_json(out_dir / "metrics.json", dict(metrics))
    numeric = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    tracker.log_metrics({f"final_{k}": v for k, v in numeric.items()}, step=step)
    for name in ("metrics.json", *artifacts):
        tracker.log_artifact(out_dir / name)
    if config["tracking"]["log_model"]:
        tracker.log_artifact(out_dir / "model", "model")
