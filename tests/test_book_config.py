"""configs/book.yaml, the book's path, run end to end by Snakemake without downloads: the GPT-2
weights it names are random ones of a small shape saved by transformers under paths.weights, the
model section is overridden to that shape, and steps, generated tokens and the data are cut.
Which stages run, their settings and where each starts are the book config's."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from snakemake_runs import make_workdir, snakemake

from pipeline.settings.load import load_config

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

SMALL = {"n_head": 2, "n_embd": 32, "context_length": 64}
"""The small GPT-2 shape: the 124M stand-in has 2 layers, the 355M stand-in 3."""
CUT_TRAIN = {"max_steps": 2, "eval_batches": 2}
RECORDS = 200
"""Instruction and preference records kept of the book's 1100 (the first ones)."""
RECORD_FILES = ("instruction-data.json", "instruction-data-with-preference.json")
CORPUS_CHARS = 100_000
"""Of tinyshakespeare.txt, the corpus pretrain evaluates on."""


def save_gpt2(path: Path, n_layer: int, seed: int) -> None:
    """A random GPT-2 of the small shape, in Hugging Face's layout (its config says dropout 0.1)."""
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=SMALL["n_head"],
        n_embd=SMALL["n_embd"],
        n_positions=SMALL["context_length"],
        vocab_size=50257,
    )
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)


def cut(name: str, data: bytes) -> bytes:
    """A source file's first records (or characters); any other file as it is."""
    if name in RECORD_FILES:
        return json.dumps(json.loads(data)[:RECORDS], indent=1).encode()
    if name == "tinyshakespeare.txt":
        return data.decode()[:CORPUS_CHARS].encode()
    return data


def cut_sources(repo: Path, mirror: Path, into: Path) -> list[dict]:
    """The default data.sources with the cut files' sha256s, mirrored in `into` (a downloaded
    file's sha256 is always checked)."""
    sources = load_config([repo / "config.yaml"])["data"]["sources"]
    for source in sources:
        data = cut(source["name"], (mirror / source["name"]).read_bytes())
        (into / source["name"]).parent.mkdir(parents=True, exist_ok=True)
        (into / source["name"]).write_bytes(data)
        source["sha256"] = hashlib.sha256(data).hexdigest()
    return sources


def small_run(sources: list[dict], mirror: Path) -> dict:
    """Only the size of the run: data, the model's shape, steps, evaluations, sampled tokens."""
    return {
        "data": {"mirrors": [str(mirror)], "sources": sources},
        "model": {"n_layer": 2, **SMALL},
        "pretrain": {"sample_tokens": 4, "train": {"eval_batches": 2}},
        "finetune-classifier": {"misclassified_examples": 3, "train": CUT_TRAIN},
        "finetune-instruct": {"generation": {"max_new_tokens": 2}, "train": CUT_TRAIN},
        "align-dpo": {"generation": {"max_new_tokens": 2}, "train": CUT_TRAIN},
    }


def leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def book(tmp_path_factory, repo, mirror) -> Path:
    root = tmp_path_factory.mktemp("book")
    sources = cut_sources(repo, mirror, root / "mirror")
    workdir = make_workdir(root / "work", repo, small_run(sources, root / "mirror"))
    shutil.copy(repo / "configs" / "book.yaml", workdir / "book.yaml")
    save_gpt2(workdir / "models" / "gpt2", n_layer=2, seed=0)
    save_gpt2(workdir / "models" / "gpt2-medium", n_layer=3, seed=1)
    snakemake(workdir, configfiles=("book.yaml", "tiny.yaml"))
    return workdir


def checkpoint(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / "results" / stage / "model" / "config.json").read_text())


def test_the_run_keeps_every_book_setting_but_the_size(book, repo):
    resolved = leaves(yaml.safe_load((book / "results" / "config.resolved.yaml").read_text()))
    book_settings = leaves(yaml.safe_load((repo / "configs" / "book.yaml").read_text()))
    sized = set(leaves(yaml.safe_load((book / "tiny.yaml").read_text())))
    assert sized & set(book_settings) == {
        "finetune-instruct.generation.max_new_tokens",  # 256 per test answer
        "align-dpo.generation.max_new_tokens",
    }
    kept = {key: value for key, value in book_settings.items() if key not in sized}
    assert {key: resolved[key] for key in kept} == kept


def test_the_classifier_fine_tunes_the_124m_and_instruct_and_dpo_the_355m(book):
    pretrain, classifier = checkpoint(book, "pretrain"), checkpoint(book, "finetune-classifier")
    instruct, dpo = checkpoint(book, "finetune-instruct"), checkpoint(book, "align-dpo")
    assert pretrain["model"]["n_layer"] == classifier["model"]["n_layer"] == 2  # models/gpt2
    assert instruct["model"]["n_layer"] == dpo["model"]["n_layer"] == 3  # models/gpt2-medium
    assert classifier["classifier"]["labels"] == ["ham", "spam"]
    assert instruct["instruct"]["template"] == "alpaca"
    # the book fine-tunes without dropout: the model section's 0.0, not the weights' config's 0.1
    assert instruct["model"]["dropout"] == instruct["model"]["attn_dropout"] == 0.0
    # started from weights without our tokenizer folder, it ships the downloaded BPE files
    assert (book / "results" / "finetune-instruct" / "model" / "tokenizer" / "vocab.bpe").is_file()


def test_every_stage_reports_the_figures_the_book_gives(book):
    """The README's table of the book's figures names these metrics."""
    metrics = {
        stage: json.loads((book / "results" / stage / "metrics.json").read_text())
        for stage in ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo")
    }
    assert {"val_loss", "val_perplexity"} <= set(metrics["pretrain"])
    assert {"train_accuracy", "val_accuracy", "test_accuracy"} <= set(
        metrics["finetune-classifier"]
    )
    assert {"train_loss", "val_loss"} <= set(metrics["finetune-instruct"])
    assert {"val_loss", "val_reward_margin"} <= set(metrics["align-dpo"])
    out = book / "results" / "finetune-instruct"
    answered = json.loads((out / "test_responses.json").read_text())
    assert len(answered) == len(json.loads((out / "test.json").read_text())) > 0
