import copy
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import ATTENTION_BACKENDS, GPT, GPTConfig, KVCache, build_attention
from pipeline.model.attention import (
    AttentionChoice,
    AttentionWorkload,
    attend_to_cache,
    choose_attention,
    measured_choice,
)

OTHERS = [name for name in ATTENTION_BACKENDS if name != "sdpa"]


def tiny(**overrides):
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def forward_backward(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def test_backend_names():
    assert set(ATTENTION_BACKENDS) == {"fused", "sdpa", "simple", "causal", "multihead"}
    with pytest.raises(ValueError, match="sdpa"):
        build_attention("flash", context_length=8)


@pytest.mark.parametrize("backend", OTHERS)
def test_backend_matches_sdpa_forward_and_backward(backend):
    torch.manual_seed(0)
    reference = GPT(tiny()).eval()
    model = copy.deepcopy(reference)
    model.set_attention(backend)
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    ref_logits, ref_grads = forward_backward(reference, idx, targets)
    logits, grads = forward_backward(model, idx, targets)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", OTHERS)
def test_backend_matches_sdpa_on_raw_qkv(backend):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    sdpa = build_attention("sdpa", context_length=16).eval()
    other = build_attention(backend, context_length=16).eval()
    torch.testing.assert_close(other(q, k, v), sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_fused_refuses_attention_dropout_in_training():
    model = GPT(tiny(attn_dropout=0.1), attention="fused").train()
    with pytest.raises(ValueError, match=r"model\.attn_dropout: 0.*sdpa"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_fused_allows_attention_dropout_config_in_eval():
    torch.manual_seed(0)
    model = GPT(tiny(attn_dropout=0.1), attention="fused").eval()
    idx = torch.randint(0, 97, (2, 16))
    fused = model(idx)
    model.set_attention("sdpa")
    torch.testing.assert_close(fused, model(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "simple", "causal", "multihead"])
def test_attention_dropout_is_active_only_in_training(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    module = build_attention(backend, context_length=16, attn_dropout=0.5)
    plain = build_attention("sdpa", context_length=16).eval()(q, k, v)
    module.train()
    a, b = module(q, k, v), module(q, k, v)
    assert not torch.equal(a, b)
    assert not torch.allclose(a, plain)
    module.eval()
    torch.testing.assert_close(module(q, k, v), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["simple", "causal", "multihead"])
def test_reference_dropout_zeroes_attention_weights(backend):
    """With every weight dropped the output is exactly zero: dropout acts on the weights."""
    module = build_attention(backend, context_length=16, attn_dropout=0.999999).train()
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    torch.manual_seed(0)
    assert torch.count_nonzero(module(q, k, v)) == 0


def test_attend_to_cache_aligns_causal_mask_bottom_right():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for new in (1, 3, 10):
        torch.testing.assert_close(attend_to_cache(q[:, :, -new:], k, v), full[:, :, -new:])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_kv_cache_logits_match_full_forward(backend):
    torch.manual_seed(0)
    model = GPT(tiny(), attention=backend).eval()
    idx = torch.randint(0, 97, (2, 16))
    full = model(idx)
    cache = KVCache(model.config.n_layer)
    pieces = [model(idx[:, :6], cache), model(idx[:, 6:7], cache), model(idx[:, 7:12], cache)]
    pieces += [model(idx[:, t : t + 1], cache) for t in range(12, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rebuild the cache"):
        model(idx[:, :1], cache)


def test_fused_takes_bfloat16_inputs_as_accurately_as_sdpa():
    """bf16 in, bf16 out, accumulated in float32. On AMX the probabilities are rounded to bf16
    for P V (as SDPA's bf16 path and FlashAttention do), so an output may be an ulp off the
    float32 result rounded; its error against float64 stays within SDPA-bf16's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.bfloat16) for _ in range(3))
    fused = build_attention("fused", context_length=16).eval()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    out = fused(q, k, v)
    assert out.dtype == torch.bfloat16
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rounded = exact.float().bfloat16()
    error = (out.double() - exact).abs().max()
    assert error <= max((sdpa.double() - exact).abs().max(), (rounded.double() - exact).abs().max())


def test_fused_matches_sdpa_under_bf16_autocast():
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (2, 16))
    logits = {}
    for backend in ("fused", "sdpa"):
        torch.manual_seed(1)
        model = GPT(tiny(), attention=backend).eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[backend] = model(idx)
    assert logits["fused"].dtype == logits["sdpa"].dtype
    torch.testing.assert_close(logits["fused"], logits["sdpa"], atol=5e-2, rtol=5e-2)


def test_auto_runs_the_fused_op_on_the_cpu_and_on_a_gpu_only_where_measured_faster():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert choose_attention("auto", cpu) == AttentionChoice(
        "fused", "the fused op's CPU kernels (faster than SDPA on CPUs)"
    )
    assert choose_attention("auto", cpu, attn_dropout=0.1).name == "sdpa"  # the op has no dropout
    assert choose_attention("multihead", cuda).name == "multihead"
    assert choose_attention("auto", mps).name == "sdpa"
    with pytest.raises(ValueError, match=r"'fused' has kernels for cpu, cuda only, not mps"):
        choose_attention("fused", mps)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        choose_attention("flash", cpu)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("pipeline::causal_attention_fwd", "CUDA"):
        # this torch is a CPU wheel: the extension has no CUDA kernels to run
        assert choose_attention("auto", cuda).reason == (
            "the fused op was built without its CUDA kernels (a CPU-only torch at build time)"
        )
        with pytest.raises(ValueError, match="'fused' was built without its CUDA kernels"):
            choose_attention("fused", cuda)


H200 = (9, 0)


def workload(seq_len: int, head_dim: int = 64, backward: bool = True) -> AttentionWorkload:
    return AttentionWorkload(torch.bfloat16, head_dim, seq_len, backward)


def test_on_a_gpu_auto_follows_the_shipped_measurements():
    """The H200 figures shipped in fused_cuda_speedups.json: slower than SDPA flash when
    training, 1.04x forward at T1024; nothing measured: sdpa."""
    trains = measured_choice(H200, workload(1024))
    assert trains == AttentionChoice(
        "sdpa",
        "0.89x SDPA flash measured on NVIDIA H200 (bfloat16, D64, T1024, forward+backward, "
        "commit d3ca21d) for sm_90 bfloat16 D64 T1024",
    )
    assert measured_choice(H200, workload(1024, backward=False)).name == "fused"
    assert measured_choice(H200, workload(1500)).reason.startswith("0.86x")  # nearest: T2048
    for capability, work in [((8, 0), workload(1024)), (H200, workload(1024, head_dim=128)),
                             (H200, workload(8192))]:  # fmt: skip
        choice = measured_choice(capability, work)
        assert choice.name == "sdpa" and choice.reason.startswith("no measurement"), choice
    assert measured_choice(H200, None).name == "sdpa"


def test_a_faster_measurement_makes_auto_pick_the_fused_op(tmp_path):
    rows = {
        "measurements": [
            {
                "gpu": "G",
                "capability": [9, 0],
                "commit": "abc",
                "dtype": "bfloat16",
                "head_dim": 64,
                "seq_len": 2048,
                "forward": 1.3,
                "forward_backward": 1.1,
            }
        ]
    }
    table = tmp_path / "speedups.json"
    table.write_text(json.dumps(rows))
    assert measured_choice(H200, workload(2048), table).name == "fused"
    assert measured_choice(H200, workload(1024), table).name == "fused"  # within 2x
