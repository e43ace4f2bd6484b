"""The single training loop shared by pretraining and every fine-tuning stage.

A stage supplies the model, a ``loss_fn(model, batch)``, a resumable batch source and its
evaluation sets; ``fit`` owns everything else (optimizer, schedule, precision, accumulation,
clipping, evaluation, logging, resume checkpoints, multi-process training), so all stages behave
and log alike.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.train.distributed import PARALLELISMS, all_reduce_sum, current_world
from pipeline.train.parallel import ParallelModel
from pipeline.train.schedule import lr_at
from pipeline.train.state import (
    ResumeState,
    canonical_json,
    check_resume_dir,
    load_resume_state,
    save_resume_state,
)

log = logging.getLogger("pipeline.train")

PERPLEXITY_LOSS_CAP = 50.0
"""Losses above this are capped before ``exp`` so perplexity stays a finite float."""

_BOOKKEEPING_FIELDS = frozenset(
    {"log_every", "checkpoint_every", "nproc_per_node", "nnodes", "parallelism"}
)
"""Config fields that do not change the numbers a run produces (beyond float rounding, for the
launch fields), so they may differ on resume."""


@dataclass
class TrainConfig:
    """Optimisation settings of one stage; ``max_steps`` counts optimizer steps."""

    max_steps: int
    batch_size: int
    grad_accum_steps: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 10
    checkpoint_every: int = 50
    log_every: int = 10
    precision: str = "fp32"
    compile: bool = False
    seed: int = 1234
    nproc_per_node: int = 1
    nnodes: int = 1
    parallelism: str = "ddp"

    def __post_init__(self) -> None:
        positive = (
            "max_steps", "batch_size", "grad_accum_steps", "eval_batches", "nproc_per_node",
            "nnodes",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
            "eval_every", "checkpoint_every", "log_every",
        )  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(
                f"TrainConfig.precision must be 'fp32' or 'bf16', got {self.precision!r}"
            )
        if self.parallelism not in PARALLELISMS:
            raise ValueError(
                f"TrainConfig.parallelism must be one of {', '.join(PARALLELISMS)}, "
                f"got {self.parallelism!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a config mapping, rejecting typos instead of silently using defaults.

        Float fields also accept numeric strings, since YAML reads ``6e-4`` (no dot) as a string.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown TrainConfig key(s): {', '.join(unknown)}; known: {', '.join(fields)}"
            )
        values: dict[str, Any] = {}
        for name, value in d.items():
            kind = fields[name].type
            kind = kind if isinstance(kind, str) else kind.__name__
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "float":
                if isinstance(value, str):
                    with contextlib.suppress(ValueError):
                        value = float(value)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {kind}, got {value!r}")
            values[name] = value
        return cls(**values)


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


@dataclass
class TrainResult:
    """Outcome of ``fit``: final evaluation, throughput and the curves for plotting."""

    step: int
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None


LossFn = Callable[[nn.Module, tuple[Tensor, ...]], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
"""Returns the loss, or (loss, extra per-batch statistics logged beside it, e.g. DPO rewards)."""


def _loss_and_stats(out: Tensor | tuple[Tensor, dict[str, Tensor]]) -> tuple[Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


EvalSets = Mapping[str, Callable[[], Iterable[tuple[Tensor, ...]]]]


def configure_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over trainable parameters: decay matrices/embeddings, not biases or norm gains.

    Group 0 decays (dim >= 2), group 1 does not; frozen parameters are left out entirely so
    fine-tuning stages can freeze parts of the model.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log.info(
        "trainable parameters: %s of %s (%s decayed, %s not decayed)",
        f"{n_trainable:,}",
        f"{n_total:,}",
        f"{sum(p.numel() for p in decay):,}",
        f"{sum(p.numel() for p in no_decay):,}",
    )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def _to_device(batch: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(t.to(device, non_blocking=True) if isinstance(t, Tensor) else t for t in batch)


def _default_tokens(batch: tuple[Tensor, ...]) -> int:
    return batch[0].numel()


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged model reports a large number rather than inf."""
    return math.exp(min(loss, PERPLEXITY_LOSS_CAP))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )


def evaluate_losses(
    model: nn.Module,
    loss_fn: LossFn,
    eval_sets: EvalSets,
    n_batches: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """``<set>_loss`` and ``<set>_perplexity``: the mean loss over each set's first ``n_batches``.

    The evaluation ``fit`` runs, public so that a stage can score a model without training it.
    Runs without gradients in whatever mode the model is in: call ``model.eval()`` first.
    """
    device = torch.device(device)
    metrics: dict[str, float] = {}
    for name, make_batches in eval_sets.items():
        total = torch.zeros((), device=device)
        count = 0
        for batch in islice(make_batches(), n_batches):
            with torch.no_grad(), _autocast(device, precision):
                loss, _ = _loss_and_stats(loss_fn(model, _to_device(batch, device)))
            total += loss.detach().float()
            count += 1
        if count == 0:
            raise ValueError(f"eval set {name!r} yielded no batches")
        mean = (total / count).item()
        metrics[f"{name}_loss"] = mean
        metrics[f"{name}_perplexity"] = perplexity(mean)
    return metrics


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
    return " | ".join(parts)


def _format_eval_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{max_steps}", "eval"]
    parts += [f"{name} {value:.4g}" for name, value in metrics.items()]
    return " | ".join(parts)


def _due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: Batches,
    cfg: TrainConfig,
    *,
    device: torch.device,
    eval_sets: EvalSets | None = None,
    resume_dir: Path | None = None,
    fingerprint: dict | None = None,
    logger: TrainLogger | None = None,
    sample_fn: Callable[[nn.Module], str] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    tokens_in_batch: Callable[[tuple[Tensor, ...]], int] | None = None,
    loss_units: Callable[[tuple[Tensor, ...]], float] | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps, resuming if possible.

    Steps are numbered 1..max_steps; step ``s`` uses ``lr_at(s, cfg)``. At each evaluation
    (every ``eval_every`` steps and at the last) the mean loss over the first
    ``cfg.eval_batches`` batches of every eval set is recorded, ``eval_fn`` adds the stage's own
    metrics (accuracy, rewards...), then ``sample_fn`` runs on the uncompiled model. With
    ``resume_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the last step
    (after that step's evaluation); a later call with the same fingerprint and config continues
    from it and ends bitwise identical to an uninterrupted run (under the same world size; under
    another, equal to float rounding). ``flops_per_token`` (forward + backward) and
    ``peak_flops`` together enable MFU.

    ``loss_units(batch)`` counts what ``loss_fn`` averages over (learned tokens, examples, their
    class weights). Multi-process runs need it when processes' shares of a batch may hold
    different counts: each process's loss is then weighted by its share, so the gradient is that
    of the global batch's mean, as in one process. Without it shares are weighted equally.
    """
    eval_sets = eval_sets or {}
    device = torch.device(device)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 requested but {device} does not support bfloat16")
    world = current_world()
    if world.distributed:
        train_batches.shard(world.rank, world.size)
        if world.size != cfg.nproc_per_node * cfg.nnodes:
            log.warning(
                "running on %d processes, but train.nproc_per_node x train.nnodes = %d",
                world.size,
                cfg.nproc_per_node * cfg.nnodes,
            )
    if not world.is_main:
        logger = None
    torch.manual_seed(cfg.seed)
    model.train()
    run_fingerprint = canonical_json(
        {
            "train_config": {
                k: v for k, v in dataclasses.asdict(cfg).items() if k not in _BOOKKEEPING_FIELDS
            },
            "fingerprint": fingerprint,
        }
    )

    if resume_dir is not None:
        check_resume_dir(Path(resume_dir))
        try:
            json.dumps(train_batches.state_dict())
        except TypeError as e:
            raise TypeError(f"train_batches.state_dict() must be JSON-serialisable: {e}") from e

    history: list[dict] = []
    train_time = 0.0
    tokens_seen = 0
    start_step = 0
    last_metrics: dict[str, float] = {}
    resumed_from: int | None = None
    restored = None
    if resume_dir is not None:
        restored = load_resume_state(
            Path(resume_dir), model=model, fingerprint=run_fingerprint, device=device
        )
        if restored is not None:
            train_batches.load_state_dict(restored.data_state)
            history = restored.history
            train_time = restored.train_time_s
            tokens_seen = restored.tokens_seen
            last_metrics = restored.last_metrics
            start_step = resumed_from = restored.step
            log.info("resumed from step %d/%d (%s)", start_step, cfg.max_steps, resume_dir)
    if world.rank > 0:
        # Dropout masks independent of rank 0's; checkpoints hold rank 0's RNG state only, so
        # with dropout a resumed multi-process run is statistically, not bitwise, the same.
        torch.manual_seed(hash((cfg.seed, start_step, world.rank)))

    parallel = ParallelModel(
        model,
        lambda module: configure_optimizer(module, cfg, device),
        world,
        parallelism=cfg.parallelism,
        compile=cfg.compile,
        device=device,
    )
    if restored is not None:
        parallel.load_optimizer_state(restored.optimizer_state)
    optimizer = parallel.optimizer
    train_model = parallel.train_module
    count_tokens = tokens_in_batch or _default_tokens
    # Under DDP rank 0 alone evaluates and samples (the others wait at the next all-reduce);
    # a sharded model's forward is itself collective, so there every process takes part.
    evaluating = world.is_main or parallel.sharded

    def autocast() -> contextlib.AbstractContextManager:
        return _autocast(device, cfg.precision)

    def evaluate(step: int) -> dict[str, float]:
        if not evaluating:
            return {}
        trained = parallel.trained
        trained.eval()
        try:
            with torch.no_grad():
                metrics = evaluate_losses(
                    parallel.eval_module, loss_fn, eval_sets, cfg.eval_batches, device,
                    cfg.precision,
                )  # fmt: skip
                if eval_fn is not None:
                    with autocast():
                        metrics.update(eval_fn(parallel.eval_module))
                if metrics:
                    log.info(_format_eval_line(step, cfg.max_steps, metrics))
                    if logger is not None:
                        logger.log_metrics(metrics, step)
                if sample_fn is not None:
                    # A sharded forward is collective, and a sample may stop early: rank 0
                    # samples alone, from the gathered model.
                    sampler = parallel.sync_model() if parallel.sharded else trained
                    if world.is_main:
                        sampler.eval()
                        with autocast():
                            text = sample_fn(sampler)
                        log.info("sample at step %d:\n%s", step, text)
                        if logger is not None:
                            logger.log_text(text, f"samples/step_{step:06d}.txt")
        finally:
            trained.train()
            parallel.model.train()
        return metrics

    def result(step: int) -> TrainResult:
        parallel.finish(device)
        throughput = {
            "tokens_per_second": tokens_seen / train_time if train_time > 0 else 0.0,
            "train_time_s": train_time,
        }
        return TrainResult(step, {**last_metrics, **throughput}, history, resumed_from)

    if start_step >= cfg.max_steps:
        log.info("resume state is at step %d >= max_steps; evaluating only", start_step)
        last_metrics = evaluate(start_step)
        return result(start_step)

    accum = cfg.grad_accum_steps
    interval_tokens = 0
    interval_time = 0.0
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(
                total=cfg.max_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                disable=None if world.is_main else True,
                dynamic_ncols=True,
            )
        )
        if not bar.disable:
            stack.enter_context(logging_redirect_tqdm())
        for step in range(start_step + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            micro_losses: list[Tensor] = []
            micro_stats: list[dict[str, Tensor]] = []
            step_tokens = 0
            for micro in range(accum):
                batch = train_batches.next_batch()
                step_tokens += count_tokens(batch)
                share = 1.0
                if world.distributed and loss_units is not None:
                    units = torch.tensor([float(loss_units(batch))], dtype=torch.float64)
                    share = units.item() * world.size / all_reduce_sum(units.to(device)).item()
                with parallel.no_sync(micro < accum - 1):
                    with autocast():
                        loss, stats = _loss_and_stats(
                            loss_fn(train_model, _to_device(batch, device))
                        )
                    (loss * share / accum).backward()
                micro_losses.append((loss.detach().float() * share).reshape(()))
                micro_stats.append(
                    {k: (v.detach().float() * share).reshape(()) for k, v in stats.items()}
                )
            grad_norm = parallel.grad_norm(cfg.grad_clip)
            stat_names = list(micro_stats[0])
            stacked = torch.stack([*micro_losses, *(m[k] for k in stat_names for m in micro_stats)])
            if world.distributed:
                stacked = all_reduce_sum(stacked) / world.size
                step_tokens = int(all_reduce_sum(torch.tensor([step_tokens], device=device)))
            values = torch.cat([stacked, grad_norm.detach().float().reshape(1).to(device)])
            values = values.tolist()
            losses, norm = values[:accum], values[-1]
            stat_means = {
                k: sum(values[accum + i * accum : accum + (i + 1) * accum]) / accum
                for i, k in enumerate(stat_names)
            }
            for i, value in enumerate(losses):
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"non-finite loss {value} at step {step} "
                        f"(micro-batch {i + 1}/{accum}); no update or checkpoint was made"
                    )
            if not math.isfinite(norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm {norm} at step {step} (loss {sum(losses) / accum}); "
                    "no update or checkpoint was made"
                )
            optimizer.step()
            dt = time.perf_counter() - t0
            train_time += dt
            interval_time += dt
            tokens_seen += step_tokens
            interval_tokens += step_tokens
            bar.update(1)

            entry: dict | None = None
            if step == 1 or _due(step, cfg.log_every, cfg.max_steps):
                tps = interval_tokens / interval_time if interval_time > 0 else 0.0
                entry = {
                    "step": step,
                    "lr": lr,
                    "loss": sum(losses) / accum,
                    "grad_norm": norm,
                    "tokens_per_second": tps,
                    "tokens": tokens_seen,
                    "train_time_s": train_time,
                    **stat_means,
                }
                if flops_per_token is not None and peak_flops:
                    entry["mfu"] = flops_per_token * tps / (peak_flops * world.size)
                interval_tokens = 0
                interval_time = 0.0
                history.append(entry)
                log.info(_format_train_line(entry, cfg.max_steps))
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.1e}", refresh=False)
                if logger is not None:
                    logger.log_metrics({k: v for k, v in entry.items() if k != "step"}, step)

            if _due(step, cfg.eval_every, cfg.max_steps):
                last_metrics = evaluate(step)
                if entry is None:
                    entry = {"step": step}
                    history.append(entry)
                entry.update(last_metrics)

            checkpoint_due = cfg.checkpoint_every > 0 and _due(
                step, cfg.checkpoint_every, cfg.max_steps
            )
            if resume_dir is not None and checkpoint_due:
                trained_model = parallel.sync_model()
                optimizer_state = parallel.optimizer_state()
                if world.is_main:
                    save_resume_state(
                        Path(resume_dir),
                        model=trained_model,
                        optimizer_state=optimizer_state,
                        fingerprint=run_fingerprint,
                        state=ResumeState(
                            step=step,
                            data_state=train_batches.state_dict(),
                            history=history,
                            train_time_s=train_time,
                            tokens_seen=tokens_seen,
                            last_metrics=last_metrics,
                        ),
                    )
                    log.debug("checkpoint written at step %d", step)

    return result(cfg.max_steps)
