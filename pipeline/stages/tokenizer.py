"""Stage `tokenizer`: the BPE every later stage encodes with -> data/tokenizer/.

`tokenizer.kind: gpt2` writes GPT-2's ranks (from the downloaded encoder.json + vocab.bpe);
`trained` learns a byte-level BPE of `vocab_size` ids with rustbpe (nanochat's trainer) from the
corpus's training text and, if asked, fine-tuning stages' training splits
(pipeline/data/tokenizer_sample.py), at most `max_chars` characters streamed, so time and memory
are bounded by the cap, not the corpus. Either way the files are the format of
pipeline/data/tokenizer.py; the same corpus and settings give the same bytes. How long it took
and its peak memory go to results/tokenizer/training.json.

`--report` (its own rule, once `prepare` has written the tokens) measures bytes per token,
against GPT-2's, on exactly the val split and on each fine-tuning stage's val and test records:
results/tokenizer/metrics.json and the MLflow run `tokenizer`, which also holds the files.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from pipeline.data.tokenizer import (
    PATTERNS,
    gpt2_ranks,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_info,
    write_tokenizer,
)
from pipeline.data.tokenizer_sample import capped, corpus_train_text, fine_tuning_texts
from pipeline.data.tokens import load_tokens
from pipeline.errors import InputError
from pipeline.io import atomic_directory, atomic_write_json
from pipeline.settings import END_OF_TEXT, StageConfig, TokenizerSettings
from pipeline.stages.registry import fine_tuning_stages
from pipeline.tracking import WARNINGS_FILE, stage_run

TokenizerConfig = StageConfig[TokenizerSettings]
STAGE = "tokenizer"
TRAINING_FILE = "training.json"
RATIOS = ("bytes_per_token", "gpt2_bytes_per_token", "vs_gpt2")
"""The report's results (MLflow metrics); its counts are params."""

log = logging.getLogger("pipeline.tokenizer")


def train_ranks(texts: Iterable[str], ranks: int, pattern: str) -> dict[bytes, int]:
    """A byte-level BPE of `ranks` tokens (256 bytes + merges) learned from `texts`; fewer
    when the text has too few distinct pairs. rustbpe uses every core unless
    RAYON_NUM_THREADS says otherwise (the rule sets it)."""
    import rustbpe  # deferred: only a trained tokenizer needs it

    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # a line per 1% of the merges
    log.info("learning %d merges (%s pattern)", ranks - 256, pattern)
    trainer = rustbpe.Tokenizer()  # pyright: ignore[reportAttributeAccessIssue]  (no stubs)
    trainer.train_from_iterator(iter(texts), ranks, pattern=PATTERNS[pattern])
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


class _Counted:
    """An iterator of texts that counts their characters as they pass."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.chars = iter(texts), 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            yield text


def sample(config: TokenizerConfig) -> Iterator[str]:
    """What a trained tokenizer learns from: the corpus's training text, then the named
    fine-tuning stages' training splits, `max_chars` characters in all."""
    section = config.section

    def texts() -> Iterator[str]:
        yield from corpus_train_text(config, section.max_chars)
        for stage in section.fine_tuning:
            yield from fine_tuning_texts(config, stage).train

    return capped(texts(), section.max_chars)


def learn(config: TokenizerConfig) -> tuple[dict[bytes, int], dict[str, Any]]:
    """The trained ranks and how they were learned (characters, seconds, peak memory)."""
    section = config.section
    wanted = section.vocab_size - len(section.special_tokens)
    text = _Counted(sample(config))
    start = time.perf_counter()
    ranks = train_ranks(text, wanted, section.pattern)
    seconds = time.perf_counter() - start
    if len(ranks) < wanted:
        raise InputError(
            f"tokenizer: learned {len(ranks) - 256:,} merges from {text.chars:,} characters; "
            f"vocab_size {section.vocab_size:,} needs {wanted - 256:,}: lower "
            "tokenizer.vocab_size or learn from more text (prepare.corpus, "
            "tokenizer.max_chars, tokenizer.fine_tuning)"
        )
    return ranks, {"chars": text.chars, "seconds": round(seconds, 3),
                   "peak_rss_mb": round(peak_rss_mb(), 1)}  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def build(config: TokenizerConfig) -> dict[str, Any]:
    """data/tokenizer/ (replaced whole) and results/tokenizer/training.json."""
    section, paths = config.section, config.paths
    if section.kind == "gpt2":
        ranks, how = gpt2_ranks(paths.bpe), {"source": str(paths.bpe)}
        pattern, specials = "gpt2", [END_OF_TEXT]
    else:
        ranks, how = learn(config)
        pattern, specials = section.pattern, section.special_tokens
    with atomic_directory(paths.tokenizer) as tmp:
        info = write_tokenizer(tmp, ranks, section.kind, pattern, specials)
    training = {**info.as_dict(), "pattern": pattern, **how}
    atomic_write_json(paths.stage(STAGE) / TRAINING_FILE, training)
    log.info("%s tokenizer: %d ids (sha256 %s) in %s", section.kind, info.n_vocab,
             info.sha256[:12], paths.tokenizer)  # fmt: skip
    if "seconds" in how:
        log.info("learned from %d characters in %.1f s, peak memory %.0f MB", how["chars"],
                 how["seconds"], how["peak_rss_mb"])  # fmt: skip
    return training


def val_documents(tokens_dir: Path, tokenizer: tiktoken.Encoding) -> list[bytes]:
    """The val split's documents (cut at end-of-text) as the bytes they encode."""
    ids = np.asarray(load_tokens(tokens_dir, "val"))
    cuts = np.flatnonzero(ids == tokenizer.eot_token)
    pieces = np.split(ids, cuts)
    return [tokenizer.decode_bytes(p[p != tokenizer.eot_token].tolist()) for p in pieces]


def compression(texts: Sequence[bytes], tokenizer: tiktoken.Encoding, gpt2: tiktoken.Encoding
                ) -> dict[str, float]:  # fmt: skip
    """Bytes per token of `tokenizer` and of GPT-2's on `texts`, each encoded whole."""
    size = sum(len(t) for t in texts)
    decoded = [t.decode("utf-8", errors="replace") for t in texts]
    tokens = sum(len(ids) for ids in tokenizer.encode_ordinary_batch(decoded))
    gpt2_tokens = sum(len(ids) for ids in gpt2.encode_ordinary_batch(decoded))
    ours, theirs = size / max(tokens, 1), size / max(gpt2_tokens, 1)
    return {"bytes": size, "tokens": tokens, "bytes_per_token": round(ours, 4),
            "gpt2_tokens": gpt2_tokens, "gpt2_bytes_per_token": round(theirs, 4),
            "vs_gpt2": round(ours / theirs, 4)}  # fmt: skip


def report(config: TokenizerConfig) -> dict[str, Any]:
    """results/tokenizer/metrics.json and the MLflow run: compression on held-out text."""
    paths = config.paths
    tokenizer = load_tokenizer(paths.tokenizer)
    gpt2 = gpt2_tokenizer(paths.bpe)
    metrics = {"val": compression(val_documents(paths.tokens, tokenizer), tokenizer, gpt2)}
    for stage in fine_tuning_stages():
        texts = fine_tuning_texts(config, stage).evaluation
        metrics[stage] = compression([t.encode() for t in texts], tokenizer, gpt2)
    info = tokenizer_info(paths.tokenizer)
    out = paths.stage(STAGE)
    with stage_run(config.tracking, STAGE, config.resolved,
                   warnings_file=out / WARNINGS_FILE) as tracker:  # fmt: skip
        training = _read_training(out / TRAINING_FILE)
        tracker.log_params({**info.as_dict(), **{k: v for k, v in training.items()
                                                  if k not in info.as_dict()}})  # fmt: skip
        tracker.log_metrics({f"{name}/{key}": float(values[key]) for name, values in metrics.items()
                             for key in RATIOS}, step=0)  # fmt: skip
        tracker.log_params({f"{name}/{key}": value for name, values in metrics.items()
                            for key, value in values.items() if key not in RATIOS})  # fmt: skip
        tracker.log_datasets([{"name": "tokenizer", "source": paths.tokenizer,
                               "digest": info.sha256, "profile": info.as_dict()}],
                             context="tokenizer")  # fmt: skip
        tracker.log_artifact(paths.tokenizer, "tokenizer")
        if (out / TRAINING_FILE).is_file():
            tracker.log_artifact(out / TRAINING_FILE)
        atomic_write_json(out / "metrics.json", metrics)
        tracker.log_artifact(out / "metrics.json")
    for name, m in metrics.items():
        log.info("%s: %.3f bytes per token (GPT-2's %.3f: x%.3f)", name, m["bytes_per_token"],
                 m["gpt2_bytes_per_token"], m["vs_gpt2"])  # fmt: skip
    return metrics


def _read_training(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(config: TokenizerConfig, threads: int | None = None, report_only: bool = False
         ) -> dict[str, Any]:  # fmt: skip
    """Write the tokenizer, or with `report_only` measure the one written."""
    return report(config) if report_only else build(config)
