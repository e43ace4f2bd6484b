"""GPT-2 weights from and to Hugging Face: a GPT2LMHeadModel directory in, one out.

In: config.json plus model.safetensors or pytorch_model.bin (sharded or not, old checkpoints'
mask buffers and all); out: what `transformers.GPT2LMHeadModel.from_pretrained` loads. The
renaming and its checks are shared with the other formats (`pipeline.model.gpt2_tensors`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.data.hf_tokenizer import tokenizer_config
from pipeline.data.tokenizer import ENCODING_FILE, END_OF_TEXT, END_OF_TEXT_ID, HF_FILE
from pipeline.errors import InputError
from pipeline.io import atomic_directory
from pipeline.model.architecture import HF_NAME_FOR_PRESET, GPTConfig
from pipeline.model.checkpoint import (
    TIED_KEY,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    load_checkpoint,
    load_checkpoint_config,
)
from pipeline.model.gpt import GPT
from pipeline.model.gpt2_tensors import (
    build_gpt,
    check_dir,
    map_tensors,
    name_table,
    our_shapes,
    read_json,
    transposed,
    unchanged,
)

__all__ = [
    "HF_NAME_FOR_PRESET",
    "PRESET_FOR_HF_NAME",
    "config_from_hf",
    "export_hf",
    "hf_config",
    "hf_dir_config",
    "hf_weight_files",
    "load_hf_gpt2",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "untie_lm_head",
]

log = logging.getLogger("pipeline.model.hf")

# Also under the hub's current names (openai-community/gpt2, ...).
PRESET_FOR_HF_NAME: dict[str, str] = {
    name: preset
    for preset, hf in HF_NAME_FOR_PRESET.items()
    for name in (hf, f"openai-community/{hf}")
}

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_BIN = "pytorch_model.bin"
HF_PREFIX = "transformer."
HF_LM_HEAD = "lm_head.weight"
# HF's own tokenizer file names for OpenAI's encoder.json and vocab.bpe.
HF_TOKENIZER_NAMES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
# Written into the exported safetensors header, so a re-export may replace its own output only.
EXPORT_METADATA = {"exported_by": "gpt-pipeline"}

# What GPT2Config assumes for a key its config.json leaves out (transformers' defaults).
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
# Causal-mask buffers that transformers < 4.31 saved with every attention layer.
HF_MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# --- configs ----------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any]) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 `config.json`; refuses what our GPT cannot compute.

    Dropouts carry over (resid_pdrop is our `dropout`, attn_pdrop our `attn_dropout`; with it,
    `model.attention: auto` trains with sdpa, since the fused op has no attention dropout).
    """
    c = {**_HF_DEFAULTS, **hf}
    if "n_positions" not in hf and "n_ctx" in hf:  # very old configs
        c["n_positions"] = hf["n_ctx"]
    problems = []
    if c.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {c['model_type']!r}, not 'gpt2'")
    if c["activation_function"] not in _GELU_TANH:
        problems.append(
            f"activation_function is {c['activation_function']!r}; "
            f"our GPT uses the tanh GELU ({' or '.join(_GELU_TANH)})"
        )
    if c["layer_norm_epsilon"] != 1e-5:
        problems.append(f"layer_norm_epsilon is {c['layer_norm_epsilon']}; our GPT uses 1e-5")
    n_embd = c["n_embd"]
    if c["n_inner"] is not None and c["n_inner"] != 4 * n_embd:
        problems.append(f"n_inner is {c['n_inner']}; our GPT's MLP is 4 * n_embd = {4 * n_embd}")
    if not c["scale_attn_weights"]:
        problems.append("scale_attn_weights is false; our GPT scales scores by 1/sqrt(head_dim)")
    for key in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if c[key]:
            problems.append(f"{key} is true; our GPT does not implement it")
    if problems:
        raise InputError("unsupported GPT-2 config: " + "; ".join(problems))

    dropout, attn_dropout = c["resid_pdrop"], c["attn_pdrop"]
    if c["embd_pdrop"] != dropout:
        log.info(
            "embd_pdrop %s differs from resid_pdrop %s; our GPT uses one dropout: %s",
            c["embd_pdrop"],
            dropout,
            dropout,
        )
    return GPTConfig(
        vocab_size=c["vocab_size"],
        context_length=c["n_positions"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=n_embd,
        dropout=dropout,
        attn_dropout=attn_dropout,
        qkv_bias=True,
    )


def hf_config(config: GPTConfig, eot_token: int | None = END_OF_TEXT_ID) -> dict[str, Any]:
    """The Hugging Face `config.json` of a GPT2LMHeadModel with our model's dimensions."""
    if eot_token is not None and not 0 <= eot_token < config.vocab_size:
        eot_token = None  # HF rejects special ids outside the vocabulary
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
    }


# --- weights ----------------------------------------------------------------------------------


def state_dict_from_hf(
    tensors: Mapping[str, Tensor],
    config: GPTConfig,
    source: str | Path = "state dict",
    require_lm_head: bool = False,
) -> dict[str, Tensor]:
    """Our state dict (without the tied lm_head) from Hugging Face GPT-2 tensors.

    Accepts keys with or without the "transformer." prefix, skips the causal-mask buffers old
    checkpoints carry, and accepts `lm_head.weight` only if it equals the token embedding.
    """
    # Name everything the way most of the file does, so errors quote the file's own names.
    prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in tensors) else ""
    renamed: dict[str, Tensor] = {}
    for key, t in tensors.items():
        name = key if key == HF_LM_HEAD else prefix + key.removeprefix(HF_PREFIX)
        if HF_MASK_BUFFERS.fullmatch(key.removeprefix(HF_PREFIX)):
            continue
        renamed[f"{key} (duplicate)" if name in renamed else name] = t

    shapes = our_shapes(config)
    expected = {}
    for ours, hf, _, conv in name_table(config.n_layer):
        shape = transposed(shapes[ours]) if conv else shapes[ours]
        expected[prefix + hf] = (ours, shape, _conv1d_to_linear if conv else unchanged)
    if HF_LM_HEAD in renamed or require_lm_head:
        expected[HF_LM_HEAD] = (HF_LM_HEAD, shapes["tok_emb.weight"], unchanged)
    return untie_lm_head(map_tensors(renamed, expected, config, source), source, prefix)


def untie_lm_head(state: dict[str, Tensor], source: str | Path, prefix: str) -> dict[str, Tensor]:
    """`state` without its `lm_head.weight`, which must equal the token embedding (tied)."""
    lm_head = state.pop(HF_LM_HEAD, None)
    if lm_head is not None and not torch.equal(lm_head, state["tok_emb.weight"]):
        raise InputError(
            f"{source}: lm_head.weight differs from {prefix}wte.weight; our GPT ties the LM head "
            f"to the token embedding and cannot hold an untied one"
        )
    return state


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """Hugging Face GPT2LMHeadModel tensors ("transformer.*", Conv1D (in, out)) for our GPT.

    The tied LM head is left out, as transformers writes it. Without qkv biases, zeros stand in.
    """
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items() if k != TIED_KEY}
    out = {}
    for ours, hf, _, conv in name_table(model.config.n_layer):
        t = state.pop(ours, None)
        if t is None and ours.endswith("attn.qkv.bias") and not model.config.qkv_bias:
            t = torch.zeros(3 * model.config.n_embd, dtype=model.tok_emb.weight.dtype)
        if t is None:
            raise InputError(f"model has no tensor {ours}")
        out[HF_PREFIX + hf] = (t.t() if conv else t).contiguous()
    if state:
        raise InputError(
            f"model has tensors a GPT2LMHeadModel cannot hold: {', '.join(sorted(state))}"
        )
    return out


def _conv1d_to_linear(t: Tensor) -> Tensor:
    return t.t().contiguous()


# --- reading ----------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} could not be read as safetensors (truncated?): {exc}") from exc


def _read_bin(path: Path) -> dict[str, Tensor]:
    """A pytorch_model.bin state dict, unpickled with weights_only so it cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is mostly advice to retry unsafely; keep only the offending object
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it references {found.group(1)}" if found else type(exc).__name__
        raise InputError(
            f"{path} is not a plain tensor state dict and was not unpickled "
            f"(torch.load(weights_only=True) refused it: {reason})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} could not be read by torch.load (truncated?): {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path} does not hold a state dict of named tensors")
    return dict(state)


def _shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` lists, each checked to exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index} has no 'weight_map'")
    paths = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} (a shard listed in {index.name}) is missing")
    return paths


def _read_sharded(index: Path, read: Callable[[Path], dict[str, Tensor]]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for path in _shards(index):
        tensors.update(read(path))
    return tensors


def _hf_weights(src: Path) -> tuple[Path, Callable[[Path], dict[str, Tensor]], bool]:
    """(file, reader, sharded): safetensors if present, else pytorch_model.bin; one place decides,
    so the files hashed for provenance are the files read."""
    for name, read in ((HF_SAFETENSORS, _read_safetensors), (HF_BIN, _read_bin)):
        if (src / name).is_file():
            return src / name, read, False
        index = src / f"{name}.index.json"
        if index.is_file():
            return index, read, True
    raise FileNotFoundError(f"{src} has no {HF_SAFETENSORS} or {HF_BIN} (nor a sharded index)")


def _read_hf_weights(src: Path) -> tuple[Path, dict[str, Tensor]]:
    """(file, tensors) from safetensors if present, else pytorch_model.bin; sharded or not."""
    path, read, sharded = _hf_weights(src)
    return path, _read_sharded(path, read) if sharded else read(path)


def hf_dir_config(src: Path) -> tuple[dict[str, Any], GPTConfig]:
    """(config.json, our GPTConfig for it) of a Hugging Face GPT-2 directory."""
    hf = read_json(src / HF_CONFIG)
    try:
        return hf, config_from_hf(hf)
    except ValueError as exc:
        raise InputError(f"{src / HF_CONFIG}: {exc}") from exc


def load_hf_gpt2(src: Path) -> GPT:
    """A GPT from a local Hugging Face GPT-2 directory (config.json + safetensors or .bin)."""
    src = Path(src)
    check_dir(src)
    hf, config = hf_dir_config(src)
    path, tensors = _read_hf_weights(src)
    require_lm_head = not hf.get("tie_word_embeddings", True)
    state = state_dict_from_hf(tensors, config, source=path, require_lm_head=require_lm_head)
    return build_gpt(config, state)


def hf_weight_files(src: Path) -> list[Path]:
    """The files `load_hf_gpt2` reads tensors from: the weights file, or an index and its shards."""
    path, _, sharded = _hf_weights(src)
    return [path, *_shards(path)] if sharded else [path]


# --- export -----------------------------------------------------------------------------------


def _is_previous_export(out: Path) -> bool:
    try:
        with safe_open(out / HF_SAFETENSORS, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return all(metadata.get(k) == v for k, v in EXPORT_METADATA.items())


def _check_export_target(out: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not _is_previous_export(out):
        raise FileExistsError(
            f"{out} is not empty and is not an earlier export-hf output; refusing to replace it"
        )


def _export_tokenizer(tok_dir: Path, out: Path, context_length: int) -> None:
    """The checkpoint's tokenizer for `transformers`: our tokenizer.json read by the fast class
    (pipeline/data/hf_tokenizer.py), or GPT-2's old files as vocab.json + merges.txt; none if
    the checkpoint carries none."""
    encoding_file = tok_dir / ENCODING_FILE
    if encoding_file.is_file():
        specials = json.loads(encoding_file.read_text())["special_tokens"]
        shutil.copyfile(tok_dir / HF_FILE, out / HF_FILE)
        config = {**tokenizer_config(specials, END_OF_TEXT), "model_max_length": context_length}
    elif all((tok_dir / name).is_file() for name in HF_TOKENIZER_NAMES):
        for ours, theirs in HF_TOKENIZER_NAMES.items():
            shutil.copyfile(tok_dir / ours, out / theirs)
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": context_length,
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "add_prefix_space": False,
        }
    else:
        return
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Write our checkpoint as a directory `transformers.GPT2LMHeadModel.from_pretrained` loads.

    config.json + model.safetensors, plus the checkpoint's tokenizer (tokenizer.json, or GPT-2's
    vocab.json / merges.txt, and tokenizer_config.json) when it has one. Written atomically;
    only language models can be exported.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    meta = load_checkpoint_config(checkpoint)
    _check_export_target(out)
    weights = checkpoint / WEIGHTS_FILE
    try:
        with safe_open(weights, "pt") as f:
            heads = sorted(k for k in f.keys() if k.startswith("classifier."))  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise InputError(f"checkpoint weights {weights} could not be read: {exc}") from exc
    if heads or "classifier" in meta:
        raise InputError(
            f"{checkpoint} is a classifier ({', '.join(heads) or 'classifier section in config'});"
            f" only language models export to GPT2LMHeadModel"
        )
    model = load_checkpoint(checkpoint)
    if type(model) is not GPT:
        raise InputError(
            f"{checkpoint} holds a {type(model).__name__}, not a plain GPT; only language "
            f"models export to GPT2LMHeadModel"
        )
    tensors = state_dict_to_hf(model)

    tokenizer = meta.get("tokenizer")
    eot = END_OF_TEXT_ID
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("eot_token"), int):
        eot = tokenizer["eot_token"]
    config = hf_config(model.config, eot_token=eot)
    with atomic_directory(out) as tmp:
        save_file(tensors, tmp / HF_SAFETENSORS, metadata={"format": "pt", **EXPORT_METADATA})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _export_tokenizer(checkpoint / TOKENIZER_DIR, tmp, model.config.context_length)
    return out
