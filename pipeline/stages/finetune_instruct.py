"""Stage `finetune-instruct`: instruction fine-tuning (full or LoRA) on Alpaca-style records.

Reads the instruction records and a starting checkpoint; writes
results/finetune-instruct/{train,val,test}.json, model/ (LoRA merged), metrics.json, loss.png,
test_responses.json. Resume state lives in .resume/finetune-instruct.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.data.instruct import (
    InstructionExample,
    bucketed_order,
    collate,
    count_truncated,
    encode_example,
    format_prompt,
)
from pipeline.data.loader import ExampleBatches
from pipeline.evaluate.responses import respond
from pipeline.evaluate.text import corpus_scores, exact_match, rouge_l_f1
from pipeline.io import atomic_write_json
from pipeline.model import GPT
from pipeline.model.checkpoint import (
    checkpoint_tokenizer,
    checkpoint_tokenizer_files,
    save_checkpoint,
)
from pipeline.model.lora import merge_lora
from pipeline.paths import Paths
from pipeline.plots import plot_training_curves
from pipeline.stages.common import (
    epoch_train_config,
    fine_tuning_fingerprint,
    finish_stage,
    instruction_splits,
    load_language_model,
    make_trainable,
    seeded,
    stage_device,
)
from pipeline.tracking import stage_run
from pipeline.train import clear_resume_state, fit, is_main_process
from pipeline.train.losses import learned_targets, lm_loss

log = logging.getLogger("pipeline.finetune_instruct")

STAGE = "finetune-instruct"
SECTION = "finetune_instruct"
RECORD_KEYS = ("instruction", "input", "output")
ARTIFACTS = ("train.json", "val.json", "test.json", "loss.png", "test_responses.json")


def _sample_table(rows: Sequence[Mapping[str, Any]], limit: int) -> dict[str, list]:
    keys = ("instruction", "input", "output", "model_response", "rouge_l")
    return {k: [row[k] for row in rows[:limit]] for k in keys}


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    paths = Paths.from_config(config)
    section = config[SECTION]
    out_dir = paths.stage(STAGE)
    device = stage_device(config)
    template = section["template"]

    train, val, test, skipped = instruction_splits(config, SECTION, RECORD_KEYS)
    model, start = load_language_model(config, SECTION, device)
    tokenizer = checkpoint_tokenizer(start)
    context = model.config.context_length
    examples: dict[str, list[InstructionExample]] = {
        name: [encode_example(r, template, tokenizer) for r in split]
        for name, split in (("train", train), ("val", val))
    }
    truncated = {name: count_truncated(ex, context) for name, ex in examples.items()}
    for name, n in truncated.items():
        if n:
            log.info(
                "%s: %d of %d examples truncated to %d tokens",
                name,
                n,
                len(examples[name]),
                context,
            )

    trainable, total = make_trainable(model, config, SECTION)

    batch_size = section["train"]["batch_size"]

    def collate_examples(split: str, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return collate(
            [examples[split][i] for i in indices],
            context_length=context,
            mask_prompt=section["mask_prompt"],
        )

    lengths = [ex.num_tokens for ex in examples["train"]]
    order = None
    if section["bucket_by_length"]:
        order = lambda g: bucketed_order(lengths, batch_size, int(g.initial_seed()))  # noqa: E731
    train_batches = ExampleBatches(
        len(train),
        batch_size,
        lambda idx: collate_examples("train", idx),
        seed=config["seed"],
        order=order,
    )
    train_cfg, steps_per_epoch = epoch_train_config(
        section["train"], config["seed"], section["epochs"], train_batches.steps_per_epoch
    )
    eval_batches = {
        split: [
            collate_examples(split, range(i, min(i + batch_size, len(examples[split]))))
            for i in range(0, len(examples[split]), batch_size)
        ][: train_cfg.eval_batches]
        for split in ("train", "val")
    }
    generation = section["generation"]
    first_val = val[0]

    def sample_fn(m: GPT) -> str:
        answer = respond(m, tokenizer, first_val, template, generation, seeded(config, device))
        return f"{format_prompt(first_val, template)}{answer}"

    fingerprint = fine_tuning_fingerprint(
        config, SECTION, start, model, reporting_keys=("generation", "sample_table_rows")
    )
    with stage_run(config, STAGE) as tracker:
        tracker.set_tags(
            {"init_from": str(start), "device": device.type, "method": section["method"]}
        )
        tracker.log_metrics(
            {
                "trainable_parameters": float(trainable),
                "trainable_fraction": trainable / total,
                "skipped_records": float(skipped),
                **{f"truncated_{k}": float(v) for k, v in truncated.items()},
            },
            step=0,
        )
        result = fit(
            model,
            lm_loss,
            train_batches,
            train_cfg,
            device=device,
            eval_sets={split: (lambda b=b: b) for split, b in eval_batches.items()},
            resume_dir=paths.stage_resume(STAGE),
            fingerprint=fingerprint,
            logger=tracker,
            sample_fn=sample_fn,
            loss_units=learned_targets,
        )
        if not is_main_process():
            return result.metrics  # rank 0 evaluates, writes and logs the stage's outputs
        if section["method"] == "lora":
            merge_lora(model)
        model.eval()

        t0 = time.perf_counter()
        rows = []
        generator = seeded(config, device)
        for record in test:
            answer = respond(model, tokenizer, record, template, generation, generator)
            rows.append(
                {
                    "instruction": record["instruction"],
                    "input": record["input"],
                    "output": record["output"],
                    "model_response": answer,
                    "rouge_l": rouge_l_f1(answer, record["output"]),
                    "exact_match": exact_match(answer, record["output"]),
                }
            )
        response_time = time.perf_counter() - t0
        scores = corpus_scores([r["model_response"] for r in rows], [r["output"] for r in rows])
        log.info(
            "test: ROUGE-L %.4f, exact match %.4f over %d responses (%.0f s)",
            scores["rouge_l_f1"], scores["exact_match"], len(rows), response_time,
        )  # fmt: skip
        atomic_write_json(out_dir / "test_responses.json", rows)
        tracker.log_table(_sample_table(rows, section["sample_table_rows"]), "test_samples.json")

        metrics = {
            **result.metrics,
            "test_rouge_l": scores["rouge_l_f1"],
            "test_exact_match": scores["exact_match"],
            "test_responses": len(rows),
            "response_time_s": response_time,
            "steps": result.step,
            "epochs": result.step / steps_per_epoch,
            "method": section["method"],
            "trainable_parameters": trainable,
            "trainable_fraction": trainable / total,
            "skipped_records": skipped,
            **{f"truncated_{k}": v for k, v in truncated.items()},
        }
        plot_training_curves(
            result.history, out_dir / "loss.png", title=f"{STAGE} ({section['method']})"
        )
        save_checkpoint(
            model,
            out_dir / "model",
            metadata={
                "stage": STAGE,
                "instruct": {"template": template, "method": section["method"]},
                "tokenizer": {"name": "gpt2", "eot_token": tokenizer.eot_token},
                "metrics": {
                    k: metrics[k] for k in ("val_loss", "test_rouge_l", "test_exact_match")
                },
            },
            extra_files=checkpoint_tokenizer_files(start),
        )
        finish_stage(tracker, config, out_dir, metrics, result.step, ARTIFACTS)
    clear_resume_state(paths.stage_resume(STAGE))
    return metrics
