"""Stage `pretrain`: a GPT-2 language model on the prepared token files, from scratch or from
pretrained weights.

Reads data/tokens, writes results/pretrain/{model/, metrics.json, loss.png, samples.txt}.
`pretrain.init_from` picks the start: `scratch` (random init, then training), or GPT-2 weights
(OpenAI's, found by name under `paths.weights`, or any directory holding our checkpoint, a
Hugging Face GPT-2 or OpenAI's TensorFlow checkpoint). Weights are then either only evaluated,
sampled and saved (`continue_pretraining: false`: the book's "load OpenAI's weights") or trained
further (`true`). Resume state lives in .resume/pretrain (not a Snakemake output): rerunning after
a kill continues.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.data.loader import TokenWindows, evaluation_batches
from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import load_tokens
from pipeline.io import atomic_write_text
from pipeline.model import GPT, PRESETS, GPTConfig
from pipeline.model.checkpoint import save_checkpoint, tokenizer_files
from pipeline.model.generate import generate_tokens
from pipeline.model.hf import HF_NAME_FOR_PRESET, gpt2_config, load_gpt2
from pipeline.paths import Paths
from pipeline.plots import plot_training_curves
from pipeline.stages.common import finish_stage, stage_device, train_config, weights_sha256
from pipeline.tracking import stage_run
from pipeline.train import (
    clear_resume_state,
    evaluate_losses,
    fit,
    is_main_process,
    measure_peak_flops,
)
from pipeline.train.losses import lm_loss

log = logging.getLogger("pipeline.pretrain")

STAGE = "pretrain"
MODEL_OVERRIDES = (
    "context_length",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "attn_dropout",
    "qkv_bias",
)
SCRATCH = "scratch"
# The names `init_from` looks up under paths.weights: our presets and Hugging Face's model names.
PRESET_FOR_WEIGHTS_NAME: dict[str, str] = {
    **{preset: preset for preset in HF_NAME_FOR_PRESET},
    **{hf: preset for preset, hf in HF_NAME_FOR_PRESET.items()},
}
# What must agree between the init weights and the model section; dropouts and attention need not.
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "context_length", "vocab_size", "qkv_bias")


def model_config(model_section: Mapping[str, Any], vocab_size: int) -> GPTConfig:
    """The model section's GPTConfig: the preset with any overrides."""
    overrides = {k: model_section[k] for k in MODEL_OVERRIDES if k in model_section}
    return GPTConfig.from_preset(
        model_section["preset"],
        attention=model_section["attention"],
        vocab_size=vocab_size,
        **overrides,
    )


def weights_candidates(config: Mapping[str, Any], name: str) -> list[Path]:
    """Where a GPT-2 name is looked for: paths.weights/<preset>, then paths.weights/<HF name>."""
    preset = PRESET_FOR_WEIGHTS_NAME[name]
    weights = Paths.from_config(config).weights
    return [weights / preset, weights / HF_NAME_FOR_PRESET[preset]]


def resolve_init_from(config: Mapping[str, Any]) -> Path | None:
    """The weights directory `pretrain.init_from` names, or None for `scratch`.

    A missing directory fails here, saying where it was looked for and how to get the weights.
    """
    init_from = config[STAGE]["init_from"]
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
    init_from = config[STAGE]["init_from"]
    if init_from == SCRATCH:
        return []
    if init_from in PRESET_FOR_WEIGHTS_NAME:
        found = [d for d in weights_candidates(config, init_from) if d.is_dir()]
        return [str(found[0])] if found else []
    return [init_from]


def _describe(config: GPTConfig) -> str:
    return ", ".join(f"{key}={getattr(config, key)}" for key in ARCHITECTURE)


def check_architecture(
    weights: GPTConfig,
    configured: GPTConfig,
    model_section: Mapping[str, Any],
    init_from: str,
    directory: Path,
) -> None:
    """Fail, naming both shapes and the fix, if the init weights are not the configured model."""
    differ = [key for key in ARCHITECTURE if getattr(weights, key) != getattr(configured, key)]
    if not differ:
        return
    preset = model_section["preset"]
    overrides = [key for key in MODEL_OVERRIDES if key in model_section and key in ARCHITECTURE]
    given = f"model.preset {preset!r}" + (
        f" with model.{', model.'.join(overrides)}" if overrides else ""
    )
    if "vocab_size" in differ:
        fix = (
            f"vocab_size comes from the token files ({configured.vocab_size}, GPT-2's BPE); "
            "these weights were trained with another tokenizer"
        )
    else:
        matching = [
            name
            for name, values in PRESETS.items()
            if all(values[key] == getattr(weights, key) for key in ARCHITECTURE)
        ]
        if matching:
            fix = f"set model.preset: {matching[0]}"
            if overrides:
                fix += f" and remove model.{', model.'.join(overrides)}"
        else:
            fix = "set " + ", ".join(f"model.{key}: {getattr(weights, key)}" for key in differ)
    raise ValueError(
        f"pretrain.init_from {init_from!r}: the weights in {directory} are a GPT-2 with "
        f"{_describe(weights)}, but the model section ({given}) gives {_describe(configured)}. "
        f"The architecture comes from the weights: {fix}"
    )


def load_init_model(
    directory: Path, cfg: GPTConfig, model_section: Mapping[str, Any], init_from: str
) -> GPT:
    """A GPT with `cfg` holding the weights in `directory` (any layout `load_gpt2` reads).

    The architecture is checked before any tensor is read; dropouts and attention come from the
    model section, not from the weights' config (Hugging Face's says 0.1, GPT-2's training value).
    """
    # The source model only carries the tensors over, so its attention backend does not matter.
    check_architecture(
        gpt2_config(directory, attention="sdpa"), cfg, model_section, init_from, directory
    )
    source = load_gpt2(directory, attention="sdpa")
    model = GPT(cfg)
    model.load_state_dict(source.state_dict())
    return model


def sample_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A seeded temperature-0.8/top-k-50 continuation: the same text for the same weights."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = generate_tokens(
        model,
        tokenizer.encode_ordinary(prompt),
        max_new_tokens,
        temperature=0.8,
        top_k=50,
        eos_id=tokenizer.eot_token,
        generator=generator,
    )
    return prompt + tokenizer.decode(list(ids))


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train (or, for weights with continue_pretraining false, only evaluate) and save the model."""
    paths = Paths.from_config(config)
    section = config[STAGE]
    out_dir = paths.stage(STAGE)
    init_from = section["init_from"]
    init_dir = resolve_init_from(config)  # before any work: a missing download fails at once
    meta = json.loads((paths.tokens / "meta.json").read_text())
    train_tokens = load_tokens(paths.tokens / "train.bin")
    val_tokens = load_tokens(paths.tokens / "val.bin")
    tokenizer = gpt2_tokenizer(paths.bpe)

    cfg = model_config(config["model"], vocab_size=meta["vocab_size"])
    train_cfg = train_config(section["train"], config["seed"])
    device = stage_device(config)
    torch.manual_seed(config["seed"])
    if init_dir is None:
        model = GPT(cfg)
        training, init_sha = True, None
    else:
        model = load_init_model(init_dir, cfg, config["model"], init_from)
        training, init_sha = section["continue_pretraining"], weights_sha256(init_dir)
    log.info(
        "model: %s, %s parameters, attention=%s, device=%s, init_from=%s%s",
        config["model"]["preset"],
        f"{model.num_parameters():,}",
        cfg.attention,
        device,
        init_from,
        "" if init_dir is None else f" ({init_dir}, sha256 {init_sha})",
    )
    if not training:
        log.info("continue_pretraining is false: evaluating %s as it is, no training", init_from)

    ctx, batch = cfg.context_length, train_cfg.batch_size
    train_batches = TokenWindows(
        train_tokens,
        ctx,
        batch,
        sampling=section["sampling"],
        stride=section["stride"],
        seed=config["seed"],
    )
    fixed_batches = {
        split: evaluation_batches(
            tokens, ctx, batch, train_cfg.eval_batches, str(paths.tokens / f"{split}.bin")
        )
        for split, tokens in (("train", train_tokens), ("val", val_tokens))
    }
    eval_sets = {split: (lambda b=b: b) for split, b in fixed_batches.items()}
    peak_flops = section["peak_flops"]
    if peak_flops is None and training:
        peak_flops = measure_peak_flops(
            device, torch.bfloat16 if train_cfg.precision == "bf16" else torch.float32
        )
    fingerprint = {
        "model": cfg.to_dict(),
        "seed": config["seed"],
        "sampling": section["sampling"],
        "stride": section["stride"],
        "data": [d["sha256"] for d in meta["documents"]],
        "val_fraction": meta["val_fraction"],
    }
    init_info: dict[str, Any] = {"init_from": init_from}
    if init_dir is not None:
        fingerprint["init_weights"] = init_sha  # absent for scratch: older resume states stay valid
        init_info["init_weights_sha256"] = init_sha

    with stage_run(config, STAGE) as tracker:
        tags = {"parameters": model.num_parameters(), "device": device.type, **init_info}
        if init_dir is not None:
            tags.update(init_weights=init_dir, continue_pretraining=training)
        tracker.set_tags(tags)
        if training:
            result = fit(
                model,
                lm_loss,
                train_batches,
                train_cfg,
                device=device,
                eval_sets=eval_sets,
                resume_dir=paths.stage_resume(STAGE),
                fingerprint=fingerprint,
                logger=tracker,
                sample_fn=lambda m: sample_text(
                    m, tokenizer, section["sample_prompt"], section["sample_tokens"], config["seed"]
                ),
                flops_per_token=model.flops_per_token(),
                peak_flops=peak_flops,
            )
            step, history, measured = result.step, result.history, result.metrics
        else:
            model.to(device).eval()
            measured = evaluate_losses(
                model, lm_loss, eval_sets, train_cfg.eval_batches, device, train_cfg.precision
            )
            tracker.log_metrics(measured, step=0)
            step, history = 0, [{"step": 0, **measured}]
        if not is_main_process():
            return measured  # rank 0 writes and logs the stage's outputs
        metrics = {
            **measured,
            "steps": step,
            "parameters": model.num_parameters(),
            "tokens_seen": step * train_cfg.grad_accum_steps * batch * ctx,
            "epochs": train_batches.epoch,
            **init_info,
        }
        samples = sample_text(
            model, tokenizer, section["sample_prompt"], section["sample_tokens"], config["seed"]
        )
        if not training:
            log.info("sample:\n%s", samples)
            tracker.log_text(samples, "samples/step_000000.txt")

        save_checkpoint(
            model,
            out_dir / "model",
            metadata={
                "stage": STAGE,
                "tokenizer": {"name": "gpt2", "eot_token": tokenizer.eot_token},
                "metrics": metrics,
            },
            extra_files=tokenizer_files(paths.bpe),
        )
        title = f"pretrain ({config['model']['preset']}, init_from {init_from})"
        plot_training_curves(history, out_dir / "loss.png", title=title)
        atomic_write_text(out_dir / "samples.txt", samples + "\n")
        finish_stage(tracker, config, out_dir, metrics, step, ("loss.png", "samples.txt"))
    clear_resume_state(paths.stage_resume(STAGE))
    if training:
        log.info(
            "pretrain done (init_from %s): val_loss %.4f, %.0f tokens/s",
            init_from,
            metrics.get("val_loss", float("nan")),
            metrics.get("tokens_per_second", float("nan")),
        )
    else:
        log.info(
            "pretrain done (init_from %s, not trained): train_loss %.4f, val_loss %.4f",
            init_from,
            metrics["train_loss"],
            metrics["val_loss"],
        )
    return metrics
