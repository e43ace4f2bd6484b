"""The real DAG, end to end: Snakemake runs the stage entry points on a tiny config, MLflow
records them in a real sqlite store, and the user-facing promises hold (no-op rerun, only the
changed stage reruns, a corrupted mirror or a bad key fails clearly, kill -9 resumes, `make report`
shows every stage's figures, also in a headless browser)."""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from headless_browser import SKIP_REASON, browser, dump_dom, screenshot, visible_text
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from snakemake_runs import SNAKEMAKE, make_workdir, snakemake, tiny_config

from pipeline.evaluate.diversity import STATS, collapse_reasons
from pipeline.stages.registry import STAGES, training_stages
from pipeline.tracking import KIND_TAG, WARNING_TAG
from pipeline.tracking.model_registry import DATA_TAG, data_alias

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    """Processes started by `pid`, at any depth (only our own job is killed, never others')."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(c) for c in out]
    return children + [d for c in children for d in descendants(c)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def done(tmp_path_factory, repo, mirror) -> Path:
    """One full run of the DAG on the tiny config; align-dpo as 2 processes under torchrun."""
    config = tiny_config(mirror)
    config["align-dpo"]["train"]["nproc_per_node"] = 2
    workdir = make_workdir(tmp_path_factory.mktemp("dag"), repo, config)
    result = snakemake(workdir)
    (workdir / "terminal.txt").write_text(result.stdout + result.stderr)
    return workdir


def test_dag_produces_every_stage_output(done):
    pretrain = done / "results" / "pretrain"
    metrics = json.loads((pretrain / "metrics.json").read_text())
    assert {"val_loss", "val_perplexity", "tokens_per_second"} <= set(metrics)
    assert metrics["steps"] == 6
    assert {p.name for p in (pretrain / "model").iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer",
    }
    assert (pretrain / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (pretrain / "samples.txt").read_text().startswith("ROMEO:")
    meta = json.loads((done / "data" / "tokens" / "meta.json").read_text())
    assert meta["inputs"][0]["tokens"] == 5145  # "The Verdict" in GPT-2 tokens
    assert not (done / "data" / "token-parts" / "1-of-1").exists()  # a temp() output, removed
    assert "val_loss" in (done / "logs" / "pretrain.log").read_text()
    assert not (done / ".resume" / "pretrain").exists()  # resume state is cleared after success


# What `make report` shows of each stage (its category): {subcategory: file names}.
REPORTED = {
    "tokenizer": {"Metrics": {"metrics.json"}},
    "pretrain": {
        "Metrics": {"metrics.json"},
        "Training": {"loss.png"},
        "Generations": {"samples.txt"},
    },
    "finetune-classifier": {
        "Metrics": {"metrics.json"},
        "Training": {"loss.png"},
        "Evaluation": {"confusion_matrix.png", "reliability_diagram.png", "misclassified.tsv"},
    },
    "finetune-instruct": {
        "Metrics": {"metrics.json"},
        "Training": {"loss.png"},
        "Generations": {"test_responses.json"},
    },
    "align-dpo": {
        "Metrics": {"metrics.json"},
        "Training": {"loss.png"},
        "Generations": {"test_responses.json"},
    },
}


@pytest.fixture(scope="module")
def report_html(done, repo) -> Path:
    """`make report` after the tiny run, as a user types it (the run's config passed on)."""
    venv = f"VENV={Path(sys.executable).parent.parent}"
    cmd = ["make", "-f", str(repo / "Makefile"), "-o", "setup", "report", venv,
           "SNAKEMAKE_ARGS=--configfile tiny.yaml"]  # fmt: skip
    result = subprocess.run(cmd, cwd=done, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote report.html" in result.stdout
    return done / "report.html"


def report_data(html: str, name: str):
    """The JSON a Snakemake report's page script holds as `var <name> = ...;`."""
    return json.loads(re.search(rf'<script id="{name}">\s*var {name} = (.*);\n', html).group(1))


def test_make_report_holds_every_stages_figures_and_tables(report_html, done):
    html = report_html.read_text()
    categories = report_data(html, "categories")
    assert {
        stage: {sub: {Path(f).name for f in files} for sub, files in subs.items()}
        for stage, subs in categories.items()
    } == REPORTED
    results = report_data(html, "results")
    for stage, subs in categories.items():
        for path in (f for files in subs.values() for f in files):
            assert Path(path).parent == Path("results") / stage
            assert results[path]["caption"].strip(), path  # report/<name>.rst, rendered
    loss = results["results/finetune-classifier/loss.png"]
    assert loss["mime_type"] == "image/png"  # the file itself is in the page:
    assert loss["data_uri"].startswith("data:image/png;")
    data = base64.b64decode(loss["data_uri"].split(";base64,", 1)[1])
    assert data == (done / "results" / "finetune-classifier" / "loss.png").read_bytes()
    assert "A GPT-2-style model trained from scratch" in html  # report/workflow.rst


@pytest.mark.skipif(browser() is None, reason=SKIP_REASON)
def test_the_report_renders_each_stage_in_a_headless_browser(report_html, tmp_path):
    profile = tmp_path / "profile"
    dom = dump_dom(report_html.as_uri(), profile)
    (tmp_path / "dom.html").write_text(dom)
    text = visible_text(dom)
    assert "Snakemake Report" in text and "A GPT-2-style model trained from scratch" in text
    # The menu the page's scripts build: one entry per category (stage), sorted.
    assert "General Workflow Statistics About Results " + " ".join(sorted(REPORTED)) in text
    screenshot(report_html.as_uri(), tmp_path / "report.png", profile)


def test_dag_fine_tunes_the_classifier_from_the_pretrained_model(done):
    out = done / "results" / "finetune-classifier"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert 0.0 <= metrics[f"test_{key}"] <= 1.0
    assert metrics["steps"] == 4 and metrics["labels"] == ["ham", "spam"]
    assert sum(map(sum, metrics["test_confusion_matrix"])) == 298  # 747 - 523 - 75, twice
    splits = {s: (out / f"{s}.tsv").read_text().splitlines() for s in ("train", "val", "test")}
    assert all(lines[0] == "label\ttext" for lines in splits.values())
    assert [len(lines) - 1 for lines in splits.values()] == [1046, 150, 298]
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["temperature"] > 0 and {"test_ece", "test_ece_uncalibrated"} <= metrics.keys()
    assert (out / "misclassified.tsv").read_text().startswith("label\tpredicted\tprobability")
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["classifier"]["labels"] == ["ham", "spam"]
    assert (out / "model" / "tokenizer" / "encoding.json").is_file()  # pretrain's, carried on
    assert config["tokenizer"]["kind"] == "gpt2" and config["tokenizer"]["n_vocab"] == 50257


def evaluated_sha256(workdir: Path, stage: str) -> str:
    """The sha256 of the split a stage's headline is measured on: pretrain's val tokens (its
    shards end to end), a fine-tuning stage's val or test split file."""
    if stage == "pretrain":
        tokens = workdir / "data" / "tokens"
        meta = json.loads((tokens / "meta.json").read_text())
        files = [tokens / shard["file"] for shard in meta["shards"]["val"]]
    else:
        split = STAGES[stage].headline.metric.split("_")[0]
        files = list((workdir / "results" / stage).glob(f"{split}.*"))
    assert files
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()


def test_mlflow_has_a_parent_run_with_a_child_per_stage(done):
    client = MlflowClient(f"sqlite:///{done / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline")
    assert experiment.tags[KIND_TAG] == "custom_model_development"  # the UI's model training
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = "download+tokenizer+prepare+pretrain+finetune-classifier+finetune-instruct+align-dpo"
    assert re.fullmatch(
        rf"{re.escape(stages)} \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ", parents[0].info.run_name
    )
    children = {
        r.data.tags["pipeline.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert set(children) == {
        "download", "tokenizer", "prepare", "pretrain", "finetune-classifier",
        "finetune-instruct", "align-dpo",
    }  # fmt: skip
    assert all(r.info.status == "FINISHED" for r in children.values())
    pretrain = children["pretrain"]
    assert pretrain.data.params["model.n_embd"] == "32"
    assert {"git_commit", "git_dirty"} <= set(pretrain.data.tags)
    steps = [m.step for m in client.get_metric_history(pretrain.info.run_id, "loss")]
    assert steps == sorted(steps) and len(steps) >= 5
    assert "val_loss" in pretrain.data.metrics
    facts = {"steps", "parameters", "epochs", "tokens_seen"}  # one value each: params
    assert facts <= pretrain.data.params.keys() and not facts & pretrain.data.metrics.keys()
    assert pretrain.data.params["steps"] == "6"
    assert parents[0].data.params["pretrain.steps"] == "6"
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"metrics.json", "loss.png", "samples.txt", "config.yaml"} <= artifacts
    assert "pretrain.val_loss" in parents[0].data.metrics
    assert "finetune-classifier.test_accuracy" in parents[0].data.metrics
    classifier = children["finetune-classifier"]
    assert {"val_accuracy", "val_f1", "train_accuracy", "test_roc_auc"} <= set(
        classifier.data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(classifier.info.run_id)}
    assert {"confusion_matrix.png", "reliability_diagram.png", "misclassified.tsv"} <= artifacts
    instruct = children["finetune-instruct"]
    assert {"val_loss", "test_rouge_l"} <= set(instruct.data.metrics)
    assert float(instruct.data.params["trainable_fraction"]) < 1  # LoRA's
    artifacts = {a.path for a in client.list_artifacts(instruct.info.run_id)}
    assert {"test_responses.json", "test_samples.json", "loss.png"} <= artifacts
    dpo = children["align-dpo"]
    steps = [m.step for m in client.get_metric_history(dpo.info.run_id, "reward_margin")]
    assert steps == [1, 2]  # DPO statistics per training step, beside the loss
    assert {"val_reward_accuracy", "val_reward_margin", "val_chosen_reward"} <= set(
        dpo.data.metrics
    )
    for stage in ("finetune-instruct", "align-dpo"):  # collapsed answers are tagged, others not
        metrics = json.loads((done / "results" / stage / "metrics.json").read_text())
        stats = [{k: metrics[f"test_{k}_{w}"] for k in STATS} for w in ("before", "after")]
        tag = children[stage].data.tags.get(WARNING_TAG)
        assert (tag is not None) == bool(collapse_reasons(*stats)), (stage, tag)
    for stage in ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo"):
        run = client.get_run(children[stage].info.run_id)
        (logged,) = run.outputs.model_outputs  # its checkpoint as a pyfunc model
        model = client.get_logged_model(logged.model_id)
        assert model.name == stage and model.source_run_id == run.info.run_id
        (found,) = client.search_model_versions(f"name = 'gpt-pipeline-{stage}'")
        version = client.get_model_version(found.name, found.version)  # search omits aliases
        data = run.data.tags[DATA_TAG]
        assert version.tags[DATA_TAG] == data == evaluated_sha256(done, stage), stage
        assert version.run_id == run.info.run_id
        assert sorted(version.aliases) == ["champion", data_alias(data)]
        assert version.source == model.artifact_location  # the version is that logged model
        assert version.tags["pipeline.parent_run_id"] == parents[0].info.run_id


def test_each_training_stage_reports_its_headline_metric(done):
    """The metric a registered model's @champion follows is one the stage's metrics.json has."""
    for name, stage in training_stages().items():
        metrics = json.loads((done / "results" / name / "metrics.json").read_text())
        assert stage.headline.metric in metrics, (name, sorted(metrics))


def test_the_terminal_shows_each_training_stages_progress_and_the_log_keeps_all(done):
    terminal = (done / "terminal.txt").read_text()
    for stage, steps in [("pretrain", 6), ("finetune-classifier", 4), ("align-dpo", 2)]:
        last = re.search(
            rf"^{stage}: step {steps}/{steps} \| loss \S+ \|.* tok/s \|.*eta 0s$", terminal, re.M
        )
        assert last, f"no progress line of {stage} in:\n{terminal}"
        assert re.search(rf"^{stage}: step 1/{steps} \| loss .*\| eta \d+", terminal, re.M)
    assert re.search(r"^pretrain: step 3/6 \| eval \| .*val_loss ", terminal, re.M)
    assert "sample at step" not in terminal  # the rest stays in the log
    log = (done / "logs" / "pretrain.log").read_text()
    assert "INFO pipeline.train: step 6/6 | loss " in log and "sample at step 3" in log


def test_the_run_ends_with_each_stages_warnings(done):
    """After fine-tuning, 61 of 110 instruct answers were "The", and only logs/*.log and an
    MLflow tag said so: each stage's warnings (collapse included) end the run's output."""
    terminal = (done / "terminal.txt").read_text()
    end = terminal[terminal.rindex("steps (100%) done") :]
    shown = []
    for stage in training_stages():
        metrics = json.loads((done / "results" / stage / "metrics.json").read_text())
        warnings = json.loads((done / "results" / stage / "warnings.json").read_text())
        if stage in ("finetune-instruct", "align-dpo"):
            stats = [{k: metrics[f"test_{k}_{w}"] for k in STATS} for w in ("before", "after")]
            assert bool(warnings) == bool(collapse_reasons(*stats)), (stage, warnings)
        shown += [f"\n  {stage}: {w.removeprefix(f'{stage}: ')}" for w in warnings]
    assert shown, "the tiny config's answers collapse: the run ends with a warning"
    assert all(line in end for line in shown), end


def test_second_run_has_nothing_to_do(done):
    result = snakemake(done, "--dry-run")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changed_pretrain_config_reruns_only_pretrain(done, mirror):
    (done / "longer.yaml").write_text(yaml.safe_dump({"pretrain": {"train": {"max_steps": 7}}}))
    result = snakemake(done, "--dry-run", configfiles=("tiny.yaml", "longer.yaml"))
    jobs = result.stdout + result.stderr
    assert "pretrain" in jobs and "rule prepare" not in jobs and "rule download" not in jobs
    forced = snakemake(done, "--dry-run", "-R", "prepare").stdout
    assert "rule prepare" in forced and "rule pretrain" in forced and "rule download" not in forced


def test_dag_instruction_tunes_with_lora_and_answers_the_test_set(done):
    out = done / "results" / "finetune-instruct"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_loss", "val_perplexity", "test_rouge_l", "test_exact_match"} <= set(metrics)
    assert metrics["steps"] == 3 and metrics["method"] == "lora"
    assert 0 < metrics["trainable_fraction"] < 0.1
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [935, 55, 110]
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 110
    assert set(responses[0]) >= {"instruction", "input", "output", "model_response"}
    assert set(responses[0]) >= {"base_model_response"}
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in splits["test"]]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["instruct"] == {"template": "alpaca", "method": "lora"}
    weights = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in name for name in weights)  # merged into the base weights


def test_dag_aligns_the_instruction_tuned_model_with_dpo(done):
    out = done / "results" / "align-dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin"} <= set(metrics)
    assert 0.0 <= metrics["val_reward_accuracy"] <= 1.0 and metrics["steps"] == 2
    assert "rank 0 of 2 (gloo)" in (done / "logs" / "align-dpo.log").read_text()
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 110
    assert set(responses[0]) >= {"chosen", "rejected", "response_before", "response_after"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["instruct"]["template"] == "alpaca" and config["instruct"]["aligned"] == "dpo"


def test_chat_answers_one_instruction_with_the_checkpoints_template(done):
    cmd = [
        sys.executable, "-m", "pipeline", "chat",
        "--checkpoint", "results/finetune-instruct/model",
        "--instruction", "Name a color.", "--max-new-tokens", "5",
    ]  # fmt: skip
    first = subprocess.run(cmd, cwd=done, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, cwd=done, capture_output=True, text=True, check=True)
    assert first.stdout == second.stdout and first.stdout.endswith("\n")
    assert "### Instruction" not in first.stdout
    piped = subprocess.run(
        cmd[:6] + ["--max-new-tokens", "5"],
        cwd=done, input="Name a color.\n", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert piped.stdout == first.stdout


def test_changed_classifier_config_reruns_only_the_classifier(done):
    (done / "mean.yaml").write_text(yaml.safe_dump({"finetune-classifier": {"pooling": "mean"}}))
    jobs = snakemake(done, "--dry-run", configfiles=("tiny.yaml", "mean.yaml")).stdout
    assert "rule finetune_classifier" in jobs and "rule pretrain" not in jobs


def test_classify_labels_texts_and_files_from_the_stage_checkpoint(done, tmp_path):
    def classify(*args: str) -> subprocess.CompletedProcess:
        checkpoint = str(done / "results" / "finetune-classifier" / "model")
        cmd = [sys.executable, "-m", "pipeline", "classify", "--checkpoint", checkpoint, *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    result = classify("WINNER! Claim your prize now", "see you at 6")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["label", "probability", "text"]
    assert [r[2] for r in rows[1:]] == ["WINNER! Claim your prize now", "see you at 6"]
    assert all(r[0] in ("ham", "spam") and 0.5 <= float(r[1]) <= 1 for r in rows[1:])

    (tmp_path / "in.tsv").write_text("id\ttext\n1\tcall me\n2\tFREE\tentry\n")
    result = classify("--input", str(tmp_path / "in.tsv"), "--output", str(tmp_path / "out.tsv"))
    assert result.returncode == 0, result.stderr
    out = (tmp_path / "out.tsv").read_text().splitlines()
    assert len(out) == 3 and out[2].endswith("\tFREE\tentry")

    (tmp_path / "lines.txt").write_bytes(b"hello\n\xff\xfe\n")
    result = classify("--input", str(tmp_path / "lines.txt"))
    assert result.returncode == 1 and "lines.txt:2: not valid UTF-8" in result.stderr
    (tmp_path / "lines.txt").write_text("hello\n\nbye\n")
    result = classify("--input", str(tmp_path / "lines.txt"))
    assert result.returncode == 1 and "lines.txt:2: empty text" in result.stderr
    result = classify("   ")
    assert result.returncode == 1 and "text 1 is empty" in result.stderr
    pretrained = str(done / "results" / "pretrain" / "model")
    result = classify("--checkpoint", pretrained, "hi")
    assert result.returncode == 1 and "not a classifier checkpoint" in result.stderr


def test_generate_streams_from_the_checkpoint(done):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "generate",
        "--checkpoint",
        "results/pretrain/model",
        "--prompt",
        "I had always",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.7",
        "--seed",
        "1",
    ]
    first = subprocess.run(cmd, cwd=done, capture_output=True, text=True, check=True).stdout
    second = subprocess.run(cmd, cwd=done, capture_output=True, text=True, check=True).stdout
    assert first.startswith("I had always") and first == second


def test_corrupted_mirror_fails_with_the_hashes_and_no_model(tmp_path, repo, mirror):
    bad_mirror = tmp_path / "mirror"
    shutil.copytree(mirror, bad_mirror)
    os.chmod(bad_mirror / "the-verdict.txt", 0o644)
    (bad_mirror / "the-verdict.txt").write_text("tampered")
    workdir = make_workdir(tmp_path / "work", repo, tiny_config(bad_mirror))
    result = snakemake(workdir, check=False)
    assert result.returncode != 0
    log = (workdir / "logs" / "download.log").read_text()
    assert "the-verdict.txt" in log and "sha256 mismatch" in log
    assert "expected b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f" in log
    assert not (workdir / "results" / "pretrain" / "model").exists()


def test_bad_config_key_fails_naming_it(tmp_path, repo, mirror):
    config = tiny_config(mirror)
    config["pretrain"]["train"]["max_stepz"] = 3
    workdir = make_workdir(tmp_path / "work", repo, config)
    result = snakemake(workdir, check=False)
    assert result.returncode != 0
    assert "pretrain.train.max_stepz: unknown key" in result.stdout + result.stderr


def test_kill_during_pretraining_then_rerun_resumes(tmp_path, repo, mirror):
    config = tiny_config(mirror, max_steps=300, checkpoint_every=10, eval_every=100, log_every=10)
    workdir = make_workdir(tmp_path / "work", repo, config)
    snakemake(workdir, "--until", "prepare")
    job = subprocess.Popen(
        [SNAKEMAKE, "--cores", "2", "--configfile", "tiny.yaml"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = workdir / ".resume" / "pretrain" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    assert state.exists(), "no resume checkpoint appeared"
    trainers = [pid for pid in descendants(job.pid) if b"pipeline\x00pretrain" in cmdline(pid)]
    assert trainers, "the pretrain process was not found"
    for pid in trainers:
        os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < 300

    snakemake(workdir)
    log = (workdir / "logs" / "pretrain.log").read_text()
    assert f"from step {killed_at}" in log
    resumed = json.loads((workdir / "results" / "pretrain" / "metrics.json").read_text())

    reference = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "pretrain",
            "--config",
            "results/config.resolved.yaml",
            "--set",
            "paths.results=reference",
            "--set",
            "paths.resume=.resume-reference",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr
    uninterrupted = json.loads((workdir / "reference" / "pretrain" / "metrics.json").read_text())
    assert resumed["steps"] == uninterrupted["steps"] == 300
    assert resumed["val_loss"] == uninterrupted["val_loss"]
    assert resumed["train_loss"] == uninterrupted["train_loss"]


def test_concurrent_invocations_each_train_and_track_their_own_config(tmp_path, repo, mirror):
    """Two invocations at once, disjoint targets, different configs (the shared upstream built
    first): each stage trains its own invocation's steps, and each parent run holds its own."""
    workdir = make_workdir(tmp_path / "work", repo, tiny_config(mirror))
    snakemake(workdir, "--until", "pretrain")
    steps = {
        "a": {"finetune-classifier": 3, "finetune-instruct": 5},
        "b": {"finetune-classifier": 5, "finetune-instruct": 2},
    }
    for name, counts in steps.items():
        overrides = {stage: {"train": {"max_steps": n}} for stage, n in counts.items()}
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(overrides))
    targets = {"a": "finetune-classifier", "b": "finetune-instruct"}
    jobs = {
        name: subprocess.Popen(
            [
                SNAKEMAKE,
                "--cores",
                "1",
                "--configfile",
                "tiny.yaml",
                f"{name}.yaml",
                "--",
                f"results/{stage}/metrics.json",
            ],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name, stage in targets.items()
    }
    outputs = {name: job.communicate(timeout=600)[0] for name, job in jobs.items()}
    for name, job in jobs.items():
        assert job.returncode == 0, outputs[name]
    for name, stage in targets.items():
        metrics = json.loads((workdir / "results" / stage / "metrics.json").read_text())
        assert metrics["steps"] == steps[name][stage], name
        assert f"{stage}: step {steps[name][stage]}/{steps[name][stage]} | loss" in outputs[name]
        dry = snakemake(
            workdir,
            "--dry-run",
            f"results/{stage}/metrics.json",
            configfiles=("tiny.yaml", f"{name}.yaml"),
        )
        assert "Nothing to be done" in dry.stdout + dry.stderr, name  # its params recorded

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline")
    parents = {
        r.info.run_name.split()[0]: r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("pipeline.role") == "parent"
    }
    assert set(parents) == {"download+tokenizer+prepare+pretrain", *targets.values()}
    for name, stage in targets.items():
        parent = parents[stage]
        assert parent.info.status == "FINISHED"
        assert {key.split(".")[0] for key in parent.data.metrics} == {stage}
        assert parent.data.params[f"{stage}.steps"] == str(steps[name][stage])
    configs = sorted((workdir / "results" / "configs").glob("*.yaml"))
    assert len(configs) == 3  # the upstream run's, a's and b's
