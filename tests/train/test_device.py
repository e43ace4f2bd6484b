import json
import time

import pytest
import torch

from pipeline.errors import InputError
from pipeline.kernels import cpu_capability
from pipeline.train import measure_peak_flops, pick_device
from pipeline.train.device import (
    PeakFlops,
    machine_peak,
    native_bf16,
    peak_cache_file,
    peak_key,
    record_peak,
    resolve_precision,
)

CPU, FP32 = torch.device("cpu"), torch.float32


def test_pick_device_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device()
    assert auto.type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        assert auto.type != "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_clear_error_naming_the_available_devices():
    message = r"--device 'cuda': CUDA is not available here .*; available devices: cpu"
    with pytest.raises(InputError, match=message):
        pick_device("cuda", key="--device")
    with pytest.raises(InputError, match=r"^device 'cuda:1': CUDA is not available"):
        pick_device("cuda:1")


def test_unknown_device_name():
    with pytest.raises(ValueError, match="tpu"):
        pick_device("tpu")


def test_measure_peak_flops_cpu_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    flops = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert flops > 1e8
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The user's cache directory, in the test's own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "gpt-pipeline" / "peak_flops.json"


def test_the_cached_peak_is_the_best_measured_per_machine_and_precision(cache):
    assert peak_cache_file() == cache and not cache.exists()
    assert record_peak("cpu a", 2e9) == 2e9 and record_peak("cpu b", 1e9) == 1e9
    assert record_peak("cpu a", 1e9) == 2e9  # a lower measurement (a busy machine) is not kept
    assert json.loads(cache.read_text()) == {"cpu a": 2e9, "cpu b": 1e9}
    assert record_peak("cpu a", 3e9) == 3e9  # a higher one replaces it
    assert json.loads(cache.read_text()) == {"cpu a": 3e9, "cpu b": 1e9}
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary file left
    cache.write_text("{not json")  # a damaged cache is measured again, and rewritten
    assert record_peak("cpu a", 1e9) == 1e9 and json.loads(cache.read_text()) == {"cpu a": 1e9}

    key = peak_key(CPU, FP32)
    assert f"{torch.get_num_threads()} threads" in key and "float32" in key
    assert torch.__version__ in key and key != peak_key(CPU, torch.bfloat16)
    first = machine_peak(CPU, FP32)
    assert first.cache_key == key and json.loads(cache.read_text())[key] == first.flops
    record_peak(key, 1e15)  # measured once on an idle machine: a later run starts from it
    assert machine_peak(CPU, FP32).flops == 1e15


def busy_for(calls: int, seconds: float):
    """A stand-in for other work on the machine during the first `calls` matmuls timed."""
    left = [calls]

    def busy() -> None:
        if left[0] > 0:
            left[0] -= 1
            time.sleep(seconds)

    return busy


def test_the_measured_peak_is_the_best_of_several_timings():
    busy_throughout = measure_peak_flops(CPU, FP32, seconds=0.1, rounds=2, busy=busy_for(99, 0.3))
    busy_at_first = measure_peak_flops(CPU, FP32, seconds=0.25, rounds=5, busy=busy_for(1, 0.3))
    assert busy_at_first > 2 * busy_throughout  # the busy round is not the one kept


def test_mfu_cannot_exceed_100_percent_of_a_peak_measured_while_the_machine_was_busy(cache):
    """The issue's `mfu 177.9%`: the peak was measured while the machine was busy, then the
    training ran on an idle machine faster than that peak."""
    key = peak_key(CPU, FP32)
    busy = measure_peak_flops(CPU, FP32, seconds=0.1, rounds=2, busy=busy_for(99, 0.3))
    peak = PeakFlops(record_peak(key, busy), "the best matmul measured here", key)
    achieved = measure_peak_flops(CPU, FP32, seconds=0.1, rounds=2)  # real matmuls, idle
    assert achieved > busy  # an MFU of achieved / busy: above 100%
    assert peak.utilization(achieved) == 1.0 and peak.utilization(achieved / 2) == 0.5
    assert record_peak(key, 0.0) == achieved  # the next run starts from the higher figure


def test_auto_precision_is_bf16_only_where_bf16_is_native_and_measured_faster():
    cpu = torch.device("cpu")
    native = cpu_capability() in ("avx512_bf16", "amx_bf16")  # AVX2 (no bf16 dots): fp32
    assert native_bf16(cpu) == native
    # On a CPU, bf16 paid from gpt2-124m's width up and lost at tiny's (CPU_BF16_MIN_WIDTH).
    assert resolve_precision("auto", cpu, 768) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", cpu, 128) == "fp32"
    assert resolve_precision("auto", cpu) == "fp32"  # width unknown
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        assert resolve_precision("auto", torch.device("cuda")) == expected


def test_model_width_finds_the_gpt_inside_wrappers():
    from torch import nn

    from pipeline.model import GPT, GPTConfig
    from pipeline.train.device import model_width

    gpt = GPT(GPTConfig(vocab_size=64, context_length=8, n_layer=1, n_head=2, n_embd=16))
    assert model_width(gpt) == 16
    assert model_width(nn.Sequential(gpt)) == 16
    assert model_width(nn.Linear(2, 2)) is None
