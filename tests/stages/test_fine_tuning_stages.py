"""The fine-tuning stages run in-process on a tiny random GPT: an interrupted run resumes to
the same weights and metrics as an uninterrupted one (LoRA, length buckets and class weights
included), and a stage refuses a start checkpoint of the wrong kind."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import pipeline.train.loop as loop
from pipeline.errors import InputError
from pipeline.evaluate.diversity import STATS
from pipeline.model import GPT, GPTConfig, save_checkpoint
from pipeline.model.checkpoint import tokenizer_extra_files
from pipeline.model.classifier import GPTClassifier
from pipeline.settings.load import deep_merge, load_config, stage_config
from pipeline.stages import align_dpo, finetune_classifier, finetune_instruct
from pipeline.stages.registry import STAGES
from pipeline.tracking.model_registry import DATA_TAG

REPO = Path(__file__).resolve().parents[2]

SOURCES = (
    "SMSSpamCollection",
    "instruction-data.json",
    "instruction-data-with-preference.json",
    "gpt2-bpe/encoder.json",
    "gpt2-bpe/vocab.bpe",
)
TRAIN = {
    "max_steps": 4,
    "warmup_steps": 1,
    "batch_size": 4,
    "eval_batches": 1,
    "checkpoint_every": 2,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mirror):
    """Raw data and two start checkpoints (a language model, and one marked instruction-tuned)."""
    root = tmp_path_factory.mktemp("finetune")
    for name in SOURCES:
        (root / "data" / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / name, root / "data" / "raw" / name)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=32, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config)
    tokenizer = tokenizer_extra_files(root / "data" / "raw" / "gpt2-bpe")
    save_checkpoint(model, root / "results" / "pretrain" / "model", {}, tokenizer)
    save_checkpoint(model, root / "instructed", {"instruct": {"template": "alpaca"}}, tokenizer)
    classifier = GPTClassifier.from_language_model(model, ["ham", "spam"])
    save_checkpoint(classifier, root / "classifier", {"classifier": {"labels": ["ham", "spam"]}})
    return root


def config_for(workdir, results: str, section: str, settings: dict) -> dict:
    base = load_config([REPO / "config.yaml"])
    paths = {
        "data": str(workdir / "data"),
        "results": str(workdir / results),
        "resume": str(workdir / f".resume-{results}"),
    }
    if results != "results":
        shutil.copytree(workdir / "results", workdir / results, dirs_exist_ok=True)
    return deep_merge(
        base,
        {
            "paths": paths,
            "model": {"attention": "sdpa"},
            "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "log_model": False},
            section: {**settings, "train": {**TRAIN, **settings.get("train", {})}},
        },
    )


CASES = {
    "classifier": (finetune_classifier, "finetune-classifier", {"balance": "class_weights"}),
    "instruct": (
        finetune_instruct,
        "finetune-instruct",
        {"method": "lora", "bucket_by_length": True, "generation": {"max_new_tokens": 2}},
    ),
    "instruct-muon": (  # Muon on the LoRA adapters (the 2-D matrices inside the blocks)
        finetune_instruct,
        "finetune-instruct",
        {"method": "lora", "generation": {"max_new_tokens": 2}, "train": {"optimizer": "muon"}},
    ),
    "dpo": (align_dpo, "align-dpo", {"method": "lora", "generation": {"max_new_tokens": 1}}),
}


@pytest.mark.parametrize("case", CASES)
def test_interrupted_stage_resumes_to_the_uninterrupted_result(case, workdir, monkeypatch):
    stage, section, settings = CASES[case]
    if case == "dpo":
        settings = {**settings, "init_from": str(workdir / "instructed")}
    save_resume_state = loop.save_resume_state

    def save_then_die(*args, **kwargs):
        save_resume_state(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    interrupted = config_for(workdir, f"{case}-interrupted", section, settings)
    monkeypatch.setattr(loop, "save_resume_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stage.main(stage_config(interrupted, section))
    monkeypatch.undo()
    resumed = stage.main(stage_config(interrupted, section))
    reference = stage.main(
        stage_config(config_for(workdir, f"{case}-reference", section, settings), section)
    )

    timings = ("tokens_per_second", "train_time_s", "response_time_s")
    assert resumed.keys() == reference.keys()
    for key in reference.keys() - set(timings):
        both_nan = all(
            isinstance(v, float) and math.isnan(v) for v in (resumed[key], reference[key])
        )
        assert both_nan or resumed[key] == reference[key], key
    out = stage.STAGE
    weights = [
        load_file(workdir / name / out / "model" / "model.safetensors")
        for name in (f"{case}-interrupted", f"{case}-reference")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    saved = json.loads((workdir / f"{case}-interrupted" / out / "metrics.json").read_text())
    if case.startswith("instruct"):  # a language-model loss: bits per byte beside it
        assert saved["val_bpb"] > 0 and saved["train_bpb"] > 0
    else:
        assert "val_bpb" not in saved
    if case != "classifier":  # the test answers' diversity, before and after the stage
        assert {
            f"test_{k}_{when}" for k in STATS for when in ("before", "after")
        } <= reference.keys()
    assert_split_datasets(workdir, section, workdir / f"{case}-interrupted")
    assert_evaluated_data_and_facts(workdir, section, workdir / f"{case}-interrupted")


def resumed_run(workdir: Path, section: str, results: Path):
    """The stage's one MLflow run that wrote to `results`."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline").experiment_id
    [run] = client.search_runs(
        [experiment],
        f"tags.`pipeline.stage` = '{section}' and params.`paths.results` = '{results}'",
    )
    return run


def assert_evaluated_data_and_facts(workdir: Path, section: str, results: Path) -> None:
    """The run names the data its headline is measured on (the val or test split file's
    sha256), and says what it was (steps, epochs, trainable parameters, from both of its
    processes) as params, not as one-point metrics."""
    run = resumed_run(workdir, section, results)
    split = STAGES[section].headline.metric.split("_")[0]
    [evaluated] = (results / section).glob(f"{split}.*")
    assert run.data.tags[DATA_TAG] == hashlib.sha256(evaluated.read_bytes()).hexdigest()
    facts = {"steps", "epochs", "trainable_parameters"}
    assert facts <= run.data.params.keys() and not facts & run.data.metrics.keys()
    assert run.data.params["steps"] == str(TRAIN["max_steps"])


def assert_split_datasets(workdir: Path, section: str, results: Path) -> None:
    """The resumed run (one run for both processes) lists its source's train, val and test
    splits once each: named after the source, the split file's sha256 as digest, its rows and
    the source's verified sha256 (the one `data.sources` gives) as profile."""
    run = resumed_run(workdir, section, results)
    config = load_config([REPO / "config.yaml"])
    source = config[section]["data"]
    [expected_sha256] = [s["sha256"] for s in config["data"]["sources"] if s["name"] == source]
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert len(run.inputs.dataset_inputs) == 4  # and the tokenizer its start carries
    assert inputs["tokenizer"].name == "tokenizer"
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        dataset = inputs[context]
        [split_file] = (results / section).glob(f"{split}.*")
        text = split_file.read_text()
        rows = len(json.loads(text)) if split_file.suffix == ".json" else text.count("\n") - 1
        assert dataset.name == source
        assert dataset.digest == hashlib.sha256(split_file.read_bytes()).hexdigest()[:36]
        assert json.loads(dataset.profile) == {"rows": rows, "source_sha256": expected_sha256}
        assert json.loads(dataset.source)["uri"] == str(
            (workdir / "data" / "raw" / source).resolve()
        )


@pytest.mark.parametrize("case", CASES)
def test_a_classifier_checkpoint_is_not_a_start_for_fine_tuning(case, workdir):
    stage, section, _ = CASES[case]
    config = config_for(workdir, "wrong-start", section, {"init_from": str(workdir / "classifier")})
    if case == "dpo":
        config[section]["template"] = "alpaca"
    with pytest.raises(ValueError, match="not a language-model checkpoint"):
        stage.main(stage_config(config, section))


def test_a_mislabeled_sms_row_is_named_not_an_empty_split(workdir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(workdir / "data", data)
    sms = data / "raw" / "SMSSpamCollection"
    lines = sms.read_text().split("\n")
    lines[9] = "hma\t" + lines[9].partition("\t")[2]
    sms.write_text("\n".join(lines))
    config = config_for(workdir, "mislabeled", "finetune-classifier", {})
    config["paths"]["data"] = str(data)
    expected = rf"{sms}:10: label 'hma' is not one of the expected labels ham, spam"
    with pytest.raises(InputError, match=expected + r" \(finetune-classifier\.labels\)"):
        finetune_classifier.main(stage_config(config, "finetune-classifier"))


def classify(checkpoint: Path, texts: list[str], capsys) -> list[float]:
    """`python -m pipeline classify` in-process: the printed probability of each text."""
    from pipeline.cli import main

    assert main(["classify", "--checkpoint", str(checkpoint), "--attention", "sdpa", *texts]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "label\tprobability\ttext"
    return [float(row.split("\t")[1]) for row in rows[1:]]


def test_classifier_is_calibrated_and_classify_prints_calibrated_probabilities(workdir, capsys):
    from pipeline.model import load_checkpoint
    from pipeline.model.checkpoint import checkpoint_tokenizer
    from pipeline.model.classifier import encode_texts, predict_logits

    config = config_for(workdir, "calibrated", "finetune-classifier", {})
    finetune_classifier.main(stage_config(config, "finetune-classifier"))
    out = workdir / "calibrated" / "finetune-classifier"
    metrics = json.loads((out / "metrics.json").read_text())
    calibration = ("temperature", "test_ece", "test_ece_uncalibrated", "test_loss_uncalibrated")
    assert set(calibration) <= metrics.keys()
    assert metrics["temperature"] > 0 and 0 <= metrics["test_ece"] <= 1
    assert (out / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["classifier"]["temperature"] == metrics["temperature"]

    texts = ["ok", "WINNER!! Claim your free prize now, text WIN to 80086"]
    model = load_checkpoint(out / "model").eval()
    ids, _ = encode_texts(texts, checkpoint_tokenizer(out / "model"), 32)
    logits = predict_logits(model, ids, 2)
    older = workdir / "calibrated" / "older"  # as saved before calibration: no temperature
    shutil.copytree(out / "model", older)
    for temperature in (metrics["temperature"], 0.01, None):
        model_config["classifier"].pop("temperature", None)
        if temperature is not None:
            model_config["classifier"]["temperature"] = temperature
        (older / "config.json").write_text(json.dumps(model_config))
        expected = torch.softmax(logits / (temperature or 1.0), -1).max(-1).values
        assert classify(older, texts, capsys) == pytest.approx(expected.tolist(), abs=6e-5)
