"""The stage registry: the one list of stages that the CLI, the config, the launcher and the
Snakefile read. A new stage is one `Stage` entry here (or `register(...)` from a module named in
`PIPELINE_EXTRA_STAGES`) plus its module with a `main(config)`.

Each stage has one name, used everywhere a user meets it: `python -m pipeline <name>`, the config
section `<name>:`, `results/<name>/`, `logs/<name>.log`, `init_from: <name>` and its MLflow run.
Only Snakemake's rule names, which must be Python identifiers, spell it with underscores.
Nothing here imports torch: building the DAG must stay fast.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipeline import settings as s
from pipeline.errors import InputError
from pipeline.model.weights import init_from_input
from pipeline.settings import Config, TrainSettings
from pipeline.tracking.headline import Headline

EXTRA_STAGES_ENV = "PIPELINE_EXTRA_STAGES"
"""Comma-separated modules imported after the built-in stages; each may `register` stages."""

Inputs = Callable[[Config], dict[str, Any]]
"""A rule's named inputs, from the typed config."""


@dataclass(frozen=True)
class Stage:
    name: str
    """CLI command, config section, results and log folder name."""
    module: str
    """The module whose `main(config)` runs the stage (`config`: its `StageConfig`)."""
    settings: type | None = None
    """Its config section's settings class (pipeline/settings/__init__.py), if it has one."""
    trains: bool = False
    """A training stage: its Snakemake rule is generated, launched as `train` says, and its
    `model/` is a checkpoint that later stages can start from (`init_from: <name>`)."""
    outputs: tuple[str, ...] = ()
    """Files it writes in results/<name>/ besides model/ and metrics.json (logged to MLflow)."""
    inputs: Inputs | None = None
    """Its rule's named inputs, from the resolved config (training stages)."""
    resources: s.StageResources | None = None
    """Its default `resources.<name>`, for a stage that runs as scheduled jobs (every training
    stage does: the plain defaults unless given)."""
    parts: bool = False
    """It runs as several jobs (`--part i-of-n`), then one that gathers (`--gather`)."""
    report: str = ""
    """What its `--report` pass does, if it has one (its own Snakemake rule, `<rule>_report`,
    run once the stages it measures on have run): `main(config, report_only=True)`."""
    headline: Headline = Headline("val_loss")
    """A training stage's metric that decides its registered model's champions, among the
    versions measured on the same data (`StagePlan.eval_data`)."""

    def __post_init__(self) -> None:
        if self.trains and self.resources is None:
            object.__setattr__(self, "resources", s.StageResources())

    @property
    def rule(self) -> str:
        """The Snakemake rule name (an identifier)."""
        return self.name.replace("-", "_")


def init_checkpoint_path(config: Config, init_from: str) -> Path:
    """Where a fine-tuning stage starts from a stage or a path: the stage's `model/`, or the
    directory (GPT-2 weights by name: `pipeline.model.weights`)."""
    if init_from in training_stages():
        return config.paths.stage(init_from) / "model"
    return Path(init_from)


@runtime_checkable
class FineTuningSection(Protocol):
    """What a fine-tuning stage's section has: where it starts and the data it reads."""

    @property
    def init_from(self) -> str: ...

    @property
    def data(self) -> str: ...

    @property
    def train(self) -> TrainSettings: ...


def fine_tuning_inputs(stage: str) -> Inputs:
    """A fine-tuning stage reads its data source and its start: a stage's checkpoint, or GPT-2
    weights (by name or directory) and the downloaded BPE files it then encodes with."""

    def inputs(config: Config) -> dict[str, Any]:
        section = config.section_of(stage, FineTuningSection)
        data = {"data": str(config.paths.source(section.data))}
        if section.init_from in training_stages():
            return {**data, "model": str(init_checkpoint_path(config, section.init_from))}
        return {
            **data,
            "model": init_from_input(section.init_from, config.paths.weights),
            "bpe": [str(path) for path in config.paths.bpe_files],
        }

    return inputs


def pretrain_inputs(config: Config) -> dict[str, Any]:
    """The token directory and, when `pretrain.init_from` names weights, their directory."""
    init_from = config.section_of("pretrain", s.PretrainSettings).init_from
    return {
        "tokens": str(config.paths.tokens),
        "init": init_from_input(init_from, config.paths.weights),
    }


SPLITS_JSON = ("train.json", "val.json", "test.json")
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage; its name must be new and its settings a dataclass."""
    if stage.name in STAGES:
        raise InputError(f"stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return stage


for _stage in (
    Stage("download", "pipeline.stages.download"),
    Stage(
        "tokenizer",
        "pipeline.stages.tokenizer",
        s.TokenizerSettings,
        resources=s.StageResources(runtime=60),
        report="only measure the tokenizer written (bytes per token against GPT-2's on the "
        "val split and the fine-tuning data; run after prepare)",
    ),
    Stage(
        "prepare",
        "pipeline.stages.prepare",
        s.PrepareSettings,
        resources=s.StageResources(runtime=60),
        parts=True,
    ),
    Stage(
        "pretrain",
        "pipeline.stages.pretrain",
        s.PretrainSettings,
        trains=True,
        outputs=("loss.png", "samples.txt"),
        inputs=pretrain_inputs,
        resources=s.StageResources(runtime=60),
        headline=Headline("val_loss"),
    ),
    Stage(
        "finetune-classifier",
        "pipeline.stages.finetune_classifier",
        s.ClassifierSettings,
        trains=True,
        outputs=(
            "train.tsv",
            "val.tsv",
            "test.tsv",
            "loss.png",
            "confusion_matrix.png",
            "reliability_diagram.png",
            "misclassified.tsv",
        ),  # fmt: skip
        inputs=fine_tuning_inputs("finetune-classifier"),
        headline=Headline("test_f1", higher_is_better=True),
    ),
    Stage(
        "finetune-instruct",
        "pipeline.stages.finetune_instruct",
        s.InstructSettings,
        trains=True,
        outputs=(*SPLITS_JSON, "loss.png", "test_responses.json"),
        inputs=fine_tuning_inputs("finetune-instruct"),
        headline=Headline("val_loss"),
    ),
    Stage(
        "align-dpo",
        "pipeline.stages.align_dpo",
        s.DpoSettings,
        trains=True,
        outputs=(*SPLITS_JSON, "loss.png", "test_responses.json"),
        inputs=fine_tuning_inputs("align-dpo"),
        headline=Headline("val_reward_accuracy", higher_is_better=True),
    ),
):
    register(_stage)

for _module in filter(None, os.environ.get(EXTRA_STAGES_ENV, "").split(",")):
    importlib.import_module(_module.strip())


def training_stages() -> dict[str, Stage]:
    return {name: stage for name, stage in STAGES.items() if stage.trains}


def fine_tuning_stages() -> list[str]:
    """The training stages after pretraining, each with its own data source (`<stage>.data`)."""
    return [name for name in training_stages() if name != "pretrain"]


def scheduled_stages() -> dict[str, Stage]:
    """Stages with `resources.<name>`: what their jobs ask a scheduler for."""
    return {name: stage for name, stage in STAGES.items() if stage.resources is not None}
