"""Token files: the pretraining corpus as uint16 GPT-2 ids, split into train/val, read by memmap."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from pipeline.errors import InputError
from pipeline.io import atomic_open, atomic_write_json, sha256_file

TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")


def encode_documents(
    paths: Sequence[Path], tokenizer: tiktoken.Encoding
) -> tuple[np.ndarray, list[dict]]:
    """Encode each file as one document, with <|endoftext|> between documents."""
    eot = tokenizer.eot_token
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise InputError(
            f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids: too many for uint16"
        )
    pieces: list[list[int]] = []
    documents = []
    for i, path in enumerate(paths):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc})") from None
        ids = tokenizer.encode_ordinary(text)
        if i:
            pieces.append([eot])
        pieces.append(ids)
        documents.append(
            {
                "file": Path(path).name,
                "sha256": sha256_file(path),
                "chars": len(text),
                "tokens": len(ids),
            }
        )
    tokens = np.fromiter((t for piece in pieces for t in piece), dtype=TOKEN_DTYPE)
    return tokens, documents


def prepare_corpus(
    paths: Sequence[Path], out_dir: Path, tokenizer: tiktoken.Encoding, val_fraction: float
) -> dict[str, Any]:
    """Write `train.bin`, `val.bin` (the last `val_fraction` of the tokens) and `meta.json`."""
    tokens, documents = encode_documents(paths, tokenizer)
    n_val = int(round(len(tokens) * val_fraction))
    if n_val < 2 or len(tokens) - n_val < 2:
        raise InputError(
            f"corpus {[str(p) for p in paths]}: {len(tokens)} tokens is too few to split "
            f"with val_fraction={val_fraction}"
        )
    split = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
    out_dir = Path(out_dir)
    for name, array in split.items():
        with atomic_open(out_dir / f"{name}.bin") as handle:
            handle.write(array.tobytes())
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.n_vocab,
        "eot_token": tokenizer.eot_token,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "val_fraction": val_fraction,
        "train_tokens": int(len(split["train"])),
        "val_tokens": int(len(split["val"])),
        "documents": documents,
    }
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def load_tokens(path: Path | str) -> np.memmap:
    """Memory-map a token file written by `prepare_corpus`."""
    path = Path(path)
    meta_path = path.with_name("meta.json")
    dtype = json.loads(meta_path.read_text())["dtype"] if meta_path.exists() else "uint16"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token file not found (run `python -m pipeline prepare`)")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")
