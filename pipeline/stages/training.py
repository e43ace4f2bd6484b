"""The one skeleton every training stage runs; a stage supplies only what differs.

`run_training_stage` owns the shared sequence: device -> the stage's `setup` (its data, start
model, trainable parts, task and fingerprint) -> MLflow run (the interrupted one, when resuming),
its dataset inputs and system metrics -> `fit` (or, for weights that are only evaluated, an
evaluation) -> rank-0 gate -> LoRA merge -> the stage's `report` (its test evaluation and files)
-> loss plot -> checkpoint -> metrics.json and artifacts -> its warnings (warnings.json) -> the
new folder swapped in whole -> clearing the resume state. A stage is a `TrainingStage` subclass
whose `setup` and `report` read top to bottom, as a torchtune recipe does. Everything it writes
goes to a temporary folder, so results/<stage>/ always holds one complete run; resume
checkpoints live apart, in `paths.resume`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import tiktoken
import torch

from pipeline.data.tokenizer import tokenizer_info
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.model import GPT
from pipeline.model.checkpoint import save_checkpoint, tokenizer_extra_files
from pipeline.model.lora import merge_lora
from pipeline.plots import plot_training_curves
from pipeline.serving.models import log_stage_model
from pipeline.settings import StageConfig, TrainSettings
from pipeline.stages.common import stage_device
from pipeline.stages.registry import STAGES
from pipeline.tracking import (
    WARNINGS_FILE,
    StageRun,
    facts_and_metrics,
    stage_run,
    system_metrics,
)
from pipeline.tracking.model_registry import DATA_TAG, register_stage
from pipeline.train import (
    TrainResult,
    TrainTask,
    clear_resume_state,
    evaluate_losses,
    fit,
    is_main_process,
    recorded_run,
    resume_fingerprint,
)

log = logging.getLogger("pipeline.stages")


@dataclass
class StagePlan:
    """What a stage's `setup` hands the skeleton."""

    model: GPT
    """Trained in place, then saved as results/<stage>/model."""
    task: TrainTask
    train: TrainSettings
    """The `train` section, with what the stage derives (steps from epochs) filled in."""
    fingerprint: dict[str, Any]
    """What identifies the run for resume, beside `train` (data, start weights, ...)."""
    tokenizer: tiktoken.Encoding
    tokenizer_dir: Path | None
    """Where `tokenizer`'s files are: saved beside the weights, so the checkpoint carries its
    tokenizer, and logged as the run's `tokenizer` dataset (None: a start without one)."""
    title: str
    """The loss plot's title."""
    eval_data: str
    """The sha256 of the split the stage's headline metric (`Stage.headline`) is measured on:
    the model registry ranks a version only among those measured on the same data."""
    loss_label: str = "cross-entropy loss"
    """The loss plot's y axis: which loss the stage minimises."""
    tags: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    """What the run is, known at its start (trainable parameters, truncated examples, ...):
    MLflow params (`RUN_FACTS`)."""
    lora: bool = False
    """Merge LoRA adapters into the weights before reporting and saving."""
    trains: bool = True
    """False: evaluate the start weights only (pretrain.continue_pretraining false)."""
    datasets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """The data read, by MLflow context (training / validation / test): the run's dataset
    inputs, as `StageRun.log_datasets` takes them."""


class TrainingSection(Protocol):
    """What every training stage's section has."""

    @property
    def train(self) -> TrainSettings: ...

    @property
    def registered_model_name(self) -> str | None: ...


Section = TypeVar("Section", bound=TrainingSection)


class TrainingStage(Generic[Section]):
    """A training stage: its registry `name`, what it sets up and what it reports."""

    name: str

    def setup(self, config: StageConfig[Section], device: torch.device, out_dir: Path
              ) -> StagePlan:  # fmt: skip
        """The stage's plan; files it writes up front (its splits) go in `out_dir`."""
        raise NotImplementedError

    def report(self, plan: StagePlan, result: TrainResult, out_dir: Path,
               tracker: StageRun) -> dict[str, Any]:  # fmt: skip
        """The stage's final metrics, after writing its own outputs (test answers, plots)."""
        raise NotImplementedError

    def saved_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The metrics the checkpoint's config.json keeps."""
        return dict(metrics)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The stage's own sections of the checkpoint's config.json (`classifier`, `instruct`),
        asked for after `report`."""
        return {}


def _evaluate_only(plan: StagePlan, device: torch.device, tracker: StageRun) -> TrainResult:
    plan.model.to(device).eval()
    measured = evaluate_losses(
        plan.model, plan.task.loss_fn, plan.task.eval_sets, plan.train.eval_batches, device,
        plan.train.precision, plan.task.token_bytes,
    )  # fmt: skip
    tracker.log_metrics(measured, step=0)
    return TrainResult(0, measured, [{"step": 0, **measured}])


@contextmanager
def _stage_folder(out_dir: Path) -> Iterator[Path]:
    """Where a stage writes its outputs: on rank 0 a temporary sibling of `out_dir` that replaces
    it whole once the stage succeeds (a failed stage leaves the previous complete folder), on
    other ranks a scratch folder that is discarded."""
    if is_main_process():
        with atomic_directory(out_dir) as work:
            yield work
    else:
        with tempfile.TemporaryDirectory(prefix="stage-") as scratch:
            yield Path(scratch)


def run_training_stage(
    stage: TrainingStage[Section],
    config: StageConfig[Section],
    threads: int | None = None,
    keep_resume_state: bool = False,
) -> dict[str, Any]:
    """Set up, train, report and save one stage; returns its metrics (rank 0's final ones).
    `threads`: torch's CPU threads (default: torch's choice). `keep_resume_state`: leave the
    resume checkpoint (at the last step) for whoever accepts the outputs to delete: a job killed
    between writing them and Snakemake accepting them then reruns only the evaluation."""
    if threads:
        torch.set_num_threads(threads)
    out_dir, resume_dir = config.paths.stage(stage.name), config.paths.stage_resume(stage.name)
    device = stage_device(config)
    with _stage_folder(out_dir) as work:
        plan = stage.setup(config, device, work)
        earlier, resumes = recorded_run(
            resume_dir, resume_fingerprint(plan.train, config.seed, plan.fingerprint)
        )
        resumes = resumes and plan.trains  # a stage that only evaluates leaves its earlier run
        resume, abandoned = (earlier, "") if resumes else ("", earlier)
        tracking, warnings_file = config.tracking, work / WARNINGS_FILE
        with (
            stage_run(
                tracking, stage.name, config.resolved, resume, abandoned, warnings_file
            ) as tracker,
            system_metrics(tracker, tracking.uri, tracking.system_metrics_interval),
        ):
            tracker.set_tags({**plan.tags, DATA_TAG: plan.eval_data, **_attention_tags(plan)})
            for context, files in plan.datasets.items():
                tracker.log_datasets(files, context)
            _log_tokenizer(tracker, plan.tokenizer_dir)
            tracker.log_params(plan.facts)
            if plan.trains:
                result = fit(
                    plan.model, plan.task, plan.train, device=device, seed=config.seed,
                    resume_dir=resume_dir, fingerprint=plan.fingerprint, logger=tracker,
                )  # fmt: skip
            else:
                result = _evaluate_only(plan, device, tracker)
            if not is_main_process():
                return result.metrics  # rank 0 evaluates, writes and logs the stage's outputs
            metrics = _report(stage, plan, result, work, tracker)
            registered = STAGES[stage.name]
            model = finish_stage(
                tracker, work, metrics, result.step, registered.outputs, stage.name,
                log_model=tracking.log_model,
            )  # fmt: skip
            if model:
                log.info("logged the model as %s (mlflow models serve -m %s)", model, model)
            if tracking.register:
                register_stage(
                    tracking.uri, stage.name, config.section.registered_model_name, model,
                    tracker.run_id, registered.headline, metrics, plan.eval_data,
                )  # fmt: skip
    if not keep_resume_state:
        clear_resume_state(resume_dir)
    return metrics


def _attention_tags(plan: StagePlan) -> dict[str, str]:
    """The attention backend the stage's GPT runs and why (`choose_attention`), as run tags."""
    for module in plan.model.modules():
        if isinstance(module, GPT):
            return {"attention": module.attention, "attention_reason": module.attention_reason}
    return {}


def _report(stage: TrainingStage[Any], plan: StagePlan, result: TrainResult, out_dir: Path,
            tracker: StageRun) -> dict[str, Any]:  # fmt: skip
    """The stage's report, loss plot and model checkpoint in `out_dir`; returns its metrics."""
    if plan.lora:
        merge_lora(plan.model)
    plan.model.eval()
    metrics = stage.report(plan, result, out_dir, tracker)
    plot_training_curves(
        result.history, out_dir / "loss.png", title=plan.title, ylabel=plan.loss_label
    )
    save_checkpoint(
        plan.model,
        out_dir / "model",
        metadata={
            "stage": stage.name,
            **stage.checkpoint_metadata(),
            "tokenizer": _tokenizer_metadata(plan),
            "metrics": stage.saved_metrics(metrics),
        },
        extra_files=tokenizer_extra_files(plan.tokenizer_dir) if plan.tokenizer_dir else {},
    )
    return metrics


def _tokenizer_metadata(plan: StagePlan) -> dict[str, Any]:
    if plan.tokenizer_dir is None:
        return {"n_vocab": plan.tokenizer.n_vocab, "eot_token": plan.tokenizer.eot_token}
    return tokenizer_info(plan.tokenizer_dir).as_dict()


def _log_tokenizer(tracker: StageRun, tokenizer_dir: Path | None) -> None:
    """The tokenizer as the run's dataset input (context `tokenizer`) and params."""
    if tokenizer_dir is None:
        return
    info = tokenizer_info(tokenizer_dir)
    tracker.log_datasets([{"name": "tokenizer", "source": tokenizer_dir, "digest": info.sha256,
                           "profile": info.as_dict()}], context="tokenizer")  # fmt: skip
    tracker.log_params({f"tokenizer_{key}": value for key, value in info.as_dict().items()})


def _same(logged: float | None, value: float) -> bool:
    """Whether a metric's last logged value is `value` already (NaN counts as equal to NaN)."""
    if logged is None:
        return False
    return logged == value or (math.isnan(logged) and math.isnan(value))


def finish_stage(
    tracker: StageRun,
    out_dir: Path,
    metrics: Mapping[str, Any],
    step: int,
    artifacts: Iterable[str],
    stage: str,
    log_model: bool,
) -> str | None:
    """Write metrics.json last (it is the stage's completion marker), log it and the artifacts
    to the stage's MLflow run, and (`log_model`: the `tracking.log_model` setting) the checkpoint
    in `out_dir`/model as the run's MLflow pyfunc model; returns that model's URI
    (`models:/<id>`), else None.

    Its numbers go on the run under their own names, so the runs table shows them: what says
    what the run was (`RUN_FACTS`: steps, epochs, parameters) as params; of the metrics, a series
    that already ends at its value (val_loss) is left alone, any other value is logged at the
    last step, as the end of its series (tokens_per_second: the run's mean) or its one point
    (test_*). No `final_` copies: they doubled every chart."""
    facts, measured = facts_and_metrics(metrics)
    # JSON has no NaN: an undefined metric (ROC-AUC of a one-class subset) is written as null
    undefined = {k: None for k, v in measured.items() if not math.isfinite(v)}
    atomic_write_json(out_dir / "metrics.json", {**metrics, **undefined})
    tracker.log_params(facts)
    latest = tracker.latest_metrics()
    tracker.log_metrics({k: v for k, v in measured.items() if not _same(latest.get(k), v)}, step)
    for name in ("metrics.json", *artifacts):
        tracker.log_artifact(out_dir / name)
    if not log_model:
        return None
    return log_stage_model(tracker, stage, out_dir / "model", step)
