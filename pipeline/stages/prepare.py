"""Stage `prepare`: the pretraining corpus -> sharded token files of the tokenizer stage's BPE
(data/tokens: train-00000.bin, ..., val-00000.bin, meta.json, tokenizer/).

The corpus (`prepare.corpus`: downloaded sources and local files, directories or globs of text,
JSONL and parquet) is split into `prepare.scatter` groups of files; each group is tokenized into
data/token-parts/<i>-of-<n> (`--part i-of-n`: one Snakemake job each, on a cluster one SLURM job
each), then one job gathers the parts into the token files (`--gather`). Run alone, without
either flag, it does all of it in this process. The token files are the same whatever the
number of parts or workers. The gather logs val's share of the tokens and warns when the
`documents` split (whole documents) put it far from `prepare.val_fraction`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.data.corpus import CorpusFile, corpus_files, split_into_parts, split_mode
from pipeline.data.tokenizer import has_tokenizer, load_tokenizer
from pipeline.data.tokens import gather_parts, tokenize_part, val_split_warning
from pipeline.errors import InputError
from pipeline.settings import PrepareSettings, StageConfig
from pipeline.tracking import WARNINGS_FILE, stage_run

Prepare = StageConfig[PrepareSettings]

log = logging.getLogger("pipeline.prepare")


def part_names(scatter: int) -> list[str]:
    """The parts' names, as Snakemake's scatter names its items: 1-of-3, 2-of-3, 3-of-3."""
    return [f"{i}-of-{scatter}" for i in range(1, scatter + 1)]


def listed_corpus(config: Prepare) -> list[CorpusFile]:
    """Every file of `prepare.corpus`, globs expanded, in corpus order."""
    return corpus_files(config.section.corpus, config.paths)


def corpus_parts(config: Prepare, files: list[CorpusFile] | None = None
                 ) -> dict[str, list[CorpusFile]]:  # fmt: skip
    """Each part's input files (contiguous groups of about equal size, in corpus order), of
    `files` when the corpus is already listed."""
    scatter = config.section.scatter
    groups = split_into_parts(listed_corpus(config) if files is None else files, scatter)
    return dict(zip(part_names(scatter), groups, strict=True))


def tokenize(config: Prepare, part: str, threads: int | None) -> dict[str, Any]:
    """One part's files -> data/token-parts/<part>."""
    section, paths = config.section, config.paths
    corpus = listed_corpus(config)  # globs expanded once
    parts = corpus_parts(config, corpus)
    if part not in parts:
        raise InputError(f"--part {part}: expected one of {', '.join(parts)}")
    files = parts[part]
    missing = [str(f.path) for f in files if not f.path.is_file()]
    if missing:
        raise FileNotFoundError(f"corpus files missing (run `python -m pipeline download`): "
                                f"{missing}")  # fmt: skip
    if not has_tokenizer(paths.tokenizer):
        raise FileNotFoundError(f"{paths.tokenizer}: no tokenizer; run `python -m pipeline "
                                "tokenizer` first (Snakemake runs it before prepare)")  # fmt: skip
    workers = section.workers or threads or 1
    meta = tokenize_part(
        files, paths.token_part(part), load_tokenizer(paths.tokenizer), workers=workers,
        split=split_mode(section, corpus), val_fraction=section.val_fraction,
        skip_bad=section.on_bad_record == "skip",
    )  # fmt: skip
    for record in meta["inputs"]:
        if record["skipped"]:
            log.warning("%s: skipped %s", record["file"], record["skipped"])
    log.info("part %s: %d files, %d documents, %d tokens, %d workers", part, len(files),
             sum(r["documents"] for r in meta["inputs"]), sum(meta["tokens"].values()),
             workers)  # fmt: skip
    return meta


def gather(config: Prepare) -> dict[str, Any]:
    """The parts -> data/tokens (shards, split, meta.json); logged to MLflow."""
    section, paths = config.section, config.paths
    parts = [paths.token_part(name) for name in part_names(section.scatter)]
    warnings_file = paths.stage("prepare") / WARNINGS_FILE
    with stage_run(
        config.tracking, "prepare", config.resolved, warnings_file=warnings_file
    ) as tracker:
        meta = gather_parts(
            parts, paths.tokens, paths.tokenizer,
            split=split_mode(section, listed_corpus(config)),
            val_fraction=section.val_fraction, shard_tokens=section.shard_tokens,
        )  # fmt: skip
        skipped = sum(sum(r["skipped"].values()) for r in meta["inputs"])
        tracker.log_params(  # what the data is, not a series: params, not one-point charts
            {
                "train_tokens": meta["train_tokens"],
                "val_tokens": meta["val_tokens"],
                "val_fraction_realised": meta["val_fraction_realised"],
                "documents": sum(r["documents"] for r in meta["inputs"]),
                "skipped_records": skipped,
                "input_bytes": sum(r["bytes"] for r in meta["inputs"]),
            }
        )
        tracker.log_datasets(
            (
                {
                    "name": Path(record["file"]).name,
                    "source": record["file"],
                    "digest": record["sha256"],
                    "profile": {k: record[k] for k in ("bytes", "documents", "tokens", "skipped")},
                }
                for record in meta["inputs"]
            ),
            context="training",
        )
        tracker.log_artifact(paths.tokens / "meta.json")
        warning = val_split_warning(meta)
        if warning:
            tracker.warn(warning, log)
    log.info("%d train and %d val tokens (%s split; val %.1f%% of the tokens, val_fraction "
             "%.1f%%) in %d + %d shards; %d records skipped", meta["train_tokens"],
             meta["val_tokens"], meta["split"], 100 * meta["val_fraction_realised"],
             100 * meta["val_fraction"], len(meta["shards"]["train"]),
             len(meta["shards"]["val"]), skipped)  # fmt: skip
    return meta


def main(
    config: Prepare,
    threads: int | None = None,
    part: str | None = None,
    gather_only: bool = False,
) -> dict[str, Any]:
    """`part`: tokenize that part only; `gather_only`: gather the parts; neither: both, here."""
    if part is not None:
        return tokenize(config, part, threads)
    if gather_only:
        return gather(config)
    names = part_names(config.section.scatter)
    for name in names:
        tokenize(config, name, threads)
    meta = gather(config)
    parts = config.paths.token_parts
    for name in names:
        shutil.rmtree(parts / name, ignore_errors=True)
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return meta
