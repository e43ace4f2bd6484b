"""One prepared check of the fused attention op on a lent GPU: build, tests, benchmarks.

    bash benchmarks/device_check.sh [--cpu-only] [--only STEP ...] [--budget-s S]

GPU time comes rarely and for minutes, so everything runs from one command that finishes in
under 8 minutes on one H100/H200 and writes into --out (default results/device_check)
device_check.json (each step's status, reason, seconds and figures; the GPU, versions, commit,
date and the host's CPU flags) and device_check.md (the tables the README's GPU table is made
from). The steps, in order:

  build          the extension for the GPU's compute capability (TORCH_CUDA_ARCH_LIST), unless
                 pipeline/kernels/_C is newer than csrc/ and setup.py and already runs there;
  opcheck        torch.library.opcheck of the four ops (fwd, bwd, packed qkv fwd and bwd) on
                 CUDA inputs, bf16 and fp16;
  kernel_tests   pytest tests/kernels/test_causal_attention_cuda.py;
  attention      ours against SDPA's FLASH and EFFICIENT backends (benchmarks/attention_cuda.py):
                 bf16 and fp16, causal, D 64 and 128, T 512 to 8192, forward and forward +
                 backward (CUDA events, warmup, median). Every shape does the same work:
                 B·H = 2^37 / (T²·D), H 16, so each shape takes about as long to time;
  pretrain       gpt2-124m pretraining steps, bf16 autocast, batch 16 × 1024 tokens, with sdpa and
                 with fused (benchmarks/pretrain_throughput.py): tokens/s, and MFU against the
                 GPU's datasheet bf16 peak (pipeline/train/device.py; an unknown GPU: null);
  ddp            with 2 or more GPUs, a few DDP steps of the same model under torchrun;
  attention_cpu  with --cpu-only (what CI runs): step attention's CPU analogue on two tiny
                 shapes, ours against SDPA, so that the writers get real numbers.

Without a GPU, or with --cpu-only, the GPU steps are skipped and say why. Each step that loads
the extension runs in a process of its own under a time limit, so a crash, a hang or a sticky
CUDA error fails that step only; the parent never loads the extension, which the build replaces.
Both files are rewritten after every step. Exit status 1 if a step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

BUDGET_S = 450.0
"""The whole check's time on the GPU: 8 minutes less the parent's own start and writing."""
GPU_WORK = 2**37
"""B·H·T²·D of every GPU attention shape: B1 H16 at T8192 D128, about 0.3 TFLOP forward."""
CPU_WORK = 2**23
"""B·H·T²·D of the CPU analogue's shapes: B1 H8 at T128 D64, a few milliseconds."""
TIMED_HEADS = 16
TEST_FILE = "tests/kernels/test_causal_attention_cuda.py"
PRETRAIN = {"preset": "gpt2-124m", "batch": 16, "context": 1024, "warmup": 5, "bf16": True}
ATTENTION_HEADER = (
    "| device | dtype | D | T | B×H | pass | ours ms | flash ms | flash/ours | efficient ms "
    "| efficient/ours | ours TFLOP/s |"
)
PASSES = (("fwd", 1.0), ("fwd+bwd", 3.5))
"""Each timed pass and its FLOPs over the forward's (FlashAttention's count)."""


@dataclass(frozen=True)
class Step:
    """One step: its time limit, the least time worth starting it with, and what it needs."""

    name: str
    limit_s: float
    min_s: float
    gpu: bool = True
    needs_op: bool = True  # loads the extension, so a failed build skips it


STEPS = (
    Step("build", 330, 60, needs_op=False),
    Step("opcheck", 90, 20),
    Step("kernel_tests", 180, 30),
    Step("attention", 150, 30),
    Step("pretrain", 150, 30),
    Step("ddp", 120, 30),
    Step("attention_cpu", 60, 10, gpu=False),
)
STEP_NAMES = tuple(step.name for step in STEPS)


# --- the plan ----------------------------------------------------------------------------------


def plan_grid(
    dtypes: list[str], head_dims: list[int], seq_lens: list[int], work: int
) -> list[dict]:
    """Shapes of equal work B·H·T²·D = `work` (B·H rounded to a power of two, H up to 16), so
    that T8192 is not a thousand times T512 and every shape gets as many timed calls."""
    shapes = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for seq_len in seq_lens:
                bh = 2 ** max(0, round(math.log2(work / (seq_len * seq_len * head_dim))))
                heads = min(TIMED_HEADS, bh)
                shapes.append(
                    {
                        "dtype": dtype,
                        "head_dim": head_dim,
                        "seq_len": seq_len,
                        "batch": bh // heads,
                        "heads": heads,
                    }
                )
    return shapes


def make_plan(args: argparse.Namespace) -> dict:
    """What each step will run, recorded whether or not it runs."""
    gpu_shapes = plan_grid(
        ["bfloat16", "float16"], [64, 128], [512, 1024, 2048, 4096, 8192], GPU_WORK
    )
    return {
        "attention": {
            "work": "B·H·T²·D = 2^37",
            "warmup": 10,
            "repeats": args.repeats,
            "baselines": ["flash", "efficient"],
            "shapes": gpu_shapes,
        },
        "attention_cpu": {
            "work": "B·H·T²·D = 2^23",
            "warmup": 5,
            "repeats": 10,
            "baselines": ["flash"],
            "shapes": plan_grid(["float32"], [64], [128, 256], CPU_WORK),
        },
        "pretrain": {**PRETRAIN, "steps": args.pretrain_steps},
        "ddp": {**PRETRAIN, "steps": 10, "warmup": 3, "attention": "sdpa"},
    }


# --- what the machine is -----------------------------------------------------------------------


def gpu_info() -> dict:
    """The first GPU's name, compute capability and memory, and how many there are."""
    if not torch.cuda.is_available():
        return {"name": None, "capability": None, "count": 0, "memory_gib": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": [props.major, props.minor],
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def host_cpu() -> dict:
    """The host's CPU model and its vector flags (AVX2, FMA, AVX-512, AMX) for the record
    (benchmarks/attention.py's cpu_flags, plus AMX, without importing it: it loads the
    extension, which the parent must not)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    vector = [
        f
        for f in (flags.group(1).split() if flags else [])
        if f in ("avx2", "fma") or f.startswith(("avx512", "amx"))
    ]
    return {
        "model": model.group(1).strip() if model else None,
        "cores": os.cpu_count(),
        "flags": " ".join(sorted(vector)),
    }


def git_commit() -> tuple[str, bool | None]:
    """HEAD and whether the tree has uncommitted changes (a copy without .git:
    $PIPELINE_COMMIT, else unknown)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PIPELINE_COMMIT", "unknown"), None
    return head, bool(status.strip())


def nvcc_version() -> str | None:
    """nvcc's release (e.g. 12.8), or None without a CUDA toolkit."""
    nvcc = shutil.which("nvcc") or str(
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    )
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    release = re.search(r"release ([\d.]+)", out)
    return release.group(1) if release else None


# --- running a step's process ------------------------------------------------------------------


@dataclass
class Finished:
    """A step process's end: exit status (None: killed at its time limit) and its output."""

    returncode: int | None
    log: str
    timeout_s: float


def run_process(command: list[str], timeout_s: float, env: dict | None = None) -> Finished:
    """Runs `command` in its own process group, killed whole (torchrun's and pytest's children
    too) at `timeout_s`; stdout and stderr together, kept for the reason and the log's tail."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
        log.seek(0)
        return Finished(returncode, log.read(), timeout_s)


def failure_reason(done: Finished) -> str:
    """One line: the time limit, the signal, or the last exception line of the output."""
    if done.returncode is None:
        return f"timed out after {done.timeout_s:.0f} s"
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    lines = [line.strip() for line in done.log.splitlines() if line.strip()]
    # torchrun ends with its own ChildFailedError; the child's exception is the one to name
    errors = [line for line in lines if "ChildFailedError" not in line]
    said = [line for line in errors if re.match(r"^[\w.]*(Error|Exception)\w*: \S", line)]
    bare = [line for line in errors if re.match(r"^[\w.]*(Error|Exception)\w*\b", line)]
    last = (said or bare or lines or [""])[-1]
    return f"exit status {done.returncode}: {last[:300]}"


def log_tail(done: Finished, lines: int = 40) -> list[str]:
    return done.log.splitlines()[-lines:]


def run_worker(name: str, params: dict, timeout_s: float, nproc: int = 0) -> dict:
    """Runs `device_check.py --worker name` (under torchrun with `nproc` processes): its result
    file merged into the step's status; a partial result (a timed-out grid) is kept."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--params",
            json.dumps(params),
            "--result",
            str(result),
        ]
        if nproc:
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            command = launcher + command
        done = run_process([sys.executable, *command], timeout_s)
        finished = result.exists()
        data = json.loads(result.read_text()) if finished else {}
    if done.returncode == 0 and finished:
        return {"status": "ok", "reason": "", **data}
    data.pop("status", None)
    return {**data, "status": "failed", "reason": failure_reason(done), "log_tail": log_tail(done)}


# --- the steps ---------------------------------------------------------------------------------


@dataclass
class Context:
    """What the steps share: the options, the plan, the GPU, and the steps' results so far."""

    args: argparse.Namespace
    plan: dict
    gpu: dict
    steps: dict


def kernels_stale() -> str | None:
    """Why the built extension must be rebuilt (missing, or older than its sources), or None."""
    built = list((REPO / "pipeline" / "kernels").glob("_C*.so"))
    if not built:
        return "pipeline/kernels/_C is not built"
    sources = [REPO / "setup.py", *(REPO / "csrc").iterdir()]
    newest = max(sources, key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime > min(p.stat().st_mtime for p in built):
        return f"{newest.relative_to(REPO)} is newer than the built extension"
    return None


def step_build(ctx: Context, timeout_s: float) -> dict:
    """The extension for this GPU's arch, as the Makefile builds it (setup.py with this python:
    no build isolation), unless the built one is current and runs here."""
    major, minor = ctx.gpu["capability"]
    if major < 8:
        return {
            "status": "failed",
            "op_ready": False,
            "reason": f"compute capability {major}.{minor}: the CUDA kernels need 8.0+",
        }
    arch = f"{major}.{minor}"
    why = kernels_stale()
    if why is None:
        probe = run_worker("probe", {}, min(90.0, timeout_s / 2))
        if probe["status"] == "ok":
            return {
                "status": "skipped",
                "op_ready": True,
                "arch_list": arch,
                "reason": "already built: current with csrc/ and runs on this GPU",
            }
        why = f"the built extension does not run here ({probe['reason']})"
    env = {
        **os.environ,
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
        # ninja from this python's environment (a venv's bin/ is not on PATH unless activated)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace", "--force"]
    started = time.monotonic()
    done = run_process(command, timeout_s, env=env)
    record = {
        "arch_list": arch,
        "command": f"TORCH_CUDA_ARCH_LIST={arch} " + " ".join(command[1:]),
        "ninja": shutil.which("ninja", path=env["PATH"]) is not None,
    }
    if done.returncode != 0:
        reason = f"build failed ({why}): {failure_reason(done)}"
        return {
            **record,
            "status": "failed",
            "op_ready": False,
            "reason": reason,
            "log_tail": log_tail(done),
        }
    left = timeout_s - (time.monotonic() - started)
    probe = run_worker("probe", {}, max(30.0, left))
    if probe["status"] != "ok":
        return {
            **record,
            "status": "failed",
            "op_ready": False,
            "reason": f"built, but the op does not run here: {probe['reason']}",
        }
    return {
        **record,
        "status": "ok",
        "op_ready": True,
        "reason": f"built for sm_{major}{minor} ({why})",
    }


def step_opcheck(ctx: Context, timeout_s: float) -> dict:
    return run_worker("opcheck", {"device": "cuda", "dtypes": ["bfloat16", "float16"]}, timeout_s)


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """pytest's junit XML: the counts, and each failed, errored or skipped test with its
    message's first line."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{path}: no <testsuite>"
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    notes = []
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            found = case.find(outcome)
            if found is not None:
                # a module-level skip says only "collection skipped"; its text has the reason
                said = re.search(r"Skipped: (.+?)['\"]?\)?$", found.text or "")
                message = said.group(1) if said else (found.get("message") or "")
                notes.append(
                    f"{outcome}: {case.get('name')}: {(message.splitlines() or [''])[0][:200]}"
                )
    return counts, notes


def step_kernel_tests(ctx: Context, timeout_s: float) -> dict:
    """The CUDA kernel tests; they pass only if some ran and none failed (all skipped: the
    extension has no CUDA kernels)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            TEST_FILE,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
        done = run_process(command, timeout_s)
        if not junit.exists():
            return {"status": "failed", "reason": failure_reason(done), "log_tail": log_tail(done)}
        counts, notes = junit_counts(junit)
    record = {
        "command": " ".join(["python", *command[1:-1]]),
        "counts": counts,
        "notes": notes[:30],
    }
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failures", "errors", "skipped"))
    if done.returncode == 0 and counts["passed"] > 0:
        return {**record, "status": "ok", "reason": summary}
    first = f"; first: {notes[0]}" if notes else ""
    return {**record, "status": "failed", "reason": summary + first, "log_tail": log_tail(done)}


def step_attention(ctx: Context, timeout_s: float, name: str = "attention") -> dict:
    plan = ctx.plan[name]
    device = "cuda" if name == "attention" else "cpu"
    params = {key: plan[key] for key in ("shapes", "baselines", "warmup", "repeats")}
    result = run_worker("attention", {**params, "device": device}, timeout_s)
    if result["status"] == "failed" and result.get("rows"):
        measured = len(result["rows"]) // len(PASSES)
        result["reason"] += f" ({measured} of {len(plan['shapes'])} shapes measured)"
    return result


def step_attention_cpu(ctx: Context, timeout_s: float) -> dict:
    return step_attention(ctx, timeout_s, "attention_cpu")


def step_pretrain(ctx: Context, timeout_s: float) -> dict:
    return run_worker("pretrain", {**ctx.plan["pretrain"], "device": "cuda"}, timeout_s)


def step_ddp(ctx: Context, timeout_s: float) -> dict:
    nproc = min(ctx.gpu["count"], 8)
    result = run_worker("ddp", {**ctx.plan["ddp"], "device": "cuda"}, timeout_s, nproc=nproc)
    single = ctx.steps.get("pretrain", {}).get("contenders", {}).get("sdpa")
    if result["status"] == "ok" and single:
        # The same model, batch and attention per GPU as step pretrain's sdpa: the scaling.
        result["tokens_per_s_per_gpu_over_single"] = (
            result["tokens_per_s"] / nproc / single["tokens_per_s"]
        )
    return result


RUNNERS: dict[str, Callable[[Context, float], dict]] = {
    "build": step_build,
    "opcheck": step_opcheck,
    "kernel_tests": step_kernel_tests,
    "attention": step_attention,
    "pretrain": step_pretrain,
    "ddp": step_ddp,
    "attention_cpu": step_attention_cpu,
}


def static_skip(step: Step, args: argparse.Namespace, gpu: dict) -> str | None:
    """Why `step` will not run whatever the others do, or None."""
    if args.only and step.name not in args.only:
        return "not in --only"
    if step.gpu and gpu["count"] == 0:
        return "no CUDA device"
    if step.gpu and args.cpu_only:
        return "--cpu-only"
    if step.name == "ddp" and gpu["count"] < 2:
        return "1 GPU"
    if not step.gpu and gpu["count"] and not args.cpu_only:
        return "a CUDA device is present: step attention measures it (--cpu-only runs this)"
    return None


def run_steps(ctx: Context, started: float, write: Callable[[], None]) -> None:
    """Each step in order within the budget, each with the time left less what the later
    steps need at least; the outputs are rewritten after each."""
    skips = {step.name: static_skip(step, ctx.args, ctx.gpu) for step in STEPS}
    for i, step in enumerate(STEPS):
        reason = skips[step.name]
        build = ctx.steps.get("build", {})
        if reason is None and step.needs_op and build.get("status") == "failed":
            reason = "the build failed"
        left = ctx.args.budget_s - (time.monotonic() - started)
        reserve = sum(s.min_s for s in STEPS[i + 1 :] if skips[s.name] is None)
        if reason is None and left - reserve < step.min_s:
            reason = f"time budget spent ({left:.0f} s of --budget-s {ctx.args.budget_s:.0f} left)"
        if reason is not None:
            ctx.steps[step.name] = {"status": "skipped", "reason": reason, "seconds": 0.0}
        else:
            print(f"[device_check] {step.name} ...", flush=True)
            begun = time.monotonic()
            result = RUNNERS[step.name](ctx, min(step.limit_s, left - reserve))
            ctx.steps[step.name] = {**result, "seconds": round(time.monotonic() - begun, 1)}
        entry = ctx.steps[step.name]
        print(
            f"[device_check] {step.name}: {entry['status']} ({entry['seconds']} s) "
            f"{entry['reason']}",
            flush=True,
        )
        write()


def speedup_rows(report: dict) -> list[dict]:
    """The GPU rows in pipeline/model/fused_cuda_speedups.json's form (SDPA flash time / ours),
    which `model.attention: auto` decides from on a GPU."""
    rows = report["steps"].get("attention", {}).get("rows", [])
    by_shape: dict[tuple, dict] = {}
    for row in rows:
        ratio = row["ratio"].get("flash")
        if ratio is not None:
            key = (row["dtype"], row["head_dim"], row["seq_len"], row["batch"], row["heads"])
            by_shape.setdefault(key, {})[row["pass"]] = round(ratio, 2)
    return [
        {
            "gpu": report["gpu"]["name"],
            "capability": report["gpu"]["capability"],
            "commit": report["commit"][:7],
            "command": "bash benchmarks/device_check.sh",
            "dtype": dtype,
            "head_dim": d,
            "seq_len": t,
            "batch": b,
            "heads": h,
            "forward": ratios["fwd"],
            "forward_backward": ratios["fwd+bwd"],
        }
        for (dtype, d, t, b, h), ratios in by_shape.items()
        if len(ratios) == len(PASSES)
    ]


def run_check(args: argparse.Namespace) -> dict:
    """The whole check: the record of the machine, the plan, then the steps."""
    started = time.monotonic()
    commit, dirty = git_commit()
    gpu = gpu_info()
    report = {
        "schema": 1,
        "mode": "gpu" if gpu["count"] and not args.cpu_only else "cpu-only",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "uncommitted_changes": dirty,
        "gpu": gpu,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nvcc": nvcc_version(),
        },
        "host_cpu": host_cpu(),
        "options": {k: v for k, v in vars(args).items() if k not in ("worker", "params", "result")},
        "plan": make_plan(args),
        "steps": {},
        "fused_cuda_speedups": [],
        "seconds": 0.0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        report["seconds"] = round(time.monotonic() - started, 1)
        report["fused_cuda_speedups"] = speedup_rows(report)
        write_atomic(out / "device_check.json", json.dumps(report, indent=1) + "\n")
        write_atomic(out / "device_check.md", markdown(report))

    write()  # the machine and the plan, even if the check is killed during the first step
    run_steps(Context(args, report["plan"], gpu, report["steps"]), started, write)
    return report


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the markdown ------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(text: str) -> str:
    """`text` inside a table cell: one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _ms(row: dict, name: str) -> str:
    """A contender's cell: its milliseconds, failed (the JSON has its error), or – (not run)."""
    return "failed" if name in row["errors"] else _num(row["ms"].get(name), ".3f")


def attention_lines(rows: list[dict], device: str) -> list[str]:
    lines = []
    for row in rows:
        ratio = row["ratio"]
        lines.append(
            f"| {device} | {row['dtype']} | {row['head_dim']} | {row['seq_len']} | "
            f"{row['batch']}×{row['heads']} | {row['pass']} | {_ms(row, 'ours')} | "
            f"{_ms(row, 'flash')} | {_num(ratio.get('flash'), '.2f')} | {_ms(row, 'efficient')} | "
            f"{_num(ratio.get('efficient'), '.2f')} | {_num(row['tflops'].get('ours'), '.3g')} |"
        )
    return lines


def gpu_title(gpu: dict) -> str:
    if not gpu["name"]:
        return "no GPU"
    major, minor = gpu["capability"]
    plural = "s" if gpu["count"] > 1 else ""
    return f"{gpu['name']} (compute capability {major}.{minor}, {gpu['count']} GPU{plural})"


def markdown(report: dict) -> str:
    """device_check.md: the machine, each step's outcome, then the attention, pretraining and
    DDP figures that were measured."""
    gpu, versions, steps = report["gpu"], report["versions"], report["steps"]
    dirty = " with uncommitted changes" if report["uncommitted_changes"] else ""
    lines = [
        f"# Device check: {gpu_title(gpu)}",
        "",
        f"`bash benchmarks/device_check.sh{' --cpu-only' if report['mode'] == 'cpu-only' else ''}`"
        f" at commit {report['commit'][:7]}{dirty}, {report['date']}; torch {versions['torch']}, "
        f"CUDA {versions['cuda']}, nvcc {versions['nvcc']}; host CPU "
        f"{report['host_cpu']['model']} ({report['host_cpu']['cores']} cores, flags: "
        f"{report['host_cpu']['flags'] or 'none of avx2/fma/avx512/amx'}); "
        f"{report['seconds']} s in all.",
        "",
        "| step | status | seconds | reason |",
        "|---|---|---:|---|",
        *(
            f"| {n} | {s['status']} | {s['seconds']} | {_cell(s['reason'])} |"
            for n, s in steps.items()
        ),
    ]
    tables = [
        (name, device)
        for name, device in (("attention", "cuda"), ("attention_cpu", "cpu"))
        if steps.get(name, {}).get("rows")
    ]
    if tables:
        lines += [
            "",
            "## Attention: ours against SDPA (causal)",
            "",
            "Median milliseconds; x/ours is x's time over ours (above 1: ours is faster). Every "
            "shape of a device does the same work B·H·T²·D; TFLOP/s count the causal half "
            "(forward 4·B·H·D·T(T+1)/2, forward+backward 3.5 times that).",
            "",
            ATTENTION_HEADER,
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, device in tables:
            lines += attention_lines(steps[name]["rows"], device)
    lines += pretrain_lines(steps.get("pretrain", {}), steps.get("ddp", {}))
    return "\n".join(lines) + "\n"


def pretrain_lines(pretrain: dict, ddp: dict) -> list[str]:
    lines = []
    if pretrain.get("contenders"):
        peak = pretrain["peak_flops"]
        lines += [
            "",
            f"## Pretraining throughput: {pretrain['preset']}, batch {pretrain['batch']} × "
            f"{pretrain['context']} tokens, {'bf16 autocast' if pretrain['bf16'] else 'fp32'}",
            "",
            f"Median of {pretrain['steps']} steps after {pretrain['warmup']}, the two in turns; "
            + (
                f"MFU against {peak / 1e12:.0f} TFLOP/s ({pretrain['peak_source']})."
                if peak
                else "MFU: the GPU's bf16 peak is unknown."
            ),
            "",
            "| attention | ms/step | tokens/s | MFU |",
            "|---|---:|---:|---:|",
        ]
        for name, c in pretrain["contenders"].items():
            mfu = "–" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
            lines.append(f"| {name} | {c['ms_per_step']:.1f} | {c['tokens_per_s']:.0f} | {mfu} |")
    if ddp.get("tokens_per_s"):
        lines += [
            "",
            f"DDP: {ddp['world_size']} processes, {ddp['tokens_per_s']:.0f} tokens/s in all "
            f"({ddp['attention']}, batch {ddp['batch']} × {ddp['context']} per GPU, median of "
            f"{ddp['steps']} steps); weights equal on every rank after the steps: "
            f"{ddp['weights_equal']}.",
        ]
    return lines


# --- the workers (each in its own process; these load the extension) ---------------------------


def worker_probe(params: dict, save: Callable[[dict], None]) -> dict:
    """Whether the built op has CUDA kernels that run on this GPU."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    from attention_cuda import cuda_kernels_built

    from pipeline.kernels import causal_attention

    if not cuda_kernels_built():
        raise RuntimeError("pipeline.kernels._C has no CUDA kernels (a CPU-only build)")
    q = torch.randn(1, 2, 80, 64, device="cuda", dtype=torch.bfloat16)
    causal_attention(q, q, q)
    torch.cuda.synchronize()
    return {}


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(dtype)


def worker_opcheck(params: dict, save: Callable[[dict], None]) -> dict:
    """torch.library.opcheck of each op per dtype: schema, autograd registration, fake kernel
    and AOT dispatch against the real kernels on `device`."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    import pipeline.kernels  # noqa: F401  (registers torch.ops.pipeline)

    ops, device, heads, checks = torch.ops.pipeline, params["device"], 2, {}
    for name in params["dtypes"]:
        gen = torch.Generator(device=device).manual_seed(0)
        dtype = getattr(torch, name)
        q, k, v, grad = (_random((2, heads, 70, 64), dtype, gen) for _ in range(4))
        out, lse = ops.causal_attention_fwd(q, k, v)
        qkv = _random((2, 70, 3 * heads * 64), dtype, gen)
        grad_c = _random((2, 70, heads * 64), dtype, gen)
        out_c, lse_c = ops.causal_attention_qkv_fwd(qkv, heads)
        cases = {
            "fwd": (
                ops.causal_attention_fwd.default,
                tuple(t.clone().requires_grad_() for t in (q, k, v)),
            ),
            "bwd": (ops.causal_attention_bwd.default, (grad, q, k, v, out, lse)),
            "qkv_fwd": (
                ops.causal_attention_qkv_fwd.default,
                (qkv.clone().requires_grad_(), heads),
            ),
            "qkv_bwd": (ops.causal_attention_qkv_bwd.default, (grad_c, qkv, out_c, lse_c, heads)),
        }
        for op_name, (op, inputs) in cases.items():
            try:
                torch.library.opcheck(op, inputs)
                checks[f"{op_name} {name}"] = "ok"
            except Exception as exc:  # every failure is recorded; the others still run
                checks[f"{op_name} {name}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    failed = {case: msg for case, msg in checks.items() if msg != "ok"}
    reason = f"{len(checks) - len(failed)} of {len(checks)} passed" + (
        f"; {next(iter(failed))}: {next(iter(failed.values()))}" if failed else ""
    )
    return {"status": "failed" if failed else "ok", "reason": reason, "checks": checks}


def worker_attention(params: dict, save: Callable[[dict], None]) -> dict:
    """Ours and each SDPA backend on each shape, forward and forward + backward; a contender's
    error (an unsupported shape, out of memory) is recorded in its cell, the others still run.
    The rows so far are saved after each shape, so a timed-out grid keeps what it measured."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    from attention import Case, alternate_ms
    from attention_cuda import SDPA_BACKENDS, Timer, case_tensors, median_ms, sdpa_with, time_fn

    from pipeline.kernels import causal_attention

    def cpu_median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
        return alternate_ms([fn], warmup, repeats, math.inf)[0][0]  # perf_counter, no CUDA

    device = params["device"]
    timer: Timer = median_ms if device == "cuda" else cpu_median_ms
    contenders = {"ours": causal_attention}
    contenders |= {name: sdpa_with(SDPA_BACKENDS[name]) for name in params["baselines"]}
    rows: list[dict] = []
    for shape in params["shapes"]:
        case = Case(shape["batch"], shape["heads"], shape["seq_len"], shape["head_dim"])
        tensors = case_tensors(case, getattr(torch, shape["dtype"]), device)
        ms: list[dict] = [{}, {}]
        errors: dict[str, str] = {}
        for name, fn in contenders.items():
            try:
                times = time_fn(fn, tensors, params["warmup"], params["repeats"], timer=timer)
            except RuntimeError as exc:  # recorded in the cell; the other contenders still run
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            for i, value in enumerate(times):
                ms[i][name] = value
        for (label, factor), pass_ms in zip(PASSES, ms, strict=True):
            flops = factor * case.forward_flops()
            rows.append(
                {
                    **shape,
                    "pass": label,
                    "ms": pass_ms,
                    "errors": errors,
                    "ratio": {
                        n: pass_ms[n] / pass_ms["ours"]
                        for n in pass_ms
                        if n != "ours" and "ours" in pass_ms
                    },
                    "tflops": {n: flops / value / 1e9 for n, value in pass_ms.items()},
                }
            )
        del tensors
        if device == "cuda":
            torch.cuda.empty_cache()
        save({"rows": rows})
    failed = sum(len(row["errors"]) for row in rows[:: len(PASSES)])
    total = len(params["shapes"]) * len(contenders)
    status = "failed" if failed else "ok"
    first = next(
        (
            f"; first: {r['dtype']} D{r['head_dim']} T{r['seq_len']} {n}: {e}"
            for r in rows
            for n, e in r["errors"].items()
        ),
        "",
    )
    return {"status": status, "reason": f"{total - failed} of {total} timings{first}", "rows": rows}


def throughput_args(params: dict) -> argparse.Namespace:
    """benchmarks/pretrain_throughput.py's options for `params` (its `--compare attention`)."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    import pretrain_throughput

    argv = ["--compare", "attention", "--device", params["device"]]
    for key in ("preset", "batch", "context", "steps", "warmup"):
        argv += [f"--{key}", str(params[key])]
    return pretrain_throughput.build_parser().parse_args(argv + ["--bf16"] * params["bf16"])


def worker_pretrain(params: dict, save: Callable[[dict], None]) -> dict:
    """Pretraining steps with sdpa and with fused in turns: ms/step, tokens/s and MFU."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    import pretrain_throughput

    from pipeline.train.device import known_peak_flops

    args = throughput_args(params)
    trainers = pretrain_throughput.make_trainers(args)
    batches = pretrain_throughput.make_batches(args)
    times = pretrain_throughput.time_steps(trainers, batches, args.warmup)
    flops_per_token = next(iter(trainers.values())).model.flops_per_token(args.context)
    peak = known_peak_flops(torch.device(args.device), torch.bfloat16)
    contenders = {}
    for name in ("sdpa", "fused"):
        seconds = statistics.median(times[name])
        rate = args.batch * args.context / seconds
        mfu = rate * flops_per_token / peak if peak else None
        contenders[name] = {"ms_per_step": 1e3 * seconds, "tokens_per_s": rate, "mfu": mfu}
    ratio = contenders["fused"]["tokens_per_s"] / contenders["sdpa"]["tokens_per_s"]
    return {
        **params,
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
        "peak_source": "datasheet bf16 dense peak (pipeline/train/device.py)" if peak else None,
        "contenders": contenders,
        "fused_over_sdpa": ratio,
        "reason": f"fused {ratio:.2f}x sdpa tokens/s",
    }


def worker_ddp(params: dict, save: Callable[[dict], None]) -> dict | None:
    """One process of torchrun's: the model under DDP (nccl on GPUs, gloo on CPUs), a few steps
    on each rank's own batches; rank 0 reports the slowest rank's median and whether every rank
    ends with the same weights."""
    # deferred: a worker loads the extension; the parent never does (the build replaces it)
    import pretrain_throughput
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    cuda = params["device"] == "cuda"
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        args = throughput_args({**params, "device": device})
        trainer = pretrain_throughput.Trainer(params["attention"], "fused", args)
        trainer.forward = DistributedDataParallel(
            trainer.model, device_ids=[local] if cuda else None
        )
        batches = pretrain_throughput.make_batches(args, seed=rank)
        times = pretrain_throughput.time_steps({"ddp": trainer}, batches, args.warmup)["ddp"]
        stats = torch.tensor([statistics.median(times)], device=device, dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        weights = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
        spread = torch.stack([weights.sum(), -weights.sum()])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)  # max and -min of each rank's sum
        equal = bool(spread[0] + spread[1] == 0)
    finally:
        dist.destroy_process_group()
    if rank:
        return None
    seconds = stats.item()
    rate = world * args.batch * args.context / seconds
    return {
        **params,
        "world_size": world,
        "ms_per_step": 1e3 * seconds,
        "tokens_per_s": rate,
        "weights_equal": equal,
        "status": "ok" if equal else "failed",
        "reason": f"{world} processes, {rate:.0f} tokens/s" + ("" if equal else ", weights differ"),
    }


WORKERS: dict[str, Callable[[dict, Callable[[dict], None]], dict | None]] = {
    "probe": worker_probe,
    "opcheck": worker_opcheck,
    "attention": worker_attention,
    "pretrain": worker_pretrain,
    "ddp": worker_ddp,
}


def run_as_worker(args: argparse.Namespace) -> int:
    result_path = Path(args.result)

    def save(data: dict) -> None:
        write_atomic(result_path, json.dumps(data))

    result = WORKERS[args.worker](json.loads(args.params), save)
    if result is not None:
        save(result)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="results/device_check", help="folder for both files")
    parser.add_argument(
        "--cpu-only",
        action="store_true",
        help="skip every GPU step (CI); time the CPU analogue instead",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STEP_NAMES,
        metavar="STEP",
        help=f"run only these steps, of: {' '.join(STEP_NAMES)}",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help=f"seconds for all the steps (default {BUDGET_S:.0f})",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per GPU timing")
    parser.add_argument("--pretrain-steps", type=int, default=30, help="timed steps per backend")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and not (args.params and args.result):
        parser.error("--worker needs --params and --result")
    if args.budget_s <= 0 or args.repeats < 1 or args.pretrain_steps < 1:
        parser.error("--budget-s, --repeats and --pretrain-steps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)
    report = run_check(args)
    out = Path(args.out)
    print(f"[device_check] wrote {out / 'device_check.json'} and {out / 'device_check.md'}")
    return 1 if any(s["status"] == "failed" for s in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
