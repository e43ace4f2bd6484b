"""Stage `finetune-classifier`: the pretrained model fine-tuned as an SMS spam classifier.

Reads the labelled texts (`label<TAB>text`) and a starting checkpoint; writes
results/finetune-classifier/{train,val,test}.tsv, model/, metrics.json, loss.png,
confusion_matrix.png, reliability_diagram.png, misclassified.tsv. The probabilities are
calibrated by temperature scaling fitted on the validation split; the temperature is saved in the
model's config.json. Resume state lives in .resume/finetune-classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.labeled_text import (
    LabeledText,
    class_weights,
    label_counts,
    read_label_tab_text,
    stratified_split,
    undersample,
    write_tsv,
)
from pipeline.data.loader import ExampleBatches
from pipeline.errors import InputError
from pipeline.evaluate.calibration import fit_temperature, reliability_bins
from pipeline.evaluate.classification import binary_metrics, confusion_matrix
from pipeline.io import atomic_write_text, sha256_file
from pipeline.model.classifier import (
    GPTClassifier,
    collate_texts,
    encode_texts,
    predict_logits,
)
from pipeline.plots import plot_confusion_matrix, plot_reliability
from pipeline.settings import ClassifierSettings, StageConfig, TrainSettings
from pipeline.stages.common import (
    check_splits,
    epoch_train_settings,
    fine_tuning_fingerprint,
    load_language_model,
    split_datasets,
    start_tokenizer,
)
from pipeline.stages.training import StagePlan, TrainingStage, run_training_stage
from pipeline.tracking import StageRun
from pipeline.train import TrainResult, TrainTask

log = logging.getLogger("pipeline.finetune_classifier")

STAGE = "finetune-classifier"


def _split_metrics(
    logits: torch.Tensor,
    labels: Sequence[int],
    positive: int,
    weight: torch.Tensor | None,
    temperature: float = 1.0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss and binary metrics of softmax(logits / temperature), and those probabilities."""
    scaled, y = logits / temperature, torch.as_tensor(labels)
    probs = torch.softmax(scaled, dim=-1)
    loss = F.cross_entropy(scaled, y, weight=weight)
    metrics = binary_metrics(
        y.tolist(), probs.argmax(-1).tolist(), probs[:, positive].tolist(), positive
    )
    return {"loss": loss.item(), **metrics}, probs


class FinetuneClassifier(TrainingStage[ClassifierSettings]):
    name = STAGE

    def setup(self, config: StageConfig[ClassifierSettings], device: torch.device,
              out_dir: Path) -> StagePlan:  # fmt: skip
        section = self.section = config.section
        self.split_records(config, out_dir)
        model, start = self.setup_model(config, device)
        tokenizer, tokenizer_dir = start_tokenizer(config, start)
        max_length = self.max_length = section.max_length or model.config.context_length
        if max_length > model.config.context_length:
            raise InputError(
                f"{STAGE}.max_length {max_length} exceeds the model's context_length "
                f"{model.config.context_length}"
            )
        self.encode(tokenizer, max_length)
        task, train = self.setup_task(config.seed, device)
        return StagePlan(
            model, task, train,
            fine_tuning_fingerprint(config, start, model, ("misclassified_examples",)),
            tokenizer, tokenizer_dir, title=STAGE, eval_data=sha256_file(out_dir / "test.tsv"),
            tags={"init_from": str(start), "device": device.type},
            facts={"trainable_parameters": self.trainable,
                   **{f"truncated_{name}": n for name, n in self.truncated.items()}},
            datasets=split_datasets(
                config.paths.source(section.data),
                {name: (out_dir / f"{name}.tsv", split) for name, split in self.splits.items()},
            ),
        )  # fmt: skip

    def setup_model(self, config: StageConfig[ClassifierSettings], device: torch.device
                    ) -> tuple[GPTClassifier, Path]:  # fmt: skip
        """The start checkpoint with a new (seeded) classification head, trainable as the
        section says; and the checkpoint's path."""
        base, start = load_language_model(config, device)
        torch.manual_seed(config.seed)  # the new head's initialisation
        model = GPTClassifier.from_language_model(base, self.labels, self.section.pooling)
        self.trainable = model.set_trainable(self.section.trainable_blocks)
        return model, start

    def setup_task(self, seed: int, device: torch.device) -> tuple[TrainTask, TrainSettings]:
        """Shuffled batches of the train split, the (class-weighted) loss and evaluation, and
        the train settings counted in epochs."""
        self.batch_size = self.section.train.batch_size
        batches = ExampleBatches(
            len(self.splits["train"]),
            self.batch_size,
            lambda idx: collate_texts(
                [self.encoded["train"][i] for i in idx], [self.targets["train"][i] for i in idx]
            ),
            seed=seed,
        )
        train, self.steps_per_epoch = epoch_train_settings(
            self.section.train, self.section.epochs, batches.steps_per_epoch
        )
        self.eval_train = min(len(self.splits["train"]), train.eval_batches * self.batch_size)
        loss_weight = None if self.weight is None else self.weight.to(device)

        def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            tokens, lengths, y = batch
            return F.cross_entropy(m(tokens, lengths).float(), y, weight=loss_weight)

        return TrainTask(loss_fn, batches, eval_fn=self.evaluate, loss_units=self.loss_units), train

    def split_records(self, config: StageConfig[ClassifierSettings], out_dir: Path) -> None:
        """Read the labelled texts, balance them as configured, split them stratified (written
        to `out_dir` as train/val/test.tsv) and weigh the classes if asked."""
        section = self.section
        labels = sorted(section.labels)
        records = read_label_tab_text(config.paths.source(section.data), labels, f"{STAGE}.labels")
        self.labels, self.positive = labels, labels.index(section.positive_label)
        log.info("read %d records: %s", len(records), label_counts(records))
        if section.balance == "undersample":
            records = undersample(records, config.seed)
            log.info("balanced by undersampling to %s", label_counts(records))
        splits = stratified_split(records, section.split.train, section.split.val, config.seed)
        self.splits = dict(zip(("train", "val", "test"), splits, strict=True))
        check_splits(STAGE, **self.splits)
        for name, split in self.splits.items():
            write_tsv(out_dir / f"{name}.tsv", split)
            log.info("%s split: %d records %s", name, len(split), label_counts(split))
        self.weight = None
        if section.balance == "class_weights":
            self.weight = torch.tensor(class_weights(self.splits["train"], labels))
            log.info("class weights %s", dict(zip(labels, self.weight.tolist(), strict=True)))

    def encode(self, tokenizer, max_length: int) -> None:
        """Each split's texts as token ids (cut to `max_length`, counted) and label indices."""
        self.encoded, self.truncated = {}, {}
        for name, split in self.splits.items():
            self.encoded[name], self.truncated[name] = encode_texts(
                [r.text for r in split], tokenizer, max_length
            )
            if self.truncated[name]:
                log.info(
                    "%s: %d of %d texts truncated to %d tokens",
                    name, self.truncated[name], len(split), max_length,
                )  # fmt: skip
        self.targets = {
            name: [self.labels.index(r.label) for r in split] for name, split in self.splits.items()
        }

    def loss_units(self, batch: tuple[torch.Tensor, ...]) -> float:
        """What the (class-weighted) cross-entropy averages over: examples, or their weights."""
        labels = batch[2]
        return float(len(labels) if self.weight is None else self.weight[labels].sum())

    def logits(self, model: torch.nn.Module, split: str, size: int | None = None) -> torch.Tensor:
        return predict_logits(model, self.encoded[split][:size], self.batch_size)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        metrics = {}
        for name, size in (("train", self.eval_train), ("val", None)):
            logits = self.logits(model, name, size)
            values, _ = _split_metrics(
                logits, self.targets[name][:size], self.positive, self.weight
            )
            metrics.update({f"{name}_{k}": v for k, v in values.items()})
        return metrics

    def report(self, plan: StagePlan, result: TrainResult, out_dir: Path,
               tracker: StageRun) -> dict[str, Any]:  # fmt: skip
        test_values, test_probs, calibration = self.calibrate(plan, out_dir)
        predictions = test_probs.argmax(-1).tolist()
        counts = confusion_matrix(self.targets["test"], predictions, len(self.labels))
        metrics = {
            **{k: v for k, v in result.metrics.items() if not k.endswith("perplexity")},
            **{f"test_{k}": v for k, v in test_values.items()},
            **calibration,
            "test_confusion_matrix": counts.tolist(),
            "labels": self.labels,
            "positive_label": self.labels[self.positive],
            "steps": result.step,
            "epochs": result.step / self.steps_per_epoch,
            "trainable_parameters": self.trainable,
            "parameters": plan.model.num_parameters(),
            **{f"truncated_{name}": n for name, n in self.truncated.items()},
        }
        log.info(
            "test: accuracy %.4f precision %.4f recall %.4f f1 %.4f roc_auc %.4f",
            *(test_values[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc")),
        )
        _write_misclassified(
            out_dir / "misclassified.tsv", self.splits["test"], predictions, test_probs,
            self.labels, self.section.misclassified_examples,
        )  # fmt: skip
        plot_confusion_matrix(counts, self.labels, out_dir / "confusion_matrix.png", title=STAGE)
        return metrics

    def calibrate(self, plan: StagePlan, out_dir: Path
                  ) -> tuple[dict[str, float], torch.Tensor, dict[str, float]]:  # fmt: skip
        """Fit the temperature on val, save it with the model, and return the test metrics and
        probabilities at that temperature, the ECE before and after, and draw both."""
        temperature = fit_temperature(self.logits(plan.model, "val"), self.targets["val"])
        self.temperature = temperature
        test_logits, y = self.logits(plan.model, "test"), self.targets["test"]
        raw, raw_probs = _split_metrics(test_logits, y, self.positive, self.weight)
        values, probs = _split_metrics(test_logits, y, self.positive, self.weight, temperature)
        bins = {"uncalibrated": reliability_bins(raw_probs, y),
                f"temperature {temperature:.3g}": reliability_bins(probs, y)}  # fmt: skip
        before, after = (b.ece for b in bins.values())
        log.info(
            "calibration: temperature %.4g fitted on val; test ECE %.4f -> %.4f, loss %.4f -> %.4f",
            temperature, before, after, raw["loss"], values["loss"],
        )  # fmt: skip
        plot_reliability(bins, out_dir / "reliability_diagram.png", title=f"{STAGE} (test)")
        calibration = {
            "temperature": temperature,
            "test_ece_uncalibrated": before,
            "test_ece": after,
            "test_loss_uncalibrated": raw["loss"],
        }
        return values, probs, calibration

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            "classifier": {
                "labels": self.labels, "pooling": self.section.pooling,
                "positive_label": self.section.positive_label, "max_length": self.max_length,
                "temperature": self.temperature,
            }
        }  # fmt: skip

    def saved_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in metrics.items() if k.startswith("test_")}


def main(
    config: StageConfig[ClassifierSettings],
    threads: int | None = None,
    keep_resume_state: bool = False,
) -> dict[str, Any]:
    return run_training_stage(FinetuneClassifier(), config, threads, keep_resume_state)


def _write_misclassified(
    path, records: Sequence[LabeledText], predictions, probs, labels, limit: int
) -> None:
    """The most confidently wrong test messages first."""
    wrong = [
        i for i, (r, p) in enumerate(zip(records, predictions, strict=True)) if labels[p] != r.label
    ]
    wrong.sort(key=lambda i: -float(probs[i, predictions[i]]))
    lines = ["label\tpredicted\tprobability\ttext"]
    for i in wrong[:limit]:
        p = predictions[i]
        lines.append(
            f"{records[i].label}\t{labels[p]}\t{float(probs[i, p]):.4f}\t{records[i].text}"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")
