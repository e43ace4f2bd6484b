"""The tokenizer's rules in the real DAG, read from `snakemake --dry-run` after every job of the
tiny config is recorded as run: what a changed setting reruns. A trained tokenizer reruns, with
all that encodes with it, when its settings, the corpus's split or a fine-tuning split it learns
from change; GPT-2's for nothing of those; the report reruns for any fine-tuning split."""

import re

import pytest
import yaml
from snakemake_runs import make_workdir, snakemake, tiny_config

AFTER_TOKENIZER = {
    "tokenizer", "tokenize", "prepare", "tokenizer_report", "pretrain", "finetune_classifier",
    "finetune_instruct", "align_dpo", "all",
}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One MLflow store for the module's work directories (its tables are made once)."""
    return {"uri": f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"}


def recorded_as_run(path, repo, mirror, store, **tokenizer):
    """A work directory where every job is recorded as run: `--touch` writes Snakemake's
    metadata (each job's params, as a real run does), then stand-ins of the outputs are made in
    the order the jobs ran. Nothing is trained: the DAG's decisions are what is tested."""
    config = {**tiny_config(mirror), "tokenizer": tokenizer, "tracking": store}
    workdir = make_workdir(path, repo, config)
    run = snakemake(workdir, "--touch")
    for outputs in re.findall(r"^ {4}output: (.+)$", run.stdout + run.stderr, re.MULTILINE):
        for name in outputs.split(", "):
            stand_in = workdir / name
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.mkdir() if stand_in.name == "model" else stand_in.touch()
    return workdir


def planned(workdir, change: dict | None = None) -> set[str]:
    """The rules a dry run would run, with `change` as one more config file."""
    configfiles = ["tiny.yaml"]
    if change is not None:
        (workdir / "change.yaml").write_text(yaml.safe_dump(change))
        configfiles.append("change.yaml")
    dry = snakemake(workdir, "--dry-run", configfiles=configfiles)
    listing = dry.stdout + dry.stderr
    rules = set(re.findall(r"^(?:local)?rule (\w+):$", listing, re.MULTILINE))
    assert rules or "Nothing to be done" in listing, listing
    return rules


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo, mirror, store):
    return recorded_as_run(tmp_path_factory.mktemp("trained"), repo, mirror, store,
                           kind="trained", vocab_size=300)  # fmt: skip


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, repo, mirror, store):
    return recorded_as_run(tmp_path_factory.mktemp("gpt2"), repo, mirror, store, kind="gpt2")


@pytest.fixture(scope="module")
def learns_instructions(tmp_path_factory, repo, mirror, store):
    return recorded_as_run(tmp_path_factory.mktemp("instructions"), repo, mirror, store,
                           kind="trained", vocab_size=300,
                           fine_tuning=["finetune-instruct"])  # fmt: skip


def test_a_trained_tokenizers_new_vocabulary_reruns_all_that_encodes_but_no_download(trained):
    assert planned(trained, {"tokenizer": {"vocab_size": 400}}) == AFTER_TOKENIZER
    assert planned(trained, {"prepare": {"val_fraction": 0.2}}) == AFTER_TOKENIZER


def test_gpt2s_tokenizer_reruns_for_none_of_the_trained_settings(gpt2):
    change = {"tokenizer": {"vocab_size": 400, "max_chars": 1000, "pattern": "gpt2"}}
    assert planned(gpt2, change) == set()
    assert "tokenizer" not in planned(gpt2, {"prepare": {"val_fraction": 0.2}})


def test_a_fine_tuning_split_the_tokenizer_does_not_learn_from_reruns_its_report_only(trained):
    change = {"finetune-instruct": {"split": {"train": 0.8, "val": 0.1}}}
    assert planned(trained, change) == {
        "tokenizer_report", "finetune_instruct", "align_dpo", "all"
    }  # fmt: skip
    same = {"finetune-instruct": {"split": {"train": 0.85, "val": 0.05}}}  # the tiny config's
    assert planned(trained, same) == set()  # restated in another file (keys merged in a new order)


def test_a_fine_tuning_split_the_tokenizer_learns_from_reruns_it(learns_instructions):
    change = {"finetune-instruct": {"split": {"train": 0.8, "val": 0.1}}}
    assert planned(learns_instructions, change) == AFTER_TOKENIZER
    other = {"align-dpo": {"split": {"train": 0.8, "val": 0.1}}}
    assert planned(learns_instructions, other) == {"tokenizer_report", "align_dpo", "all"}
