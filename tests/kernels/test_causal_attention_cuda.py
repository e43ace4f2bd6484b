"""The CUDA kernels of the fused causal attention op (csrc/causal_attention_cuda.cu).

Skipped without a GPU. Accuracy follows FlashAttention's rule: for float16/bfloat16 inputs,
the error of our output and gradients against a float32 reference (SDPA's math backend on
upcast inputs) must be at most twice the error of PyTorch's own same-dtype SDPA against that
reference, plus the rounding error of the reference values in the test dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

kernels = pytest.importorskip(
    "pipeline.kernels", reason="pipeline.kernels._C is not built", exc_type=ImportError
)
if not torch._C._dispatch_has_kernel_for_dispatch_key("pipeline::causal_attention_fwd", "CUDA"):
    pytest.skip(
        "pipeline.kernels._C was built without the CUDA kernels (CPU-only torch or "
        "PIPELINE_NO_CUDA=1)",
        allow_module_level=True,
    )
if torch.cuda.get_device_capability() < (8, 0):
    pytest.skip("the CUDA kernels need compute capability 8.0+", allow_module_level=True)

causal_attention = kernels.causal_attention
fwd_op = torch.ops.pipeline.causal_attention_fwd.default
bwd_op = torch.ops.pipeline.causal_attention_bwd.default

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 64, 80, 128]


def make_qkv(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) for _ in "qkv")
    return (q * scale).to(dtype), k.to(dtype), v.to(dtype)


def run(fn, q, k, v, grad_out) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    # detach() keeps strides and storage offset (clone() would densify strided views).
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def reference32(q, k, v, grad_out) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """float32 math-backend SDPA on upcast inputs (no TF32)."""
    with sdpa_kernel(SDPBackend.MATH):
        return run(sdpa, q.float(), k.float(), v.float(), grad_out.float())


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref).abs().max().item()


def assert_as_accurate_as_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    grad_out = torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype)
    exact = reference32(q, k, v, grad_out)
    base = run(sdpa, q, k, v, grad_out)
    got = run(causal_attention, q, k, v, grad_out)
    for name, g, b, ref in zip(("out", "dq", "dk", "dv"), got, base, exact, strict=True):
        assert g.dtype == q.dtype and g.shape == ref.shape, name
        assert torch.isfinite(g).all(), name
        atol = _rounding(ref, q.dtype)
        err, sdpa_err = max_err(g, ref), max_err(b, ref)
        assert err <= 2 * sdpa_err + atol, (
            f"{name}: error {err:.3g} vs SDPA's {sdpa_err:.3g} (atol {atol:.3g})"
        )


def _rounding(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Rounding error of the reference itself in the test dtype (slack for near-zero errors)."""
    return (ref.to(dtype).float() - ref).abs().max().item() + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 1000])
def test_matches_sdpa(seq_len: int, head_dim: int, dtype: torch.dtype) -> None:
    assert_as_accurate_as_sdpa(*make_qkv((2, 3, seq_len, head_dim), dtype, seed=seq_len))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_scores(head_dim: int, dtype: torch.dtype) -> None:
    # Nearly one-hot softmax rows: the online max and lse must not overflow or cancel.
    assert_as_accurate_as_sdpa(*make_qkv((1, 2, 300, head_dim), dtype, scale=100.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse(dtype: torch.dtype) -> None:
    q, k, v = make_qkv((2, 2, 130, 64), dtype)
    out, lse = fwd_op(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 2, 130)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(64)
    mask = torch.ones(130, 130, dtype=torch.bool, device="cuda").triu(1)
    expected = scores.masked_fill(mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-4, atol=1e-4)


def _strided_views(dtype: torch.dtype, head_dim: int) -> list[tuple[torch.Tensor, ...]]:
    batch, seq_len, heads = 2, 67, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    # Packed qkv as a projection produces it: (B, T, 3, H, D) -> (B, H, T, D) views that the
    # kernel reads in place through their strides.
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen, device="cuda").to(dtype)
    packed = tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    # Last dimension not contiguous, and a storage offset that breaks 16-byte alignment: both
    # must be copied by the wrapper.
    transposed = tuple(
        torch.randn(batch, heads, head_dim, seq_len, generator=gen, device="cuda")
        .to(dtype)
        .transpose(2, 3)
        for _ in range(3)
    )
    numel = math.prod(shape)
    misaligned = tuple(
        torch.randn(numel + 1, generator=gen, device="cuda").to(dtype)[1:].view(shape)
        for _ in range(3)
    )
    return [packed, transposed, misaligned]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_non_contiguous_inputs(head_dim: int, dtype: torch.dtype) -> None:
    for q, k, v in _strided_views(dtype, head_dim):
        assert not (q.is_contiguous() and q.data_ptr() % 16 == 0)
        gen = torch.Generator(device="cuda").manual_seed(3)
        grad_out = torch.randn(q.shape, generator=gen, device="cuda").to(dtype)
        got = run(causal_attention, q, k, v, grad_out.transpose(0, 1).contiguous().transpose(0, 1))
        expected = run(causal_attention, q.contiguous(), k.contiguous(), v.contiguous(), grad_out)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        assert_as_accurate_as_sdpa(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward(dtype: torch.dtype) -> None:
    q, k, v = make_qkv((2, 4, 777, 64), dtype)
    grad_out = torch.randn_like(q)
    first = run(causal_attention, q, k, v, grad_out)
    for _ in range(3):
        again = run(causal_attention, q, k, v, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_opcheck() -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 2, 70, 64), torch.bfloat16))
    torch.library.opcheck(fwd_op, (q, k, v))
    out, lse = fwd_op(q.detach(), k.detach(), v.detach())
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(bwd_op, (torch.randn_like(out), q, k, v, out, lse))
    torch.library.opcheck(fwd_op, make_qkv((1, 3, 9, 32), torch.float16))


def test_empty_inputs() -> None:
    for shape in [(0, 2, 5, 64), (1, 2, 0, 64)]:
        q, k, v = (t.requires_grad_() for t in make_qkv(shape, torch.bfloat16))
        out = causal_attention(q, k, v)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad is not None and q.grad.shape == shape


def test_unsupported_inputs() -> None:
    q, k, v = make_qkv((1, 2, 5, 64), torch.float32)
    with pytest.raises(RuntimeError, match="supports dtypes float16 and bfloat16, got Float"):
        causal_attention(q, k, v)
    q, k, v = make_qkv((1, 2, 5, 48), torch.bfloat16)
    with pytest.raises(RuntimeError, match="supports head dims 32, 64, 80 and 128, got 48"):
        causal_attention(q, k, v)
    q, k, v = make_qkv((1, 2, 5, 64), torch.bfloat16)
    with pytest.raises(RuntimeError, match="must be on the same device"):
        causal_attention(q, k.cpu(), v)
    with pytest.raises(RuntimeError, match="q, k and v must have the same dtype"):
        causal_attention(q, k.half(), v)
    out, lse = fwd_op(q, k, v)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        bwd_op(out, q, k, v, out, lse[:, :1])
    with pytest.raises(RuntimeError, match="lse must have dtype Float"):
        bwd_op(out, q, k, v, out, lse.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_packed_qkv_same_bits_as_the_split_heads(head_dim: int, dtype: torch.dtype) -> None:
    batch, seq_len, n_head = 2, 200, 3
    c = n_head * head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3 * c, generator=gen, device="cuda").to(dtype)
    grad_out = torch.randn(batch, seq_len, c, generator=gen, device="cuda").to(dtype)
    packed = qkv.detach().requires_grad_()
    out = kernels.causal_attention_qkv(packed, n_head)
    (dqkv,) = torch.autograd.grad(out, packed, grad_out)
    heads = [z.view(batch, seq_len, n_head, head_dim).transpose(1, 2) for z in qkv.split(c, 2)]
    split = run(
        causal_attention, *heads, grad_out.view(batch, seq_len, n_head, head_dim).transpose(1, 2)
    )
    merged = [t.transpose(1, 2).reshape(batch, seq_len, c) for t in split]
    assert torch.equal(out, merged[0])
    assert torch.equal(dqkv, torch.cat(merged[1:], dim=2))
    qkv_fwd_op = torch.ops.pipeline.causal_attention_qkv_fwd.default
    torch.library.opcheck(qkv_fwd_op, (qkv.detach().requires_grad_(), n_head))
