"""Stage `prepare` on its own (no Snakemake): what it tells the user about the corpus it read,
in the log, in data/tokens/meta.json and on its MLflow run."""

import json
import logging
import shutil

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.tokens import in_val
from pipeline.settings.load import load_config, stage_config
from pipeline.stages import prepare, tokenizer


def run_prepare(repo, mirror, tmp_path, *overrides: str) -> tuple[dict, dict, dict]:
    """prepare.main on the corpus in tmp_path/corpus: (meta.json, the run's params, tags)."""
    shutil.copytree(mirror / "gpt2-bpe", tmp_path / "data" / "raw" / "gpt2-bpe")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config([repo / "config.yaml"], [
        f"paths.data={tmp_path / 'data'}",
        f"paths.results={tmp_path / 'results'}",
        f"tracking.uri={uri}",
        f"prepare.corpus={json.dumps([{'path': str(tmp_path / 'corpus')}])}",
        *overrides,
    ])  # fmt: skip
    tokenizer.main(stage_config(config, "tokenizer"))
    meta = prepare.main(stage_config(config, "prepare"))
    assert json.loads((tmp_path / "data" / "tokens" / "meta.json").read_text()) == meta
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    (run,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'prepare'")
    assert not run.data.metrics  # its counts are params
    return meta, run.data.params, run.data.tags


def write_corpus(tmp_path, documents: dict[str, str]) -> None:
    (tmp_path / "corpus").mkdir()
    for name, text in documents.items():
        (tmp_path / "corpus" / name).write_text(text)


def test_a_documents_split_far_from_val_fraction_is_logged_and_explained(
    repo, mirror, tmp_path, caplog
):
    big = "A long book, chapter after chapter. " * 3000
    assert not in_val(big, 0.1)  # the big document is in train
    notes = {f"note{i:02d}.txt": f"Short note {i}. " * 10 for i in range(40)}
    write_corpus(tmp_path, {"big.txt": big, **notes})
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        meta, params, tags = run_prepare(repo, mirror, tmp_path, "prepare.val_split=documents")
    realised = meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert realised < 0.05 and meta["val_fraction_realised"] == pytest.approx(realised)
    assert float(params["val_fraction_realised"]) == pytest.approx(realised)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "whole documents" in warnings[0]
    assert "val_split: tail" in warnings[0] and f"{100 * realised:.1f}%" in warnings[0]
    assert tags["pipeline.warning"] == warnings[0]
    assert json.loads((tmp_path / "results" / "prepare" / "warnings.json").read_text()) == warnings
    info = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert f"val {100 * realised:.1f}% of the tokens" in info


def test_an_empty_file_skipped_is_counted_in_meta_the_log_and_mlflow(
    repo, mirror, tmp_path, caplog
):
    write_corpus(tmp_path, {"a.txt": "Some words. " * 200, "empty.txt": "",
                            "b.txt": "Other words. " * 200})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        meta, params, _ = run_prepare(
            repo, mirror, tmp_path, "prepare.on_bad_record=skip", "prepare.val_split=tail"
        )
    assert [r["skipped"] for r in meta["inputs"]] == [{}, {}, {"empty": 1}]
    assert params["skipped_records"] == "1"
    assert any("empty.txt: skipped {'empty': 1}" in r.getMessage() for r in caplog.records)
