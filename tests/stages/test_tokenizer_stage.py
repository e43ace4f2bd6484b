"""Stage `tokenizer` on its own (no Snakemake), with real rustbpe on small texts: the files it
writes and their reproducibility, what a trained tokenizer learns from (training text only,
never val or test), the error for too small a corpus, GPT-2's ranks, and the `--report`
measurement of bytes per token on held-out text, in metrics.json and MLflow."""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.instruct import format_prompt
from pipeline.data.tokenizer import (
    TOKENIZER_FILES,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_info,
)
from pipeline.data.tokenizer_sample import corpus_train_text, fine_tuning_texts
from pipeline.data.tokens import in_val, load_tokens
from pipeline.errors import InputError
from pipeline.settings.load import load_config, stage_config
from pipeline.stages import prepare, tokenizer
from pipeline.stages.common import instruction_splits

RAW = (
    "the-verdict.txt",
    "gpt2-bpe",
    "SMSSpamCollection",
    "instruction-data.json",
    "instruction-data-with-preference.json",
)
EVERYTHING = 10**9
TEXT = "Héllo, world! 12345 tokens\n\n  def f(x): return x ** 2  # ünïcode ✓"


@pytest.fixture
def root(tmp_path, mirror):
    """A work directory whose data/raw holds the mirror's files, as `download` leaves it."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in RAW:
        copy = shutil.copytree if (mirror / name).is_dir() else shutil.copy
        copy(mirror / name, raw / name)
    return tmp_path


def resolved(root, repo, *overrides: str) -> dict:
    """The resolved config of a trained tokenizer (300 ids) on the-verdict.txt in `root`."""
    return load_config([repo / "config.yaml"], [
        f"paths.data={root / 'data'}",
        f"paths.results={root / 'results'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "prepare.corpus=[the-verdict.txt]",
        "tokenizer.kind=trained",
        "tokenizer.vocab_size=300",
        *overrides,
    ])  # fmt: skip


def config_of(root, repo, *overrides: str):
    return stage_config(resolved(root, repo, *overrides), "tokenizer")


def files_of(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data" / "tokenizer").iterdir())}


def training_of(root) -> dict:
    return json.loads((root / "results" / "tokenizer" / "training.json").read_text())


def write_jsonl(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_a_trained_tokenizer_writes_its_files_and_the_same_bytes_again(root, repo):
    config = config_of(root, repo)
    training = tokenizer.main(config)
    assert set(files_of(root)) == set(TOKENIZER_FILES)
    assert training == training_of(root)
    verdict = (root / "data" / "raw" / "the-verdict.txt").read_text()
    assert training["chars"] == int(len(verdict) * 0.9)  # the text before val's tail
    assert training["seconds"] >= 0 and training["peak_rss_mb"] > 0
    assert (training["kind"], training["n_vocab"], training["eot_token"]) == ("trained", 300, 299)
    assert training["sha256"] == tokenizer_info(root / "data" / "tokenizer").sha256
    encoding = load_tokenizer(root / "data" / "tokenizer")
    assert encoding.n_vocab == 300 and encoding.decode(encoding.encode(TEXT)) == TEXT
    assert len(encoding.encode(verdict[:2000])) < len(verdict[:2000].encode())  # it merges
    first = files_of(root)
    (root / "data" / "tokenizer" / "stale.txt").write_text("left by an older run")
    tokenizer.main(config)
    assert files_of(root) == first  # byte-identical, and the directory replaced whole


def test_the_documents_split_sample_is_every_train_document_and_no_val_one(root, repo):
    docs = [f"Document {i}: " + f"word{i} and more words, " * (i % 7 + 1) for i in range(60)]
    write_jsonl(root / "docs.jsonl", docs)
    corpus = json.dumps([{"path": str(root / "docs.jsonl")}])
    config = config_of(root, repo, f"prepare.corpus={corpus}", "prepare.val_fraction=0.2",
                       "prepare.val_split=documents")  # fmt: skip
    train = [d for d in docs if not in_val(d, 0.2)]
    assert 0 < len(train) < len(docs)  # both splits hold documents
    assert list(corpus_train_text(config, EVERYTHING)) == train
    capped = config_of(root, repo, f"prepare.corpus={corpus}", "prepare.val_fraction=0.2",
                       "prepare.val_split=documents", "tokenizer.max_chars=500")  # fmt: skip
    assert "".join(tokenizer.sample(capped)) == "".join(train)[:500]


def test_the_tail_split_sample_ends_before_the_last_val_fraction(root, repo):
    text = (root / "data" / "raw" / "the-verdict.txt").read_text()
    config = config_of(root, repo, "prepare.val_fraction=0.25", "prepare.val_split=tail")
    sample = "".join(corpus_train_text(config, EVERYTHING))
    assert text.startswith(sample)
    assert len(text) * 0.75 - 1 <= len(sample) <= len(text) * 0.75
    capped = config_of(root, repo, "prepare.val_split=tail", "tokenizer.max_chars=3000")
    assert "".join(tokenizer.sample(capped)) == text[:3000]
    assert tokenizer.main(capped)["chars"] == 3000


def test_an_instruction_stages_train_split_joins_the_sample_its_val_and_test_never(root, repo):
    settings = resolved(root, repo, "tokenizer.fine_tuning=[finetune-instruct]")
    config = stage_config(settings, "tokenizer")
    sample = list(tokenizer.sample(config))
    corpus = list(corpus_train_text(config, EVERYTHING))
    texts = fine_tuning_texts(config, "finetune-instruct")
    assert sample == corpus + texts.train
    # the stage's own split (what finetune-instruct trains and is evaluated on)
    stage = stage_config(settings, "finetune-instruct")
    required = ("instruction", "input", "output")
    train, val, test, _ = instruction_splits(stage, required, root / "splits")
    assert texts.train == [format_prompt(r, "alpaca") + r["output"] for r in train]
    held_out = {format_prompt(r, "alpaca") + r["output"] for r in (*val, *test)}
    assert held_out == set(texts.evaluation) and len(held_out) == len(val) + len(test)
    assert not held_out & set(sample)
    training = tokenizer.main(config)
    assert training["chars"] == sum(map(len, corpus)) + sum(map(len, texts.train))


def test_a_classifier_stages_labelled_texts_join_the_sample_by_its_split(root, repo):
    from pipeline.stages.finetune_classifier import FinetuneClassifier  # deferred: torch

    settings = resolved(root, repo, "tokenizer.fine_tuning=[finetune-classifier]")
    config = stage_config(settings, "tokenizer")
    sample = list(tokenizer.sample(config))
    corpus = list(corpus_train_text(config, EVERYTHING))
    classifier = stage_config(settings, "finetune-classifier")
    assert classifier.section.balance == "undersample"  # the split after balancing, as trained
    stage = FinetuneClassifier()
    stage.section = classifier.section
    (root / "splits").mkdir()
    stage.split_records(classifier, root / "splits")  # the stage's own split
    train = [r.text for r in stage.splits["train"]]
    assert sample == corpus + train
    # SMS texts repeat ("Ok lor..."): a held-out text may also be a training text
    held_out = {r.text for name in ("val", "test") for r in stage.splits[name]} - set(train)
    assert held_out and not held_out & set(sample)
    assert tokenizer.main(config)["chars"] == sum(map(len, sample))


def test_too_small_a_corpus_for_the_vocabulary_is_one_clear_error(root, repo):
    tokenizer.main(config_of(root, repo))
    before = files_of(root)
    with pytest.raises(InputError) as error:
        tokenizer.main(config_of(root, repo, "tokenizer.vocab_size=16384"))
    message = str(error.value)
    assert "\n" not in message and "from 18,431 characters" in message
    assert "learned " in message and " merges" in message
    assert "lower tokenizer.vocab_size" in message
    assert files_of(root) == before  # the tokenizer written before is kept


def test_kind_gpt2_writes_gpt2s_ranks(root, repo):
    training = tokenizer.main(config_of(root, repo, "tokenizer.kind=gpt2"))
    bpe = root / "data" / "raw" / "gpt2-bpe"
    ours, gpt2 = load_tokenizer(root / "data" / "tokenizer"), gpt2_tokenizer(bpe)
    verdict = (bpe.parent / "the-verdict.txt").read_text()
    for text in (TEXT, verdict):
        assert ours.encode(text) == gpt2.encode(text)
    assert ours.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert (ours.n_vocab, ours.eot_token) == (50257, 50256)
    assert tokenizer_info(root / "data" / "tokenizer") == tokenizer_info(bpe)  # one identity
    assert training["kind"] == "gpt2" and "chars" not in training


def test_report_measures_bytes_per_token_on_held_out_text_into_mlflow(root, repo):
    settings = resolved(root, repo)
    config = stage_config(settings, "tokenizer")
    tokenizer.main(config)
    prepare.main(stage_config(settings, "prepare"))
    metrics = tokenizer.main(config, report_only=True)
    out = root / "results" / "tokenizer"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"val", "finetune-classifier", "finetune-instruct", "align-dpo"}
    ours = load_tokenizer(root / "data" / "tokenizer")
    gpt2 = gpt2_tokenizer(root / "data" / "raw" / "gpt2-bpe")
    # val: the-verdict's tail as prepare split it, measured by hand
    verdict = (root / "data" / "raw" / "the-verdict.txt").read_text()
    val_ids = [i for i in load_tokens(root / "data" / "tokens", "val") if i != ours.eot_token]
    val_text = ours.decode(val_ids)
    assert verdict.endswith(val_text) and 0.05 < len(val_text) / len(verdict) < 0.15
    val = metrics["val"]
    tokens = len(ours.encode_ordinary(val_text))
    gpt2_tokens = len(gpt2.encode_ordinary(val_text))
    assert (val["bytes"], val["tokens"]) == (len(val_text.encode()), tokens)
    assert val["bytes_per_token"] == round(len(val_text.encode()) / tokens, 4)
    assert val["gpt2_bytes_per_token"] == round(len(val_text.encode()) / gpt2_tokens, 4)
    assert val["vs_gpt2"] == pytest.approx(gpt2_tokens / tokens, abs=1e-3)
    assert val["vs_gpt2"] < 1  # 300 ids compress worse than GPT-2's 50,257
    # an instruction stage: its val and test records, as the stage splits them
    stage = stage_config(settings, "finetune-instruct")
    _, v, t, _ = instruction_splits(stage, ("instruction", "input", "output"), root / "splits")
    held_out = [format_prompt(r, "alpaca") + r["output"] for r in (*v, *t)]
    instruct = metrics["finetune-instruct"]
    assert instruct["bytes"] == sum(len(text.encode()) for text in held_out)
    assert instruct["tokens"] == sum(len(ours.encode_ordinary(text)) for text in held_out)
    for values in metrics.values():
        assert values["bytes_per_token"] == round(values["bytes"] / values["tokens"], 4)
        assert {"gpt2_bytes_per_token", "vs_gpt2"} <= set(values)

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(settings["tracking"]["experiment"])
    (run,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'tokenizer'")
    assert run.info.run_name == "tokenizer" and run.info.status == "FINISHED"
    logged = run.data.metrics
    for name, values in metrics.items():
        for key in ("bytes_per_token", "gpt2_bytes_per_token", "vs_gpt2"):
            assert logged[f"{name}/{key}"] == pytest.approx(values[key]), (name, key)
    info = tokenizer_info(root / "data" / "tokenizer")
    assert run.data.params["kind"] == "trained" and run.data.params["sha256"] == info.sha256
    assert run.data.params["chars"] == str(training_of(root)["chars"])
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "tokenizer" and info.sha256.startswith(dataset.dataset.digest)
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "tokenizer"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"tokenizer", "metrics.json", "training.json"} <= artifacts
    logged_files = {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}
    assert logged_files == {f"tokenizer/{name}" for name in TOKENIZER_FILES}
