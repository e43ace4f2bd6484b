"""The GPT architecture: one validated dataclass (GPTConfig), plus the GPT-2 size presets.

The architecture only: which attention backend runs it is chosen at run time
(`pipeline.model.attention.choose_attention`), never stored. No torch import here.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 50257,
        "context_length": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "qkv_bias": True,
    },
    "gpt2-124m": {
        "vocab_size": 50257,
        "context_length": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "qkv_bias": True,
    },
    "gpt2-355m": {
        "vocab_size": 50257,
        "context_length": 1024,
        "n_layer": 24,
        "n_head": 16,
        "n_embd": 1024,
        "qkv_bias": True,
    },
    "gpt2-774m": {
        "vocab_size": 50257,
        "context_length": 1024,
        "n_layer": 36,
        "n_head": 20,
        "n_embd": 1280,
        "qkv_bias": True,
    },
    "gpt2-1558m": {
        "vocab_size": 50257,
        "context_length": 1024,
        "n_layer": 48,
        "n_head": 25,
        "n_embd": 1600,
        "qkv_bias": True,
    },
}

HF_NAME_FOR_PRESET: dict[str, str] = {
    "gpt2-124m": "gpt2",
    "gpt2-355m": "gpt2-medium",
    "gpt2-774m": "gpt2-large",
    "gpt2-1558m": "gpt2-xl",
}
"""Each GPT-2 preset's name on the Hugging Face hub (also a weights directory name)."""

LEGACY_ATTENTION_KEY = "attention"

_POSITIVE_INTS = ("vocab_size", "context_length", "n_layer", "n_head", "n_embd")
_PROBABILITIES = ("dropout", "attn_dropout")


@dataclass
class GPTConfig:
    """Architecture hyperparameters of a GPT-2-style model.

    Validated on construction so that a typo in a YAML file fails before any tensor is built.
    Assigning fields afterwards bypasses validation; use `dataclasses.replace` instead.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    attn_dropout: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"GPTConfig.{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= value < 1.0:
                raise InputError(f"GPTConfig.{name} must be in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.qkv_bias, bool):
            raise InputError(f"GPTConfig.qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.n_embd % self.n_head != 0:
            raise InputError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by "
                f"GPTConfig.n_head ({self.n_head})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, as stored in checkpoints and logged to MLflow."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of `to_dict`; unknown keys are an error rather than silently dropped.

        `attention`, which checkpoints written before it became a run-time choice carry, is
        ignored."""
        d = {k: v for k, v in d.items() if k != LEGACY_ATTENTION_KEY}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"unknown GPTConfig field(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named size from PRESETS, with any field overridden (e.g. n_layer=2)."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)
