"""The token shards checked against `meta.json`, which records each one's tokens, bytes and
sha256 as `prepare` writes it: a truncated or overwritten shard is named before anything reads
it, not met as a raw IndexError steps into training, or never.

Three checks: `check_split` before a training stage maps a split's shards (sizes, then the
sha256 of each; hashing runs at about 1 GB/s, seconds for GBs of tokens next to hours of
training); `verify` for `python -m pipeline verify`, every shard; and `changed_shards` while the
Snakefile builds the DAG, so a changed shard reruns `prepare` (Snakemake checks a rule's inputs,
never the contents of its outputs). That one stats every shard and hashes only those whose mtime
is not older than meta.json's (written after them): nothing but a stat when nothing changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io import sha256_file

META = "meta.json"
RERUN = "rerun prepare: snakemake --cores all -R prepare, or python -m pipeline prepare"


def read_meta(token_dir: Path) -> dict[str, Any]:
    """The token directory's index, `meta.json`."""
    path = token_dir / META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token index not found (run `python -m pipeline prepare`)")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not the JSON index prepare writes ({exc}); {RERUN}") from None


def shard_problem(path: Path, record: Mapping[str, Any], itemsize: int, hash_it: bool = True
                  ) -> str | None:  # fmt: skip
    """What is wrong with one shard against its `meta.json` record; None when nothing is. A
    record without a sha256 (a meta.json from before checksums) is checked by size only."""
    if not path.is_file():
        return f"{path}: listed in {META} but not found"
    size, tokens = path.stat().st_size, record["tokens"]
    if size % itemsize:
        return (f"{path}: {size:,} bytes, not a whole number of {itemsize}-byte tokens (cut "
                f"short?); expected {tokens:,} tokens from {META}")  # fmt: skip
    if size != tokens * itemsize:
        return f"{path}: expected {tokens:,} tokens from {META}, found {size // itemsize:,}"
    if hash_it and record.get("sha256") and sha256_file(path) != record["sha256"]:
        return f"{path}: sha256 differs from {META}'s: the file changed after prepare wrote it"
    return None


def problems(token_dir: Path, meta: Mapping[str, Any], splits: Iterable[str] | None = None,
             newer_than: int | None = None) -> list[str]:  # fmt: skip
    """Each damaged shard of `splits` (default: all), in one line; with `newer_than` (ns), only
    the shards modified at or after it are hashed (the others are checked by size)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    found = []
    for split in meta["shards"] if splits is None else splits:
        for record in meta["shards"][split]:
            path = token_dir / record["file"]
            hash_it = newer_than is None or (
                path.is_file() and path.stat().st_mtime_ns >= newer_than
            )
            problem = shard_problem(path, record, itemsize, hash_it)
            if problem:
                found.append(problem)
    return found


def _first(found: list[str]) -> str:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return found[0] + more


def check_split(token_dir: Path, meta: Mapping[str, Any], split: str) -> None:
    """Refuse a damaged shard of `split` before it is read: one line naming it."""
    found = problems(token_dir, meta, [split])
    if found:
        raise InputError(f"{_first(found)}; {RERUN}")


def verify(token_dir: Path) -> tuple[list[str], str]:
    """Every shard against meta.json: the problems, one line each, and a summary line."""
    meta = read_meta(token_dir)
    found = problems(token_dir, meta)
    shards = [r for split_shards in meta["shards"].values() for r in split_shards]
    if found:
        return found, f"{len(found)} of {len(shards)} token shards damaged; {RERUN}"
    counted = f"{token_dir}: {len(shards)} shards, {sum(r['tokens'] for r in shards):,} tokens"
    unhashed = sum(not r.get("sha256") for r in shards)
    if unhashed:
        return [], (f"{counted}, match {META} by size; {unhashed} have no sha256 there (written "
                    f"before checksums): {RERUN} to add them")  # fmt: skip
    return [], f"{counted}, match {META} (sizes and sha256)"


def changed_shards(token_dir: Path) -> list[str]:
    """The shards changed since prepare wrote them, cheaply (for the DAG): sizes, and the sha256
    of those modified since meta.json was written; none without a token directory (prepare
    makes it anyway)."""
    if not token_dir.is_dir():
        return []
    try:
        meta = read_meta(token_dir)
        return problems(token_dir, meta, newer_than=(token_dir / META).stat().st_mtime_ns)
    except (OSError, InputError) as exc:
        return [str(exc)]


def changed_line(found: list[str]) -> str:
    """The Snakefile's line for a changed shard: which, and that prepare reruns."""
    return f"{_first(found)}; prepare reruns"
