"""A tokenizer trained on the corpus, from the corpus to every stage's checkpoint, the served
MLflow models and back out to `transformers`: the real Snakefile on the tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from snakemake_runs import make_workdir, snakemake, tiny_config

from pipeline.data.tokenizer import load_tokenizer, tokenizer_info
from pipeline.model.checkpoint import load_checkpoint

VOCAB = 600
TRAINING_STAGES = ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo")
TRICKY = "naïve café — 東京 😀  two  spaces\r\n\n\n  45000 it's <|endoftext|> end.\nNext"


@pytest.fixture(scope="module")
def done(tmp_path_factory, repo, mirror) -> Path:
    config = tiny_config(mirror)
    config["tokenizer"] = {"kind": "trained", "vocab_size": VOCAB,
                           "fine_tuning": ["finetune-instruct"]}  # fmt: skip
    workdir = make_workdir(tmp_path_factory.mktemp("trained"), repo, config)
    snakemake(workdir)
    return workdir


def test_every_checkpoint_carries_the_trained_tokenizer_and_its_vocabulary(done):
    info = tokenizer_info(done / "data" / "tokenizer")
    assert info.kind == "trained" and info.n_vocab == VOCAB and info.eot_token == VOCAB - 1
    meta = json.loads((done / "data" / "tokens" / "meta.json").read_text())
    assert meta["tokenizer"] == info.as_dict() and meta["vocab_size"] == VOCAB
    for stage in TRAINING_STAGES:
        model_dir = done / "results" / stage / "model"
        saved = json.loads((model_dir / "config.json").read_text())
        assert saved["tokenizer"] == info.as_dict(), stage
        assert tokenizer_info(model_dir / "tokenizer") == info, stage
        assert load_checkpoint(model_dir).tok_emb.num_embeddings == VOCAB, stage


def test_the_report_measures_compression_against_gpt2(done):
    metrics = json.loads((done / "results" / "tokenizer" / "metrics.json").read_text())
    assert set(metrics) == {"val", "finetune-classifier", "finetune-instruct", "align-dpo"}
    for values in metrics.values():
        assert values["bytes_per_token"] == pytest.approx(values["bytes"] / values["tokens"],
                                                          abs=1e-4)  # fmt: skip
        assert values["vs_gpt2"] < 1  # 600 ids learned from 20 KB do not beat GPT-2's 50,257
    client = MlflowClient(f"sqlite:///{done / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("gpt-pipeline").experiment_id],
        "tags.`pipeline.stage` = 'tokenizer'",
    )
    assert run.data.params["sha256"] == tokenizer_info(done / "data" / "tokenizer").sha256
    assert run.data.metrics["val/bytes_per_token"] == metrics["val"]["bytes_per_token"]


def test_every_training_run_logs_the_tokenizer_as_a_dataset(done):
    client = MlflowClient(f"sqlite:///{done / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline").experiment_id
    sha = tokenizer_info(done / "data" / "tokenizer").sha256
    for stage in TRAINING_STAGES:
        (run,) = client.search_runs([experiment], f"tags.`pipeline.stage` = '{stage}'")
        inputs = {(d.dataset.name, d.tags[0].value): d.dataset for d in run.inputs.dataset_inputs}
        assert inputs["tokenizer", "tokenizer"].digest == sha[:36], stage
        assert run.data.params["tokenizer_sha256"] == sha, stage


def test_the_served_models_and_the_commands_encode_with_it(done, monkeypatch):
    monkeypatch.chdir(done)
    mlflow.set_tracking_uri(f"sqlite:///{done / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/gpt-pipeline-pretrain@champion")
    sampled = {"max_new_tokens": 5, "temperature": 0.9, "top_k": 20, "seed": 3}
    (completion,) = served.predict(["I had always"], params=sampled)
    generate = [sys.executable, "-m", "pipeline", "generate", "--checkpoint",
                "results/pretrain/model", "--prompt", "I had always", "--max-new-tokens", "5",
                "--temperature", "0.9", "--top-k", "20", "--seed", "3"]  # fmt: skip
    printed = subprocess.run(generate, capture_output=True, text=True, check=True).stdout
    assert printed == "I had always" + completion + "\n"
    classifier = mlflow.pyfunc.load_model("models:/gpt-pipeline-finetune-classifier@champion")
    assert len(classifier.predict(["WINNER!! claim your prize", TRICKY])) == 2
    chat = mlflow.pyfunc.load_model("models:/gpt-pipeline-align-dpo@champion")
    answer = chat.predict({"messages": [{"role": "user", "content": TRICKY}]},
                          params={"max_new_tokens": 4})  # fmt: skip
    # GPT-2's ids (up to 50,256) would index past these models' 600-row embeddings
    assert answer["usage"]["completion_tokens"] <= 4 and answer["usage"]["prompt_tokens"] > 0


def test_the_hugging_face_export_encodes_and_predicts_as_ours(done, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "pipeline", "export-hf",
                    str(done / "results" / "finetune-instruct" / "model"), str(out)],
                   cwd=done, check=True, capture_output=True)  # fmt: skip
    ours = load_tokenizer(done / "data" / "tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in (TRICKY, (done / "data" / "raw" / "the-verdict.txt").read_text()[:3000]):
        assert theirs(text, add_special_tokens=False).input_ids == ours.encode(
            text, allowed_special="all")  # fmt: skip
        assert theirs.decode(ours.encode_ordinary(text)) == text
    assert theirs.eos_token_id == ours.eot_token and len(theirs) == VOCAB
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    mine = load_checkpoint(done / "results" / "finetune-instruct" / "model").eval()
    ids = torch.tensor([ours.encode_ordinary(TRICKY)[: mine.config.context_length]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mine(ids), rtol=1e-4, atol=1e-4)
