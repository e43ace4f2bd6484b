"""GPT-2 model: configuration, architecture, attention backends, generation and checkpoints."""

from pipeline.model.attention import ATTENTION_BACKENDS, build_attention
from pipeline.model.checkpoint import (
    load_checkpoint,
    load_checkpoint_config,
    load_weights,
    save_checkpoint,
)
from pipeline.model.config import PRESETS, GPTConfig
from pipeline.model.generate import generate, generate_tokens
from pipeline.model.gpt import GPT, KVCache

__all__ = [
    "ATTENTION_BACKENDS",
    "GPT",
    "PRESETS",
    "GPTConfig",
    "KVCache",
    "build_attention",
    "generate",
    "generate_tokens",
    "load_checkpoint",
    "load_checkpoint_config",
    "load_weights",
    "save_checkpoint",
]
