"""A tiktoken BPE as Hugging Face's `tokenizer.json`, written without importing `tokenizers`.

The file splits text with the same pattern, maps bytes to GPT-2's printable characters and
merges with one merge per token, rebuilt from the ranks: for the token of rank r, the two parts
tiktoken's own BPE ends with when it may use only ranks below r. On GPT-2's ranks that gives
vocab.bpe's 50,000 merges in their order. `ignore_merges` copies tiktoken's shortcut (a chunk
that is a whole token is that token). Loaded as `PreTrainedTokenizerFast` (not a GPT-2 class,
which swaps in GPT-2's pattern), it encodes every text as tiktoken does with
`allowed_special="all"`; with `split_special_tokens=True`, as `encode_ordinary`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


@cache
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's printable character for each byte (its `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


def byte_level(token: bytes) -> str:
    """A token's bytes as byte-level BPE writes them."""
    chars = _byte_chars()
    return "".join(chars[b] for b in token)


@cache
def _byte_values() -> dict[str, int]:
    return {char: b for b, char in enumerate(_byte_chars())}


def from_byte_level(text: str) -> bytes:
    """The bytes of a token byte-level BPE writes as `text` (KeyError: not of its alphabet)."""
    values = _byte_values()
    return bytes(values[char] for char in text)


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (see the module's docstring)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(pairwise(parts))]
            best, i = min(found)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise InputError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked "
                             "tokens: not a BPE vocabulary")  # fmt: skip
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_json(ranks: Mapping[bytes, int], pattern: str, specials: Mapping[str, int]
                   ) -> dict[str, Any]:  # fmt: skip
    """The `tokenizer.json` of a byte-level BPE (ranks 0..n-1, special tokens after them)."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }  # fmt: skip
        for s, i in specials.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },  # fmt: skip
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },  # fmt: skip
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {byte_level(token): rank for token, rank in ordered},
            "merges": [[byte_level(a), byte_level(b)] for a, b in merges_from_ranks(ranks)],
        },  # fmt: skip
    }


def tokenizer_config(specials: Mapping[str, int], eot: str) -> dict[str, Any]:
    """`tokenizer_config.json` beside `tokenizer.json`: the fast class reads the file as is."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": None,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [s for s in specials if s != eot],
    }


def read_tokenizer_json(data: bytes, where: Path) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """(ranks, split pattern, special tokens) of a `tokenizer.json` as `tokenizer_json` writes
    it, for turning an exported tokenizer back into ranks. Whether it is exactly that file (its
    merges those of the ranks) is for the caller to check by writing it again."""
    try:
        hf = json.loads(data)
        split = hf["pre_tokenizer"]["pretokenizers"][0]
        pattern = split["pattern"]["Regex"]
        if hf["model"]["type"] != "BPE" or split["type"] != "Split":
            raise ValueError("not a BPE with a Split pre-tokenizer")
        ranks = {from_byte_level(token): rank for token, rank in hf["model"]["vocab"].items()}
        specials = {added["content"]: added["id"] for added in hf["added_tokens"]}
        if not isinstance(pattern, str) or not all(type(i) is int for i in ranks.values()):
            raise ValueError("the pattern is not a string or a rank not an integer")
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # JSONDecodeError included
        raise InputError(
            f"{where}: expected a byte-level BPE tokenizer.json as export-hf writes it "
            f"(BPE model, Split + ByteLevel pre-tokenizer): {exc!r}"
        ) from None
    return ranks, pattern, dict(sorted(specials.items(), key=lambda item: item[1]))
