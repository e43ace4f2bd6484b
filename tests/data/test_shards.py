"""Token shards against meta.json: `verify` hashes every shard; the DAG's `changed_shards`
checks every size but hashes only the shards modified since meta.json was written, so it costs
a stat when nothing changed; an index from before checksums is checked by size."""

import json
import os

import pytest

from pipeline.data.corpus import CorpusFile
from pipeline.data.shards import changed_shards, verify
from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import gather_parts, load_tokens, tokenize_part

SECOND = 1_000_000_000


@pytest.fixture
def token_dir(tmp_path, mirror):
    """The Verdict in shards of 2,000 tokens (train-00000..00002, val-00000)."""
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    verdict = CorpusFile(mirror / "the-verdict.txt", "text")
    tokenize_part([verdict], tmp_path / "part", tokenizer, workers=1, split="tail",
                  val_fraction=0.1)  # fmt: skip
    gather_parts([tmp_path / "part"], tmp_path / "tokens", mirror / "gpt2-bpe", split="tail",
                 val_fraction=0.1, shard_tokens=2000)  # fmt: skip
    return tmp_path / "tokens"


def set_mtime(path, mtime_ns):
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_dag_check_hashes_only_shards_modified_since_meta_json(token_dir):
    assert changed_shards(token_dir) == []
    shard = token_dir / "train-00001.bin"
    written = (token_dir / "meta.json").stat().st_mtime_ns - SECOND
    with open(shard, "r+b") as handle:
        handle.write(bytes(16))
    set_mtime(shard, written)  # same size, older than meta.json: not hashed
    assert changed_shards(token_dir) == []
    assert len(verify(token_dir)[0]) == 1  # verify hashes every shard
    set_mtime(shard, written + 2 * SECOND)
    assert changed_shards(token_dir) == [
        f"{shard}: sha256 differs from meta.json's: the file changed after prepare wrote it"
    ]


def test_the_dag_check_sees_a_cut_shard_without_hashing(token_dir):
    shard = token_dir / "val-00000.bin"
    meta = json.loads((token_dir / "meta.json").read_text())
    tokens = meta["shards"]["val"][0]["tokens"]
    with open(shard, "r+b") as handle:
        handle.truncate(2 * (tokens - 1))
    set_mtime(shard, (token_dir / "meta.json").stat().st_mtime_ns - SECOND)
    assert changed_shards(token_dir) == [
        f"{shard}: expected {tokens:,} tokens from meta.json, found {tokens - 1:,}"
    ]


def test_no_token_directory_is_no_change_and_one_without_its_index_is(tmp_path):
    assert changed_shards(tmp_path / "tokens") == []
    (tmp_path / "tokens").mkdir()
    assert changed_shards(tmp_path / "tokens") == [
        f"{tmp_path / 'tokens' / 'meta.json'}: token index not found (run `python -m pipeline "
        "prepare`)"
    ]


def test_an_index_from_before_checksums_is_checked_by_size(token_dir):
    meta_path = token_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    for records in meta["shards"].values():
        for record in records:
            del record["bytes"], record["sha256"]
    meta_path.write_text(json.dumps(meta))
    with open(token_dir / "train-00000.bin", "r+b") as handle:
        handle.write(bytes(16))
    assert len(load_tokens(token_dir, "train")) == meta["train_tokens"]
    problems, summary = verify(token_dir)
    assert problems == []
    assert summary.startswith(f"{token_dir}: 4 shards, 5,145 tokens, match meta.json by size; 4 ")
    (token_dir / "val-00000.bin").write_bytes(b"\0\0\0")
    assert verify(token_dir)[0] == [
        f"{token_dir / 'val-00000.bin'}: 3 bytes, not a whole number of 2-byte tokens "
        f"(cut short?); expected {meta['val_tokens']:,} tokens from meta.json"
    ]
