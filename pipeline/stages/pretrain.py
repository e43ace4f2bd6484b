"""Stage `pretrain`: a GPT-2 model trained from scratch on the prepared token files.

Reads data/tokens, writes results/pretrain/{model/, metrics.json, loss.png, samples.txt}.
Resume state lives in .resume/pretrain (not a Snakemake output): rerunning after a kill continues.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.loader import TokenWindows, evaluation_batches
from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import load_tokens
from pipeline.io import atomic_write_text
from pipeline.model import GPT, GPTConfig
from pipeline.model.checkpoint import save_checkpoint, tokenizer_files
from pipeline.model.generate import generate_tokens
from pipeline.paths import Paths
from pipeline.plots import plot_training_curves
from pipeline.stages.common import finish_stage, stage_device, train_config
from pipeline.tracking import stage_run
from pipeline.train import clear_resume_state, fit, measure_peak_flops

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


def model_config(model_section: Mapping[str, Any], vocab_size: int) -> GPTConfig:
    overrides = {k: model_section[k] for k in MODEL_OVERRIDES if k in model_section}
    return GPTConfig.from_preset(
        model_section["preset"],
        attention=model_section["attention"],
        vocab_size=vocab_size,
        **overrides,
    )


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy over every position."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


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
    paths = Paths.from_config(config)
    section = config[STAGE]
    out_dir = paths.stage(STAGE)
    meta = json.loads((paths.tokens / "meta.json").read_text())
    train_tokens = load_tokens(paths.tokens / "train.bin")
    val_tokens = load_tokens(paths.tokens / "val.bin")
    tokenizer = gpt2_tokenizer(paths.bpe)

    cfg = model_config(config["model"], vocab_size=meta["vocab_size"])
    train_cfg = train_config(section["train"], config["seed"])
    device = stage_device(config)
    torch.manual_seed(config["seed"])
    model = GPT(cfg)
    log.info(
        "model: %s, %s parameters, attention=%s, device=%s",
        config["model"]["preset"],
        f"{model.num_parameters():,}",
        cfg.attention,
        device,
    )

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
    if peak_flops is None:
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

    with stage_run(config, STAGE) as tracker:
        tracker.set_tags({"parameters": model.num_parameters(), "device": device.type})
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
        metrics = {
            **result.metrics,
            "steps": result.step,
            "parameters": model.num_parameters(),
            "tokens_seen": result.step * train_cfg.grad_accum_steps * batch * ctx,
            "epochs": train_batches.epoch,
        }
        samples = sample_text(
            model, tokenizer, section["sample_prompt"], section["sample_tokens"], config["seed"]
        )

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
        plot_training_curves(
            result.history, out_dir / "loss.png", title=f"pretrain ({config['model']['preset']})"
        )
        atomic_write_text(out_dir / "samples.txt", samples + "\n")
        finish_stage(tracker, config, out_dir, metrics, result.step, ("loss.png", "samples.txt"))
    clear_resume_state(paths.stage_resume(STAGE))
    log.info(
        "pretrain done: val_loss %.4f, %.0f tokens/s",
        metrics.get("val_loss", float("nan")),
        metrics.get("tokens_per_second", float("nan")),
    )
    return metrics
