"""GPT-2 byte-pair encoding through tiktoken.

Offline the encoding is built from the two mirrored OpenAI files (checked against tiktoken's
own expected hashes); online it is `tiktoken.get_encoding("gpt2")`. Both give the same ids.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from pipeline.errors import InputError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257
GPT2_BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@cache
def _from_files(bpe_dir: Path) -> tiktoken.Encoding:
    missing = [name for name in GPT2_BPE_FILES if not (bpe_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{bpe_dir}: GPT-2 BPE files missing: {', '.join(missing)}")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe_dir / "vocab.bpe"),
            encoder_json_file=str(bpe_dir / "encoder.json"),
            vocab_bpe_hash=GPT2_BPE_FILES["vocab.bpe"],
            encoder_json_hash=GPT2_BPE_FILES["encoder.json"],
        )
    except ValueError as exc:
        raise InputError(
            f"{bpe_dir}: GPT-2 BPE files do not have the expected sha256: {exc}"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def gpt2_tokenizer(bpe_dir: Path | str | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding, from `bpe_dir` (encoder.json + vocab.bpe) or, if None, from tiktoken."""
    if bpe_dir is None:
        return tiktoken.get_encoding("gpt2")
    return _from_files(Path(bpe_dir).resolve())


def token_byte_lengths(tokenizer: tiktoken.Encoding) -> list[int]:
    """The UTF-8 bytes of each token id, for bits per byte; special tokens (<|endoftext|>)
    count 0, as they stand for no text."""
    special = {tokenizer.encode_single_token(t) for t in tokenizer.special_tokens_set}
    return [
        0 if i in special else len(tokenizer.decode_single_token_bytes(i))
        for i in range(tokenizer.n_vocab)
    ]
