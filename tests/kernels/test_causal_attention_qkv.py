"""The packed-QKV entry point of the fused attention op: the model's (B, T, 3C) projection in,
(B, T, C) out, the projection's gradient back (pipeline/kernels, csrc/causal_attention.cpp).

It runs the same kernels as the (B, H, T, D) op, which test_causal_attention.py holds to
SDPA's accuracy, so the results must be the same bits as that op on the split heads."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode

kernels = pytest.importorskip(
    "pipeline.kernels", reason="pipeline.kernels._C is not built", exc_type=ImportError
)
qkv_fwd_op = torch.ops.pipeline.causal_attention_qkv_fwd.default
qkv_bwd_op = torch.ops.pipeline.causal_attention_qkv_bwd.default


def make_packed(
    batch: int, seq_len: int, n_head: int, head_dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, seq_len, 3 * n_head * head_dim, generator=gen).to(dtype)


def packed(qkv: torch.Tensor, n_head: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    qkv = qkv.detach().requires_grad_()  # keeps the strides of a view
    out = kernels.causal_attention_qkv(qkv, n_head)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), grad


def split(qkv: torch.Tensor, n_head: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The unpacked path: contiguous (B, H, T, D) copies in, merged and concatenated out."""
    batch, seq_len, width = qkv.shape
    c = width // 3
    heads = [
        z.reshape(batch, seq_len, n_head, c // n_head).transpose(1, 2).contiguous()
        for z in qkv.detach().split(c, dim=2)
    ]
    for z in heads:
        z.requires_grad_()
    out = kernels.causal_attention(*heads).transpose(1, 2).reshape(batch, seq_len, c)
    grads = torch.autograd.grad(out, heads, grad_out)
    merged = [g.transpose(1, 2).reshape(batch, seq_len, c) for g in grads]
    return out.detach(), torch.cat(merged, dim=2)


def assert_same_bits(qkv: torch.Tensor, n_head: int) -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    grad_out = torch.randn(shape, generator=gen).to(qkv.dtype)
    got, expected = packed(qkv, n_head, grad_out), split(qkv, n_head, grad_out)
    for name, a, b in zip(("out", "dqkv"), got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == qkv.dtype, name
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_as_the_split_heads(seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
    batch, n_head = (1, 2) if seq_len > 300 else (2, 3)
    assert_same_bits(make_packed(batch, seq_len, n_head, head_dim, dtype), n_head)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype: torch.dtype) -> None:
    assert_same_bits(make_packed(2, 70, 2, 16, dtype), 2)


def test_strided_projection_is_read_in_place() -> None:
    """A qkv whose rows are further apart than 3C, or whose batch is not the outer dimension,
    is read where it lies; only a non-contiguous last dimension is copied."""
    wide = make_packed(2, 67, 3, 16, torch.float32).repeat(1, 1, 2)  # rows 6C apart
    assert_same_bits(wide[:, :, : wide.shape[2] // 2], 3)
    time_major = make_packed(67, 2, 3, 16).transpose(0, 1)  # (B, T, 3C) view of (T, B, 3C)
    assert_same_bits(time_major, 3)
    every_other = make_packed(2, 67, 3, 32)[:, :, ::2]  # last dimension strided
    assert_same_bits(every_other, 3)


def test_empty_inputs() -> None:
    for batch, seq_len in [(0, 5), (2, 0)]:
        qkv = make_packed(batch, seq_len, 2, 8).requires_grad_()
        out = kernels.causal_attention_qkv(qkv, 2)
        assert out.shape == (batch, seq_len, 16)
        out.sum().backward()
        assert qkv.grad is not None and qkv.grad.shape == qkv.shape


def test_gradcheck_float64() -> None:
    qkv = make_packed(2, 9, 2, 4, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kernels.causal_attention_qkv(x, 2), (qkv,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype: torch.dtype) -> None:
    qkv = make_packed(2, 9, 2, 8, dtype).requires_grad_()
    torch.library.opcheck(qkv_fwd_op, (qkv, 2))
    out, lse = qkv_fwd_op(qkv.detach(), 2)
    torch.library.opcheck(qkv_bwd_op, (torch.randn_like(out), qkv.detach(), out, lse, 2))


@pytest.mark.parametrize(
    ("shape", "n_head", "match"),
    [
        ((2, 5), 1, r"qkv must be the \(B, T, 3C\) projection"),
        ((1, 5, 3, 8), 1, r"qkv must be the \(B, T, 3C\) projection"),
        ((1, 5, 20), 1, r"last dimension of qkv \(20\) must be 3 \* n_head \* head_dim"),
        ((1, 5, 24), 5, r"with n_head = 5"),
        ((1, 5, 24), 0, "n_head must be positive"),
        ((1, 5, 0), 1, r"last dimension of qkv \(0\)"),
    ],
)
def test_bad_inputs(shape: tuple[int, ...], n_head: int, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        kernels.causal_attention_qkv(torch.zeros(shape), n_head)


def test_bad_backward_args() -> None:
    qkv = make_packed(1, 5, 2, 8)
    out, lse = qkv_fwd_op(qkv, 2)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have shape \(B, T, C\)"):
        qkv_bwd_op(out[..., :8], qkv, out, lse, 2)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        qkv_bwd_op(out, qkv, out, lse[:, :1], 2)
    with pytest.raises(RuntimeError, match="grad_out and out must have the dtype of q"):
        qkv_bwd_op(out.double(), qkv, out, lse, 2)


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _in_op(event) -> bool:  # type: ignore[no-untyped-def]
    """Whether a profiler event ran inside one of this project's ops."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("pipeline::"):
            return True
        parent = parent.cpu_parent
    return False


@pytest.mark.parametrize("backend", ["fused", "sdpa"])
def test_model_layer_copies_nothing_with_fused(backend: str) -> None:
    """The model's attention layer hands the fused op its projection as is: forward and
    backward run no copy, clone or concatenation (the sdpa path needs them, which shows
    the log can see them)."""
    from pipeline.model import GPTConfig
    from pipeline.model.gpt import SelfAttention

    config = GPTConfig(vocab_size=97, context_length=16, n_layer=1, n_head=4, n_embd=32)
    layer = SelfAttention(config, layer_idx=0, attention=backend)
    x = torch.randn(2, 16, 32, requires_grad=True)
    with OpLog() as log, torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    copy_ops = {"clone", "copy_", "cat", "stack", "contiguous"}
    copies = [op for op in log.ops if op.removeprefix("aten.") in copy_ops]
    # The profiler also sees what the custom ops call inside their C++ kernels.
    copies += [
        e.name for e in prof.events() if e.name.removeprefix("aten::") in copy_ops and _in_op(e)
    ]
    if backend == "fused":
        assert "pipeline.causal_attention_qkv_fwd" in log.ops
        assert "pipeline.causal_attention_qkv_bwd" in log.ops
        assert copies == []
    else:
        assert copies != []


def test_compiled_model_fullgraph() -> None:
    """The whole GPT with the fused backend compiles into one graph, forward and backward,
    and gives the eager model's loss and gradients."""
    from pipeline.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(config, attention="fused")
    idx = torch.randint(0, 97, (2, 32))

    def loss_and_grads(forward):  # type: ignore[no-untyped-def]
        model.zero_grad(set_to_none=True)
        loss = forward(idx).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_loss, expected = loss_and_grads(model)
    got_loss, got = loss_and_grads(torch.compile(model, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(got_loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)
