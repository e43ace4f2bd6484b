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

import tiktoken
import torch

from pipeline.data.instruct import (
    InstructionExample,
    collate,
    count_truncated,
    encode_example,
)
from pipeline.data.loader import ExampleBatches
from pipeline.errors import InputError
from pipeline.evaluate.responses import respond
from pipeline.evaluate.text import rouge_l_f1
from pipeline.io import atomic_write_json, sha256_file
from pipeline.model import GPT, load_checkpoint_config
from pipeline.model.checkpoint import recorded_template
from pipeline.model.gpt2_import import LAYOUT_CHECKPOINT, gpt2_layout
from pipeline.settings import DpoSettings, StageConfig, TrainSettings
from pipeline.stages.common import (
    epoch_train_settings,
    fine_tuning_fingerprint,
    instruction_datasets,
    instruction_splits,
    load_language_model,
    make_trainable,
    report_answer_diversity,
    seeded,
    start_tokenizer,
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
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (2B, T) batch: the chosen sequences, then the rejected ones, with only response
    tokens (and their end-of-text, `eos_id`) as targets, so one forward pass scores both."""
    return collate([*chosen, *rejected], context_length=context_length, eos_id=eos_id,
                   mask_prompt=True)  # fmt: skip


def pair_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Summed response log-probabilities of the chosen and of the rejected halves."""
    logps = model_response_logprobs(model, inputs, targets)
    half = inputs.shape[0] // 2
    return logps[:half], logps[half:]


def loss_label(loss_type: str, label_smoothing: float) -> str:
    """What `preference_loss` computes, for the loss plot's axis: Δ is the log-ratio margin,
    (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)."""
    if loss_type == "ipo":
        return "IPO loss (Δ − 1/(2β))²"
    if label_smoothing:
        keep = 1 - label_smoothing
        return f"cDPO loss −{keep:g}·log σ(βΔ) − {label_smoothing:g}·log σ(−βΔ)"
    return "DPO loss −log σ(βΔ)"


@torch.no_grad()
def reference_logprobs(
    model: GPT,
    chosen: Sequence[InstructionExample],
    rejected: Sequence[InstructionExample],
    context_length: int,
    batch_size: int,
    eos_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen reference model's summed response log-probabilities, computed once (CPU)."""
    device = model.tok_emb.weight.device
    out_c, out_r = [], []
    for i in range(0, len(chosen), batch_size):
        inputs, targets = collate_pairs(
            chosen[i : i + batch_size], rejected[i : i + batch_size], context_length, eos_id
        )
        c, r = pair_logprobs(model, inputs.to(device), targets.to(device))
        out_c.append(c.cpu())
        out_r.append(r.cpu())
    return torch.cat(out_c), torch.cat(out_r)


class AlignDpo(TrainingStage[DpoSettings]):
    name = STAGE

    def setup(self, config: StageConfig[DpoSettings], device: torch.device, out_dir: Path
              ) -> StagePlan:  # fmt: skip
        section = self.section = config.section
        train_records, val, self.test, skipped = instruction_splits(
            config, PREFERENCE_KEYS, out_dir
        )
        model, start = load_language_model(config, device)
        self.template = self.start_template(start)
        tokenizer, tokenizer_dir = start_tokenizer(config, start)
        self.context, self.batch_size = model.config.context_length, section.train.batch_size
        self.encode({"train": train_records, "val": val}, tokenizer)
        self.setup_reference(model, tokenizer, config.seed, device)
        trainable, total = make_trainable(model, config)
        task, train = self.setup_task(config.seed, len(train_records), len(val))
        self.device = device
        self.summary = {
            "method": section.method,
            "loss_type": section.loss,
            "beta": section.beta,
            "trainable_parameters": trainable,
            "skipped_records": skipped,
        }
        return StagePlan(
            model, task, train,
            fine_tuning_fingerprint(
                config, start, model, ("generation", "sample_table_rows"), template=self.template,
            ),
            tokenizer, tokenizer_dir,
            title=f"{STAGE} (β {section.beta:g}; Δ: chosen − rejected log-ratio margin)",
            loss_label=loss_label(section.loss, section.label_smoothing),
            tags={"init_from": str(start), "device": device.type, "method": section.method},
            eval_data=sha256_file(out_dir / "val.json"),
            facts={"trainable_parameters": trainable, "trainable_fraction": trainable / total},
            datasets=instruction_datasets(config, out_dir, train_records, val, self.test),
            lora=section.method == "lora",
        )  # fmt: skip

    def start_template(self, start: Path) -> str:
        """The prompt template: the section's, else the one the start checkpoint was tuned with
        (GPT-2 weights in another layout record none)."""
        template = self.section.template
        if template is None and gpt2_layout(start) == LAYOUT_CHECKPOINT:
            template = recorded_template(load_checkpoint_config(start))
        if template is None:
            raise InputError(
                f"{start} records no prompt template (not an instruction-tuned checkpoint?); "
                f"set {STAGE}.template"
            )
        return template

    def setup_reference(self, model: GPT, tokenizer: tiktoken.Encoding, seed: int,
                        device: torch.device) -> None:  # fmt: skip
        """The start model, frozen, answers the test set and scores every pair once: it is the
        reference the policy is measured against."""
        model.eval()
        self.generator = lambda: seeded(seed, device)  # the same one before and after
        before = self.generator()
        self.before = (
            [self.respond(model, tokenizer, r, before) for r in self.test]
            if is_main_process()
            else []
        )
        self.reference = {
            name: reference_logprobs(
                model, self.examples[name, "chosen"], self.examples[name, "rejected"],
                self.context, self.batch_size, self.eos_id,
            )
            for name in ("train", "val")
        }  # fmt: skip

    def setup_task(self, seed: int, train_size: int, val_size: int
                   ) -> tuple[TrainTask, TrainSettings]:  # fmt: skip
        """Shuffled pair batches with their reference log-probabilities, the preference loss
        and its evaluation, and the settings counted in epochs."""
        batches = ExampleBatches(
            train_size, self.batch_size, lambda idx: self.pair_batch("train", idx), seed=seed
        )
        train, self.steps_per_epoch = epoch_train_settings(
            self.section.train, self.section.epochs, batches.steps_per_epoch
        )
        self.eval_sizes = {
            "train": min(train_size, train.eval_batches * self.batch_size),
            "val": val_size,
        }
        task = TrainTask(self.loss, batches, eval_fn=self.evaluate, loss_units=lambda b: len(b[2]))
        return task, train

    def encode(self, splits: Mapping[str, Sequence[Mapping[str, Any]]], tokenizer) -> None:
        """Each split's chosen and rejected answers as training examples (truncation logged)."""
        self.eos_id = tokenizer.eot_token
        self.examples = {
            (name, key): [
                encode_example(r, self.template, tokenizer, response_key=key) for r in split
            ]
            for name, split in splits.items()
            for key in ("chosen", "rejected")
        }
        for (name, key), split_examples in self.examples.items():
            if n := count_truncated(split_examples, self.context):
                log.info(
                    "%s %s: %d of %d truncated to %d tokens",
                    name, key, n, len(split_examples), self.context,
                )  # fmt: skip

    def pair_batch(self, split: str, indices: Sequence[int]) -> PairBatch:
        """Chosen and rejected sequences of `indices`, with their reference log-probabilities."""
        inputs, targets = collate_pairs(
            [self.examples[split, "chosen"][i] for i in indices],
            [self.examples[split, "rejected"][i] for i in indices],
            self.context,
            self.eos_id,
        )
        ref_c, ref_r = self.reference[split]
        index = torch.as_tensor(list(indices))
        return inputs, targets, ref_c[index], ref_r[index]

    def loss(self, model: torch.nn.Module, batch: PairBatch):
        inputs, targets, ref_c, ref_r = batch
        policy_c, policy_r = pair_logprobs(model, inputs, targets)
        section = self.section
        return preference_loss(
            policy_c, policy_r, ref_c, ref_r, beta=section.beta,
            label_smoothing=section.label_smoothing, loss_type=section.loss,
        )  # fmt: skip

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The preference loss and reward statistics over the train sample and all of val."""
        metrics: dict[str, float] = {}
        for split, size in self.eval_sizes.items():
            sums: dict[str, float] = {}
            for i in range(0, size, self.batch_size):
                indices = range(i, min(i + self.batch_size, size))
                batch = tuple(t.to(self.device) for t in self.pair_batch(split, indices))
                loss, stats = self.loss(model, batch)
                for key, value in {"loss": loss, **stats}.items():
                    sums[key] = sums.get(key, 0.0) + value.item() * len(indices)
            metrics.update({f"{split}_{k}": v / size for k, v in sums.items()})
        return metrics

    def respond(self, model: GPT, tokenizer, record: Mapping[str, Any], generator) -> str:
        return respond(model, tokenizer, record, self.template, self.section.generation, generator)

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
        shown = rows[: self.section.sample_table_rows]
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
            **report_answer_diversity(
                STAGE, self.before, [r["response_after"] for r in rows], plan.tokenizer, tracker
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

    def checkpoint_metadata(self) -> dict[str, Any]:
        method = self.section.method
        return {"instruct": {"template": self.template, "method": method, "aligned": "dpo"}}

    def saved_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {k: metrics[k] for k in ("val_loss", "val_reward_accuracy", "val_reward_margin")}


def main(
    config: StageConfig[DpoSettings], threads: int | None = None, keep_resume_state: bool = False
) -> dict[str, Any]:
    return run_training_stage(AlignDpo(), config, threads, keep_resume_state)
