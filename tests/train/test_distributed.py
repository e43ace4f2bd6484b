"""Multi-process pretraining under torchrun with gloo on the CPU, through the real CLI: two
processes follow one process's loss curve for the same global batch, only rank 0 logs and writes,
and a run killed mid-way under one process resumes under two."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from snakemake_runs import tiny_config

from pipeline.launch import single_node_launcher

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 60
CHECKPOINT_EVERY = 10


def tiny_pretrain(mirror: Path, workdir: Path, **train) -> dict:
    """The Snakemake tests' tiny config, with a longer pretraining run on two blocks."""
    config = tiny_config(
        mirror,
        max_steps=MAX_STEPS,
        batch_size=8,
        eval_every=30,
        checkpoint_every=CHECKPOINT_EVERY,
        warmup_steps=5,
        **train,
    )
    config["device"] = "cpu"
    config["model"]["n_layer"] = 2
    config["pretrain"]["sample_tokens"] = 4
    config["tracking"] = {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "log_model": False}
    return config


def command(stage: str, *args: str, processes: int = 1) -> list[str]:
    configs = ["--config", str(REPO / "config.yaml"), "--config", "tiny.yaml"]
    launch = single_node_launcher(processes, sys.executable)
    return [*launch, stage, *configs, "--threads", "1", *args]


def parallel(parallelism: str) -> list[str]:
    return ["--set", f"pretrain.train.parallelism={parallelism}"]


def run_name(name: str) -> list[str]:
    return ["--set", f"paths.results=results-{name}", "--set", f"paths.resume=.resume-{name}"]


def run(workdir: Path, stage: str, *args: str, processes: int = 1) -> str:
    result = subprocess.run(
        command(stage, *args, processes=processes),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{stage} failed:\n{result.stdout}\n{result.stderr}"
    return result.stderr


def loss_curve(workdir: Path, name: str) -> dict[int, float]:
    """The per-step loss MLflow holds for run `name`; fails if a step was logged twice."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpt-pipeline")
    runs = client.search_runs(
        [experiment.experiment_id], f"params.`paths.results` = 'results-{name}'"
    )
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {name}: only rank 0 may create one"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{name}: a step was logged more than once"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mirror) -> Path:
    """Token files for the tiny config, and the one-process reference run."""
    workdir = tmp_path_factory.mktemp("distributed")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_pretrain(mirror, workdir)))
    run(workdir, "download")
    run(workdir, "tokenizer")
    run(workdir, "prepare")
    run(workdir, "pretrain", *run_name("one"))
    return workdir


def metrics(workdir: Path, name: str) -> dict:
    return json.loads((workdir / f"results-{name}" / "pretrain" / "metrics.json").read_text())


def weights(workdir: Path, name: str) -> dict:
    return load_file(workdir / f"results-{name}" / "pretrain" / "model" / "model.safetensors")


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_follow_one_process_loss_curve(workdir, parallelism):
    name = f"two-{parallelism}"
    log = run(workdir, "pretrain", *run_name(name), *parallel(parallelism), processes=2)
    assert "rank 0 of 2 (gloo)" in log
    one, two = loss_curve(workdir, "one"), loss_curve(workdir, name)
    assert sorted(one) == sorted(two) == list(range(1, MAX_STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"step {step}"
    reference, result = metrics(workdir, "one"), metrics(workdir, name)
    assert result["steps"] == MAX_STEPS
    assert result["tokens_seen"] == reference["tokens_seen"]
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    expected = weights(workdir, "one")
    trained = weights(workdir, name)
    assert trained.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(trained[key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert not (workdir / f".resume-{name}" / "pretrain").exists(), "resume state not cleared"


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_run_killed_under_one_process_resumes_under_two(workdir, parallelism):
    name = f"killed-{parallelism}"
    job = subprocess.Popen(
        command("pretrain", *run_name(name)),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = workdir / f".resume-{name}" / "pretrain" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert state.exists(), "no resume checkpoint appeared before the run ended"
    killed_at = json.loads(state.read_text())["step"]
    assert 0 < killed_at < MAX_STEPS

    log = run(workdir, "pretrain", *run_name(name), *parallel(parallelism), processes=2)
    assert f"resumed from step {killed_at}/{MAX_STEPS}" in log
    reference, resumed = metrics(workdir, "one"), metrics(workdir, name)
    assert resumed["steps"] == MAX_STEPS
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


def test_weights_evaluated_without_training_under_two_processes(workdir):
    """continue_pretraining false: every rank evaluates, rank 0 alone writes the outputs."""
    init = workdir / "results-one" / "pretrain" / "model"
    settings = ["--set", f"pretrain.init_from={init}"]
    settings += ["--set", "pretrain.continue_pretraining=false"]
    run(workdir, "pretrain", *run_name("evaluated"), *settings, processes=2)
    evaluated, trained = metrics(workdir, "evaluated"), metrics(workdir, "one")
    assert evaluated["steps"] == 0
    assert evaluated["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    assert (workdir / "results-evaluated" / "pretrain" / "samples.txt").is_file()


UNEVEN_FIT = """
import json, sys
import torch
from pipeline.data.loader import ExampleBatches
from pipeline.model import GPT, GPTConfig
from pipeline.settings import TrainSettings
from pipeline.train import TrainTask, fit
from pipeline.train.distributed import current_world, init_distributed, shutdown_distributed
from pipeline.train.losses import learned_targets, lm_loss

init_distributed("cpu")
torch.manual_seed(0)
lengths = [4, 31, 7, 22, 5, 30, 12, 3, 28, 9]
examples = []
for n in lengths:
    tokens = torch.randint(0, 64, (n + 1,))
    targets = tokens[1:].clone()
    targets[: n // 2] = -100  # a prompt: unlearned
    examples.append((tokens[:-1], targets))

def collate(indices):
    width = max(len(examples[i][0]) for i in indices)
    inputs = torch.zeros(len(indices), width, dtype=torch.long)
    targets = torch.full((len(indices), width), -100)
    for row, i in enumerate(indices):
        x, y = examples[i]
        inputs[row, : len(x)], targets[row, : len(y)] = x, y
    return inputs, targets

model = GPT(GPTConfig(vocab_size=64, context_length=32, n_layer=1, n_head=2, n_embd=16))
batches = ExampleBatches(len(examples), 4, collate, seed=3)
cfg = TrainSettings(max_steps=6, batch_size=4, grad_accum_steps=2, eval_every=100, log_every=1,
                  warmup_steps=0, lr=1e-2)
units = learned_targets if sys.argv[2] == "weighted" else None
result = fit(model, TrainTask(lm_loss, batches, loss_units=units), cfg, device=torch.device("cpu"),
             seed=1234)
if current_world().is_main:
    with open(sys.argv[1], "w") as f:
        json.dump([entry["loss"] for entry in result.history], f)
shutdown_distributed()
"""


def test_uneven_shares_are_weighted_to_the_global_batch_mean(tmp_path):
    """Examples with different learned-token counts, an epoch's last batch split unevenly: the
    loss_units weighting makes two processes' losses those of one process."""
    script = tmp_path / "uneven_fit.py"
    script.write_text(UNEVEN_FIT)

    def losses(name: str, weighting: str, processes: int) -> list[float]:
        out = tmp_path / f"{name}.json"
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        result = subprocess.run(
            [*launch, str(script), str(out), weighting],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text())

    one = losses("one", "weighted", 1)
    assert losses("two", "weighted", 2) == pytest.approx(one, rel=1e-5)
    unweighted = losses("two-unweighted", "equal", 2)
    assert unweighted != pytest.approx(one, rel=1e-3), "the shares were not uneven"
