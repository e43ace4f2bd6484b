"""The tokenizer: a byte-level BPE encoded by tiktoken, GPT-2's or one trained on the corpus.

On disk (data/tokenizer/, and `tokenizer/` inside every checkpoint) a tokenizer is three files:
- `ranks.tiktoken`: each token's bytes (base64) and rank, one per line, in rank order (tiktoken's
  own format);
- `encoding.json`: what else makes the encoding (kind, split pattern, special tokens, vocabulary
  size) and the ranks file's sha256. Its own sha256 names the tokenizer: it pins everything;
- `tokenizer.json`: the same tokenizer for Hugging Face `tokenizers`/`transformers`
  (pipeline/data/hf_tokenizer.py), which encodes exactly as tiktoken does.
Special tokens follow the ranks; the first is always `<|endoftext|>` (document separator, eos
and padding). Checkpoints written before this format carry GPT-2's encoder.json + vocab.bpe,
which `load_tokenizer` still reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from pipeline.errors import InputError
from pipeline.io import atomic_write_bytes
from pipeline.settings import END_OF_TEXT

END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257
GPT2_BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""The sha256 of GPT-2's ranks as `ranks.tiktoken`: how GPT-2 is known in a bare tokenizer.json."""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
"""GPT-4's split pattern as rustbpe spells it: cl100k's own string says `\\p{N}{1,3}+`, which
Hugging Face's regex engine reads as a repetition, not a possessive (it joins "45000")."""
PATTERNS = {"gpt2": r50k_pat_str, "gpt4": GPT4_PATTERN}
"""The split patterns by name (`tokenizer.pattern`)."""
RANKS_FILE, ENCODING_FILE, HF_FILE = "ranks.tiktoken", "encoding.json", "tokenizer.json"
TOKENIZER_FILES = (RANKS_FILE, ENCODING_FILE, HF_FILE)
FORMAT = "gpt-pipeline-tokenizer"


@dataclass(frozen=True)
class TokenizerInfo:
    """What a checkpoint's metadata, meta.json and MLflow record of a tokenizer."""

    kind: str
    """gpt2 | trained"""
    sha256: str
    """encoding.json's sha256 (GPT-2's old files: what theirs in this format is, so GPT-2's
    tokenizer has one identity whichever files carry it)."""
    n_vocab: int
    eot_token: int

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sha256": self.sha256, "n_vocab": self.n_vocab,
                "eot_token": self.eot_token}  # fmt: skip


def gpt2_ranks(bpe_dir: Path) -> dict[bytes, int]:
    """GPT-2's mergeable ranks from the downloaded encoder.json + vocab.bpe, checked against
    tiktoken's expected sha256."""
    missing = [name for name in GPT2_BPE_FILES if not (bpe_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{bpe_dir}: GPT-2 BPE files missing: {', '.join(missing)}")
    try:
        return data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe_dir / "vocab.bpe"),
            encoder_json_file=str(bpe_dir / "encoder.json"),
            vocab_bpe_hash=GPT2_BPE_FILES["vocab.bpe"],
            encoder_json_hash=GPT2_BPE_FILES["encoder.json"],
        )
    except ValueError as exc:
        raise InputError(
            f"{bpe_dir}: GPT-2 BPE files do not have the expected sha256: {exc}"
        ) from None


@cache
def _gpt2_from_files(bpe_dir: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=gpt2_ranks(bpe_dir),
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def gpt2_tokenizer(bpe_dir: Path | str | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding, from `bpe_dir` (encoder.json + vocab.bpe) or, if None, from tiktoken."""
    if bpe_dir is None:
        return tiktoken.get_encoding("gpt2")
    return _gpt2_from_files(Path(bpe_dir).resolve())


def ranks_bytes(ranks: Mapping[bytes, int]) -> bytes:
    """`ranks` in tiktoken's file format, in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)


def parse_ranks(data: bytes, where: Path) -> dict[bytes, int]:
    """tiktoken's format read here, not by `tiktoken.load.load_tiktoken_bpe`, which caches by
    path and returns a file's old ranks after it is rewritten."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise InputError(f"{where}:{number}: expected `<base64 token> <rank>`") from None
    return ranks


def write_tokenizer(directory: Path, ranks: Mapping[bytes, int], kind: str, pattern: str,
                    special_tokens: Sequence[str] = (END_OF_TEXT,)) -> TokenizerInfo:  # fmt: skip
    """Write the three files to `directory` (each atomically; the same inputs give the same
    bytes). `pattern` is a name of PATTERNS; ranks must be 0..n-1."""
    from pipeline.data.hf_tokenizer import tokenizer_json  # deferred: only writers need it

    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{directory}: the ranks are not 0..{len(ranks) - 1}, each once")
    data = ranks_bytes(ranks)
    encoding = _encoding(data, len(ranks), kind, pattern, special_tokens)
    hf = tokenizer_json(ranks, PATTERNS[pattern], encoding["special_tokens"])
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / RANKS_FILE, data)
    atomic_write_bytes(directory / HF_FILE, (json.dumps(hf, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(directory / ENCODING_FILE, _encoding_bytes(encoding))
    return tokenizer_info(directory)


def import_hf_tokenizer(directory: Path, source: Path) -> TokenizerInfo:
    """Write the tokenizer of `source`, a tokenizer.json as export-hf writes it, to `directory`
    in this format (kind gpt2 if it is GPT-2's). Refused unless writing it again gives the same
    file, so the ranks encode exactly as `source` does."""
    from pipeline.data.hf_tokenizer import read_tokenizer_json  # deferred: only importers need it

    ranks, regex, specials = read_tokenizer_json(source.read_bytes(), source)
    pattern = next((name for name, known in PATTERNS.items() if known == regex), None)
    if pattern is None:
        raise InputError(
            f"{source}: the split pattern {regex!r} is none of ours ({', '.join(PATTERNS)}); "
            "expected a tokenizer export-hf wrote"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{source}: the vocabulary's ids are not 0..{len(ranks) - 1}, each once")
    if list(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
        raise InputError(f"{source}: expected the special tokens to follow the vocabulary from "
                         f"id {len(ranks)}, got {specials}")  # fmt: skip
    is_gpt2 = (pattern, list(specials)) == ("gpt2", [END_OF_TEXT]) and (
        hashlib.sha256(ranks_bytes(ranks)).hexdigest() == GPT2_RANKS_SHA256)  # fmt: skip
    try:
        info = write_tokenizer(directory, ranks, "gpt2" if is_gpt2 else "trained", pattern,
                               list(specials))  # fmt: skip
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    if _encodes(directory / HF_FILE) != _encodes(source):
        raise InputError(f"{source}: its merges, pre-tokenizer, decoder or special tokens differ "
                         "from what export-hf writes for its vocabulary: not a tokenizer "
                         "tiktoken encodes the same way")  # fmt: skip
    return info


def _encodes(hf_file: Path) -> dict[str, Any]:
    """What in a tokenizer.json decides the ids (not its truncation and padding settings)."""
    hf = json.loads(hf_file.read_bytes())
    return {key: value for key, value in hf.items() if key not in ("truncation", "padding")}


def _encoding(ranks_data: bytes, n_ranks: int, kind: str, pattern: str,
              special_tokens: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """encoding.json's content for ranks written as `ranks_data`."""
    if not special_tokens or special_tokens[0] != END_OF_TEXT:
        raise InputError(f"the first special token must be {END_OF_TEXT}, not {special_tokens}")
    specials = {token: n_ranks + i for i, token in enumerate(special_tokens)}
    return {
        "format": FORMAT,
        "version": 1,
        "kind": kind,
        "pattern": pattern,
        "special_tokens": specials,
        "eot_token": specials[END_OF_TEXT],
        "n_vocab": n_ranks + len(specials),
        "ranks_sha256": hashlib.sha256(ranks_data).hexdigest(),
    }


def _encoding_bytes(encoding: Mapping[str, Any]) -> bytes:
    return (json.dumps(encoding, indent=1, sort_keys=True) + "\n").encode()


def has_tokenizer(directory: Path) -> bool:
    """Whether `directory` holds a tokenizer, in this format or GPT-2's old files."""
    return (directory / ENCODING_FILE).is_file() or (directory / "encoder.json").is_file()


def tokenizer_files(directory: Path) -> list[Path]:
    """The files of the tokenizer in `directory` (this format's, else GPT-2's old ones)."""
    names = TOKENIZER_FILES if (directory / ENCODING_FILE).is_file() else tuple(GPT2_BPE_FILES)
    return [directory / name for name in names]


def tokenizer_info(directory: Path) -> TokenizerInfo:
    """The kind, identity, size and eot id of the tokenizer in `directory`."""
    path = directory / ENCODING_FILE
    if not path.is_file():  # GPT-2's old files: the identity its files in this format have
        ranks = gpt2_ranks(directory)
        data = _encoding_bytes(_encoding(ranks_bytes(ranks), len(ranks), "gpt2", "gpt2",
                                         [END_OF_TEXT]))  # fmt: skip
        return TokenizerInfo("gpt2", hashlib.sha256(data).hexdigest(), VOCAB_SIZE, END_OF_TEXT_ID)
    data = path.read_bytes()
    encoding = _read_encoding(path, data)
    return TokenizerInfo(encoding["kind"], hashlib.sha256(data).hexdigest(),
                         encoding["n_vocab"], encoding["eot_token"])  # fmt: skip


def _read_encoding(path: Path, data: bytes) -> dict[str, Any]:
    try:
        encoding = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(encoding, dict) or encoding.get("format") != FORMAT:
        raise InputError(f"{path}: not a tokenizer's {ENCODING_FILE} (format {FORMAT!r})")
    if encoding.get("version") != 1 or encoding.get("pattern") not in PATTERNS:
        raise InputError(f"{path}: version {encoding.get('version')!r} and pattern "
                         f"{encoding.get('pattern')!r}: expected version 1 and one of "
                         f"{', '.join(PATTERNS)} (written by a newer pipeline?)")  # fmt: skip
    return encoding


def load_tokenizer(directory: Path | str) -> tiktoken.Encoding:
    """The tiktoken encoding of the tokenizer in `directory`, its ranks checked against
    encoding.json's sha256 (GPT-2's old files: against tiktoken's)."""
    directory = Path(directory).resolve()
    path = directory / ENCODING_FILE
    if not path.is_file():
        if (directory / "encoder.json").is_file():
            return gpt2_tokenizer(directory)
        raise FileNotFoundError(f"{directory}: no tokenizer ({ENCODING_FILE} or GPT-2's "
                                "encoder.json + vocab.bpe)")  # fmt: skip
    return _load(directory, hashlib.sha256(path.read_bytes()).hexdigest())


@cache
def _load(directory: Path, sha256: str) -> tiktoken.Encoding:
    """Cached by content (`sha256`), so a tokenizer rewritten in place is read again."""
    path = directory / ENCODING_FILE
    encoding = _read_encoding(path, path.read_bytes())
    ranks_path = directory / RANKS_FILE
    data = ranks_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != encoding["ranks_sha256"]:
        raise InputError(f"{ranks_path}: sha256 differs from {path}'s ranks_sha256: the file "
                         "changed after the tokenizer stage wrote it; rerun it")  # fmt: skip
    return tiktoken.Encoding(
        name=f"{encoding['kind']}-{sha256[:12]}",
        pat_str=PATTERNS[encoding["pattern"]],
        mergeable_ranks=parse_ranks(data, ranks_path),
        special_tokens=dict(encoding["special_tokens"]),
        explicit_n_vocab=encoding["n_vocab"],
    )


def token_byte_lengths(tokenizer: tiktoken.Encoding) -> list[int]:
    """The UTF-8 bytes of each token id, for bits per byte; special tokens (<|endoftext|>)
    count 0, as they stand for no text."""
    special = {tokenizer.encode_single_token(t) for t in tokenizer.special_tokens_set}
    return [
        0 if i in special else len(tokenizer.decode_single_token_bytes(i))
        for i in range(tokenizer.n_vocab)
    ]
