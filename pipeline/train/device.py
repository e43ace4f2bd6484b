"""Device selection and the peak-FLOPS figure used as the MFU denominator."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.io import atomic_write_json

log = logging.getLogger("pipeline.train")

# Dense (no sparsity) bf16/fp16 tensor-core peaks, matched against torch.cuda.get_device_name
# in order, so the more specific names come first.
_KNOWN_CUDA_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device names usable on this machine, for error messages."""
    cuda = (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return ["cpu", *cuda, *(["mps"] if _mps_available() else [])]


def pick_device(name: str = "auto", key: str = "device") -> torch.device:
    """Resolve a device name (of the setting or option `key`), failing loudly instead of
    silently training on the CPU.

    ``"auto"`` picks cuda > mps > cpu; ``"cuda"``, ``"cuda:N"``, ``"mps"`` and ``"cpu"`` are
    taken literally and must be usable here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(
            f"{key}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{key}: unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    problem = None
    if device.type == "cuda" and not torch.cuda.is_available():
        problem = "CUDA is not available here (a CPU-only torch build, or no GPU visible)"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        problem = f"only {torch.cuda.device_count()} GPU(s) are visible"
    elif device.type == "mps" and not _mps_available():
        problem = "MPS is not available here"
    if problem:
        raise InputError(
            f"{key} {name!r}: {problem}; available devices: {', '.join(available_devices())} "
            "(or auto, which picks the best of them)"
        )
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively, so bf16 autocast can pay: a CUDA GPU with bf16
    support, or a CPU with AVX512_BF16 dot products (AMX CPUs have them too). On AVX2 bf16 is
    converted in software and a step is slower than in fp32 (`benchmarks/precision.py`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # deferred: pipeline.kernels loads the compiled extension, needed only on this path
        from pipeline.kernels import cpu_capability

        return cpu_capability() in ("avx512_bf16", "amx_bf16")
    return False


CPU_BF16_MIN_WIDTH = 768
"""On a CPU with native bf16, the narrowest model (n_embd) that steps faster under bf16
autocast: `benchmarks/precision.py` on a 16-core Xeon with AVX512_BF16 and AMX measured
gpt2-124m (768 wide, 4 x 1,024 tokens) 1.75x faster in bf16, `tiny` (128 wide, 16 x 128) 1.29x
slower (its step is small matmuls, where the casts cost more than bf16 saves)."""


def resolve_precision(precision: str, device: torch.device, width: int | None = None) -> str:
    """`train.precision` as run on `device` for a model `width` (n_embd) wide: auto is bf16 where
    `native_bf16` (on a CPU only from `CPU_BF16_MIN_WIDTH` up; unknown width: fp32), else fp32."""
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "fp32"
    if device.type == "cpu" and (width is None or width < CPU_BF16_MIN_WIDTH):
        return "fp32"
    return "bf16"


def model_width(model: torch.nn.Module) -> int | None:
    """n_embd of the GPT inside `model` (a wrapper, classifier or DDP module), None if none."""
    for module in model.modules():
        width = getattr(getattr(module, "config", None), "n_embd", None)
        if isinstance(width, int):
            return width
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def known_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak for known GPUs in half precision, else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _KNOWN_CUDA_BF16_PEAKS:
        if key in name:
            return peak
    return None


def measure_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    seconds: float = 0.5,
    rounds: int = 5,
    busy: Callable[[], None] | None = None,
) -> float:
    """The FLOP/s a large dense matmul achieves here: the best of `rounds` timings of about
    `seconds / rounds` each, so a moment the machine was busy elsewhere does not lower it.
    `busy` (a test's stand-in for other work on the machine) runs inside each timed matmul."""
    n = 4096 if device.type in ("cuda", "mps") else 1024
    g = torch.Generator().manual_seed(0)  # leaves the global RNG (training determinism) alone
    a = torch.rand(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.rand(n, n, generator=g).to(device=device, dtype=dtype)
    torch.matmul(a, b)
    _synchronize(device)
    per_sync = 8 if device.type in ("cuda", "mps") else 1
    best = 0.0
    for _ in range(rounds):
        iters, elapsed, start = 0, 0.0, time.perf_counter()
        while elapsed < seconds / rounds:
            for _ in range(per_sync):
                torch.matmul(a, b)
                if busy is not None:
                    busy()
            iters += per_sync
            _synchronize(device)
            elapsed = time.perf_counter() - start
        best = max(best, 2.0 * n**3 * iters / elapsed)
    log.info("measured peak %.3g FLOP/s (%s, %s, %dx%d matmul, best of %d)", best, device,
             dtype, n, n, rounds)  # fmt: skip
    return best


def peak_cache_file() -> Path:
    """Where measured peaks are kept between runs: the user's cache directory."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt-pipeline" / "peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak holds for: the GPU, or the CPU model, its instruction set and the
    threads torch uses; the torch version and the dtype."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        capability = torch.backends.cpu.get_cpu_capability()
        hardware = f"{_cpu_model()}, {capability}, {torch.get_num_threads()} threads"
    return f"{device.type}: {hardware}; torch {torch.__version__}; {dtype}"


def _cached_peaks(path: Path) -> dict[str, float]:
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: a cache, so measured again
        return {}
    if not isinstance(peaks, dict):
        return {}
    return {k: float(v) for k, v in peaks.items() if isinstance(v, (int, float))}


def record_peak(key: str, flops: float) -> float:
    """The best FLOP/s known for `key` (`peak_key`): `flops` or the cached figure, whichever is
    higher; a higher `flops` replaces the cached one. A cache that cannot be written is skipped:
    it only saves a later run from a measurement taken while the machine was busy."""
    path = peak_cache_file()
    peaks = _cached_peaks(path)
    if peaks.get(key, 0.0) >= flops:
        return peaks[key]
    try:
        atomic_write_json(path, {**peaks, key: flops})
    except OSError as error:
        log.info("peak FLOP/s not cached: %s", error)
    return flops


@dataclass
class PeakFlops:
    """MFU's denominator and where it comes from (a datasheet, a setting, the best matmul
    measured here). Each is a lower bound of what the device can do, so a training step that
    achieves more proves it low: the peak is then raised to what was achieved (warned once), and
    a measured one so raised is cached for later runs. MFU is thus never above 100%."""

    flops: float
    source: str
    cache_key: str | None = None
    """`peak_key` of a measured peak."""
    raised: bool = False

    def utilization(self, achieved: float) -> float:
        """`achieved` FLOP/s (per device) as a fraction of the peak."""
        if achieved > self.flops:
            if not self.raised:
                log.warning(
                    "training ran at %.3g FLOP/s, above the peak of %.3g FLOP/s (%s): MFU is "
                    "measured against the higher figure from here on (a peak measured while the "
                    "machine was busy, or set too low)", achieved, self.flops, self.source,
                )  # fmt: skip
            self.flops, self.raised = achieved, True
            if self.cache_key is not None:
                record_peak(self.cache_key, achieved)
        return achieved / self.flops


def machine_peak(device: torch.device, dtype: torch.dtype) -> PeakFlops:
    """MFU's peak when none is configured: a known GPU's datasheet figure, else the best of a
    measurement now and the cached ones of this machine and precision (`peak_key`)."""
    known = known_peak_flops(device, dtype)
    if known is not None:
        return PeakFlops(known, f"the datasheet peak of {torch.cuda.get_device_name(device)}")
    key = peak_key(device, dtype)
    flops = record_peak(key, measure_peak_flops(device, dtype))
    log.info("MFU peak %.3g FLOP/s: the best measured for %s (%s)", flops, key, peak_cache_file())
    return PeakFlops(flops, "the best matmul measured here", key)
