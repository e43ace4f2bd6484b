"""GPT-2's tensors under each format's names, and the checked renaming every format reader shares.

Our GPT keeps GPT-2's module layout, so converting is renaming plus one transpose: GPT-2's Conv1D
stores its weight as (in, out), nn.Linear as (out, in). Every tensor's name and shape is checked
against the config before anything is loaded, and all problems are reported at once, so a wrong
config or a truncated download fails with one readable message instead of a half-loaded model.
The Hugging Face and TensorFlow readers differ only in their names; this is what they share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import InputError
from pipeline.model.architecture import GPTConfig
from pipeline.model.checkpoint import TIED_KEY
from pipeline.model.gpt import GPT

__all__ = [
    "build_gpt",
    "check_dir",
    "map_tensors",
    "name_table",
    "our_shapes",
    "read_json",
    "transposed",
    "unchanged",
]

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


def name_table(n_layer: int) -> list[tuple[str, str, str, bool]]:
    """(ours, Hugging Face's, OpenAI TF's, is a Conv1D weight) for every tensor of `n_layer`."""
    rows = list(_TOP)
    for i in range(n_layer):
        rows += [(f"blocks.{i}.{o}", f"h.{i}.{h}", f"model/h{i}/{t}", c) for o, h, t, c in _BLOCK]
    return rows


def our_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, qkv_bias=True))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name != TIED_KEY}


def _describe(config: GPTConfig) -> str:
    return (
        f"vocab_size={config.vocab_size}, context_length={config.context_length}, "
        f"n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}"
    )


def map_tensors(
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


def transposed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1]


def unchanged(t: Tensor) -> Tensor:
    """The `convert` of a tensor stored as our GPT stores it."""
    return t


def build_gpt(config: GPTConfig, state: Mapping[str, Tensor]) -> GPT:
    """A GPT holding `state` (a mapped state dict, without the tied lm_head)."""
    model = GPT(config)
    result = model.load_state_dict(state, strict=False)
    if list(result.missing_keys) != [TIED_KEY] or result.unexpected_keys:
        raise InputError(
            f"mapped GPT-2 tensors do not fit the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return model


# --- reading ----------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return data


def check_dir(src: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
