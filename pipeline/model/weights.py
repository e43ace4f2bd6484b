"""Where `pretrain.init_from` finds GPT-2 weights: `scratch`, a preset or Hugging Face name
looked up under `paths.weights`, or a directory. Paths only, no torch: the Snakefile asks too."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.model.config import HF_NAME_FOR_PRESET
from pipeline.paths import Paths

SCRATCH = "scratch"
PRESET_FOR_WEIGHTS_NAME: dict[str, str] = {
    **{preset: preset for preset in HF_NAME_FOR_PRESET},
    **{hf: preset for preset, hf in HF_NAME_FOR_PRESET.items()},
}
"""The names `init_from` looks up under paths.weights: our presets and Hugging Face's names."""


def weights_candidates(config: Mapping[str, Any], name: str) -> list[Path]:
    """Where a GPT-2 name is looked for: paths.weights/<preset>, then paths.weights/<HF name>."""
    preset = PRESET_FOR_WEIGHTS_NAME[name]
    weights = Paths.from_config(config).weights
    return [weights / preset, weights / HF_NAME_FOR_PRESET[preset]]


def resolve_init_from(config: Mapping[str, Any]) -> Path | None:
    """The weights directory `pretrain.init_from` names, or None for `scratch`.

    A missing directory fails here, saying where it was looked for and how to get the weights.
    """
    init_from = config["pretrain"]["init_from"]
    if init_from == SCRATCH:
        return None
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        candidates = weights_candidates(config, init_from)
        for directory in candidates:
            if directory.is_dir():
                return directory
        preset = PRESET_FOR_WEIGHTS_NAME[init_from]
        hf_name = HF_NAME_FOR_PRESET[preset]
        raise FileNotFoundError(
            f"pretrain.init_from {init_from!r}: no weights at {candidates[0]} or {candidates[1]} "
            f"(paths.weights is {Paths.from_config(config).weights}). Download GPT-2 {preset} "
            f"first, e.g. `hf download openai-community/{hf_name} config.json model.safetensors "
            f"vocab.json merges.txt --local-dir {candidates[1]}`, or put OpenAI's checkpoint "
            f"(hparams.json, model.ckpt.*) in {candidates[0]}; or set pretrain.init_from to the "
            f"directory that holds them"
        )
    directory = Path(init_from)
    if not directory.is_dir():
        names = ", ".join(PRESET_FOR_WEIGHTS_NAME)
        raise FileNotFoundError(
            f"pretrain.init_from {init_from!r}: no such directory; expected {SCRATCH!r}, a GPT-2 "
            f"name looked up under paths.weights ({names}) or a weights directory"
        )
    return directory


def init_from_input(config: Mapping[str, Any]) -> list[str]:
    """The Snakefile's extra input for rule pretrain: the init_from directory, if any.

    A directory given by path is always an input, so Snakemake reports it missing before running;
    a name is an input once found (if it is not, the stage's own error says where it looked).
    """
    init_from = config["pretrain"]["init_from"]
    if init_from == SCRATCH:
        return []
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        found = [d for d in weights_candidates(config, init_from) if d.is_dir()]
        return [str(found[0])] if found else []
    return [init_from]
