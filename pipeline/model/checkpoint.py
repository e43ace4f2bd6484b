"""Model checkpoints: a directory holding `model.safetensors` and `config.json`.

Weights are safetensors, so loading a checkpoint never unpickles anything. The LM head is tied
to the token embedding and is stored once, as `tok_emb.weight`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import tiktoken
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data.tokenizer import (
    TokenizerInfo,
    gpt2_tokenizer,
    has_tokenizer,
    load_tokenizer,
    tokenizer_files,
    tokenizer_info,
)
from pipeline.errors import InputError
from pipeline.io import atomic_directory
from pipeline.model.architecture import GPTConfig
from pipeline.model.classifier import GPTClassifier
from pipeline.model.gpt import GPT

FORMAT = "gpt-pipeline-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEY = "lm_head.weight"
TOKENIZER_DIR = "tokenizer"
_RESERVED_KEYS = ("format", "version", "model")


def _unwrap(model: nn.Module) -> GPT:
    """The GPT inside a torch.compile or DistributedDataParallel wrapper."""
    while not isinstance(model, GPT):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a GPT model, got {type(model).__name__}")
        model = inner
    return model


def _check_replaceable(target: Path) -> None:
    """Refuse to delete something that is not a checkpoint (say, a mistyped results/ path)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a checkpoint directory")
    entries = {p.name for p in target.iterdir()}
    if entries and not entries & {CONFIG_FILE, WEIGHTS_FILE}:
        raise FileExistsError(
            f"{target} exists and does not look like a checkpoint (no {CONFIG_FILE} or "
            f"{WEIGHTS_FILE}); refusing to replace it"
        )


def _extra_file_targets(extra_files: Mapping[str, str | Path]) -> dict[PurePosixPath, Path]:
    """Validated relative destinations, so an extra file cannot escape or shadow the checkpoint."""
    targets = {}
    for name, source in extra_files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InputError(
                f"extra file name {name!r} must be a relative path inside the checkpoint"
            )
        if rel.parts[0] in (WEIGHTS_FILE, CONFIG_FILE):
            raise InputError(f"extra file name {name!r} clashes with the checkpoint's own files")
        targets[rel] = Path(source)
    return targets


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write weights and config to `directory`, atomically.

    Everything is written to a temporary sibling directory first and renamed into place, so a
    crash mid-write never leaves a half-written checkpoint, and an existing checkpoint at
    `directory` is replaced only once the new one is complete. `extra_files` maps relative
    names inside the checkpoint (e.g. "tokenizer/vocab.bpe") to files copied there, such as the
    tokenizer the model was trained with.
    """
    gpt = _unwrap(model)
    if gpt.lm_head.weight is not gpt.tok_emb.weight:
        raise InputError("lm_head.weight is not tied to tok_emb.weight; this format stores it once")
    metadata = dict(metadata or {})
    clashes = sorted(set(metadata) & set(_RESERVED_KEYS))
    if clashes:
        raise InputError(f"metadata keys {clashes} are reserved by the checkpoint format")
    config_text = json.dumps(
        {"format": FORMAT, "version": VERSION, "model": gpt.config.to_dict(), **metadata},
        indent=2,
    )

    extras = _extra_file_targets(extra_files or {})

    target = Path(directory)
    _check_replaceable(target)
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in gpt.state_dict().items()
        if name != TIED_KEY
    }
    with atomic_directory(target) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        for rel, source in extras.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / rel)
    return target


def load_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` (format, version, model config and the caller's metadata)."""
    directory = Path(directory)
    if directory.is_file():  # every command's --checkpoint reads this first
        raise InputError(f"{directory} is a file, not a checkpoint directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config {path} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"checkpoint config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{path} is not a {FORMAT} config (its 'format' is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise InputError(
            f"{path} has checkpoint version {config.get('version')!r}; "
            f"this code reads version {VERSION}"
        )
    if not isinstance(config.get("model"), dict):
        raise InputError(f"{path} has no 'model' section with the GPTConfig fields")
    return config


def recorded_template(checkpoint_config: Mapping[str, Any]) -> str | None:
    """The prompt template an instruction-tuned checkpoint's config.json records, or None."""
    return checkpoint_config.get("instruct", {}).get("template")


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy a checkpoint's weights into `model`, checking every tensor's name and shape first."""
    gpt = _unwrap(model)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} are missing")
    device = gpt.tok_emb.weight.device
    try:
        tensors = load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"checkpoint weights {path} could not be read: {exc}") from exc

    expected = {name: t.shape for name, t in gpt.state_dict().items() if name != TIED_KEY}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise InputError(f"{path} is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise InputError(f"{path} has unexpected tensor(s): {', '.join(unexpected)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise InputError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"the model expects {tuple(shape)}"
            )
    result = gpt.load_state_dict(tensors, strict=False)
    assert list(result.missing_keys) == [TIED_KEY] and not result.unexpected_keys
    assert gpt.lm_head.weight is gpt.tok_emb.weight


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT rebuilt from a checkpoint written by `save_checkpoint` (sdpa attention until the
    caller picks the run's backend with `set_attention`).

    A checkpoint whose config has a `classifier` section ({labels, pooling}) gives a
    `GPTClassifier`.
    """
    directory = Path(directory)
    saved = load_checkpoint_config(directory)
    try:
        config = GPTConfig.from_dict(dict(saved["model"]))
    except ValueError as exc:
        raise InputError(f"{directory / CONFIG_FILE}: {exc}") from exc
    head = saved.get("classifier")
    with torch.device(device):
        if head is None:
            model = GPT(config)
        else:
            try:
                model = GPTClassifier(config, head["labels"], head.get("pooling", "last"))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(
                    f"{directory / CONFIG_FILE}: bad 'classifier' section {head!r}: {exc}"
                ) from exc
    load_weights(model, directory)
    return model


def tokenizer_extra_files(tokenizer_dir: str | Path) -> dict[str, Path]:
    """`extra_files` for `save_checkpoint` that ship the tokenizer in `tokenizer_dir` (the
    tokenizer stage's files, or GPT-2's encoder.json + vocab.bpe) inside the checkpoint."""
    return {f"{TOKENIZER_DIR}/{path.name}": path for path in tokenizer_files(Path(tokenizer_dir))}


def checkpoint_tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """`extra_files` that carry a checkpoint's tokenizer over to a model fine-tuned from it."""
    tokenizer_dir = Path(directory) / TOKENIZER_DIR
    return tokenizer_extra_files(tokenizer_dir) if has_tokenizer(tokenizer_dir) else {}


def checkpoint_tokenizer(directory: str | Path) -> tiktoken.Encoding:
    """The tokenizer saved beside the weights, else tiktoken's own GPT-2 encoding."""
    tokenizer_dir = Path(directory) / TOKENIZER_DIR
    return load_tokenizer(tokenizer_dir) if has_tokenizer(tokenizer_dir) else gpt2_tokenizer()


def checkpoint_tokenizer_info(directory: str | Path) -> TokenizerInfo | None:
    """The identity of the tokenizer saved beside the weights, if one is."""
    tokenizer_dir = Path(directory) / TOKENIZER_DIR
    return tokenizer_info(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None
