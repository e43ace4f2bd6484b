"""The fused CPU causal attention op (csrc/causal_attention.cpp, pipeline/kernels)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

kernels = pytest.importorskip(
    "pipeline.kernels", reason="pipeline.kernels._C is not built", exc_type=ImportError
)
causal_attention = kernels.causal_attention
fwd_op = torch.ops.pipeline.causal_attention_fwd.default
bwd_op = torch.ops.pipeline.causal_attention_bwd.default
# avx512_bf16: AVX-512, and bf16 dot products for the scores of bf16 inputs. amx_bf16: the
# bf16 forward's products on AMX tiles (the rest as avx512_bf16).
CAPABILITIES = ["default", "avx2", "avx512", "avx512_bf16", "amx_bf16"]


def make_qkv(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    return q * scale, k, v


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    backend: SDPBackend = SDPBackend.MATH,
) -> tuple[torch.Tensor, ...]:
    """SDPA output and input gradients, computed in the dtype of the inputs."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out.detach(), *grads)


def ours(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def assert_as_accurate_as_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_baseline: SDPBackend | None = None,
) -> None:
    """Output and gradients in the dtype of q: error vs a float64 reference computed from the
    same (rounded) inputs <= 2x the error of PyTorch's SDPA in that dtype, plus a tiny slack
    for cases where SDPA happens to be exact (flash-attn's rule).

    The output compares with SDPA's math backend; the gradients with `grad_baseline`: by
    default the math backend for float32 and float64 and SDPA's CPU flash kernel (what SDPA
    runs by default) for 16-bit dtypes. There the math backend computes in float32 and keeps
    O in float32 for its backward, while a flash-style backward (ours, flash-attn's, SDPA's
    flash kernel) takes delta = rowsum(dO * O) from the output rounded to 16 bits. That is
    all of our 16-bit gradients' extra error (test_16_bit_gradients_error_is_the_rounded_
    outputs); it grows where one key dominates a row (dS = P (dP - delta) cancels): peaked
    scores, small head dims. FLASH_ATTENTION for float32 is for such peaked scores.
    """
    dtype = q.dtype
    if grad_baseline is None:
        sixteen_bit = dtype in (torch.bfloat16, torch.float16)
        grad_baseline = SDPBackend.FLASH_ATTENTION if sixteen_bit else SDPBackend.MATH
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(dtype)
    exact = reference(q.double(), k.double(), v.double(), grad_out.double())
    base = reference(q, k, v, grad_out)
    if grad_baseline != SDPBackend.MATH:
        base = (base[0], *reference(q, k, v, grad_out, grad_baseline)[1:])
    got_all = ours(q, k, v, grad_out)
    slack = 1e-6 if dtype == torch.float32 else 1e-4
    for name, got, sdpa, ref in zip(("out", "dq", "dk", "dv"), got_all, base, exact, strict=True):
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.isfinite(got).all(), name
        err, sdpa_err = max_err(got, ref), max_err(sdpa, ref)
        assert err <= 2 * sdpa_err + slack, f"{name}: error {err:.3g} vs SDPA's {sdpa_err:.3g}"


def assert_split_backward_is_exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, threads: int = 2
) -> None:
    """Fewer (batch, head) pairs than `threads` (the backward splits each head by tiles) give
    the bits of 1 thread (one item per head)."""
    default_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        split = ours(q, k, v, grad_out)
        torch.set_num_threads(1)
        whole = ours(q, k, v, grad_out)
    finally:
        torch.set_num_threads(default_threads)
    assert all(torch.equal(a, b) for a, b in zip(split, whole, strict=True))


def qkv_shape(seq_len: int, head_dim: int) -> tuple[int, int, int, int]:
    # Fewer heads for the long sequences keeps the float64 references quick.
    return (1, 2, seq_len, head_dim) if seq_len > 300 else (2, 3, seq_len, head_dim)


@pytest.mark.parametrize("seq_len", [1, 7, 63, 64, 65, 300, 1000])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 128])
def test_matches_sdpa_float32(seq_len: int, head_dim: int) -> None:
    assert_as_accurate_as_sdpa(*make_qkv(qkv_shape(seq_len, head_dim)))


@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
def test_matches_sdpa_bfloat16(seq_len: int, head_dim: int) -> None:
    assert_as_accurate_as_sdpa(*make_qkv(qkv_shape(seq_len, head_dim), dtype=torch.bfloat16))


@pytest.mark.parametrize("seq_len", [1, 65, 300])
def test_matches_sdpa_float16(seq_len: int) -> None:
    assert_as_accurate_as_sdpa(*make_qkv(qkv_shape(seq_len, 64), dtype=torch.float16))


def flash_style_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, dk in float64 from the (rounded) inputs, exact but for delta = rowsum(dO * O), which
    takes O rounded to the inputs' dtype, as a flash-style backward does; rounded to it."""
    dtype = q.dtype
    q, k, v, grad_out = (t.double() for t in (q, k, v, grad_out))
    seq_len, scale = q.shape[-2], 1 / math.sqrt(q.shape[-1])
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    p = (q @ k.transpose(-1, -2) * scale).masked_fill(future, float("-inf")).softmax(-1)
    out = (p @ v).to(dtype).double()
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds = p * (grad_out @ v.transpose(-1, -2) - delta) * scale
    return (ds @ k).to(dtype), (ds.transpose(-1, -2) @ q).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("seq_len", "head_dim"), [(63, 32), (65, 64), (300, 64), (64, 128)])
def test_16_bit_gradients_error_is_the_rounded_outputs(
    dtype: torch.dtype, seq_len: int, head_dim: int
) -> None:
    """Our 16-bit dq and dk are as accurate as exact arithmetic with delta taken from the
    rounded output: that is all their error beyond the final rounding (the math backend, which
    keeps O in float32, is up to ~2.7x more accurate on some draws: torch 2.11's bf16 randn
    gave such draws to test_matches_sdpa_bfloat16 when it compared with it)."""
    for seed in range(3):
        q, k, v = make_qkv((1, 2, seq_len, head_dim), dtype, seed)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
        grad_out = grad_out.to(dtype)
        exact = reference(q.double(), k.double(), v.double(), grad_out.double())
        flash_style = flash_style_reference(q, k, v, grad_out)
        got = ours(q, k, v, grad_out)[1:3]
        for name, a, b, ref in zip(("dq", "dk"), got, flash_style, exact[1:3], strict=True):
            err, base_err = max_err(a, ref), max_err(b, ref)
            assert err <= 2 * base_err + 1e-4, f"seed {seed} {name}: {err:.3g} vs {base_err:.3g}"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_instruction_set(capability: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", capability)
    if kernels.cpu_capability() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    for seq_len, head_dim in [(5, 8), (65, 7), (130, 24), (300, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            assert_as_accurate_as_sdpa(*make_qkv((1, 2, seq_len, head_dim), dtype, seq_len))
    q, k, v = make_qkv((1, 2, 70, 16), dtype=torch.float64)
    grad_out = torch.randn_like(q)
    for got, ref in zip(ours(q, k, v, grad_out), reference(q, k, v, grad_out), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_bf16_dot_products_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under avx512_bf16 the bf16 forward takes its own path (its scores are summed in another
    order), not the avx512 one; both are held to SDPA's accuracy above."""
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", "avx512_bf16")
    if kernels.cpu_capability() != "avx512_bf16":
        pytest.skip("this CPU has no AVX512_BF16")
    q, k, v = make_qkv((1, 2, 300, 64), torch.bfloat16)
    dots = causal_attention(q, k, v)
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", "avx512")
    assert not torch.equal(dots, causal_attention(q, k, v))


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX's bf16 tiles (with AVX512_BF16, which amx_bf16 needs)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)


def test_amx_tiles_are_used_where_the_cpu_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AMX CPU runs the bf16 forward on AMX tiles (its own path: P rounded to bf16 for P V),
    and PIPELINE_CPU_CAPABILITY=avx512_bf16 takes it off them; other dtypes are unchanged."""
    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX bf16 tiles (/proc/cpuinfo: amx_tile, amx_bf16)")
    monkeypatch.delenv("PIPELINE_CPU_CAPABILITY", raising=False)
    assert kernels.cpu_capability() == "amx_bf16"
    q, k, v = make_qkv((1, 2, 300, 64), torch.bfloat16)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    tiles, tiles32 = causal_attention(q, k, v), causal_attention(q32, k32, v32)
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", "avx512_bf16")
    assert kernels.cpu_capability() == "avx512_bf16"
    assert not torch.equal(tiles, causal_attention(q, k, v))
    assert torch.equal(tiles32, causal_attention(q32, k32, v32))


def test_amx_backward_runs_on_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AMX CPU runs the bf16 backward on AMX tiles too (P and dS rounded to bf16 for their
    products): from the same out and lse its gradients are not avx512_bf16's, and both are as
    accurate as SDPA's (test_every_instruction_set, test_matches_sdpa_bfloat16)."""
    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX bf16 tiles (/proc/cpuinfo: amx_tile, amx_bf16)")
    monkeypatch.delenv("PIPELINE_CPU_CAPABILITY", raising=False)
    q, k, v = make_qkv((1, 2, 300, 64), torch.bfloat16)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    out, lse = fwd_op(q, k, v)
    tiles = bwd_op(grad_out, q, k, v, out, lse)
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", "avx512_bf16")
    vectors = bwd_op(grad_out, q, k, v, out, lse)
    for name, a, b in zip(("dq", "dk", "dv"), tiles, vectors, strict=True):
        assert not torch.equal(a, b), name
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_unknown_capability_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", "avx9000")
    with pytest.raises(RuntimeError, match="PIPELINE_CPU_CAPABILITY must be one of"):
        causal_attention(*make_qkv((1, 1, 4, 8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_lse_and_dtypes(dtype: torch.dtype) -> None:
    q, k, v = make_qkv((2, 2, 70, 16), dtype=dtype)
    out, lse = fwd_op(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    # 16-bit inputs keep a float32 log-sum-exp (as SDPA's flash kernels do); float32 inputs
    # a float64 one (their scores are summed in float64, see test_large_scores_accuracy).
    lse_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64
    assert lse.dtype == lse_dtype and lse.shape == (2, 2, 70)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(16)
    mask = torch.ones(70, 70, dtype=torch.bool).triu(1)
    expected = scores.masked_fill(mask, float("-inf")).logsumexp(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("seq_len", [1, 5, 70])
@pytest.mark.parametrize("head_dim", [8, 16])
def test_gradcheck_float64(seq_len: int, head_dim: int) -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv((1, 2, seq_len, head_dim), torch.float64))
    assert torch.autograd.gradcheck(causal_attention, (q, k, v), fast_mode=seq_len > 8)


def test_opcheck_forward() -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 2, 9, 8)))
    torch.library.opcheck(fwd_op, (q, k, v))
    torch.library.opcheck(fwd_op, make_qkv((1, 3, 70, 16), dtype=torch.float64))
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 2, 9, 8), dtype=torch.bfloat16))
    torch.library.opcheck(fwd_op, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_backward(dtype: torch.dtype) -> None:
    q, k, v = make_qkv((2, 2, 9, 8), dtype=dtype)
    out, lse = fwd_op(q, k, v)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), q, k, v, out, lse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(dtype: torch.dtype) -> None:
    batch, seq_len, heads, head_dim = 2, 67, 3, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
    assert not q.is_contiguous()
    grad_out = torch.randn(batch, seq_len, heads, head_dim, generator=gen).to(dtype)
    grad_out = grad_out.transpose(1, 2)
    got = ours(q, k, v, grad_out)
    expected = ours(q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous())
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert_as_accurate_as_sdpa(q, k, v)


def test_large_scores_stay_finite() -> None:
    q, k, v = make_qkv((1, 2, 130, 32), scale=100.0)
    assert_as_accurate_as_sdpa(q, k, v)
    q, k, v = make_qkv((1, 2, 130, 32), torch.bfloat16, scale=100.0)
    assert_as_accurate_as_sdpa(q, k, v)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    grad_out = torch.randn_like(q64)
    for got, ref in zip(
        ours(q64, k64, v64, grad_out), reference(q64, k64, v64, grad_out), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def best_and_capped_capabilities() -> list[str]:
    """The uncapped path a user gets ("best") and every capability cap."""
    return ["best", *CAPABILITIES]


def use_capability(capability: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run with `capability` ("best": uncapped); skip what this CPU lacks, and caps that are
    the best path itself (already run as "best")."""
    monkeypatch.delenv("PIPELINE_CPU_CAPABILITY", raising=False)
    best = kernels.cpu_capability()
    if capability == "best":
        return
    if CAPABILITIES.index(capability) >= CAPABILITIES.index(best):
        pytest.skip(f"{capability} is not narrower than this CPU's best path ({best})")
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", capability)
    assert kernels.cpu_capability() == capability


@pytest.mark.parametrize("scale", [30.0, 100.0])
@pytest.mark.parametrize("capability", best_and_capped_capabilities())
def test_large_scores_accuracy(
    capability: str, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q and k scaled (scores of hundreds to thousands, nearly one-hot softmax rows), float32:
    error vs a float64 reference within 2x of SDPA's own, for every head dim and tile edge.

    out and dV are held to SDPA's math backend. dQ and dK are held to SDPA's CPU flash
    kernel (what F.scaled_dot_product_attention runs by default for float32): where a row
    is one-hot to about float32 precision, the exact dS = P (dP - delta) is tiny and a
    flash-style backward, which takes delta = rowsum(dO * O) from the output rounded to
    float32, computes it with an error of a few ulp of dP, while the math backend forms
    delta from P itself and keeps it. Ours stays well inside the flash kernel's error there.
    """
    use_capability(capability, monkeypatch)
    for head_dim in (16, 32, 64, 80, 96, 128):
        # T1000 (16 tiles, online softmax over many key tiles) for a few head dims only: the
        # float64 references make it the slow case.
        for seq_len in (1, 63, 64, 65) + ((1000,) if head_dim in (16, 80, 128) else ()):
            shape = (1, 1 if seq_len > 300 else 2, seq_len, head_dim)
            gen = torch.Generator().manual_seed(head_dim * seq_len)
            q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
            q, k = q * scale, k * scale
            grad_out = torch.randn(shape, generator=gen)
            exact = reference(q.double(), k.double(), v.double(), grad_out.double())
            math_ = reference(q, k, v, grad_out)
            flash = reference(q, k, v, grad_out, SDPBackend.FLASH_ATTENTION)
            got_all = ours(q, k, v, grad_out)
            bases = (math_[0], flash[1], flash[2], math_[3])
            for name, got, sdpa, ref in zip(
                ("out", "dq", "dk", "dv"), got_all, bases, exact, strict=True
            ):
                assert torch.isfinite(got).all(), name
                err, sdpa_err = max_err(got, ref), max_err(sdpa, ref)
                assert err <= 2 * sdpa_err + 1e-6, (
                    f"D{head_dim} T{seq_len} x{scale:g} {name}: error {err:.3g} vs SDPA's "
                    f"{sdpa_err:.3g}"
                )


@pytest.mark.parametrize("capability", best_and_capped_capabilities())
def test_scores_either_side_of_the_float_bound(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 scores are summed in float where no |score| can pass 32 (by the largest query
    and key norms), else in double: per query tile in the forward, per head in the backward.
    Heads scaled to either side of the bound, and one where only the last query tiles see a
    key past it: as accurate as SDPA (dq, dk: its flash kernel, see test_large_scores_accuracy),
    and the split backward (fewer heads than threads, which decides from per-tile norms) gives
    the bits of the unsplit one."""
    use_capability(capability, monkeypatch)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=gen) for _ in range(3))
    # Largest row norms ~10, so the bound scale * max|q| * max|k| is ~12.5 c^2.
    for head, c in enumerate((1.0, 1.3, 2.0)):
        q[:, head] *= c
        k[:, head] *= c
    k[:, 3, 200] *= 4.0  # bound ~40 for the query tiles from 192 on, ~12.5 before

    def bound(head: int, end: int) -> float:
        norms = [t[0, head, :end].norm(dim=-1).max().item() for t in (q, k)]
        return norms[0] * norms[1] / math.sqrt(64)

    assert max(bound(0, 300), bound(1, 300), bound(3, 192)) < 28 < 36 < bound(2, 300)
    assert bound(3, 300) > 36
    assert_as_accurate_as_sdpa(q, k, v, grad_baseline=SDPBackend.FLASH_ATTENTION)
    grad_out = torch.randn(q.shape, generator=gen)
    for head in range(4):
        assert_split_backward_is_exact(*(t[:, head : head + 1] for t in (q, k, v, grad_out)))


@pytest.mark.parametrize("capability", best_and_capped_capabilities())
def test_one_key_gradients_are_exactly_zero(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one key the softmax is constant: dq and dk are exactly 0. dS = P (dP - delta)
    leaves the rounding difference of two sums of D products there (scaled by |k|, large at
    large scores) unless both sums run in the same order (they did on AVX2, not on AVX-512:
    2.2e-5 against SDPA's 8.1e-6 at D128 x30); the backward forms it as dO . (V - O) = 0."""
    use_capability(capability, monkeypatch)
    for head_dim in (16, 64, 80, 128):
        for scale in (1.0, 30.0, 100.0):
            for dtype in (torch.float32, torch.bfloat16):
                q, k, v = make_qkv((2, 3, 1, head_dim), dtype, seed=head_dim, scale=scale)
                grad_out = torch.randn(q.shape, dtype=dtype)
                _, dq, dk, dv = ours(q, k * scale, v, grad_out)
                assert torch.equal(dq, torch.zeros_like(dq)), (head_dim, scale, dtype)
                assert torch.equal(dk, torch.zeros_like(dk)), (head_dim, scale, dtype)
                assert torch.equal(dv, grad_out), (head_dim, scale, dtype)


@pytest.mark.parametrize("capability", best_and_capped_capabilities())
def test_a_non_finite_key_does_not_reach_earlier_queries(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward computes the diagonal tile's scores in whole vectors, past the causal
    boundary, and masks what lies beyond it: an infinite key (NaN and infinite scores) must
    leave the queries before it as they are without it."""
    use_capability(capability, monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make_qkv((1, 2, 150, 32), dtype)
        for key in (5, 20, 81, 140):  # in the first, second and last (partial) tile
            bad = k.clone()
            bad[:, :, key] = math.inf
            out = causal_attention(q, bad, v)
            assert out[:, :, key:].isnan().any()
            expected = causal_attention(q[:, :, :key], k[:, :, :key], v[:, :, :key])
            torch.testing.assert_close(out[:, :, :key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capability", best_and_capped_capabilities())
def test_an_infinite_value_does_not_reach_earlier_queries_gradients(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backward's diagonal-tile loops run past the causal boundary in whole vectors, where
    dP = dO V is not finite for an infinite value: the queries before it must get the dq they
    get without it. Key 88 is the 25th of its tile, the first of a row block of the products
    (6 or 8 rows: a product's row block reads the values of all its keys, so the outputs of
    earlier queries in the same block, 0 * inf, would be NaN in the forward already, as in
    SDPA's math backend)."""
    use_capability(capability, monkeypatch)
    key = 88
    q, k, v = make_qkv((1, 2, 150, 32))
    grad_out = torch.randn_like(q)
    bad = v.clone()
    bad[:, :, key] = math.inf
    dq = ours(q, k, bad, grad_out)[1]
    assert dq[:, :, key:].isnan().any()
    prefix = ours(q[:, :, :key], k[:, :, :key], v[:, :, :key], grad_out[:, :, :key])[1]
    torch.testing.assert_close(dq[:, :, :key], prefix, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype: torch.dtype) -> None:
    q, k, v = make_qkv((2, 3, 200, 32), dtype=dtype)
    grad_out = torch.randn_like(q)
    first = ours(q, k, v, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, ours(q, k, v, grad_out), strict=True))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ours(q, k, v, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, single, strict=True))


@pytest.mark.parametrize(
    "dtype, head_dim",
    [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 80), (torch.float16, 80)],
)
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_backward_split_inside_a_head(
    capability: str, dtype: torch.dtype, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fewer heads than threads the backward splits each head by tiles: same bits as
    one thread per head (which is what a single thread runs)."""
    monkeypatch.setenv("PIPELINE_CPU_CAPABILITY", capability)
    if kernels.cpu_capability() != capability:
        pytest.skip(f"this CPU does not support {capability}")
    q, k, v = make_qkv((1, 1, 300, head_dim), dtype=dtype)
    assert_split_backward_is_exact(q, k, v, torch.randn_like(q))
    assert_as_accurate_as_sdpa(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_split_of_several_heads(dtype: torch.dtype) -> None:
    """Three heads on four threads: each head's kept dQ products at its own offset."""
    q, k, v = make_qkv((1, 3, 300, 64), dtype, seed=3)
    assert_split_backward_is_exact(q, k, v, torch.randn_like(q), threads=4)


def test_backward_split_without_room_to_keep_dq_products() -> None:
    """A head too long to keep its dQ products (over kMaxDqPartials, 2^24 elements: 91 tiles
    at D64) splits the other way, computing P and dS again for dQ: the same bits too."""
    q, k, v = make_qkv((1, 1, 91 * 64, 64))
    assert_split_backward_is_exact(q, k, v, torch.randn_like(q))


def test_empty_inputs() -> None:
    for shape in [(0, 2, 5, 8), (1, 2, 0, 8)]:
        q, k, v = (t.requires_grad_() for t in make_qkv(shape))
        out = causal_attention(q, k, v)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad is not None and q.grad.shape == shape


def test_lse_gets_no_gradient() -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv((1, 1, 4, 8)))
    out, lse = fwd_op(q, k, v)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize(
    ("shapes", "dtype", "match"),
    [
        ([(2, 3)] * 3, torch.float32, r"q must have shape \(B, H, T, D\), got \[2, 3\]"),
        ([(1, 2, 3, 4, 5)] * 3, torch.float32, r"q must have shape \(B, H, T, D\)"),
        ([(1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 5, 8)], torch.float32, "k must have the shape of q"),
        ([(1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 4)], torch.float32, "v must have the shape of q"),
        ([(1, 2, 5, 0)] * 3, torch.float32, "head dimension D must be positive"),
        ([(1, 2, 5, 8)] * 3, torch.int32, "dtype must be float32, float64, bfloat16 or float16"),
    ],
)
def test_bad_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype, match: str) -> None:
    q, k, v = (torch.zeros(shape, dtype=dtype) for shape in shapes)
    with pytest.raises(RuntimeError, match=match):
        causal_attention(q, k, v)


def test_mixed_dtypes_and_bad_backward_args() -> None:
    q, k, v = make_qkv((1, 2, 5, 8))
    with pytest.raises(RuntimeError, match="q, k and v must have the same dtype"):
        causal_attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="q, k and v must have the same dtype"):
        causal_attention(q.bfloat16(), k.bfloat16(), v)
    out, lse = fwd_op(q, k, v)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        bwd_op(out, q, k, v, out, lse[:, :1])
    with pytest.raises(RuntimeError, match="lse must have dtype Double, got Float"):
        bwd_op(out, q, k, v, out, lse.float())
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        bwd_op(out[..., :4], q, k, v, out, lse)


def _loss(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (causal_attention(q * 2, k, v).sin() * v).sum()


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("aot_eager", torch.float32), ("inductor", torch.float32), ("inductor", torch.bfloat16)],
)
def test_torch_compile(backend: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in make_qkv((2, 2, 33, 16), dtype=dtype))
    expected = torch.autograd.grad(_loss(q, k, v), (q, k, v))
    compiled = torch.compile(_loss, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # inductor may fuse the bf16 roundings away
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
