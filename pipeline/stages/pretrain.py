"""Stage `pretrain`: a GPT-2 language model on the prepared token files, from scratch or from
pretrained weights.

Reads data/tokens (its shards), writes results/pretrain/{model/, metrics.json, loss.png,
samples.txt}.
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
from pipeline.data.tokenizer import (
    TokenizerInfo,
    has_tokenizer,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_info,
)
from pipeline.data.tokens import TOKENIZER_DIR, load_tokens
from pipeline.errors import InputError
from pipeline.io import atomic_write_text, sha256_bytes, sha256_files
from pipeline.model import GPT, PRESETS, GPTConfig
from pipeline.model.generate import generate_tokens
from pipeline.model.gpt2_import import gpt2_config, load_gpt2_as
from pipeline.model.weights import resolve_init_from
from pipeline.settings import ModelSettings, PretrainSettings, StageConfig, TrainSettings
from pipeline.stages.common import SPLIT_CONTEXTS, use_attention, weights_sha256
from pipeline.stages.training import StagePlan, TrainingStage, run_training_stage
from pipeline.tracking import StageRun
from pipeline.train import TrainResult, TrainTask
from pipeline.train.device import PeakFlops, machine_peak, resolve_precision
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
# What must agree between the init weights and the model section; dropouts need not.
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "context_length", "vocab_size", "qkv_bias")


def _overrides(model: ModelSettings) -> dict[str, Any]:
    """The model section's settings that replace the preset's values (those not null)."""
    return {k: getattr(model, k) for k in MODEL_OVERRIDES if getattr(model, k) is not None}


def model_config(model: ModelSettings, vocab_size: int) -> GPTConfig:
    """The model section's GPTConfig: the preset with any overrides."""
    return GPTConfig.from_preset(model.preset, vocab_size=vocab_size, **_overrides(model))


def _describe(config: GPTConfig) -> str:
    return ", ".join(f"{key}={getattr(config, key)}" for key in ARCHITECTURE)


def check_architecture(
    weights: GPTConfig,
    configured: GPTConfig,
    model: ModelSettings,
    init_from: str,
    directory: Path,
) -> None:
    """Fail, naming both shapes and the fix, if the init weights are not the configured model."""
    differ = [key for key in ARCHITECTURE if getattr(weights, key) != getattr(configured, key)]
    if not differ:
        return
    preset = model.preset
    overrides = [key for key in _overrides(model) if key in ARCHITECTURE]
    given = f"model.preset {preset!r}" + (
        f" with model.{', model.'.join(overrides)}" if overrides else ""
    )
    if "vocab_size" in differ:
        fix = (
            f"vocab_size comes from the token files ({configured.vocab_size} ids, the tokenizer "
            "stage's); these weights were trained with another tokenizer"
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
    raise InputError(
        f"pretrain.init_from {init_from!r}: the weights in {directory} are a GPT-2 with "
        f"{_describe(weights)}, but the model section ({given}) gives {_describe(configured)}. "
        f"The architecture comes from the weights: {fix}"
    )


def tokens_tokenizer(tokens: Path, meta: Mapping[str, Any]) -> TokenizerInfo:
    """The tokenizer the token files are of (their `tokenizer/`, as meta.json names it)."""
    recorded = meta.get("tokenizer")
    if not isinstance(recorded, dict) or not has_tokenizer(tokens / TOKENIZER_DIR):
        raise InputError(f"{tokens} was prepared before tokens carried their tokenizer "
                         "(no tokenizer/ or no tokenizer in meta.json): rerun prepare")  # fmt: skip
    info = tokenizer_info(tokens / TOKENIZER_DIR)
    if info.sha256 != recorded.get("sha256"):
        raise InputError(f"{tokens / TOKENIZER_DIR}: sha256 {info.sha256[:12]} differs from "
                         f"meta.json's {str(recorded.get('sha256'))[:12]}: it changed after "
                         "prepare wrote it; rerun prepare")  # fmt: skip
    return info


def check_init_tokenizer(init_dir: Path, tokens: TokenizerInfo, init_from: str, token_dir: Path
                         ) -> None:  # fmt: skip
    """Weights that carry a tokenizer must carry the token files' (GPT-2's by any files)."""
    carried = init_dir / TOKENIZER_DIR
    if not has_tokenizer(carried):
        return
    info = tokenizer_info(carried)
    if info.sha256 != tokens.sha256:
        raise InputError(
            f"pretrain.init_from {init_from!r}: {init_dir} was trained with tokenizer "
            f"{info.kind} {info.sha256[:12]} ({info.n_vocab} ids), but {token_dir} was prepared "
            f"with {tokens.kind} {tokens.sha256[:12]} ({tokens.n_vocab} ids): rerun prepare with "
            "its tokenizer (tokenizer.kind and settings) or start from scratch"
        )


def load_init_model(directory: Path, cfg: GPTConfig, model: ModelSettings, init_from: str) -> GPT:
    """A GPT with `cfg` holding the weights in `directory` (any layout `load_gpt2` reads).

    The architecture is checked before any tensor is read; dropouts come from the model
    section, not from the weights' config (Hugging Face's says 0.1, GPT-2's training value).
    """
    check_architecture(gpt2_config(directory), cfg, model, init_from, directory)
    return load_gpt2_as(directory, cfg)


def token_datasets(token_dir: Path, meta: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The token files' train and val splits as the run's dataset inputs (`tokens/train`,
    `tokens/val`). The digest is a sha256 of what made them, from meta.json: the split, its
    settings and each input file's name and sha256 (stable, and read without hashing the
    shards); the profile has the split's tokens, shards and input files (the prepare run lists
    each with its sha256)."""
    made_of = [[r["file"], r["sha256"]] for r in meta["inputs"]]
    recipe = [meta["tokenizer"], meta["split"], meta["val_fraction"], made_of]
    return {
        SPLIT_CONTEXTS[split]: [
            {
                "name": f"{token_dir.name}/{split}",
                "source": token_dir / "meta.json",
                "digest": sha256_bytes(json.dumps([split, *recipe]).encode()),
                "profile": {
                    "tokens": meta[f"{split}_tokens"],
                    "shards": len(meta["shards"][split]),
                    "input_files": len(made_of),
                },
            }
        ]
        for split in ("train", "val")
    }


def val_sha256(token_dir: Path, meta: Mapping[str, Any]) -> str:
    """The sha256 of the val tokens, its shards end to end: the data val_loss is measured on,
    whatever made it or however it is sharded."""
    return sha256_files(token_dir / shard["file"] for shard in meta["shards"]["val"])


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


class Pretrain(TrainingStage[PretrainSettings]):
    """From scratch (random init, then training), or from GPT-2 weights: evaluated as they are
    (`continue_pretraining: false`) or trained further."""

    name = STAGE

    def setup(self, config: StageConfig[PretrainSettings], device: torch.device, out_dir: Path
              ) -> StagePlan:  # fmt: skip
        self.section, self.seed, tokens = config.section, config.seed, config.paths.tokens
        init_dir = resolve_init_from(self.section.init_from, config.paths.weights)  # fails early
        meta = json.loads((tokens / "meta.json").read_text())
        info = tokens_tokenizer(tokens, meta)
        if init_dir is not None:
            check_init_tokenizer(init_dir, info, self.section.init_from, tokens)
        self.tokenizer = load_tokenizer(tokens / TOKENIZER_DIR)
        model, trains, attention = self.setup_model(config, meta["vocab_size"], init_dir, device)
        train = self.section.train
        task = self.setup_task(model, tokens, train, trains, device)
        fingerprint = {
            "model": model.config.to_dict(),
            "attention": attention,
            "seed": config.seed,
            "sampling": self.section.sampling,
            "stride": self.section.stride,
            "data": [d["sha256"] for d in meta["inputs"]],
            "split": [meta["split"], meta["val_fraction"]],
            "tokenizer": info.sha256,
            **({"init_weights": self.init_info["init_weights_sha256"]} if init_dir else {}),
        }
        tags = {"device": device.type, **self.init_info}
        if init_dir is not None:
            tags.update(init_weights=init_dir, continue_pretraining=trains)
        return StagePlan(
            model, task, train, fingerprint, self.tokenizer, tokens / TOKENIZER_DIR,
            title=f"pretrain ({config.model.preset}, init_from {self.section.init_from})",
            eval_data=val_sha256(tokens, meta), tags=tags,
            facts={"parameters": model.num_parameters()}, trains=trains,
            datasets=token_datasets(tokens, meta),
        )  # fmt: skip

    def setup_model(self, config: StageConfig[PretrainSettings], vocab_size: int,
                    init_dir: Path | None, device: torch.device
                    ) -> tuple[GPT, bool, str]:  # fmt: skip
        """The model (seeded random init, or the init weights), whether it trains, and the
        attention it runs; `init_info` records where it came from."""
        init_from = self.section.init_from
        cfg = model_config(config.model, vocab_size=vocab_size)
        torch.manual_seed(config.seed)
        self.init_info: dict[str, Any] = {"init_from": init_from}
        if init_dir is None:
            model, trains, init_sha = GPT(cfg), True, None
        else:
            model = load_init_model(init_dir, cfg, config.model, init_from)
            trains, init_sha = self.section.continue_pretraining, weights_sha256(init_dir)
            self.init_info["init_weights_sha256"] = init_sha
        attention = use_attention(model, config, device, self.section.train)
        log.info(
            "model: %s, %s parameters, attention=%s, device=%s, init_from=%s%s",
            config.model.preset, f"{model.num_parameters():,}", attention, device,
            init_from, "" if init_dir is None else f" ({init_dir}, sha256 {init_sha})",
        )  # fmt: skip
        if not trains:
            log.info("continue_pretraining is false: evaluating %s as it is, no training",
                     init_from)  # fmt: skip
        return model, trains, attention

    def setup_task(self, model: GPT, tokens: Path, train: TrainSettings, trains: bool,
                   device: torch.device) -> TrainTask:  # fmt: skip
        """Seeded training windows, fixed evaluation batches of both splits, samples, and the
        MFU's peak (when it trains)."""
        train_tokens, val_tokens = load_tokens(tokens, "train"), load_tokens(tokens, "val")
        ctx, batch = model.config.context_length, train.batch_size
        self.batches = TokenWindows(
            train_tokens, ctx, batch, sampling=self.section.sampling, stride=self.section.stride,
            seed=self.seed,
        )  # fmt: skip
        fixed = {
            split: evaluation_batches(
                split_tokens, ctx, batch, train.eval_batches, f"{tokens} ({split})"
            )  # fmt: skip
            for split, split_tokens in (("train", train_tokens), ("val", val_tokens))
        }
        return TrainTask(
            lm_loss,
            self.batches,
            eval_sets={split: (lambda b=b: b) for split, b in fixed.items()},
            sample_fn=self.sample,
            flops_per_token=model.flops_per_token(),
            peak_flops=self.peak_flops(model, train, device) if trains else None,
            token_bytes=torch.tensor(token_byte_lengths(self.tokenizer)),
        )

    def peak_flops(self, model: GPT, train: TrainSettings, device: torch.device) -> PeakFlops:
        """MFU's peak: `pretrain.peak_flops`, else the machine's at the training's precision."""
        if self.section.peak_flops is not None:
            return PeakFlops(self.section.peak_flops, "pretrain.peak_flops")
        precision = resolve_precision(train.precision, device, model.config.n_embd)
        return machine_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)

    def sample(self, model: GPT) -> str:
        section = self.section
        return sample_text(
            model, self.tokenizer, section.sample_prompt, section.sample_tokens, self.seed
        )

    def report(self, plan: StagePlan, result: TrainResult, out_dir: Path,
               tracker: StageRun) -> dict[str, Any]:  # fmt: skip
        model, train = plan.model, plan.train
        metrics = {
            **result.metrics,
            "steps": result.step,
            "parameters": model.num_parameters(),
            "tokens_seen": result.step
            * train.grad_accum_steps
            * train.batch_size
            * model.config.context_length,
            "epochs": self.batches.epoch,
            **self.init_info,
        }
        samples = self.sample(model)
        if not plan.trains:
            log.info("sample:\n%s", samples)
            tracker.log_text(samples, "samples/step_000000.txt")
        atomic_write_text(out_dir / "samples.txt", samples + "\n")
        how = "" if plan.trains else ", not trained"
        log.info(
            "pretrain done (init_from %s%s): train_loss %.4f, val_loss %.4f, val_bpb %.4f, "
            "%.0f tokens/s",
            self.init_info["init_from"], how, metrics.get("train_loss", float("nan")),
            metrics.get("val_loss", float("nan")), metrics.get("val_bpb", float("nan")),
            metrics.get("tokens_per_second", 0.0),
        )  # fmt: skip
        return metrics


def main(
    config: StageConfig[PretrainSettings],
    threads: int | None = None,
    keep_resume_state: bool = False,
) -> dict[str, Any]:
    return run_training_stage(Pretrain(), config, threads, keep_resume_state)
