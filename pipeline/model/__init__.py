"""GPT-2 model: configuration, architecture, attention backends, generation and checkpoints.

Names are imported on first use (PEP 562), so `pipeline.model.architecture` and
`pipeline.model.weights` can be read without importing torch (the Snakefile does). `generate`
is not among them: it would be shadowed by its module; import it from `pipeline.model.generate`.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "ATTENTION_BACKENDS": "pipeline.model.attention",
    "build_attention": "pipeline.model.attention",
    "load_checkpoint": "pipeline.model.checkpoint",
    "load_checkpoint_config": "pipeline.model.checkpoint",
    "load_weights": "pipeline.model.checkpoint",
    "save_checkpoint": "pipeline.model.checkpoint",
    "PRESETS": "pipeline.model.architecture",
    "GPTConfig": "pipeline.model.architecture",
    "generate_tokens": "pipeline.model.generate",
    "GPT": "pipeline.model.gpt",
    "KVCache": "pipeline.model.gpt",
}

# the names are _HOME's, resolved on first use by __getattr__, which pyright cannot follow
__all__ = sorted(_HOME)  # pyright: ignore[reportUnsupportedDunderAll]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
