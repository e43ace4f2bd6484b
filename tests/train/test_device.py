import pytest
import torch

from pipeline.errors import InputError
from pipeline.kernels import cpu_capability
from pipeline.train import measure_peak_flops, pick_device
from pipeline.train.device import native_bf16, resolve_precision


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


def test_auto_precision_is_bf16_only_where_bf16_is_native_and_measured_faster():
    cpu = torch.device("cpu")
    native = cpu_capability() == "avx512_bf16"  # AVX2 (no bf16 dot products): fp32
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
