"""The single training loop shared by pretraining and every fine-tuning stage.

A stage hands `fit` a `TrainTask` (its loss, resumable batches, evaluation sets and hooks) and its
`train` settings; `fit` owns everything else (optimizer, schedule, precision, accumulation,
clipping, evaluation, logging, resume checkpoints, multi-process training), so all stages behave
and log alike. The run's counters live in one `FitState`, which is exactly what a resume
checkpoint saves beside the tensors.

Under ``torchrun`` (see ``distributed.py``) every process runs ``fit``: each trains on its share
of every global batch, gradients are averaged by DDP (or reduce-scattered by FSDP), and only rank
0 logs and writes checkpoints. A world of one runs exactly the single-process code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.errors import InputError
from pipeline.settings import LAUNCH_KEYS, TrainSettings
from pipeline.train.device import PeakFlops, model_width, resolve_precision
from pipeline.train.distributed import World, all_reduce_sum, current_world
from pipeline.train.losses import IGNORE_INDEX
from pipeline.train.optim import configure_optimizer, lr_at
from pipeline.train.parallel import ParallelModel
from pipeline.train.state import (
    STAGE_FINGERPRINT,
    FitState,
    canonical_json,
    check_resume_dir,
    load_resume_state,
    save_resume_state,
)

log = logging.getLogger("pipeline.train")

PERPLEXITY_LOSS_CAP = 50.0
"""Losses above this are capped before ``exp`` so perplexity stays a finite float."""

_BOOKKEEPING_FIELDS = frozenset({"log_every", "checkpoint_every", *LAUNCH_KEYS})
"""Settings that do not change the numbers a run produces (beyond float rounding, for the
launch fields), so they may differ on resume."""


class Batches(Protocol):
    """A resumable stream of training batches (it owns its RNG; its state goes in checkpoints).

    ``shard(rank, world_size)`` (called only in multi-process runs) restricts ``next_batch`` to
    this process's part of each global batch; the state stays that of the global stream.
    """

    def next_batch(self) -> tuple[Tensor, ...]: ...

    def shard(self, rank: int, world_size: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainLogger(Protocol):
    """Where metrics and text artifacts go (the MLflow adapter)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Training diverged; raised before the bad update, so no checkpoint holds its effects."""


LossFn = Callable[[nn.Module, tuple[Tensor, ...]], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
"""Returns the loss, or (loss, extra per-batch statistics logged beside it, e.g. DPO rewards)."""

EvalSets = Mapping[str, Callable[[], Iterable[tuple[Tensor, ...]]]]


@dataclass
class TrainTask:
    """What a stage trains: everything `fit` needs that is not a setting.

    ``loss_units(batch)`` counts what ``loss_fn`` averages over (learned tokens, examples, their
    class weights). Multi-process runs need it when processes' shares of a batch may hold
    different counts: each process's loss is then weighted by its share, so the gradient is that
    of the global batch's mean, as in one process. ``flops_per_token`` (forward + backward) and
    ``peak_flops`` together enable MFU (never above 100%: see `PeakFlops`).
    """

    loss_fn: LossFn
    batches: Batches
    eval_sets: EvalSets = field(default_factory=dict)
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None
    """The stage's own metrics at each evaluation (accuracy, rewards...)."""
    sample_fn: Callable[[nn.Module], str] | None = None
    """A text sample at each evaluation, logged as an artifact."""
    loss_units: Callable[[tuple[Tensor, ...]], float] | None = None
    flops_per_token: float | None = None
    peak_flops: PeakFlops | None = None
    token_bytes: Tensor | None = None
    """UTF-8 bytes of each token id (`token_byte_lengths`), for an LM task whose loss is the mean
    over ``batch[1]``'s targets that are not IGNORE_INDEX: evaluation then reports bits per
    byte too."""


@dataclass
class TrainResult:
    """Outcome of ``fit``: final evaluation, throughput and the curves for plotting."""

    step: int
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


def _loss_and_stats(out: Tensor | tuple[Tensor, dict[str, Tensor]]) -> tuple[Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def _to_device(batch: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, Tensor) else t for t in batch)


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports a large number rather than inf."""
    return math.exp(min(loss, PERPLEXITY_LOSS_CAP))


def autocast(
    device: torch.device, precision: str, width: int | None = None
) -> contextlib.AbstractContextManager:
    """bf16 autocast when `precision` (fp32 | bf16 | auto) runs as bf16 on `device` for a model
    `width` wide; the parameters and the optimizer state stay fp32 either way."""
    bf16 = resolve_precision(precision, device, width) == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def evaluate_losses(
    model: nn.Module,
    loss_fn: LossFn,
    eval_sets: EvalSets,
    n_batches: int,
    device: torch.device,
    precision: str = "fp32",
    token_bytes: Tensor | None = None,
) -> dict[str, float]:
    """``<set>_loss`` and ``<set>_perplexity``: the mean loss over each set's first ``n_batches``;
    with ``token_bytes`` (see `TrainTask`) also ``<set>_bpb``, bits per UTF-8 byte of the
    learned targets: their total nats / ln 2 / their bytes, comparable across tokenizers.

    The evaluation ``fit`` runs, public so that a stage can score a model without training it.
    Runs without gradients in whatever mode the model is in: call ``model.eval()`` first.
    """
    device = torch.device(device)
    width = model_width(model)
    metrics: dict[str, float] = {}
    for name, make_batches in eval_sets.items():
        total, nats = torch.zeros((), device=device), torch.zeros((), device=device)
        count, n_bytes = 0, 0
        for batch in islice(make_batches(), n_batches):
            with torch.no_grad(), autocast(device, precision, width):
                loss, _ = _loss_and_stats(loss_fn(model, _to_device(batch, device)))
            total += loss.detach().float()
            count += 1
            if token_bytes is not None:
                learned = batch[1][batch[1] != IGNORE_INDEX]
                if learned.numel():  # an all-ignored batch's mean loss is NaN, and no text
                    nats += loss.detach().float() * learned.numel()
                    n_bytes += int(token_bytes[learned.cpu()].sum())
        if count == 0:
            raise InputError(f"eval set {name!r} yielded no batches")
        mean = (total / count).item()
        metrics[f"{name}_loss"] = mean
        metrics[f"{name}_perplexity"] = perplexity(mean)
        if n_bytes:
            metrics[f"{name}_bpb"] = nats.item() / math.log(2) / n_bytes
    return metrics


def _due(step: int, every: int | None, max_steps: int) -> bool:
    """At the last step, and every `every` steps (None or 0: only at the last)."""
    return step == max_steps or (bool(every) and step % every == 0)


@dataclass
class _StepOutcome:
    loss: float
    grad_norm: float
    stats: dict[str, float]
    tokens: int
    seconds: float


class _Training:
    """One run's moving parts (the parallel model, its optimizer, the world, the logger) and the
    three things `fit` does with them: a step, an evaluation, a checkpoint."""

    def __init__(self, parallel: ParallelModel, task: TrainTask, cfg: TrainSettings, device,
                 world: World, logger: TrainLogger | None) -> None:  # fmt: skip
        self.parallel, self.task, self.cfg = parallel, task, cfg
        self.device, self.world, self.logger = device, world, logger
        # Under DDP rank 0 alone evaluates and samples (the others wait at the next all-reduce);
        # a sharded model's forward is itself collective, so there every process takes part.
        self.evaluating = world.is_main or parallel.sharded
        self.throughput = _Throughput()
        self.entry: dict | None = None
        self.width = model_width(parallel.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision, self.width)

    def _share(self, batch: tuple[Tensor, ...]) -> float:
        """This process's weight in the global batch's mean loss (1 in one process)."""
        if not self.world.distributed or self.task.loss_units is None:
            return 1.0
        units = torch.tensor([float(self.task.loss_units(batch))], dtype=torch.float64)
        return units.item() * self.world.size / all_reduce_sum(units.to(self.device)).item()

    def step(self, step: int) -> _StepOutcome:
        """One optimizer step over `grad_accum_steps` micro-batches; raises before the update
        if the loss or the gradient is not finite."""
        t0 = time.perf_counter()
        cfg, parallel, accum = self.cfg, self.parallel, self.cfg.grad_accum_steps
        lr = lr_at(step, cfg)
        for group in parallel.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # Muon's group runs at its own peak rate
        parallel.optimizer.zero_grad(set_to_none=True)
        losses, stats, tokens = [], [], 0
        for micro in range(accum):
            batch = self.task.batches.next_batch()
            tokens += batch[0].numel()
            share = self._share(batch)
            with parallel.no_sync(micro < accum - 1):
                with self.autocast():
                    out = self.task.loss_fn(parallel.train_module, _to_device(batch, self.device))
                loss, extra = _loss_and_stats(out)
                (loss * share / accum).backward()
            losses.append((loss.detach().float() * share).reshape(()))
            stats.append({k: (v.detach().float() * share).reshape(()) for k, v in extra.items()})
        grad_norm = parallel.grad_norm(cfg.grad_clip)
        names = list(stats[0])
        stacked = torch.stack([*losses, *(m[k] for k in names for m in stats)])
        if self.world.distributed:
            stacked = all_reduce_sum(stacked) / self.world.size
            tokens = int(all_reduce_sum(torch.tensor([tokens], device=self.device)))
        values = torch.cat([stacked, grad_norm.detach().float().reshape(1).to(self.device)])
        values = values.tolist()
        norm = values[-1]
        for i, value in enumerate(values[:accum]):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"non-finite loss {value} at step {step} "
                    f"(micro-batch {i + 1}/{accum}); no update or checkpoint was made"
                )
        loss_mean = sum(values[:accum]) / accum
        if not math.isfinite(norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm {norm} at step {step} (loss {loss_mean}); "
                "no update or checkpoint was made"
            )
        parallel.optimizer.step()
        stat_means = {
            k: sum(values[accum + i * accum : accum + (i + 1) * accum]) / accum
            for i, k in enumerate(names)
        }
        return _StepOutcome(loss_mean, norm, stat_means, tokens, time.perf_counter() - t0)

    def advance(self, state: FitState, outcome: _StepOutcome, bar: tqdm) -> None:
        """Count a finished step into `state`; at logging steps, log it and add it to the
        history (the entry an evaluation at the same step then extends)."""
        state.step += 1
        state.train_time_s += outcome.seconds
        state.tokens_seen += outcome.tokens
        self.throughput.add(outcome)
        bar.update(1)
        self.entry = None
        cfg = self.cfg
        if state.step == 1 or _due(state.step, cfg.log_every, cfg.steps):
            self.entry = entry = self._log_entry(state, outcome)
            state.history.append(entry)
            log.info(_format_train_line(entry, cfg.steps))
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.1e}", refresh=False)
            if self.logger is not None:
                self.logger.log_metrics({k: v for k, v in entry.items() if k != "step"}, state.step)

    def _log_entry(self, state: FitState, outcome: _StepOutcome) -> dict:
        tps, task = self.throughput.take(), self.task
        entry = {
            "step": state.step,
            "lr": lr_at(state.step, self.cfg),
            "loss": outcome.loss,
            "grad_norm": outcome.grad_norm,
            "tokens_per_second": tps,
            "tokens": state.tokens_seen,
            "train_time_s": state.train_time_s,
            **outcome.stats,
        }
        if task.flops_per_token is not None and task.peak_flops is not None:
            entry["mfu"] = task.peak_flops.utilization(task.flops_per_token * tps / self.world.size)
        return entry

    def record_evaluation(self, state: FitState, metrics: dict[str, float]) -> None:
        state.last_metrics = metrics
        if self.entry is None:
            self.entry = {"step": state.step}
            state.history.append(self.entry)
        self.entry.update(metrics)

    def evaluate(self, step: int) -> dict[str, float]:
        """Eval-set losses and the stage's metrics (logged), then a sample, on the eval module."""
        if not self.evaluating:
            return {}
        parallel, task, cfg = self.parallel, self.task, self.cfg
        trained = parallel.trained
        trained.eval()
        try:
            with torch.no_grad():
                metrics = evaluate_losses(
                    parallel.eval_module, task.loss_fn, task.eval_sets, cfg.eval_batches,
                    self.device, cfg.precision, task.token_bytes,
                )  # fmt: skip
                if task.eval_fn is not None:
                    with self.autocast():
                        metrics.update(task.eval_fn(parallel.eval_module))
                if metrics:
                    log.info(_format_eval_line(step, cfg.steps, metrics))
                    if self.logger is not None:
                        self.logger.log_metrics(metrics, step)
                if task.sample_fn is not None:
                    self._sample(step, task.sample_fn)
        finally:
            trained.train()
            parallel.model.train()
        return metrics

    def _sample(self, step: int, sample_fn: Callable[[nn.Module], str]) -> None:
        # A sharded forward is collective, and a sample may stop early: rank 0 samples alone,
        # from the gathered model.
        parallel = self.parallel
        sampler = parallel.sync_model() if parallel.sharded else parallel.trained
        if self.world.is_main:
            sampler.eval()
            with self.autocast():
                text = sample_fn(sampler)
            log.info("sample at step %d:\n%s", step, text)
            if self.logger is not None:
                self.logger.log_text(text, f"samples/step_{step:06d}.txt")

    def checkpoint(self, resume_dir: Path, state: FitState, fingerprint: Any) -> None:
        """The model, optimizer and `state` as a resume checkpoint (written by rank 0)."""
        trained_model = self.parallel.sync_model()
        optimizer_state = self.parallel.optimizer_state()
        if self.world.is_main:
            state.data_state = self.task.batches.state_dict()
            save_resume_state(
                resume_dir,
                model=trained_model,
                optimizer_state=optimizer_state,
                fingerprint=fingerprint,
                state=state,
            )
            log.debug("checkpoint written at step %d", state.step)


def _format_train_line(entry: dict, max_steps: int) -> str:
    parts = [
        f"step {entry['step']}/{max_steps}",
        f"loss {entry['loss']:.4f}",
        f"lr {entry['lr']:.1e}",
        f"grad_norm {entry['grad_norm']:.3f}",
        f"{entry['tokens_per_second']:,.0f} tok/s",
    ]
    if "mfu" in entry:
        parts.append(f"mfu {100 * entry['mfu']:.1f}%")
    seconds_per_step = entry["train_time_s"] / entry["step"]
    parts.append(f"eta {_duration((max_steps - entry['step']) * seconds_per_step)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """`42s`, `5m02s` or `1h07m`: the training time left, at the mean step time so far."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _format_eval_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{max_steps}", "eval"]
    parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
    return " | ".join(parts)


class _Throughput:
    """Tokens per second since the last logged step."""

    def __init__(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    def add(self, outcome: _StepOutcome) -> None:
        self.tokens += outcome.tokens
        self.seconds += outcome.seconds

    def take(self) -> float:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.tokens, self.seconds = 0, 0.0
        return rate


@contextlib.contextmanager
def _progress(cfg: TrainSettings, start: int, world: World) -> Iterator[tqdm]:
    """A progress bar on a terminal (rank 0), with log lines printed above it."""
    bar = tqdm(
        total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
        disable=None if world.is_main else True, dynamic_ncols=True,
    )  # fmt: skip
    with bar, contextlib.nullcontext() if bar.disable else logging_redirect_tqdm():
        yield bar


def _restore(model: nn.Module, task: TrainTask, resume_dir: Path | None, fingerprint: Any,
             device: torch.device) -> tuple[FitState, dict | None]:  # fmt: skip
    """The state to start from: a matching checkpoint's (loaded into the model, the batches and
    the RNGs), else a fresh one."""
    if resume_dir is None:
        return FitState(), None
    check_resume_dir(resume_dir)
    try:
        json.dumps(task.batches.state_dict())
    except TypeError as e:
        raise TypeError(f"batches.state_dict() must be JSON-serialisable: {e}") from e
    restored = load_resume_state(resume_dir, model=model, fingerprint=fingerprint, device=device)
    if restored is None:
        return FitState(), None
    state, optimizer_state = restored
    task.batches.load_state_dict(state.data_state)
    return state, optimizer_state


def resume_fingerprint(cfg: TrainSettings, seed: int, fingerprint: Any) -> Any:
    """What a checkpoint must match to be resumed: the stage's `fingerprint`, the seed and the
    settings that change the numbers (not `log_every`, `checkpoint_every`, launch fields)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _BOOKKEEPING_FIELDS}
    return canonical_json({"train": {**settings, "seed": seed}, STAGE_FINGERPRINT: fingerprint})


def fit(
    model: nn.Module,
    task: TrainTask,
    cfg: TrainSettings,
    *,
    device: torch.device,
    seed: int,
    resume_dir: Path | None = None,
    fingerprint: Any = None,
    logger: TrainLogger | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps, resuming if possible.

    Step ``s`` (1-based) uses ``lr_at(s, cfg)``. Every ``eval_every`` steps and at the last,
    `_Training.evaluate` runs. With ``resume_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the last (after that step's evaluation); a later call with
    the same fingerprint and settings continues from it and ends bitwise identical to an
    uninterrupted run (under the same world size; under another, equal to float rounding).
    """
    device, world = torch.device(device), current_world()
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"precision bf16 requested but {device} does not support bfloat16")
    if cfg.optimizer == "muon" and world.distributed and cfg.parallelism == "fsdp":
        raise InputError(
            "train.optimizer muon needs whole matrices (Newton-Schulz) and FSDP shards them: "
            "use parallelism ddp or optimizer adamw"
        )
    if world.distributed:
        task.batches.shard(world.rank, world.size)
    torch.manual_seed(seed)
    model.train()
    run_id = resume_fingerprint(cfg, seed, fingerprint)
    resume_dir = None if resume_dir is None else Path(resume_dir)
    state, optimizer_state = _restore(model, task, resume_dir, run_id, device)
    if logger is not None and world.is_main:  # the MLflow run, which a resumed job continues
        state.tracking_run = getattr(logger, "run_id", "")
    resumed_from = state.step if optimizer_state is not None else None
    if resumed_from is not None:
        log.info("resumed from step %d/%d (%s)", state.step, cfg.steps, resume_dir)
    if world.rank > 0:
        # Dropout masks independent of rank 0's; checkpoints hold rank 0's RNG state only, so
        # with dropout a resumed multi-process run is statistically, not bitwise, the same.
        torch.manual_seed(hash((seed, state.step, world.rank)))
    parallel = ParallelModel(
        model, lambda m: configure_optimizer(m, cfg, device), world,
        parallelism=cfg.parallelism, compile=cfg.compile, device=device,
    )  # fmt: skip
    if optimizer_state is not None:
        parallel.load_optimizer_state(optimizer_state)
    run = _Training(parallel, task, cfg, device, world, logger if world.is_main else None)
    if state.step >= cfg.steps:
        log.info("resume state is at step %d >= max_steps; evaluating only", state.step)
        state.last_metrics = run.evaluate(state.step)
    with _progress(cfg, state.step, world) as bar:
        for step in range(state.step + 1, cfg.steps + 1):
            run.advance(state, run.step(step), bar)
            if _due(step, cfg.eval_every, cfg.steps):
                run.record_evaluation(state, run.evaluate(step))
            checkpoint_due = cfg.checkpoint_every > 0 and _due(
                step, cfg.checkpoint_every, cfg.steps
            )
            if resume_dir is not None and checkpoint_due:
                run.checkpoint(resume_dir, state, run_id)
    parallel.finish(device)
    rate = state.tokens_seen / state.train_time_s if state.train_time_s > 0 else 0.0
    metrics = {**state.last_metrics, "tokens_per_second": rate, "train_time_s": state.train_time_s}
    return TrainResult(state.step, metrics, state.history, resumed_from)
