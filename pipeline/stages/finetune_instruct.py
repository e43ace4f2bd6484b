"""Stage `finetune-instruct`: instruction fine-tuning (full or LoRA) on Alpaca-style records.

Reads the instruction records and a starting checkpoint; writes
results/finetune-instruct/{train,val,test}.json, model/ (LoRA merged), metrics.json, loss.png,
test_responses.json (each test answer of the start model and of the tuned one). Resume state
lives in .resume/finetune-instruct.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
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
from pipeline.data.tokenizer import token_byte_lengths
from pipeline.evaluate.responses import respond
from pipeline.evaluate.text import corpus_scores, exact_match, rouge_l_f1
from pipeline.io import atomic_write_json, sha256_file
from pipeline.model import GPT
from pipeline.settings import InstructSettings, StageConfig, TrainSettings
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
from pipeline.train.losses import learned_targets, lm_loss

log = logging.getLogger("pipeline.finetune_instruct")

STAGE = "finetune-instruct"
RECORD_KEYS = ("instruction", "input", "output")


def _sample_table(rows: Sequence[Mapping[str, Any]], limit: int) -> dict[str, list]:
    keys = ("instruction", "input", "output", "model_response", "rouge_l")
    return {k: [row[k] for row in rows[:limit]] for k in keys}


class FinetuneInstruct(TrainingStage[InstructSettings]):
    name = STAGE

    def setup(self, config: StageConfig[InstructSettings], device: torch.device,
              out_dir: Path) -> StagePlan:  # fmt: skip
        section = self.section = config.section
        train_records, val, self.test, skipped = instruction_splits(config, RECORD_KEYS, out_dir)
        self.val_first = val[0]  # the record answered in the training's samples
        model, start = load_language_model(config, device)
        tokenizer, tokenizer_dir = start_tokenizer(config, start)
        self.encode({"train": train_records, "val": val}, tokenizer, model.config.context_length)
        before = seeded(config.seed, device)  # the start model's test answers: what it changes
        self.before = (
            [respond(model, tokenizer, r, section.template, section.generation, before)
             for r in self.test]
            if is_main_process()
            else []
        )  # fmt: skip
        trainable, total = make_trainable(model, config)
        task, train = self.setup_task(config.seed, tokenizer, model.config.context_length, device)
        self.generator = seeded(config.seed, device)
        self.summary = {
            "method": section.method,
            "trainable_parameters": trainable,
            "trainable_fraction": trainable / total,
            "skipped_records": skipped,
            **{f"truncated_{k}": v for k, v in self.truncated.items()},
        }
        return StagePlan(
            model, task, train,
            fine_tuning_fingerprint(
                config, start, model, reporting_keys=("generation", "sample_table_rows")
            ),
            tokenizer, tokenizer_dir, title=f"{STAGE} ({section.method})",
            tags={"init_from": str(start), "device": device.type, "method": section.method},
            eval_data=sha256_file(out_dir / "val.json"),
            facts={k: v for k, v in self.summary.items() if k != "method"},
            datasets=instruction_datasets(config, out_dir, train_records, val, self.test),
            lora=section.method == "lora",
        )  # fmt: skip

    def encode(self, splits: Mapping[str, Sequence[Mapping[str, Any]]],
               tokenizer: tiktoken.Encoding, context: int) -> None:  # fmt: skip
        """Each split's records as training examples, the truncated ones counted and logged."""
        self.eos_id = tokenizer.eot_token
        self.examples: dict[str, list[InstructionExample]] = {
            name: [encode_example(r, self.section.template, tokenizer) for r in split]
            for name, split in splits.items()
        }
        self.truncated = {name: count_truncated(ex, context) for name, ex in self.examples.items()}
        for name, n in self.truncated.items():
            if n:
                log.info(
                    "%s: %d of %d examples truncated to %d tokens",
                    name, n, len(self.examples[name]), context,
                )  # fmt: skip

    def collate(self, split: str, indices: Sequence[int], context: int
                ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        chosen = [self.examples[split][i] for i in indices]
        return collate(chosen, context_length=context, eos_id=self.eos_id,
                       mask_prompt=self.section.mask_prompt)  # fmt: skip

    def setup_task(self, seed: int, tokenizer: tiktoken.Encoding, context: int,
                   device: torch.device) -> tuple[TrainTask, TrainSettings]:  # fmt: skip
        """Shuffled (optionally length-bucketed) batches of the train split, fixed evaluation
        batches, a sample answer to the first val record, and the settings counted in epochs."""
        section, examples = self.section, self.examples
        batch_size = section.train.batch_size
        lengths = [ex.num_tokens for ex in examples["train"]]
        order = None
        if section.bucket_by_length:
            order = lambda g: bucketed_order(lengths, batch_size, int(g.initial_seed()))  # noqa: E731
        batches = ExampleBatches(
            len(examples["train"]), batch_size,
            lambda idx: self.collate("train", idx, context), seed=seed, order=order,
        )  # fmt: skip
        train, self.steps_per_epoch = epoch_train_settings(
            section.train, section.epochs, batches.steps_per_epoch
        )
        eval_batches = {
            split: [
                self.collate(split, range(i, min(i + batch_size, len(examples[split]))), context)
                for i in range(0, len(examples[split]), batch_size)
            ][: train.eval_batches]
            for split in ("train", "val")
        }
        first_val = self.val_first

        def sample_fn(m: GPT) -> str:
            answer = respond(m, tokenizer, first_val, section.template, section.generation,
                             seeded(seed, device))  # fmt: skip
            return f"{format_prompt(first_val, section.template)}{answer}"

        task = TrainTask(
            lm_loss, batches, sample_fn=sample_fn, loss_units=learned_targets,
            eval_sets={split: (lambda b=b: b) for split, b in eval_batches.items()},
            token_bytes=torch.tensor(token_byte_lengths(tokenizer)),
        )  # fmt: skip
        return task, train

    def report(self, plan: StagePlan, result: TrainResult, out_dir: Path,
               tracker: StageRun) -> dict[str, Any]:  # fmt: skip
        section, template = self.section, self.section.template
        t0 = time.perf_counter()
        rows = []
        for record, base_answer in zip(self.test, self.before, strict=True):
            answer = respond(
                plan.model, plan.tokenizer, record, template, section.generation, self.generator
            )
            rows.append(
                {
                    "instruction": record["instruction"],
                    "input": record["input"],
                    "output": record["output"],
                    "model_response": answer,
                    "rouge_l": rouge_l_f1(answer, record["output"]),
                    "exact_match": exact_match(answer, record["output"]),
                    "base_model_response": base_answer,
                }
            )
        response_time = time.perf_counter() - t0
        answers = [r["model_response"] for r in rows]
        scores = corpus_scores(answers, [r["output"] for r in rows])
        base_scores = corpus_scores(self.before, [r["output"] for r in rows])
        diversity = report_answer_diversity(STAGE, self.before, answers, plan.tokenizer, tracker)
        log.info(
            "test: ROUGE-L %.4f, exact match %.4f over %d responses (%.0f s)",
            scores["rouge_l_f1"], scores["exact_match"], len(rows), response_time,
        )  # fmt: skip
        atomic_write_json(out_dir / "test_responses.json", rows)
        tracker.log_table(_sample_table(rows, section.sample_table_rows), "test_samples.json")
        return {
            **result.metrics,
            "test_rouge_l": scores["rouge_l_f1"],
            "test_exact_match": scores["exact_match"],
            "test_rouge_l_before": base_scores["rouge_l_f1"],
            **diversity,
            "test_responses": len(rows),
            "response_time_s": response_time,
            "steps": result.step,
            "epochs": result.step / self.steps_per_epoch,
            **self.summary,
        }

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"instruct": {"template": self.section.template, "method": self.section.method}}

    def saved_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {k: metrics[k] for k in ("val_loss", "test_rouge_l", "test_exact_match")}


def main(
    config: StageConfig[InstructSettings],
    threads: int | None = None,
    keep_resume_state: bool = False,
) -> dict[str, Any]:
    return run_training_stage(FinetuneInstruct(), config, threads, keep_resume_state)
