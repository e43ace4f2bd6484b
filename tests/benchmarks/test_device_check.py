"""benchmarks/device_check.sh as CI runs it (--cpu-only): every GPU step says why it was skipped,
and the JSON and the markdown carry the CPU analogue's real timings. The GPU steps' workers run
here on the CPU (DDP under torchrun with gloo), and a step whose process crashes or hangs is
named in one line instead of ending the check."""

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "device_check.py"
GPU_STEPS = ("build", "opcheck", "kernel_tests", "attention", "pretrain", "ddp")
STATUSES = {"ok", "failed", "skipped"}
ATTENTION_HEADER = (
    "| device | dtype | D | T | B×H | pass | ours ms | flash ms | flash/ours | efficient ms "
    "| efficient/ours | ours TFLOP/s |"
)
TINY = {"device": "cpu", "preset": "tiny", "batch": 2, "context": 32, "steps": 2, "warmup": 1,
        "bf16": False}  # fmt: skip


@pytest.fixture(scope="module")
def cpu_only(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu-only"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < 30  # 6 s on 2 cores
    report = json.loads((out / "device_check.json").read_text())
    return report, (out / "device_check.md").read_text()


def test_the_json_records_the_machine_the_plan_and_every_step(cpu_only):
    report, _ = cpu_only
    assert report["mode"] == "cpu-only" and report["schema"] == 1
    assert len(report["commit"]) == 40 and isinstance(report["uncommitted_changes"], bool)
    assert report["date"].endswith("+00:00")
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["gpu"]) == {"name", "capability", "count", "memory_gib"}
    assert isinstance(report["host_cpu"]["flags"], str) and report["host_cpu"]["cores"] >= 1
    assert list(report["steps"]) == [*GPU_STEPS, "attention_cpu"]
    for name, step in report["steps"].items():
        assert step["status"] in STATUSES, name
        assert isinstance(step["reason"], str) and isinstance(step["seconds"], float), name
    assert report["fused_cuda_speedups"] == []


def test_every_gpu_step_is_skipped_saying_why(cpu_only):
    report, _ = cpu_only
    why = "no CUDA device" if not torch.cuda.is_available() else "--cpu-only"
    for name in GPU_STEPS:
        assert report["steps"][name]["status"] == "skipped", name
        assert report["steps"][name]["reason"] == why, name


def test_the_gpu_grid_is_planned_with_equal_work_per_shape(cpu_only):
    report, _ = cpu_only
    shapes = report["plan"]["attention"]["shapes"]
    assert {(s["dtype"], s["head_dim"], s["seq_len"]) for s in shapes} == {
        (dtype, d, t) for dtype in ("bfloat16", "float16") for d in (64, 128)
        for t in (512, 1024, 2048, 4096, 8192)
    }  # fmt: skip
    for s in shapes:
        assert s["batch"] * s["heads"] * s["seq_len"] ** 2 * s["head_dim"] == 2**37, s
    assert report["plan"]["attention"]["baselines"] == ["flash", "efficient"]
    pretrain = report["plan"]["pretrain"]
    assert pretrain["preset"] == "gpt2-124m" and pretrain["bf16"] and pretrain["batch"] == 16


def test_the_cpu_analogue_gives_the_writers_real_timings(cpu_only):
    report, _ = cpu_only
    step = report["steps"]["attention_cpu"]
    assert step["status"] == "ok", step["reason"]
    rows = step["rows"]
    assert [(r["seq_len"], r["pass"]) for r in rows] == [
        (128, "fwd"), (128, "fwd+bwd"), (256, "fwd"), (256, "fwd+bwd")
    ]  # fmt: skip
    for row in rows:
        assert set(row["ms"]) == {"ours", "flash"} and not row["errors"]
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["ratio"]["flash"] == pytest.approx(row["ms"]["flash"] / row["ms"]["ours"])


def test_the_markdown_has_the_steps_and_the_cpu_rows_of_the_json(cpu_only):
    report, markdown = cpu_only
    lines = markdown.splitlines()
    assert lines[0] == "# Device check: no GPU" or torch.cuda.is_available()
    for name, step in report["steps"].items():
        assert f"| {name} | {step['status']} | {step['seconds']} | {step['reason']} |" in lines
    assert ATTENTION_HEADER in lines
    cpu_rows = [line.split(" | ") for line in lines if line.startswith("| cpu |")]
    rows = report["steps"]["attention_cpu"]["rows"]
    assert len(cpu_rows) == len(rows) == 4
    for cells, row in zip(cpu_rows, rows, strict=True):
        assert cells[1:6] == [row["dtype"], str(row["head_dim"]), str(row["seq_len"]),
                              f"{row['batch']}×{row['heads']}", row["pass"]]  # fmt: skip
        assert cells[6] == f"{row['ms']['ours']:.3f}" and cells[7] == f"{row['ms']['flash']:.3f}"
        assert cells[8] == f"{row['ratio']['flash']:.2f}" and cells[9:11] == ["–", "–"]


def run_worker(name: str, params: dict, tmp_path: Path, launcher: list[str]) -> dict:
    result = tmp_path / "result.json"
    command = [*launcher, str(SCRIPT), "--worker", name, "--params", json.dumps(params),
               "--result", str(result)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result.read_text())


def test_the_pretrain_worker_times_both_attentions(tmp_path):
    result = run_worker("pretrain", TINY, tmp_path, [sys.executable])
    assert set(result["contenders"]) == {"sdpa", "fused"}
    for contender in result["contenders"].values():
        assert contender["tokens_per_s"] > 0 and contender["mfu"] is None  # no known CPU peak
    assert result["peak_flops"] is None and result["flops_per_token"] > 0


def test_the_opcheck_worker_checks_the_four_ops(tmp_path):
    result = run_worker("opcheck", {"device": "cpu", "dtypes": ["float32"]}, tmp_path,
                        [sys.executable])  # fmt: skip
    assert result["status"] == "ok", result["reason"]
    assert set(result["checks"]) == {f"{op} float32" for op in ("fwd", "bwd", "qkv_fwd", "qkv_bwd")}


@pytest.mark.slow
def test_the_ddp_worker_trains_under_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2"]  # fmt: skip
    result = run_worker("ddp", {**TINY, "attention": "sdpa"}, tmp_path, torchrun)
    assert result["world_size"] == 2 and result["weights_equal"] and result["status"] == "ok"
    assert result["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def device_check() -> dict:
    return runpy.run_path(str(SCRIPT))


def test_a_crashed_step_is_named_by_its_signal(device_check):
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    done = device_check["run_process"]([sys.executable, "-c", crash], 60)
    assert device_check["failure_reason"](done) == "killed by SIGSEGV"


def test_a_hung_step_is_killed_with_its_children_at_its_limit(device_check):
    started = time.monotonic()
    done = device_check["run_process"](["bash", "-c", "sleep 60 & sleep 60"], 1)
    assert time.monotonic() - started < 30
    assert device_check["failure_reason"](done) == "timed out after 1 s"


def test_a_failed_step_is_named_by_its_exception_not_torchruns(device_check):
    log = "Traceback ...\nValueError: bad shape\n\ntorch...errors.ChildFailedError: \n  rank: 0\n"
    done = device_check["Finished"](1, log, 60)
    assert device_check["failure_reason"](done) == "exit status 1: ValueError: bad shape"
