"""Labelled texts for classification: the SMS Spam Collection, balancing, stratified splits, TSVs.

Files are read line by line with quoting off: SMS texts contain `"` and tabs that a CSV reader
would swallow or split on. The label is the first column, so a tab inside a text is kept.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import atomic_write_text

BALANCE_MODES = ("undersample", "class_weights")


@dataclass(frozen=True)
class LabeledText:
    label: str
    text: str


def read_lines(path: Path) -> list[str]:
    """The file's lines, split at `\n` only (a text may hold other Unicode line separators);
    invalid UTF-8 is an error naming the line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_label_tab_text(
    path: Path, labels: Sequence[str] | None = None, labels_key: str = "labels"
) -> list[LabeledText]:
    """`label<TAB>text` lines with no header (the SMS Spam Collection's format); with `labels`,
    a line with any other label is an error naming the line, the label and the setting
    `labels_key` that lists them."""
    records = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip() or not text.strip():
            raise InputError(f"{path}:{number}: expected 'label<TAB>text', got {line[:80]!r}")
        if labels is not None and label.strip() not in labels:
            raise InputError(
                f"{path}:{number}: label {label.strip()!r} is not one of the expected labels "
                f"{', '.join(labels)} ({labels_key}); correct the line, or list the label there"
            )
        records.append(LabeledText(label.strip(), text))
    if not records:
        raise InputError(f"{path}: no records")
    missing = sorted(set(labels or ()) - {r.label for r in records})
    if missing:
        raise InputError(f"{path}: no records labelled {', '.join(missing)} ({labels_key})")
    return records


def write_tsv(path: Path, records: Sequence[LabeledText]) -> None:
    """A `label<TAB>text` file with a header, written atomically."""
    lines = ["label\ttext"]
    for r in records:
        if "\n" in r.text or "\r" in r.text:
            raise InputError(f"text of a {r.label!r} record contains a line break: {r.text[:80]!r}")
        lines.append(f"{r.label}\t{r.text}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tsv(path: Path, require_label: bool = True) -> list[LabeledText]:
    """A TSV with a header holding a `text` column (and `label`, unless not required).

    When `text` is the last column, tabs inside texts are kept; empty texts are an error
    naming the line.
    """
    lines = read_lines(path)
    if not lines[0].strip():
        raise InputError(f"{path}: empty file, expected a header with a 'text' column")
    columns = lines[0].split("\t")
    if "text" not in columns or (require_label and "label" not in columns):
        wanted = "'label' and 'text' columns" if require_label else "a 'text' column"
        raise InputError(f"{path}:1: header {columns} does not have {wanted}")
    text_last = columns[-1] == "text"
    records = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t", len(columns) - 1) if text_last else line.split("\t")
        if len(fields) != len(columns):
            raise InputError(f"{path}:{number}: expected {len(columns)} columns, got {len(fields)}")
        row = dict(zip(columns, fields, strict=True))
        if not row["text"].strip():
            raise InputError(f"{path}:{number}: empty text")
        records.append(LabeledText(row.get("label", ""), row["text"]))
    return records


def label_counts(records: Sequence[LabeledText]) -> dict[str, int]:
    return dict(sorted(Counter(r.label for r in records).items()))


def undersample(records: Sequence[LabeledText], seed: int) -> list[LabeledText]:
    """Every class cut to the size of the smallest (random members kept), in a seeded order."""
    rng = random.Random(seed)
    by_label: dict[str, list[LabeledText]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    size = min(len(group) for group in by_label.values())
    kept = [r for label in sorted(by_label) for r in rng.sample(by_label[label], size)]
    rng.shuffle(kept)
    return kept


def class_weights(records: Sequence[LabeledText], labels: Sequence[str]) -> list[float]:
    """n / (classes · count): each class contributes equally to a weighted loss."""
    counts = Counter(r.label for r in records)
    missing = [label for label in labels if counts[label] == 0]
    if missing:
        raise InputError(f"no training records with label(s) {missing}")
    return [len(records) / (len(labels) * counts[label]) for label in labels]


def stratified_split(
    records: Sequence[LabeledText], train: float, val: float, seed: int
) -> tuple[list[LabeledText], list[LabeledText], list[LabeledText]]:
    """Each class split train/val/test in the same proportions (test gets the rest; sizes are
    rounded per class), each split in a seeded shuffled order."""
    if not (0 < train < 1 and 0 <= val < 1 and train + val < 1):
        raise InputError(
            f"split fractions need 0 < train, 0 <= val, train + val < 1: {train}, {val}"
        )
    rng = random.Random(seed)
    by_label: dict[str, list[LabeledText]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    splits: tuple[list[LabeledText], ...] = ([], [], [])
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_train = round(len(group) * train)
        n_val = round(len(group) * val)
        splits[0].extend(group[:n_train])
        splits[1].extend(group[n_train : n_train + n_val])
        splits[2].extend(group[n_train + n_val :])
    for split in splits:
        rng.shuffle(split)
    return splits[0], splits[1], splits[2]


def read_texts(path: Path) -> list[str]:
    """Texts from a TSV with a `text` column, else one per line; a clear error names the line,
    or the file when it holds no text at all."""
    lines = read_lines(path)
    if lines and "\t" in lines[0] and "text" in lines[0].split("\t"):
        texts = [r.text for r in read_tsv(path, require_label=False)]
    else:
        texts = lines[:-1] if lines and lines[-1] == "" else lines
        for number, line in enumerate(texts, start=1):
            if not line.strip():
                raise InputError(f"{path}:{number}: empty text")
    if not texts:
        raise InputError(
            f"{path}: no texts to classify; expected one text a line, or a TSV whose header has "
            "a 'text' column and a text on each line after it"
        )
    return texts
