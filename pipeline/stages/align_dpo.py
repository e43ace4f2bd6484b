"""Stage `align-dpo`: preference alignment of the instruction-tuned model with DPO (or IPO).

Reads the preference records ({instruction, input, chosen, rejected}) and the instruction-tuned
checkpoint; writes results/align-dpo/{train,val,test}.json, model/ (LoRA merged), metrics.json,
loss.png, test_responses.json (each test answer before and after alignment). The reference model
is the starting checkpoint, frozen: its response log-probabilities are computed once, up front.
Resume state lives in .resume/align-dpo.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.data.instruct import (
    InstructionExample,
    collate,
    count_truncated,
    encode_example,
)
from pipeline.data.loader import ExampleBatches
from pipeline.evaluate.responses import respond
from pipeline.evaluate.text import rouge_l_f1
from pipeline.io import atomic_write_json
from pipeline.model import GPT, load_checkpoint_config
from pipeline.model.checkpoint import checkpoint_tokenizer, checkpoint_tokenizer_files
from pipeline.stages.common import (
    epoch_train_settings,
    fine_tuning_fingerprint,
    instruction_splits,
    load_language_model,
    make_trainable,
    seeded,
)
from pipeline.stages.training import StagePlan, TrainingStage, run_training_stage
from pipeline.tracking import StageRun
from pipeline.train import TrainResult, TrainTask, is_main_process
from pipeline.train.dpo import model_response_logprobs, preference_loss

log = logging.getLogger("pipeline.align_dpo")

STAGE = "align-dpo"
PREFERENCE_KEYS = ("instruction", "input", "chosen", "rejected")
PairBatch = tuple[torch.Tensor, ...]


def collate_pairs(
    chosen: Sequence[InstructionExample],
    rejected: Sequence[InstructionExample],
    context_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (2B, T) batch: the chosen sequences, then the rejected ones, with only response
    tokens (and their end-of-text) as targets, so one forward pass scores both."""
    return collate([*chosen, *rejected], context_length=context_length, mask_prompt=True)


def pair_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Summed response log-probabilities of the chosen and of the rejected halves."""
    logps = model_response_logprobs(model, inputs, targets)
    half = inputs.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def reference_logprobs(
    model: GPT,
    chosen: Sequence[InstructionExample],
    rejected: Sequence[InstructionExample],
    context_length: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference model's summed response log-probabilities, computed once (CPU)."""
    device = model.tok_emb.weight.device
    out_c, out_r = [], []
    for i in range(0, len(chosen), batch_size):
        inputs, targets = collate_pairs(
            chosen[i : i + batch_size], rejected[i : i + batch_size], context_length
        )
        c, r = pair_logprobs(model, inputs.to(device), targets.to(device))
        out_c.append(c.cpu())
        out_r.append(r.cpu())
    return torch.cat(out_c), torch.cat(out_r)


class AlignDpo(TrainingStage):
    name = STAGE

    def setup(self, config: Mapping[str, Any], device: torch.device) -> StagePlan:
        section = self.section = config[STAGE]
        train_records, val, self.test, skipped = instruction_splits(config, STAGE, PREFERENCE_KEYS)
        model, start = load_language_model(config, STAGE, device)
        template = section["template"] or load_checkpoint_config(start).get("instruct", {}).get(
            "template"
        )
        if template is None:
            raise ValueError(
                f"{start} records no prompt template (not an instruction-tuned checkpoint?); "
                f"set {STAGE}.template"
            )
        self.template = template
        tokenizer = checkpoint_tokenizer(start)
        context = model.config.context_length
        batch_size = section["train"]["batch_size"]
        examples = {
            (name, key): [encode_example(r, template, tokenizer, response_key=key) for r in split]
            for name, split in (("train", train_records), ("val", val))
            for key in ("chosen", "rejected")
        }
        for (name, key), split_examples in examples.items():
            if n := count_truncated(split_examples, context):
                log.info(
                    "%s %s: %d of %d truncated to %d tokens",
                    name, key, n, len(split_examples), context,
                )  # fmt: skip

        model.eval()
        self.generator = lambda: seeded(config, device)  # the same one before and after
        before = self.generator()
        self.before = (
            [self.respond(model, tokenizer, r, before) for r in self.test]
            if is_main_process()
            else []
        )
        reference = {
            name: reference_logprobs(
                model, examples[name, "chosen"], examples[name, "rejected"], context, batch_size
            )
            for name in ("train", "val")
        }
        trainable, total = make_trainable(model, config, STAGE)

        def pair_batch(split: str, indices: Sequence[int]) -> PairBatch:
            inputs, targets = collate_pairs(
                [examples[split, "chosen"][i] for i in indices],
                [examples[split, "rejected"][i] for i in indices],
                context,
            )
            ref_c, ref_r = reference[split]
            index = torch.as_tensor(list(indices))
            return inputs, targets, ref_c[index], ref_r[index]

        def loss_fn(m: torch.nn.Module, batch: PairBatch):
            inputs, targets, ref_c, ref_r = batch
            policy_c, policy_r = pair_logprobs(m, inputs, targets)
            return preference_loss(
                policy_c, policy_r, ref_c, ref_r, beta=section["beta"],
                label_smoothing=section["label_smoothing"], loss_type=section["loss"],
            )  # fmt: skip

        batches = ExampleBatches(
            len(train_records), batch_size, lambda idx: pair_batch("train", idx),
            seed=config["seed"],
        )  # fmt: skip
        train, self.steps_per_epoch = epoch_train_settings(
            section["train"], section["epochs"], batches.steps_per_epoch
        )
        eval_sizes = {
            "train": min(len(train_records), train.eval_batches * batch_size),
            "val": len(val),
        }

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            metrics: dict[str, float] = {}
            for split, size in eval_sizes.items():
                sums: dict[str, float] = {}
                for i in range(0, size, batch_size):
                    indices = range(i, min(i + batch_size, size))
                    batch = tuple(t.to(device) for t in pair_batch(split, indices))
                    loss, stats = loss_fn(m, batch)
                    for key, value in {"loss": loss, **stats}.items():
                        sums[key] = sums.get(key, 0.0) + value.item() * len(indices)
                metrics.update({f"{split}_{k}": v / size for k, v in sums.items()})
            return metrics

        task = TrainTask(loss_fn, batches, eval_fn=eval_fn, loss_units=lambda batch: len(batch[2]))
        fingerprint = fine_tuning_fingerprint(
            config, STAGE, start, model, ("generation", "sample_table_rows"), template=template
        )
        self.summary = {
            "method": section["method"],
            "loss_type": section["loss"],
            "beta": section["beta"],
            "trainable_parameters": trainable,
            "skipped_records": skipped,
        }
        return StagePlan(
            model, task, train, fingerprint, tokenizer, checkpoint_tokenizer_files(start),
            title=f"{STAGE} ({section['loss']})",
            tags={"init_from": str(start), "device": device.type, "method": section["method"]},
            start_metrics={
                "trainable_parameters": float(trainable), "trainable_fraction": trainable / total,
            },
            checkpoint_metadata={
                "instruct": {"template": template, "method": section["method"], "aligned": "dpo"}
            },
            lora=section["method"] == "lora",
        )  # fmt: skip

    def respond(self, model: GPT, tokenizer, record: Mapping[str, Any], generator) -> str:
        generation = self.section["generation"]
        return respond(model, tokenizer, record, self.template, generation, generator)

    def report(self, plan: StagePlan, result: TrainResult, out_dir: Path,
               tracker: StageRun) -> dict[str, Any]:  # fmt: skip
        after = self.generator()
        rows = [
            {
                "instruction": record["instruction"],
                "input": record["input"],
                "chosen": record["chosen"],
                "rejected": record["rejected"],
                "response_before": before,
                "response_after": self.respond(plan.model, plan.tokenizer, record, after),
            }
            for record, before in zip(self.test, self.before, strict=True)
        ]
        atomic_write_json(out_dir / "test_responses.json", rows)
        shown = rows[: self.section["sample_table_rows"]]
        columns = ("instruction", "chosen", "response_before", "response_after")
        tracker.log_table({k: [row[k] for row in shown] for k in columns}, "test_samples.json")

        def mean_rouge(key: str) -> float:
            return sum(rouge_l_f1(row[key], row["chosen"]) for row in rows) / max(len(rows), 1)

        metrics = {
            **result.metrics,
            "test_rouge_l_chosen_before": mean_rouge("response_before"),
            "test_rouge_l_chosen_after": mean_rouge("response_after"),
            "test_changed_responses": sum(
                r["response_before"] != r["response_after"] for r in rows
            ),
            "steps": result.step,
            "epochs": result.step / self.steps_per_epoch,
            **self.summary,
        }
        log.info(
            "val: loss %.4f, reward accuracy %.3f, margin %.4f; "
            "test ROUGE-L vs chosen %.4f -> %.4f",
            metrics["val_loss"], metrics["val_reward_accuracy"], metrics["val_reward_margin"],
            metrics["test_rouge_l_chosen_before"], metrics["test_rouge_l_chosen_after"],
        )  # fmt: skip
        return metrics

    def saved_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {k: metrics[k] for k in ("val_loss", "val_reward_accuracy", "val_reward_margin")}


def main(config: Mapping[str, Any]) -> dict[str, Any]:
    return run_training_stage(AlignDpo(), config)
