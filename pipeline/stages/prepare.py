"""Stage `prepare`: the pretraining corpus -> GPT-2 BPE token files
(train.bin, val.bin, meta.json)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import prepare_corpus
from pipeline.paths import Paths
from pipeline.tracking import stage_run


def main(config: Mapping[str, Any]) -> dict[str, Any]:
    paths = Paths.from_config(config)
    corpus = [paths.source(name) for name in config["prepare"]["corpus"]]
    missing = [str(p) for p in corpus if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus files missing (run `python -m pipeline download`): {missing}"
        )
    tokenizer = gpt2_tokenizer(paths.bpe)
    with stage_run(config, "prepare") as tracker:
        meta = prepare_corpus(corpus, paths.tokens, tokenizer, config["prepare"]["val_fraction"])
        tracker.log_metrics(
            {"train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"]}, step=0
        )
        tracker.log_artifact(paths.tokens / "meta.json")
    return meta
