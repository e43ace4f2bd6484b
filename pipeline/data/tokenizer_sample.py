"""The text a tokenizer learns from and is measured on, streamed.

It learns from the corpus's training text only, in corpus order: for the `documents` split the
documents `prepare` will not put in val (the same hash), for the `tail` split the text before
the last `val_fraction` of its characters (prepare cuts its tail in tokens, so the two cuts
differ by a few characters). Then, if asked, the training split of fine-tuning stages, split as
each stage splits it (the same seed); their val and test splits never join, and they are what
the compression report measures.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipeline.data.corpus import CorpusFile, FileReport, corpus_files, read_documents, split_mode
from pipeline.data.tokens import in_val
from pipeline.settings import (
    ClassifierSettings,
    Config,
    DpoSettings,
    InstructSettings,
    PrepareSettings,
)

INSTRUCT_TEMPLATE = "alpaca"
"""A preference section with no template of its own (it takes its start checkpoint's) is
written with finetune-instruct's, else this."""


def _documents(files: list[CorpusFile], skip_bad: bool) -> Iterator[tuple[str, bool]]:
    for file in files:
        yield from read_documents(file, FileReport(), skip_bad)


def corpus_train_text(config: Config, max_chars: int) -> Iterator[str]:
    """The corpus's training text (see the module's docstring), streamed; `max_chars` only
    bounds how far the tail split reads to find the val boundary (callers cap the stream)."""
    section = config.section_of("prepare", PrepareSettings)
    files = corpus_files(section.corpus, config.paths)
    skip_bad = section.on_bad_record == "skip"
    if split_mode(section, files) == "documents":
        keep = True
        for text, starts in _documents(files, skip_bad):
            keep = not in_val(text, section.val_fraction) if starts else keep
            if keep:
                yield text
        return
    # tail: the total is needed only up to where the train part alone covers max_chars
    enough = max_chars / (1 - section.val_fraction) + 1
    total = 0
    for text, _ in _documents(files, skip_bad):
        total += len(text)
        if total > enough:
            break
    yield from capped((text for text, _ in _documents(files, skip_bad)),
                      int(total * (1 - section.val_fraction)))  # fmt: skip


def capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """`texts` up to `max_chars` characters in all, the last one cut."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)


@dataclass(frozen=True)
class FineTuningTexts:
    train: list[str]
    evaluation: list[str]
    """The val and test splits' texts."""


def fine_tuning_texts(config: Config, stage: str) -> FineTuningTexts:
    """A fine-tuning stage's records as the texts the model reads (labelled text; prompt and
    response, a preference record's chosen and rejected), split as the stage splits them."""
    # deferred: the instruction data module imports torch; building the DAG does not need it
    from pipeline.data.instruct import format_prompt, load_records, split_records
    from pipeline.data.labeled_text import read_label_tab_text, stratified_split, undersample

    section = config.sections[stage]
    path = config.paths.source(section.data)
    if isinstance(section, ClassifierSettings):
        records = read_label_tab_text(path, sorted(section.labels), f"{stage}.labels")
        if section.balance == "undersample":
            records = undersample(records, config.seed)
        train, val, test = stratified_split(records, section.split.train, section.split.val,
                                            config.seed)  # fmt: skip
        return FineTuningTexts([r.text for r in train], [r.text for r in (*val, *test)])
    if isinstance(section, DpoSettings):
        responses, template = ("chosen", "rejected"), section.template or _instruct_template(config)
    elif isinstance(section, InstructSettings):
        responses, template = ("output",), section.template
    else:
        raise TypeError(f"{stage}: no fine-tuning texts for {type(section).__name__}")
    keys = ("instruction", "input", *responses)
    records, _ = load_records(path, required=keys, skip_invalid=section.skip_invalid)
    splits = split_records(records, section.split.train, section.split.val, seed=config.seed)

    def texts(split: list[dict]) -> list[str]:
        return [format_prompt(r, template) + r[key] for r in split for key in responses]

    return FineTuningTexts(texts(splits[0]), texts([*splits[1], *splits[2]]))


def _instruct_template(config: Config) -> str:
    section = config.sections.get("finetune-instruct")
    return section.template if isinstance(section, InstructSettings) else INSTRUCT_TEMPLATE
