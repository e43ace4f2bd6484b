"""Where `init_from` finds GPT-2 weights: `scratch` (pretrain only), a preset or Hugging Face
name looked up under `paths.weights`, or a directory. Paths only, no torch: the Snakefile asks
too."""

from __future__ import annotations

from pathlib import Path

from pipeline.model.architecture import HF_NAME_FOR_PRESET

SCRATCH = "scratch"
PRESET_FOR_WEIGHTS_NAME: dict[str, str] = {
    **{preset: preset for preset in HF_NAME_FOR_PRESET},
    **{hf: preset for preset, hf in HF_NAME_FOR_PRESET.items()},
}
"""The names `init_from` looks up under paths.weights: our presets and Hugging Face's names."""


def weights_candidates(weights: Path, name: str) -> list[Path]:
    """Where a GPT-2 name is looked for: paths.weights/<preset>, then paths.weights/<HF name>."""
    preset = PRESET_FOR_WEIGHTS_NAME[name]
    return [weights / preset, weights / HF_NAME_FOR_PRESET[preset]]


def find_weights(name: str, weights: Path, key: str) -> Path:
    """The directory under `weights` (the `paths.weights` setting) holding the GPT-2 weights
    `name`, which the setting `key` gives. A missing one fails here, saying where it was looked
    for and how to get the weights."""
    candidates = weights_candidates(weights, name)
    for directory in candidates:
        if directory.is_dir():
            return directory
    preset = PRESET_FOR_WEIGHTS_NAME[name]
    hf_name = HF_NAME_FOR_PRESET[preset]
    raise FileNotFoundError(
        f"{key} {name!r}: no weights at {candidates[0]} or {candidates[1]} "
        f"(paths.weights is {weights}). Download GPT-2 {preset} "
        f"first, e.g. `hf download openai-community/{hf_name} config.json model.safetensors "
        f"vocab.json merges.txt --local-dir {candidates[1]}`, or put OpenAI's checkpoint "
        f"(hparams.json, model.ckpt.*) in {candidates[0]}; or set {key} to the "
        f"directory that holds them"
    )


def resolve_init_from(init_from: str, weights: Path) -> Path | None:
    """The weights directory `pretrain.init_from` names (looked up under `weights`, the
    `paths.weights` setting, when it is a name), or None for `scratch`.

    A missing directory fails here, saying where it was looked for and how to get the weights.
    """
    if init_from == SCRATCH:
        return None
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        return find_weights(init_from, weights, "pretrain.init_from")
    directory = Path(init_from)
    if not directory.is_dir():
        names = ", ".join(PRESET_FOR_WEIGHTS_NAME)
        raise FileNotFoundError(
            f"pretrain.init_from {init_from!r}: no such directory; expected {SCRATCH!r}, a GPT-2 "
            f"name looked up under paths.weights ({names}) or a weights directory"
        )
    return directory


def init_from_input(init_from: str, weights: Path) -> list[str]:
    """The Snakefile's input for a rule's `init_from` weights: their directory, if any.

    A directory given by path is always an input, so Snakemake reports it missing before running;
    a name is an input once found (if it is not, the stage's own error says where it looked).
    """
    if init_from == SCRATCH:
        return []
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        found = [d for d in weights_candidates(weights, init_from) if d.is_dir()]
        return [str(found[0])] if found else []
    return [init_from]
