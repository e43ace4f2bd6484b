"""GPT-2 from OpenAI's original TensorFlow checkpoint (hparams.json + model.ckpt.*).

Its own module because it is the only code that needs the optional tensorflow, and only to read
the checkpoint's variables; the mapping to our names is plain numpy and torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import InputError
from pipeline.model import gpt2_tensors
from pipeline.model.architecture import GPTConfig
from pipeline.model.gpt import GPT

__all__ = [
    "TF_HPARAMS",
    "TensorFlowRequiredError",
    "config_from_tf_hparams",
    "load_tf_gpt2",
    "state_dict_from_tf",
    "tf_dir_config",
    "tf_weight_files",
]

TF_HPARAMS = "hparams.json"
TF_INSTALL_HINT = (
    "reading OpenAI's TensorFlow checkpoint needs tensorflow: pip install 'gpt-pipeline[tf]'"
)


class TensorFlowRequiredError(ImportError):
    """Raised for an OpenAI TensorFlow checkpoint when the optional tensorflow is missing."""


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


def state_dict_from_tf(
    variables: Mapping[str, np.ndarray], config: GPTConfig, source: str | Path = "checkpoint"
) -> dict[str, Tensor]:
    """Our state dict (without the tied lm_head) from OpenAI's TF variables, e.g. model/h0/ln_1/g.

    TF's conv1d weights are (1, in, out): the leading 1 is dropped and the rest transposed.
    """
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in variables.items()}
    shapes = gpt2_tensors.our_shapes(config)
    expected = {}
    for ours, _, tf, conv in gpt2_tensors.name_table(config.n_layer):
        shape = (1, *gpt2_tensors.transposed(shapes[ours])) if conv else shapes[ours]
        expected[tf] = (ours, shape, _tf_conv1d_to_linear if conv else gpt2_tensors.unchanged)
    return gpt2_tensors.map_tensors(tensors, expected, config, source)


def _tf_conv1d_to_linear(t: Tensor) -> Tensor:
    return t[0].t().contiguous()


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
        # deferred: optional (the `tf` extra) and heavy, needed for this layout only; pyright
        # has its stubs but, without the extra installed, not its source
        import tensorflow as tf  # pyright: ignore[reportMissingModuleSource]
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
    gpt2_tensors.check_dir(src)
    config = tf_dir_config(src)
    prefix = _tf_checkpoint_prefix(src)
    state = state_dict_from_tf(_read_tf_variables(prefix), config, source=prefix)
    return gpt2_tensors.build_gpt(config, state)


def tf_dir_config(src: Path) -> GPTConfig:
    """The architecture a TF checkpoint directory's hparams.json describes."""
    hparams_path = src / TF_HPARAMS
    try:
        return config_from_tf_hparams(gpt2_tensors.read_json(hparams_path))
    except ValueError as exc:
        raise InputError(f"{hparams_path}: {exc}") from exc


def tf_weight_files(src: Path) -> list[Path]:
    """The files `load_tf_gpt2` reads tensors from: the checkpoint's index, then its data."""
    prefix = _tf_checkpoint_prefix(src)
    data = sorted(src.glob(f"{prefix.name}.data-*"))
    if not data:
        raise FileNotFoundError(f"{src} has no {prefix.name}.data-* file beside its index")
    return [prefix.with_name(f"{prefix.name}.index"), *data]
