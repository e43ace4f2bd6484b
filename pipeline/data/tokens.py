"""Token files: the pretraining corpus as uint16 ids of its tokenizer, in shards, read by memmap.

`prepare` runs in two steps, so a cluster can spread the first over many jobs:
1. `tokenize_part`: one group of input files -> a part directory: its documents encoded in
   batches by `workers` threads (tiktoken releases the GIL; ids come back as numpy arrays, never
   as Python lists) while this thread reads the next batch and writes the last one to
   `train.bin` / `val.bin`, with `<|endoftext|>` between documents, and `part.json` (each input
   file's size, sha256, documents, tokens and skipped records);
2. `gather_parts`: the parts, in order -> the token directory: the train and val streams joined
   (again with `<|endoftext|>` between), split, cut into shards of at most `shard_tokens`
   (`train-00000.bin`, ..., `val-00000.bin`), and `meta.json` indexing them (each shard's
   tokens, bytes and sha256, which `load_tokens` checks: `pipeline.data.shards`), with a copy
   of the tokenizer in `tokenizer/` (its identity in meta.json).
The result depends only on the corpus and the settings, not on how many parts or workers made
it. Both steps write into a temporary directory swapped in whole: an interrupted `prepare`
leaves no partial file that a later run would read.

The split: `tail` keeps the last `val_fraction` of all tokens (a corpus of one document, as
Tiny Shakespeare); `documents` puts a document in val when a hash of its text (of its first
piece, for one longer than `corpus.PIECE_CHARS`) falls below `val_fraction`, so no document is
in both and adding documents moves none; `auto` is `tail` for one document and `documents` for
more. Whole documents make val's share of the tokens only near `val_fraction` when no document
is a large share of the corpus: `meta.json` records the share it came to
(`val_fraction_realised`), and `val_split_warning` says when it is far off.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from pipeline.data.corpus import CorpusFile, FileReport, read_documents
from pipeline.data.shards import META, check_split, read_meta
from pipeline.data.tokenizer import load_tokenizer, tokenizer_files, tokenizer_info
from pipeline.errors import InputError
from pipeline.io import atomic_directory, atomic_write_json, sha256_file

TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")
PART_META = "part.json"
TOKENIZER_DIR = "tokenizer"
"""Where data/tokens keeps the tokenizer its ids are of (as a checkpoint does)."""
BATCH_CHARS = 4 << 20
"""Characters of text encoded per batch: enough for every worker, small enough to bound memory."""
COPY_TOKENS = 1 << 24
VAL_FRACTION_TOLERANCE = 0.05
"""The realised val share may be off `val_fraction` by half the setting or by this (5 points),
whichever is less, before `val_split_warning` warns."""


def _check_vocab(tokenizer: tiktoken.Encoding) -> None:
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise InputError(
            f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids: too many for uint16"
        )


def in_val(document: str, val_fraction: float) -> bool:
    """The `documents` split: a stable hash of the text against `val_fraction`."""
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class _Stream:
    """One split's ids, appended to a file, with `<|endoftext|>` between documents."""

    def __init__(self, path: Path, eot: int) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115
        self.eot = eot
        self.tokens = 0

    def write(self, ids: np.ndarray, starts_document: bool) -> None:
        if starts_document and self.tokens:
            self.handle.write(np.array([self.eot], dtype=TOKEN_DTYPE).tobytes())
            self.tokens += 1
        self.handle.write(ids.astype(TOKEN_DTYPE).tobytes())
        self.tokens += len(ids)

    def close(self) -> None:
        self.handle.close()


class _PartStreams:
    """A part's train and val streams and its per-file token counts. With the `documents`
    split a document goes where the hash of its first piece (the whole text, unless it is
    longer than `PIECE_CHARS`) sends it, and its later pieces follow."""

    def __init__(self, directory: Path, eot: int, split: str, val_fraction: float, files: int):
        self.streams = {name: _Stream(directory / f"{name}.bin", eot) for name in SPLITS}
        self.split, self.val_fraction = split, val_fraction
        self.tokens = [0] * files
        self.current = "train"

    def write(self, batch: Sequence[Piece], encoded: Sequence[np.ndarray]) -> None:
        for (index, text, starts), ids in zip(batch, encoded, strict=True):
            self.tokens[index] += len(ids)
            if starts:
                val = self.split == "documents" and in_val(text, self.val_fraction)
                self.current = "val" if val else "train"
            self.streams[self.current].write(ids, starts)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


Piece = tuple[int, str, bool]
"""(file index, text, starts a document): a document or, for a long one, a piece of it."""


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    """Pieces in batches of about BATCH_CHARS, across files."""
    batch: list[Piece] = []
    size = 0
    for item in pieces:
        batch.append(item)
        size += len(item[1])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _pieces(
    files: Sequence[CorpusFile], reports: Sequence[FileReport], skip_bad: bool
) -> Iterator[Piece]:
    for index, (file, report) in enumerate(zip(files, reports, strict=True)):
        for text, starts in read_documents(file, report, skip_bad):
            yield index, text, starts


def tokenize_part(
    files: Sequence[CorpusFile],
    out_dir: Path,
    tokenizer: tiktoken.Encoding,
    *,
    workers: int,
    split: str,
    val_fraction: float,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Encode `files`' documents into `out_dir` (`train.bin`, `val.bin`, `part.json`); `split`
    is `tail` (every document to train; the gather splits) or `documents`."""
    _check_vocab(tokenizer)
    reports = [FileReport() for _ in files]
    with atomic_directory(out_dir) as tmp, ThreadPoolExecutor(workers) as pool:
        out = _PartStreams(tmp, tokenizer.eot_token, split, val_fraction, len(files))
        in_flight: deque[tuple[list[Piece], list[Future]]] = deque()
        try:
            for batch in _batches(_pieces(files, reports, skip_bad)):
                # Encode this batch while the one before is written and the next is read: the
                # reading, hashing and writing overlap the encoding, which is most of the time.
                in_flight.append((batch, [pool.submit(_encode, tokenizer, p[1]) for p in batch]))
                if len(in_flight) > 1:
                    out.write(*_encoded(*in_flight.popleft()))
            while in_flight:
                out.write(*_encoded(*in_flight.popleft()))
        finally:
            for _, futures in in_flight:
                for future in futures:
                    future.cancel()
            out.close()
        meta = {
            "inputs": [
                _input_record(f, r, n) for f, r, n in zip(files, reports, out.tokens, strict=True)
            ],
            "tokens": {name: stream.tokens for name, stream in out.streams.items()},
        }
        atomic_write_json(tmp / PART_META, meta)
    return meta


def _encode(tokenizer: tiktoken.Encoding, text: str) -> np.ndarray:
    """`encode_ordinary` (special tokens are plain text), straight to a numpy array."""
    return tokenizer.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def _encoded(batch: list[Piece], futures: list[Future]) -> tuple[list[Piece], list[np.ndarray]]:
    return batch, [future.result() for future in futures]


def _input_record(file: CorpusFile, report: FileReport, tokens: int) -> dict[str, Any]:
    return {
        "file": str(file.path),
        "entry": file.entry,
        "format": file.format,
        "bytes": file.path.stat().st_size,
        "sha256": sha256_file(file.path),
        "documents": report.documents,
        "tokens": tokens,
        "skipped": report.skipped,
    }


class _ShardWriter:
    """A split's ids cut into files of at most `shard_tokens`: `<split>-00000.bin`, ..., each
    recorded with its tokens, bytes and sha256 (hashed as written, so readers can check it)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.handle = None
        self.digest = hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.handle is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next()
            assert self.handle is not None  # _next opened one
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk = ids[:room]
            data = np.ascontiguousarray(chunk, dtype=TOKEN_DTYPE).tobytes()
            self.handle.write(data)
            self.digest.update(data)
            self.shards[-1]["tokens"] += len(chunk)
            ids = ids[room:]

    def _next(self) -> None:
        self._finish()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.handle = open(self.directory / name, "wb")  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _finish(self) -> None:
        """Close the current shard and complete its record."""
        if self.handle is None:
            return
        self.handle.close()
        self.handle = None
        shard = self.shards[-1]
        shard["bytes"] = shard["tokens"] * np.dtype(TOKEN_DTYPE).itemsize
        shard["sha256"] = self.digest.hexdigest()

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def _part_streams(parts: Sequence[Path], split: str, eot: int) -> Iterator[np.ndarray]:
    """The parts' `split` streams in order, joined by `<|endoftext|>`, in bounded chunks."""
    first = True
    for part in parts:
        path = part / f"{split}.bin"
        if not path.stat().st_size:
            continue
        if not first:
            yield np.array([eot], dtype=TOKEN_DTYPE)
        first = False
        # Read, not memory-mapped: a map's pages stay resident, so the peak RSS would grow
        # with the corpus.
        with open(path, "rb") as handle:
            while len(chunk := np.fromfile(handle, dtype=TOKEN_DTYPE, count=COPY_TOKENS)):
                yield chunk


def gather_parts(
    parts: Sequence[Path],
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    split: str,
    val_fraction: float,
    shard_tokens: int,
) -> dict[str, Any]:
    """Join the parts' streams into the split's shards in `out_dir`, with `meta.json` and a
    copy of the tokenizer they were encoded with (`out_dir`/tokenizer, named in meta.json), so
    that training reads the tokenizer of its tokens."""
    tokenizer, info = load_tokenizer(tokenizer_dir), tokenizer_info(tokenizer_dir)
    metas = [json.loads((part / PART_META).read_text()) for part in parts]
    inputs = [record for meta in metas for record in meta["inputs"]]
    counts = {name: _joined_length([m["tokens"][name] for m in metas]) for name in SPLITS}
    if split == "tail":
        n_val = int(round(counts["train"] * val_fraction))
        counts = {"train": counts["train"] - n_val, "val": n_val}
    if counts["val"] < 2 or counts["train"] < 2:
        raise InputError(
            f"corpus {[r['file'] for r in inputs]}: {counts['train']} train and {counts['val']} "
            f"val tokens are too few (split {split}, val_fraction {val_fraction}); add text or "
            "change prepare.val_fraction"
        )
    eot = tokenizer.eot_token
    with atomic_directory(out_dir) as tmp:
        writers = {name: _ShardWriter(tmp, name, shard_tokens) for name in SPLITS}
        if split == "tail":
            _write_cut(_part_streams(parts, "train", eot), counts["train"], writers)
        else:
            for name in SPLITS:
                for chunk in _part_streams(parts, name, eot):
                    writers[name].write(chunk)
        shards = {name: writer.close() for name, writer in writers.items()}
        (tmp / TOKENIZER_DIR).mkdir()
        for path in tokenizer_files(tokenizer_dir):
            shutil.copyfile(path, tmp / TOKENIZER_DIR / path.name)
        meta = {
            "tokenizer": info.as_dict(),
            "vocab_size": tokenizer.n_vocab,
            "eot_token": eot,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "split": split,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "val_fraction_realised": counts["val"] / (counts["train"] + counts["val"]),
            "shards": shards,
            "inputs": inputs,
        }
        atomic_write_json(tmp / META, meta)
    return meta


def val_split_warning(meta: Mapping[str, Any]) -> str | None:
    """Why val's share of the tokens (`meta.json`'s) is far from `val_fraction`, and what to do;
    None when it is near: off by at most half the setting or 5 points, whichever is less. Only
    the `documents` split can be far: it moves whole documents, so one large document moves
    the share by its size."""
    setting, realised = meta["val_fraction"], meta["val_fraction_realised"]
    near = abs(realised - setting) <= min(setting / 2, VAL_FRACTION_TOLERANCE)
    if near or meta["split"] != "documents":  # `tail` cuts at the token
        return None
    total = meta["train_tokens"] + meta["val_tokens"]
    largest = max(meta["inputs"], key=lambda r: r["tokens"], default=None)
    because = ""
    if largest is not None and largest["documents"] == 1 and largest["tokens"] * 5 > total:
        because = f"; one of them, {largest['file']}, is {100 * largest['tokens'] / total:.0f}%"
    return (
        f"val is {100 * realised:.1f}% of the tokens, not the {100 * setting:.1f}% of "
        f"prepare.val_fraction: the documents split puts whole documents in val or train "
        f"by a hash of their text, so large documents move the share{because}. For val close "
        "to val_fraction set prepare.val_split: tail (the last val_fraction of the tokens), or "
        "give more, smaller documents"
    )


def _joined_length(lengths: Sequence[int]) -> int:
    """Tokens of streams joined with one `<|endoftext|>` between the non-empty ones."""
    present = [n for n in lengths if n]
    return sum(present) + max(0, len(present) - 1)


def _write_cut(chunks: Iterable[np.ndarray], n_train: int, writers: dict) -> None:
    """The first `n_train` ids to train, the rest to val."""
    seen = 0
    for chunk in chunks:
        cut = min(len(chunk), max(0, n_train - seen))
        if cut:
            writers["train"].write(chunk[:cut])
        if cut < len(chunk):
            writers["val"].write(chunk[cut:])
        seen += len(chunk)


class TokenShards:
    """A split's shards read as one array of ids (memory-mapped): `len`, and indexing by an
    integer array of any shape. One shard is served by its memmap directly."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.ends = np.cumsum([len(a) for a in self.arrays])
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(TOKEN_DTYPE)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: Any) -> Any:
        if len(self.arrays) == 1:
            return self.arrays[0][index]
        if isinstance(index, slice):
            return self[np.arange(*index.indices(len(self)))]
        index = np.asarray(index)
        flat = index.reshape(-1)
        shard = np.searchsorted(self.ends, flat, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            picked = shard == s
            out[picked] = self.arrays[s][flat[picked] - starts[s]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.concatenate(self.arrays).astype(dtype or self.dtype, copy=False)


def load_tokens(token_dir: Path | str, split: str) -> TokenShards:
    """Memory-map a split's shards, as `meta.json` in `token_dir` lists them, once each is
    checked against it (present, its size, its sha256): a damaged one is refused by name."""
    token_dir = Path(token_dir)
    meta = read_meta(token_dir)
    check_split(token_dir, meta, split)
    dtype = np.dtype(meta["dtype"])
    files = [token_dir / shard["file"] for shard in meta["shards"][split]]
    return TokenShards([np.memmap(path, dtype=dtype, mode="r") for path in files])
