"""Helpers the training stages share: device and attention, train settings, start checkpoints,
record splits, trainable parts, resume fingerprints, and the stage's last writes."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from pipeline.data.instruct import load_records, split_records
from pipeline.data.tokenizer import gpt2_tokenizer, has_tokenizer
from pipeline.errors import InputError
from pipeline.evaluate.diversity import compare_answers
from pipeline.io import atomic_write_json, sha256_file
from pipeline.model import GPT, load_checkpoint
from pipeline.model.attention import AttentionWorkload, choose_attention
from pipeline.model.checkpoint import (
    TOKENIZER_DIR,
    checkpoint_tokenizer,
    checkpoint_tokenizer_info,
)
from pipeline.model.gpt2_import import (
    LAYOUT_CHECKPOINT,
    gpt2_config,
    gpt2_layout,
    load_gpt2_as,
    weight_files,
)
from pipeline.model.lora import apply_lora
from pipeline.model.weights import PRESET_FOR_WEIGHTS_NAME, find_weights
from pipeline.settings import (
    Config,
    DpoSettings,
    InstructSettings,
    ModelSettings,
    StageConfig,
    TrainSettings,
)
from pipeline.settings.schema import to_plain
from pipeline.stages.registry import FineTuningSection, init_checkpoint_path
from pipeline.train import pick_device
from pipeline.train.device import resolve_precision
from pipeline.train.distributed import current_world

if TYPE_CHECKING:
    import tiktoken

    from pipeline.tracking import StageRun

log = logging.getLogger("pipeline.stages")

Instructions = TypeVar("Instructions", InstructSettings, DpoSettings)
"""The sections of the stages that tune on instruction records."""
FineTuning = TypeVar("FineTuning", bound=FineTuningSection)
"""The section of a stage that starts from a checkpoint."""


def stage_device(config: Config) -> torch.device:
    """The configured device (under torchrun on GPUs, this process's GPU)."""
    device = pick_device(config.device)
    if device.type == "cuda" and device.index is None and current_world().distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def use_attention(model: GPT, config: Config, device: torch.device, train: TrainSettings) -> str:
    """Switch `model` to the backend `model.attention` asks for on `device` for training with
    `train` (`auto`: fused on the CPU, on a GPU where measured faster; see
    `choose_attention`), saying which and why; returns its name."""
    cfg = model.config
    bf16 = resolve_precision(train.precision, device, cfg.n_embd) == "bf16"
    workload = AttentionWorkload(
        torch.bfloat16 if bf16 else torch.float32, cfg.n_embd // cfg.n_head, cfg.context_length
    )
    choice = choose_attention(config.model.attention, device, cfg.attn_dropout, workload=workload)
    model.set_attention(choice.name, choice.reason)
    log.info("attention: %s (%s)", choice.name, choice.reason)
    return choice.name


def epoch_train_settings(train: TrainSettings, epochs: int, batches_per_epoch: int
                         ) -> tuple[TrainSettings, int]:  # fmt: skip
    """(settings, optimizer steps per epoch) for a stage counted in epochs: an optimizer step
    draws grad_accum_steps batches, and evaluation falls on every epoch's end. A `max_steps` or
    `eval_every` in the config wins."""
    steps_per_epoch = max(1, -(-batches_per_epoch // train.grad_accum_steps))
    settings = dataclasses.replace(
        train,
        max_steps=train.max_steps or epochs * steps_per_epoch,
        eval_every=train.eval_every or steps_per_epoch,
    )
    return settings, steps_per_epoch


def seeded(seed: int, device: torch.device) -> torch.Generator:
    """A generator of its own for sampled text, so sampling never moves the training RNG."""
    return torch.Generator(device=device).manual_seed(seed)


def check_splits(section: str, **splits: Sized) -> None:
    """Every split must hold records; an empty one is named with the key that sizes it."""
    for name, split in splits.items():
        if len(split) == 0:
            raise InputError(
                f"{section}.split gives an empty {name} split; adjust {section}.split "
                "(train and val fractions; test gets the rest)"
            )


def init_checkpoint(config: Config, init_from: str, key: str = "init_from") -> Path:
    """The directory `init_from` (the setting `key`) names, checked to hold weights: a stage's
    checkpoint, GPT-2 weights by name (under `paths.weights`, as pretrain finds them) or a
    directory of our checkpoint or GPT-2 weights in Hugging Face's or OpenAI's layout."""
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        return find_weights(init_from, config.paths.weights, key)
    directory = init_checkpoint_path(config, init_from)
    try:
        weight_files(directory)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{key} {init_from!r}: no checkpoint at {directory} ({exc}); run that stage first "
            "or give a directory of our checkpoint or of GPT-2 weights"
        ) from None
    return directory


def start_tokenizer(config: Config, start: Path) -> tuple[tiktoken.Encoding, Path | None]:
    """The tokenizer a stage starting at `start` encodes with, and where its files are (the
    stage's checkpoint carries them on): the start checkpoint's own, or for GPT-2 weights in
    another layout the downloaded GPT-2 BPE files."""
    if gpt2_layout(start) == LAYOUT_CHECKPOINT:
        carried = start / TOKENIZER_DIR
        return checkpoint_tokenizer(start), carried if has_tokenizer(carried) else None
    return gpt2_tokenizer(config.paths.bpe), config.paths.bpe


def weights_sha256(directory: Path) -> str:
    """Identity of starting weights (our checkpoint, Hugging Face's or OpenAI's layout) for
    resume fingerprints and provenance: the weights file's sha256 (for Hugging Face's, the
    value the hub shows), or for several files a sha256 over their names and sha256s."""
    files = weight_files(directory)
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def instruction_splits(
    config: StageConfig[Instructions], required: Sequence[str], out_dir: Path
) -> tuple[list[dict], list[dict], list[dict], int]:
    """(train, val, test, skipped) of a stage's instruction records: validated (invalid ones
    skipped and logged if the section says so), split with the seed, written to `out_dir`."""
    section = config.section
    data_path = config.paths.source(section.data)
    records, skipped = load_records(data_path, required=required, skip_invalid=section.skip_invalid)
    for index, reason in skipped:
        log.warning("%s: skipped record %d: %s", data_path, index, reason)
    train, val, test = split_records(
        records, section.split.train, section.split.val, seed=config.seed
    )
    check_splits(config.stage, train=train, val=val, test=test)
    for name, split in (("train", train), ("val", val), ("test", test)):
        atomic_write_json(out_dir / f"{name}.json", split)
    log.info("records: %d train, %d val, %d test", len(train), len(val), len(test))
    return train, val, test, len(skipped)


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
"""Each split's MLflow dataset context."""


def split_datasets(
    source: Path, splits: Mapping[str, tuple[Path, Sized]]
) -> dict[str, list[dict[str, Any]]]:
    """A source file's splits (name -> the split file written and its records) as the run's
    dataset inputs, one per context, each named after the source. The digest is the split file's
    sha256, the source's is in the profile with the rows: MLflow keeps one dataset (one profile,
    one context per run) per name and digest, so the source's own sha256 would merge the three
    splits, and the counts of the first run's split settings would stand for every run's."""
    source_sha256 = sha256_file(source)
    return {
        SPLIT_CONTEXTS[name]: [
            {
                "name": source.name,
                "source": source,
                "digest": sha256_file(path),
                "profile": {"rows": len(records), "source_sha256": source_sha256},
            }
        ]
        for name, (path, records) in splits.items()
    }


def instruction_datasets(
    config: StageConfig[Instructions], out_dir: Path, *splits: Sized
) -> dict[str, list[dict[str, Any]]]:
    """`instruction_splits`' train, val and test (written to `out_dir`) as dataset inputs."""
    source = config.paths.source(config.section.data)
    files = {name: out_dir / f"{name}.json" for name in SPLIT_CONTEXTS}
    return split_datasets(
        source, {name: (files[name], records) for name, records in zip(files, splits, strict=True)}
    )


def load_language_model(config: StageConfig[FineTuning], device: torch.device) -> tuple[GPT, Path]:
    """The section's start checkpoint as a language model (not a classifier), running the
    configured attention, and its path."""
    start = init_checkpoint(config, config.section.init_from, f"{config.stage}.init_from")
    if gpt2_layout(start) == LAYOUT_CHECKPOINT:
        model = load_checkpoint(start, device=device)
    else:
        model = weights_model(start, config.model).to(device)
    if type(model) is not GPT:
        raise InputError(f"{config.stage}.init_from {start} is not a language-model checkpoint")
    use_attention(model, config, device, config.section.train)
    return model, start


def weights_model(start: Path, model: ModelSettings) -> GPT:
    """GPT-2 weights in Hugging Face's or OpenAI's layout with the model section's dropouts, as
    pretrain takes them: their own config says GPT-2's training value (Hugging Face's 0.1)."""
    architecture = dataclasses.replace(
        gpt2_config(start), dropout=model.dropout, attn_dropout=model.attn_dropout
    )
    return load_gpt2_as(start, architecture)


def make_trainable(model: GPT, config: StageConfig[Instructions]) -> tuple[int, int]:
    """Full fine-tuning, or LoRA adapters (seeded) on a frozen model, as the section says;
    returns (trainable, total) parameter counts, also logged."""
    method, lora = config.section.method, config.section.lora
    torch.manual_seed(config.seed)  # LoRA's A matrices
    if method == "lora":
        stats = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
        trainable, total = stats.trainable, stats.total
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
    log.info(
        "%s %s: %s of %s parameters trainable (%.2f%%)",
        config.stage, method, f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )  # fmt: skip
    return trainable, total


def fine_tuning_fingerprint(
    config: StageConfig[FineTuning],
    start: Path,
    model: GPT,
    reporting_keys: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """What identifies a fine-tuning run for resume: its start weights, data, model and section.

    `train` is fingerprinted by `fit` itself; `reporting_keys` only shape the stage's reports
    (sample counts, generation settings), so changing them keeps the resume state.
    """
    skipped = {"train", *reporting_keys}
    section = to_plain(config.section)
    tokenizer = checkpoint_tokenizer_info(start)
    return {
        "init_weights": weights_sha256(start),
        "tokenizer": tokenizer.sha256 if tokenizer else None,
        "data": sha256_file(config.paths.source(config.section.data)),
        **extra,
        "section": {k: v for k, v in section.items() if k not in skipped},
        "model": model.config.to_dict(),
    }


def report_answer_diversity(
    stage: str,
    before: Sequence[str],
    after: Sequence[str],
    tokenizer: tiktoken.Encoding,
    tracker: StageRun,
) -> dict[str, float]:
    """Length, distinct-n and most-common-answer share of the test answers before and after the
    stage (`compare_answers`); collapsed answers are a stage warning (`StageRun.warn`)."""
    metrics, reasons = compare_answers(before, after, lambda a: len(tokenizer.encode_ordinary(a)))
    keys = ("answer_words", "distinct_2", "most_common_answer_share")
    log.info(
        "%s test answers before -> after: %.1f -> %.1f words, distinct-2 %.3f -> %.3f, "
        "most common answer's share %.2f -> %.2f",
        stage, *(metrics[f"test_{k}_{when}"] for k in keys for when in ("before", "after")),
    )  # fmt: skip
    if reasons:
        tracker.warn(f"{stage}: the test answers collapsed: {'; '.join(reasons)}", log)
    return metrics
