"""`mlflow models serve` on the classifier and the chat model: real servers on free loopback
ports answer /invocations as `python -m pipeline classify` / `chat` answer on the command line,
and turn bad requests into a 400 with a message saying what is wrong."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 240  # two servers importing torch and mlflow on a loaded 2-core machine
REQUEST_TIMEOUT_S = 120
SERVED = ("finetune-classifier", "finetune-instruct")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(repo: Path, store: str) -> dict[str, str]:
    """This checkout's `pipeline` and the venv's executables (uvicorn) first, the test store."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(repo), "PATH": path, "MLFLOW_TRACKING_URI": store}


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def champions(logged_models, store) -> dict[str, str]:
    """Each served stage's logged model registered as the stages register theirs: the
    `models:/gpt-pipeline-<stage>@champion` URI a user serves."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    from pipeline.stages.registry import STAGES
    from pipeline.tracking.model_registry import register_stage_model

    client = MlflowClient(store)
    uris = {}
    for stage in SERVED:
        logged = client.get_logged_model(_parse_model_id_if_present(logged_models[stage]))
        name, headline = f"gpt-pipeline-{stage}", STAGES[stage].headline
        register_stage_model(
            store, logged_models[stage], name, logged.source_run_id, None, headline, 0.5
        )
        uris[stage] = f"models:/{name}@champion"
    return uris


@pytest.fixture(scope="module")
def servers(champions, store, repo, tmp_path_factory) -> Iterator[dict[str, str]]:
    """One server per served stage, started together (their start-up overlaps), each in its own
    process group, which is killed whatever happens; their URLs by stage."""
    logs = tmp_path_factory.mktemp("servers")
    started = {}
    try:
        for stage in SERVED:
            port = free_port()
            with (logs / f"{stage}.log").open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                     champions[stage], "--env-manager", "local", "--host", "127.0.0.1",
                     "-p", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env=environment(repo, store),
                )  # fmt: skip
            started[stage] = (process, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + START_TIMEOUT_S
        for stage, (process, url) in started.items():
            while not ready(url):
                log = (logs / f"{stage}.log").read_text(errors="replace")[-4000:]
                if process.poll() is not None:
                    pytest.fail(f"{stage} server exited with {process.returncode}:\n{log}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{stage} server not ready after {START_TIMEOUT_S} s:\n{log}")
                time.sleep(0.5)
        yield {stage: url for stage, (_, url) in started.items()}
    finally:
        for process, _ in started.values():
            with contextlib.suppress(ProcessLookupError):  # the whole group: uvicorn too
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def post(url: str, body: object) -> tuple[int, object]:
    """The status and parsed JSON answer of POST /invocations."""
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def run_cli(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=repo, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(repo)}, timeout=REQUEST_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_served_classifier_answers_as_classify(servers, checkpoints, repo):
    texts = ["WINNER!! Claim your free prize now", "see you at lunch", "ok"]
    status, answer = post(servers["finetune-classifier"], {"inputs": texts})
    assert status == 200, answer
    printed = run_cli(repo, "classify", "--checkpoint", str(checkpoints["finetune-classifier"]),
                      *texts)  # fmt: skip
    expected = [line.split("\t")[:2] for line in printed.splitlines()[1:]]
    served = [[p["label"], f"{p['probability']:.4f}"] for p in answer["predictions"]]
    assert served == expected


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "seed": 11}])
def test_the_served_chat_model_answers_as_chat(sampling, servers, checkpoints, repo):
    """An OpenAI-style body: `messages` and the generation params side by side."""
    params = {"max_new_tokens": 12, **sampling}
    body = {"messages": [{"role": "user", "content": "Name a primary color."}], **params}
    status, answer = post(servers["finetune-instruct"], body)
    assert status == 200, answer
    options = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    printed = run_cli(repo, "chat", "--checkpoint", str(checkpoints["finetune-instruct"]),
                      "--instruction", "Name a primary color.", *options)  # fmt: skip
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == printed.removesuffix("\n")


CHAT = [{"role": "user", "content": "Name a color."}]
BAD_REQUESTS = {
    "empty messages": ("finetune-instruct", {"messages": []}, "messages is empty"),
    "two turns": (
        "finetune-instruct",
        {"messages": [*CHAT, {"role": "assistant", "content": "Red."}, *CHAT]},
        "send one message with role 'user'",
    ),
    "non-string content": (
        "finetune-instruct",
        {"messages": [{"role": "user", "content": 3}]},
        "Expected type string",
    ),
    "max_new_tokens over the context": (
        "finetune-instruct",
        {"messages": CHAT, "max_new_tokens": 100_000},
        "max_new_tokens must be between 0 and the model's context length",
    ),
    "max_new_tokens not a number": (
        "finetune-instruct",
        {"messages": CHAT, "max_new_tokens": "many"},
        "max_new_tokens",
    ),
    "negative temperature": (
        "finetune-instruct",
        {"messages": CHAT, "temperature": -1.0},
        "temperature must be >= 0",
    ),
    "non-string text": (
        "finetune-classifier",
        {"dataframe_records": [{"text": "fine"}, {"text": 3}]},
        "text 2 is a int, not a string",
    ),
    "empty text": ("finetune-classifier", {"inputs": ["fine", "  "]}, "text 2 is empty"),
    "an unwrapped input field": (  # MLflow would answer it with a bare list
        "finetune-classifier",
        {"input": ["fine", "ok"]},
        'send texts as {"inputs": [',
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_gets_a_400_saying_what_is_wrong(case, servers):
    stage, body, message = BAD_REQUESTS[case]
    status, answer = post(servers[stage], body)
    assert status == 400, answer
    assert message in answer["message"], answer
