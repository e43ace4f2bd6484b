"""Stage `finetune-classifier`: the pretrained model fine-tuned as an SMS spam classifier.

Reads the labelled texts (`label<TAB>text`) and a starting checkpoint; writes
results/finetune-classifier/{train,val,test}.tsv, model/, metrics.json, loss.png,
confusion_matrix.png, misclassified.tsv. Resume state lives in .resume/finetune-classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import tiktoken
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
from pipeline.data.tokenizer import END_OF_TEXT_ID
from pipeline.evaluate.classification import binary_metrics, confusion_matrix
from pipeline.io import atomic_write_text
from pipeline.model.checkpoint import (
    checkpoint_tokenizer,
    checkpoint_tokenizer_files,
    save_checkpoint,
)
from pipeline.model.classifier import GPTClassifier
from pipeline.paths import Paths
from pipeline.plots import plot_confusion_matrix, plot_training_curves
from pipeline.stages.common import (
    check_splits,
    epoch_train_config,
    fine_tuning_fingerprint,
    finish_stage,
    load_language_model,
    stage_device,
)
from pipeline.tracking import stage_run
from pipeline.train import clear_resume_state, fit, is_main_process

log = logging.getLogger("pipeline.finetune_classifier")

STAGE = "finetune-classifier"
SECTION = "finetune_classifier"
ARTIFACTS = (
    "train.tsv",
    "val.tsv",
    "test.tsv",
    "loss.png",
    "confusion_matrix.png",
    "misclassified.tsv",
)


def encode_texts(
    texts: Sequence[str], tokenizer: tiktoken.Encoding, max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids per text, cut to `max_length`; also how many texts were cut."""
    ids = [tokenizer.encode_ordinary(t) for t in texts]
    truncated = sum(len(x) > max_length for x in ids)
    return [x[:max_length] for x in ids], truncated


def collate_texts(
    ids: Sequence[Sequence[int]], labels: Sequence[int] | None = None, pad_id: int = END_OF_TEXT_ID
) -> tuple[torch.Tensor, ...]:
    """(tokens right-padded to the longest, lengths[, labels]); pooling reads `lengths`."""
    if any(len(x) == 0 for x in ids):
        raise ValueError("cannot classify an empty text (it has no tokens)")
    longest = max(len(x) for x in ids)
    tokens = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if labels is None:
        return tokens, lengths
    return tokens, lengths, torch.as_tensor(labels, dtype=torch.long)


@torch.no_grad()
def predict_probabilities(
    model: GPTClassifier, ids: Sequence[Sequence[int]], batch_size: int
) -> torch.Tensor:
    """Softmax class probabilities (N, num_labels) on the CPU, in input order."""
    device = model.tok_emb.weight.device
    out = []
    for start in range(0, len(ids), batch_size):
        tokens, lengths = collate_texts(ids[start : start + batch_size])
        logits = model(tokens.to(device), lengths.to(device))
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def _split_metrics(
    model: GPTClassifier,
    ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    positive: int,
    batch_size: int,
    weight: torch.Tensor | None,
) -> tuple[dict[str, float], torch.Tensor]:
    probs = predict_probabilities(model, ids, batch_size)
    y = torch.as_tensor(labels)
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, weight=weight)
    metrics = binary_metrics(
        y.tolist(), probs.argmax(-1).tolist(), probs[:, positive].tolist(), positive
    )
    return {"loss": loss.item(), **metrics}, probs


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    paths = Paths.from_config(config)
    section = config[SECTION]
    out_dir = paths.stage(STAGE)
    device = stage_device(config)

    records = read_label_tab_text(paths.source(section["data"]))
    labels = sorted(label_counts(records))
    positive_label = section["positive_label"]
    if positive_label not in labels:
        raise ValueError(
            f"{SECTION}.positive_label {positive_label!r} is not a label of "
            f"{paths.source(section['data'])} (labels: {labels})"
        )
    positive = labels.index(positive_label)
    log.info("read %d records: %s", len(records), label_counts(records))
    if section["balance"] == "undersample":
        records = undersample(records, config["seed"])
        log.info("balanced by undersampling to %s", label_counts(records))
    train, val, test = stratified_split(
        records, section["split"]["train"], section["split"]["val"], config["seed"]
    )
    check_splits(SECTION, train=train, val=val, test=test)
    for name, split in (("train", train), ("val", val), ("test", test)):
        write_tsv(out_dir / f"{name}.tsv", split)
        log.info("%s split: %d records %s", name, len(split), label_counts(split))
    weight = None
    if section["balance"] == "class_weights":
        weight = torch.tensor(class_weights(train, labels), dtype=torch.float32)
        log.info("class weights %s", dict(zip(labels, weight.tolist(), strict=True)))

    base, start = load_language_model(config, SECTION, device)
    torch.manual_seed(config["seed"])  # the new head's initialisation
    model = GPTClassifier.from_language_model(base, labels, section["pooling"])
    del base
    tokenizer = checkpoint_tokenizer(start)
    max_length = section["max_length"] or model.config.context_length
    if max_length > model.config.context_length:
        raise ValueError(
            f"{SECTION}.max_length {max_length} exceeds the model's context_length "
            f"{model.config.context_length}"
        )
    encoded, truncated = {}, {}
    for name, split in (("train", train), ("val", val), ("test", test)):
        encoded[name], truncated[name] = encode_texts(
            [r.text for r in split], tokenizer, max_length
        )
        if truncated[name]:
            log.info(
                "%s: %d of %d texts truncated to %d tokens",
                name,
                truncated[name],
                len(split),
                max_length,
            )
    targets = {
        name: [labels.index(r.label) for r in split]
        for name, split in (("train", train), ("val", val), ("test", test))
    }

    trainable = model.set_trainable(section["trainable_blocks"])
    batch_size = section["train"]["batch_size"]
    train_batches = ExampleBatches(
        len(train),
        batch_size,
        lambda idx: collate_texts(
            [encoded["train"][i] for i in idx], [targets["train"][i] for i in idx]
        ),
        seed=config["seed"],
    )
    train_cfg, steps_per_epoch = epoch_train_config(
        section["train"], config["seed"], section["epochs"], train_batches.steps_per_epoch
    )
    loss_weight = None if weight is None else weight.to(device)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens, lengths, y = batch
        return F.cross_entropy(m(tokens, lengths).float(), y, weight=loss_weight)

    eval_train = min(len(train), train_cfg.eval_batches * batch_size)

    def loss_units(batch: tuple[torch.Tensor, ...]) -> float:
        """What the (class-weighted) cross-entropy averages over: examples, or their weights."""
        labels_ = batch[2]
        return float(len(labels_) if weight is None else weight[labels_].sum())

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        metrics = {}
        for name, ids, y in (
            ("train", encoded["train"][:eval_train], targets["train"][:eval_train]),
            ("val", encoded["val"], targets["val"]),
        ):
            values, _ = _split_metrics(m, ids, y, positive, batch_size, weight)
            metrics.update({f"{name}_{k}": v for k, v in values.items()})
        return metrics

    fingerprint = fine_tuning_fingerprint(
        config, SECTION, start, model, reporting_keys=("misclassified_examples",)
    )
    with stage_run(config, STAGE) as tracker:
        tracker.set_tags(
            {"init_from": str(start), "device": device.type, "trainable_parameters": trainable}
        )
        tracker.log_metrics(
            {f"truncated_{name}": float(n) for name, n in truncated.items()}, step=0
        )
        result = fit(
            model,
            loss_fn,
            train_batches,
            train_cfg,
            device=device,
            resume_dir=paths.stage_resume(STAGE),
            fingerprint=fingerprint,
            logger=tracker,
            eval_fn=eval_fn,
            loss_units=loss_units,
        )
        if not is_main_process():
            return result.metrics  # rank 0 evaluates, writes and logs the stage's outputs
        model.eval()
        test_values, test_probs = _split_metrics(
            model, encoded["test"], targets["test"], positive, batch_size, weight
        )
        predictions = test_probs.argmax(-1).tolist()
        counts = confusion_matrix(targets["test"], predictions, len(labels))
        metrics = {
            **{k: v for k, v in result.metrics.items() if not k.endswith("perplexity")},
            **{f"test_{k}": v for k, v in test_values.items()},
            "test_confusion_matrix": counts.tolist(),
            "labels": labels,
            "positive_label": positive_label,
            "steps": result.step,
            "epochs": result.step / steps_per_epoch,
            "trainable_parameters": trainable,
            "parameters": model.num_parameters(),
            **{f"truncated_{name}": n for name, n in truncated.items()},
        }
        log.info(
            "test: accuracy %.4f precision %.4f recall %.4f f1 %.4f roc_auc %.4f",
            *(test_values[k] for k in ("accuracy", "precision", "recall", "f1", "roc_auc")),
        )

        _write_misclassified(
            out_dir / "misclassified.tsv", test, predictions, test_probs, labels,
            section["misclassified_examples"],
        )  # fmt: skip
        plot_confusion_matrix(counts, labels, out_dir / "confusion_matrix.png", title=STAGE)
        plot_training_curves(result.history, out_dir / "loss.png", title=STAGE)
        save_checkpoint(
            model,
            out_dir / "model",
            metadata={
                "stage": STAGE,
                "classifier": {
                    "labels": labels,
                    "pooling": section["pooling"],
                    "positive_label": positive_label,
                    "max_length": max_length,
                },
                "tokenizer": {"name": "gpt2", "eot_token": END_OF_TEXT_ID},
                "metrics": {k: v for k, v in metrics.items() if k.startswith("test_")},
            },
            extra_files=checkpoint_tokenizer_files(start),
        )
        finish_stage(tracker, config, out_dir, metrics, result.step, ARTIFACTS)
    clear_resume_state(paths.stage_resume(STAGE))
    return metrics


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
