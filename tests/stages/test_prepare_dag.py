"""Your own text through the DAG: a directory of text files, a JSONL file and a parquet file,
with no URL or checksum to write, tokenized in 1 or 3 Snakemake jobs to the same bytes, and
pretrained on; a new file reruns prepare and what follows, nothing else; a token shard changed
after prepare wrote it reruns prepare, once."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from snakemake_runs import make_workdir, snakemake, tiny_config


def own_corpus(root, mirror):
    books = root / "my-books"
    (books / "more").mkdir(parents=True)
    text = (mirror / "the-verdict.txt").read_text()
    chapters = text.split("\n\n")
    for i in range(0, len(chapters), 40):
        folder = books if i % 80 else books / "more"
        (folder / f"part{i:03d}.txt").write_text("\n\n".join(chapters[i : i + 40]))
    lines = (mirror / "tinyshakespeare.txt").read_text().split("\n\n")[:400]
    with open(root / "web.jsonl", "w") as handle:
        for line in lines[:200]:
            handle.write(json.dumps({"text": line}) + "\n")
    pq.write_table(pa.table({"text": lines[200:]}), root / "rows.parquet")
    return [
        {"path": str(books)},
        {"path": str(root / "*.jsonl")},
        {"path": str(root / "rows.parquet")},
    ]


def tokens_of(workdir):
    tokens = workdir / "data" / "tokens"
    return {str(p.relative_to(tokens)): p.read_bytes() for p in sorted(tokens.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo, mirror):
    root = tmp_path_factory.mktemp("own")
    corpus = own_corpus(root, mirror)
    config = tiny_config(mirror)
    config["prepare"] = {"corpus": corpus, "shard_tokens": 4096}
    one = make_workdir(root / "one", repo, config)
    snakemake(one, "--", "data/tokens")
    config["prepare"]["scatter"] = 3
    three = make_workdir(root / "three", repo, config)
    run = snakemake(three, "-p", "--", "results/pretrain/metrics.json")
    listing = run.stdout + run.stderr
    return root, one, three, listing


def test_three_tokenize_jobs_give_the_bytes_of_one(runs):
    _, one, three, listing = runs
    for i in (1, 2, 3):
        assert f"prepare --part {i}-of-3 " in listing
    assert "prepare --gather " in listing
    assert tokens_of(one) == tokens_of(three)
    meta = json.loads((three / "data" / "tokens" / "meta.json").read_text())
    assert len(meta["shards"]["train"]) > 1 and meta["split"] == "documents"
    formats = {r["format"] for r in meta["inputs"]}
    assert formats == {"text", "jsonl", "parquet"}
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in meta["inputs"])
    assert sum(r["documents"] for r in meta["inputs"]) == 400 + len(
        [r for r in meta["inputs"] if r["format"] == "text"]
    )


def test_the_model_pretrains_on_it(runs):
    _, _, three, _ = runs
    metrics = json.loads((three / "results" / "pretrain" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["val_loss"] > 0


def test_a_new_file_reruns_prepare_and_what_follows_only(runs):
    root, _, three, _ = runs
    shutil.copy(root / "my-books" / "part040.txt", root / "my-books" / "new.txt")
    dry = snakemake(three, "--dry-run", "--", "results/pretrain/metrics.json")
    plan = dry.stdout + dry.stderr
    assert "rule tokenize:" in plan and "rule prepare:" in plan and "rule pretrain:" in plan
    assert "rule download:" not in plan


def test_every_input_file_is_a_dataset_input_of_the_prepare_run(runs):
    from mlflow.tracking import MlflowClient

    _, _, three, _ = runs
    meta = json.loads((three / "data" / "tokens" / "meta.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{three / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'prepare'")
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == len(meta["inputs"])
    by_name = {i.dataset.name: i for i in inputs}
    for record in meta["inputs"]:
        found = by_name[record["file"].rsplit("/", 1)[-1]]
        assert record["sha256"].startswith(found.dataset.digest)
        assert json.loads(found.dataset.profile)["tokens"] == record["tokens"]
        assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == "training"
    assert run.data.params["train_tokens"] == str(meta["train_tokens"])


def plan_of(workdir, *targets):
    dry = snakemake(workdir, "--dry-run", "--", *targets)
    return dry.stdout + dry.stderr


def test_a_changed_shard_reruns_prepare_once(tmp_path, repo, mirror):
    work = make_workdir(tmp_path, repo, tiny_config(mirror))
    snakemake(work, "--", "data/tokens")
    assert "Nothing to be done" in plan_of(work, "data/tokens")
    prepared = tokens_of(work)
    shard = work / "data" / "tokens" / "train-00000.bin"
    with open(shard, "r+b") as handle:
        handle.seek(shard.stat().st_size // 2)
        handle.write(b"\xff" * 16)
    plan = plan_of(work, "results/pretrain/metrics.json")
    assert "data/tokens/train-00000.bin: sha256 differs from meta.json's" in plan
    assert "; prepare reruns" in plan
    prepare_job = plan[plan.index("rule prepare:") :].split("\n\n")[0]
    assert "reason: Forced execution" in prepare_job
    assert "rule tokenize:" in plan and "rule pretrain:" in plan
    snakemake(work, "--", "data/tokens")
    assert tokens_of(work) == prepared
    assert "Nothing to be done" in plan_of(work, "data/tokens")
