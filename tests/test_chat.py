"""`python -m pipeline chat`: Ctrl-C stops the answer being written, not the chat; Ctrl-C or
Ctrl-D at the prompt ends it cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import chat_loop


def lines_then(*lines: str, end: type[BaseException] = EOFError):
    """A stand-in for input(): the given lines, then `end` (EOFError: Ctrl-D)."""
    queue = list(lines)

    def read(prompt: str) -> str:
        if not queue:
            raise end
        return queue.pop(0)

    return read


def test_ctrl_c_while_answering_stops_that_answer_and_asks_again(capsys):
    answered = []

    def answer(line: str) -> None:
        answered.append(line)
        if line == "long question":
            print("the start of a long answ", end="")
            raise KeyboardInterrupt  # Ctrl-C during generation

    chat_loop(answer, "> ", lines_then("long question", "next question"))
    assert answered == ["long question", "next question"]
    out, err = capsys.readouterr()
    assert out == "the start of a long answ\n\n" and err == "(answer stopped)\n"


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_ctrl_d_or_ctrl_c_at_the_prompt_ends_the_chat(end, capsys):
    answered = []
    chat_loop(answered.append, "> ", lines_then("one", end=end))
    assert answered == ["one"] and capsys.readouterr().out == "\n"


def test_an_empty_line_ends_the_chat():
    answered = []
    chat_loop(answered.append, "", lines_then("one", "", "never read"))
    assert answered == ["one"]


def wait_until_reading_stdin(pid: int, timeout: float = 120) -> None:
    """Until the process's main thread is in read(0, ...) (Linux: /proc/<pid>/syscall), so a
    signal sent next finds it at its prompt however loaded the machine is."""
    syscall = Path(f"/proc/{pid}/syscall")
    if not syscall.exists():
        pytest.skip("needs /proc/<pid>/syscall (Linux) to know the chat waits at its prompt")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if syscall.read_text().split()[:2] == ["0", "0x0"]:  # read(), file descriptor 0
            return
        time.sleep(0.05)
    pytest.fail(f"the chat did not come back to its prompt within {timeout} s")


def test_sigint_at_the_prompt_exits_0_without_a_traceback(tmp_path, mirror, repo):
    from pipeline.model import GPT, GPTConfig, save_checkpoint
    from pipeline.model.checkpoint import tokenizer_extra_files

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=32, n_layer=1, n_head=2, n_embd=32))
    tokenizer = tokenizer_extra_files(mirror / "gpt2-bpe")
    save_checkpoint(model, tmp_path / "model", {"instruct": {"template": "alpaca"}}, tokenizer)
    chat = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "chat", "--checkpoint", str(tmp_path / "model"),
         "--max-new-tokens", "3", "--attention", "sdpa"],
        cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(repo)},
        # as a terminal starts it: a run in the background (nohup ... &) ignores SIGINT, and an
        # ignored SIGINT is inherited and kept by Python
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    chat.stdin.write("Name a color.\n")
    chat.stdin.flush()
    chat.stdout.readline()  # the answer's first line
    wait_until_reading_stdin(chat.pid)  # the answer is done: the chat waits at its prompt
    chat.send_signal(signal.SIGINT)
    try:
        assert chat.wait(timeout=60) == 0
    finally:
        chat.kill()
    assert "Traceback" not in chat.stderr.read()
