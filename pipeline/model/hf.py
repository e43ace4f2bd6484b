"""GPT-2 weights in and out: Hugging Face and OpenAI TensorFlow checkpoints in, Hugging Face out.

Our GPT keeps GPT-2's module layout, so converting is renaming plus one transpose: GPT-2's Conv1D
stores its weight as (in, out), nn.Linear as (out, in). Every tensor's name and shape is checked
against the config before anything is loaded, and all problems are reported at once, so a wrong
config or a truncated download fails with one readable message instead of a half-loaded model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.data.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, GPT2_BPE_FILES
from pipeline.errors import InputError
from pipeline.io import atomic_directory, sha256_bytes
from pipeline.model.checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
)
from pipeline.model.checkpoint import (
    TIED_KEY,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
)
from pipeline.model.config import HF_NAME_FOR_PRESET, GPTConfig
from pipeline.model.gpt import GPT

__all__ = [
    "HF_NAME_FOR_PRESET",
    "PRESET_FOR_HF_NAME",
    "TensorFlowRequiredError",
    "config_from_hf",
    "config_from_tf_hparams",
    "export_hf",
    "gpt2_config",
    "gpt2_layout",
    "hf_config",
    "import_gpt2",
    "load_gpt2",
    "load_hf_gpt2",
    "load_tf_gpt2",
    "state_dict_from_hf",
    "state_dict_from_tf",
    "state_dict_to_hf",
    "weight_files",
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
TF_HPARAMS = "hparams.json"
# What gpt2_layout calls the three kinds of weights directory.
LAYOUT_CHECKPOINT, LAYOUT_HF, LAYOUT_TF = "checkpoint", "huggingface", "tensorflow"
TF_INSTALL_HINT = (
    "reading OpenAI's TensorFlow checkpoint needs tensorflow: pip install 'gpt-pipeline[tf]'"
)
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
_HF_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# One row per tensor: our name, Hugging Face's (without "transformer."), OpenAI's TF variable,
# and whether it is a Conv1D weight, stored transposed ((in, out); TF adds a leading 1).
_TOP = (
    ("tok_emb.weight", "wte.weight", "model/wte", False),
    ("pos_emb.weight", "wpe.weight", "model/wpe", False),
    ("ln_f.weight", "ln_f.weight", "model/ln_f/g", False),
    ("ln_f.bias", "ln_f.bias", "model/ln_f/b", False),
)
_BLOCK = (
    ("ln_1.weight", "ln_1.weight", "ln_1/g", False),
    ("ln_1.bias", "ln_1.bias", "ln_1/b", False),
    ("attn.qkv.weight", "attn.c_attn.weight", "attn/c_attn/w", True),
    ("attn.qkv.bias", "attn.c_attn.bias", "attn/c_attn/b", False),
    ("attn.proj.weight", "attn.c_proj.weight", "attn/c_proj/w", True),
    ("attn.proj.bias", "attn.c_proj.bias", "attn/c_proj/b", False),
    ("ln_2.weight", "ln_2.weight", "ln_2/g", False),
    ("ln_2.bias", "ln_2.bias", "ln_2/b", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", "mlp/c_fc/w", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", "mlp/c_fc/b", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", "mlp/c_proj/w", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", "mlp/c_proj/b", False),
)


class TensorFlowRequiredError(ImportError):
    """Raised for an OpenAI TensorFlow checkpoint when the optional tensorflow is missing."""


def _name_table(n_layer: int) -> list[tuple[str, str, str, bool]]:
    rows = list(_TOP)
    for i in range(n_layer):
        rows += [(f"blocks.{i}.{o}", f"h.{i}.{h}", f"model/h{i}/{t}", c) for o, h, t, c in _BLOCK]
    return rows


def _our_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, qkv_bias=True))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name != TIED_KEY}


def _describe(config: GPTConfig) -> str:
    return (
        f"vocab_size={config.vocab_size}, context_length={config.context_length}, "
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}"
    )


def _map_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[str, tuple[int, ...], Callable[[Tensor], Tensor]]],
    config: GPTConfig,
    source: str | Path,
) -> dict[str, Tensor]:
    """Rename and reshape `tensors` ({source name: (our name, source shape, convert)}).

    Checks everything first and raises one ValueError listing every missing, unexpected and
    mis-shaped tensor, so a wrong config is diagnosed in one go.
    """
    missing = [name for name in expected if name not in tensors]
    unexpected = sorted(name for name in tensors if name not in expected)
    misshaped = [
        f"{name} (expected {shape}, found {tuple(tensors[name].shape)})"
        for name, (_, shape, _) in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not hold a GPT-2 with {_describe(config)}:"]
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshaped),
        ):
            if names:
                lines.append(f"  {len(names)} {label}: {', '.join(names)}")
        raise InputError("\n".join(lines))
    for name in expected:
        if not tensors[name].is_floating_point():
            raise InputError(f"{source}: tensor {name} has dtype {tensors[name].dtype}, not float")
    return {ours: convert(tensors[name]) for name, (ours, _, convert) in expected.items()}


def _transposed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1]


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


def config_from_tf_hparams(hparams: Mapping[str, Any]) -> GPTConfig:
    """Our GPTConfig for OpenAI's `hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    missing = [key for key in keys if key not in hparams]
    if missing:
        raise InputError(f"hparams lack {', '.join(missing)}")
    return GPTConfig(
        vocab_size=hparams["n_vocab"],
        context_length=hparams["n_ctx"],
        n_layer=hparams["n_layer"],
        n_head=hparams["n_head"],
        n_embd=hparams["n_embd"],
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
        if _HF_IGNORED.fullmatch(key.removeprefix(HF_PREFIX)):
            continue
        renamed[f"{key} (duplicate)" if name in renamed else name] = t

    shapes = _our_shapes(config)
    expected = {}
    for ours, hf, _, conv in _name_table(config.n_layer):
        shape = _transposed(shapes[ours]) if conv else shapes[ours]
        expected[prefix + hf] = (ours, shape, _conv1d_to_linear if conv else _same)
    if HF_LM_HEAD in renamed or require_lm_head:
        expected[HF_LM_HEAD] = (HF_LM_HEAD, shapes["tok_emb.weight"], _same)
    return _untie(_map_tensors(renamed, expected, config, source), source, prefix)


def _untie(state: dict[str, Tensor], source: str | Path, prefix: str) -> dict[str, Tensor]:
    """`state` without its `lm_head.weight`, which must equal the token embedding (tied)."""
    lm_head = state.pop(HF_LM_HEAD, None)
    if lm_head is not None and not torch.equal(lm_head, state["tok_emb.weight"]):
        raise InputError(
            f"{source}: lm_head.weight differs from {prefix}wte.weight; our GPT ties the LM head "
            f"to the token embedding and cannot hold an untied one"
        )
    return state


NANOGPT_COMPILED_PREFIX = "_orig_mod."
"""What `torch.compile` puts before every name in the state dict nanoGPT's train.py saves."""


def state_dict_from_nanogpt(
    tensors: Mapping[str, Tensor], config: GPTConfig, source: str | Path = "nanoGPT checkpoint"
) -> dict[str, Tensor]:
    """Our state dict (without the tied lm_head) from karpathy/nanoGPT's `model` state dict.

    nanoGPT keeps Hugging Face's names ("transformer.h.0.attn.c_attn.weight", ...) but stores
    nn.Linear weights, (out, in), as we do: renaming only, no transpose. A compiled model's
    "_orig_mod." prefixes are stripped, and the causal-mask buffers of its non-flash attention
    skipped. It must have biases (nanoGPT's `bias=True`): our GPT has them everywhere.
    """
    names = {key: key.removeprefix(NANOGPT_COMPILED_PREFIX) for key in tensors}
    plain = {
        name: tensors[key]
        for key, name in names.items()
        if not _HF_IGNORED.fullmatch(name.removeprefix(HF_PREFIX))
    }
    shapes = _our_shapes(config)
    expected = {
        HF_PREFIX + hf: (ours, shapes[ours], _same)
        for ours, hf, _, _ in _name_table(config.n_layer)
    }
    expected[HF_LM_HEAD] = (HF_LM_HEAD, shapes["tok_emb.weight"], _same)
    return _untie(_map_tensors(plain, expected, config, source), source, HF_PREFIX)


def state_dict_from_tf(
    variables: Mapping[str, np.ndarray], config: GPTConfig, source: str | Path = "checkpoint"
) -> dict[str, Tensor]:
    """Our state dict (without the tied lm_head) from OpenAI's TF variables, e.g. model/h0/ln_1/g.

    TF's conv1d weights are (1, in, out): the leading 1 is dropped and the rest transposed.
    """
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in variables.items()}
    shapes = _our_shapes(config)
    expected = {}
    for ours, _, tf, conv in _name_table(config.n_layer):
        shape = (1, *_transposed(shapes[ours])) if conv else shapes[ours]
        expected[tf] = (ours, shape, _tf_conv1d_to_linear if conv else _same)
    return _map_tensors(tensors, expected, config, source)


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """Hugging Face GPT2LMHeadModel tensors ("transformer.*", Conv1D (in, out)) for our GPT.

    The tied LM head is left out, as transformers writes it. Without qkv biases, zeros stand in.
    """
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items() if k != TIED_KEY}
    out = {}
    for ours, hf, _, conv in _name_table(model.config.n_layer):
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


def _same(t: Tensor) -> Tensor:
    return t


def _conv1d_to_linear(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _tf_conv1d_to_linear(t: Tensor) -> Tensor:
    return t[0].t().contiguous()


def _build(config: GPTConfig, state: Mapping[str, Tensor]) -> GPT:
    model = GPT(config)
    result = model.load_state_dict(state, strict=False)
    if list(result.missing_keys) != [TIED_KEY] or result.unexpected_keys:
        raise InputError(
            f"mapped GPT-2 tensors do not fit the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


# --- reading ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return data


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
    weight_map = _read_json(index).get("weight_map")
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


def _check_dir(src: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")


def _hf_dir_config(src: Path) -> tuple[dict[str, Any], GPTConfig]:
    hf = _read_json(src / HF_CONFIG)
    try:
        return hf, config_from_hf(hf)
    except ValueError as exc:
        raise InputError(f"{src / HF_CONFIG}: {exc}") from exc


def load_hf_gpt2(src: Path) -> GPT:
    """A GPT from a local Hugging Face GPT-2 directory (config.json + safetensors or .bin)."""
    src = Path(src)
    _check_dir(src)
    hf, config = _hf_dir_config(src)
    path, tensors = _read_hf_weights(src)
    require_lm_head = not hf.get("tie_word_embeddings", True)
    state = state_dict_from_hf(tensors, config, source=path, require_lm_head=require_lm_head)
    return _build(config, state)


def _tf_checkpoint_prefix(src: Path) -> Path:
    """The checkpoint prefix (model.ckpt), found by its .index file."""
    if (src / "model.ckpt.index").is_file():
        return src / "model.ckpt"
    indexes = sorted(src.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    if not indexes:
        raise FileNotFoundError(f"{src} has no TensorFlow checkpoint (model.ckpt.index)")
    raise InputError(f"{src} has several checkpoints: {', '.join(p.name for p in indexes)}")


def _read_tf_variables(prefix: Path) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint as numpy; the only code that needs tensorflow."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise TensorFlowRequiredError(TF_INSTALL_HINT) from exc
    try:
        names = [name for name, _ in tf.train.list_variables(str(prefix))]
        return {name: np.asarray(tf.train.load_variable(str(prefix), name)) for name in names}
    except (tf.errors.OpError, ValueError) as exc:
        raise InputError(f"{prefix} could not be read as a TensorFlow checkpoint: {exc}") from exc


def load_tf_gpt2(src: Path) -> GPT:
    """A GPT from OpenAI's original TensorFlow checkpoint directory (hparams.json + model.ckpt.*).

    Needs the optional tensorflow (`pip install 'gpt-pipeline[tf]'`).
    """
    src = Path(src)
    _check_dir(src)
    config = _tf_dir_config(src)
    prefix = _tf_checkpoint_prefix(src)
    state = state_dict_from_tf(_read_tf_variables(prefix), config, source=prefix)
    return _build(config, state)


def _tf_dir_config(src: Path) -> GPTConfig:
    hparams_path = src / TF_HPARAMS
    try:
        return config_from_tf_hparams(_read_json(hparams_path))
    except ValueError as exc:
        raise InputError(f"{hparams_path}: {exc}") from exc


# --- any layout -------------------------------------------------------------------------------


def gpt2_layout(src: Path) -> str:
    """`checkpoint` (ours), `huggingface` or `tensorflow` (OpenAI's), told apart by the files.

    Our checkpoints and Hugging Face's both have a config.json; ours says which format it is.
    """
    src = Path(src)
    _check_dir(src)
    if (src / HF_CONFIG).is_file():
        is_ours = _read_json(src / HF_CONFIG).get("format") == CHECKPOINT_FORMAT
        return LAYOUT_CHECKPOINT if is_ours else LAYOUT_HF
    if (src / TF_HPARAMS).is_file():
        return LAYOUT_TF
    raise FileNotFoundError(
        f"{src} holds no GPT-2 weights: it has neither {HF_CONFIG} (a {CHECKPOINT_FORMAT} or "
        f"Hugging Face directory) nor {TF_HPARAMS} (OpenAI's TensorFlow checkpoint)"
    )


def _checkpoint_config(src: Path) -> GPTConfig:
    meta = load_checkpoint_config(src)
    if "classifier" in meta:
        raise InputError(f"{src} is a classifier checkpoint, not a GPT-2 language model")
    try:
        return GPTConfig.from_dict(meta["model"])
    except ValueError as exc:
        raise InputError(f"{src / HF_CONFIG}: {exc}") from exc


def gpt2_config(src: Path) -> GPTConfig:
    """The architecture a weights directory of any layout holds, without reading its tensors,
    so a wrong size fails before gigabytes are loaded."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_CHECKPOINT:
        return _checkpoint_config(src)
    if layout == LAYOUT_HF:
        return _hf_dir_config(src)[1]
    return _tf_dir_config(src)


def load_gpt2(src: Path) -> GPT:
    """A GPT from our checkpoint, a Hugging Face GPT-2 or OpenAI's TensorFlow checkpoint."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_HF:
        return load_hf_gpt2(src)
    if layout == LAYOUT_TF:
        return load_tf_gpt2(src)
    _checkpoint_config(src)  # refuses a classifier before loading it
    return load_checkpoint(src)


def weight_files(src: Path) -> list[Path]:
    """The files `load_gpt2` reads tensors from, in a fixed order: what identifies the weights."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_TF:
        prefix = _tf_checkpoint_prefix(src)
        data = sorted(src.glob(f"{prefix.name}.data-*"))
        if not data:
            raise FileNotFoundError(f"{src} has no {prefix.name}.data-* file beside its index")
        return [prefix.with_name(f"{prefix.name}.index"), *data]
    if layout == LAYOUT_CHECKPOINT:
        if not (src / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"checkpoint weights {src / WEIGHTS_FILE} are missing")
        return [src / WEIGHTS_FILE]
    path, _, sharded = _hf_weights(src)
    return [path, *_shards(path)] if sharded else [path]


# --- tokenizer files --------------------------------------------------------------------------


def _canonical_bpe_file(name: str, data: bytes) -> bytes | None:
    """OpenAI's exact bytes for encoder.json / vocab.bpe given either OpenAI's or HF's file.

    HF's vocab.json is the same mapping, differently formatted, and its merges.txt may have
    another header line. Both are rewritten the way OpenAI wrote them and accepted only if the
    result has the known sha256, so the checkpoint never holds a file under a false name.
    """
    if sha256_bytes(data) == GPT2_BPE_FILES[name]:
        return data
    try:
        text = data.decode("utf-8")
        if name == "encoder.json":
            canonical = json.dumps(json.loads(text)).encode("utf-8")
        else:
            merges = [line for line in text.splitlines() if not line.startswith("#version")]
            canonical = ("#version: 0.2\n" + "".join(f"{m}\n" for m in merges)).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return canonical if sha256_bytes(canonical) == GPT2_BPE_FILES[name] else None


def _tokenizer_files(src: Path, names: Mapping[str, str], staging: Path) -> dict[str, Path]:
    """extra_files for save_checkpoint: both GPT-2 BPE files, or none if either is off."""
    paths = {ours: src / theirs for ours, theirs in names.items()}
    present = [p for p in paths.values() if p.is_file()]
    if len(present) < len(paths):
        if present:
            log.warning("%s has only %s; not copying the tokenizer", src, present[0].name)
        return {}
    files = {}
    for ours, path in paths.items():
        data = _canonical_bpe_file(ours, path.read_bytes())
        if data is None:
            log.warning(
                "%s is not GPT-2's %s (sha256 differs); not copying the tokenizer", path, ours
            )
            return {}
        (staging / ours).write_bytes(data)
        files[f"{TOKENIZER_DIR}/{ours}"] = staging / ours
    return files


def import_gpt2(src: Path, out: Path) -> Path:
    """Convert a Hugging Face or OpenAI TF GPT-2 directory into our checkpoint at `out`.

    The layout is detected from the files (config.json: Hugging Face; hparams.json: OpenAI).
    GPT-2's tokenizer files are copied into `tokenizer/` when SRC has them.
    """
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_HF:
        model = load_hf_gpt2(src)
        names = HF_TOKENIZER_NAMES
    elif layout == LAYOUT_TF:
        model = load_tf_gpt2(src)
        names = {name: name for name in GPT2_BPE_FILES}
    else:
        raise InputError(f"{src} is already a {CHECKPOINT_FORMAT} directory; nothing to import")
    metadata = {
        "stage": "import",
        "source": str(src),
        "tokenizer": {"name": "gpt2", "eot_token": END_OF_TEXT_ID},
    }
    with tempfile.TemporaryDirectory() as staging:
        extra_files = _tokenizer_files(src, names, Path(staging))
        return save_checkpoint(model, out, metadata=metadata, extra_files=extra_files)


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


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Write our checkpoint as a directory `transformers.GPT2LMHeadModel.from_pretrained` loads.

    config.json + model.safetensors, plus vocab.json / merges.txt / tokenizer_config.json when
    the checkpoint has its tokenizer. Written atomically; only language models can be exported.
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
    tok_dir = checkpoint / TOKENIZER_DIR
    has_tokenizer = all((tok_dir / name).is_file() for name in HF_TOKENIZER_NAMES)

    with atomic_directory(out) as tmp:
        save_file(tensors, tmp / HF_SAFETENSORS, metadata={"format": "pt", **EXPORT_METADATA})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if has_tokenizer:
            for ours, theirs in HF_TOKENIZER_NAMES.items():
                shutil.copyfile(tok_dir / ours, tmp / theirs)
            tokenizer_config = {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": model.config.context_length,
                "bos_token": END_OF_TEXT,
                "eos_token": END_OF_TEXT,
                "unk_token": END_OF_TEXT,
                "add_prefix_space": False,
            }
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(tokenizer_config, indent=2) + "\n"
            )
    return out
