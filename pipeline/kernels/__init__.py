"""This project's compiled kernels: a fused causal attention op (csrc/causal_attention.cpp).

Importing this package loads `pipeline.kernels._C`, which registers the operators
`torch.ops.pipeline.causal_attention_fwd` / `causal_attention_bwd` (q, k, v of shape
(B, H, T, D)) and `causal_attention_qkv_fwd` / `causal_attention_qkv_bwd` (the model's packed
(B, T, 3C) projection), and adds what autograd and `torch.compile` need: fake (meta)
implementations and the backward formulas.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch
from torch import Tensor

try:
    importlib.import_module("pipeline.kernels._C")  # loading it registers the operators
except ImportError as exc:
    raise ImportError(
        "pipeline.kernels._C is not built: run `make setup` "
        "(or `python setup.py build_ext --inplace`)"
    ) from exc

__all__ = ["causal_attention", "causal_attention_qkv", "cpu_capability"]


class _Context(Protocol):
    """The part of autograd's ctx that `setup_context` and the backward use (torch types ctx
    Any; it is an instance of a generated `BackwardCFunction` subclass)."""

    saved_tensors: tuple[Tensor, ...]

    def mark_non_differentiable(self, *args: Tensor) -> None: ...

    def save_for_backward(self, *tensors: Tensor | None) -> None: ...


class _QKVContext(_Context, Protocol):
    n_head: int


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp: that of the kernels' scores (score_type in the C++ source).

    float64 for float32 and float64 inputs: float32 scores are summed in float64 and the
    backward recomputes every probability as exp(score - lse), so a float32 lse (off by up to
    ulp(|lse|) / 2, 1e-4 relative where |lse| ~ 2000) would cost accuracy at large scores.
    float32 for bfloat16 and float16, whose own rounding is far coarser.
    """
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _check_one_device_and_dtype(q: Tensor, *others: Tensor) -> None:
    """What the C++ checks beside the shapes, checked here too: the fake kernel runs where an
    input is on the meta device (a CPU q with a meta k would otherwise return an empty CPU
    tensor) and under torch.compile."""
    torch._check(
        all(t.device == q.device for t in others),
        lambda: (
            "causal_attention: q, k and v must be on the same device, got "
            + ", ".join(str(t.device) for t in (q, *others))
        ),
    )
    torch._check(
        all(t.dtype == q.dtype for t in others[:2]),
        lambda: (
            "causal_attention: q, k and v must have the same dtype, got "
            + ", ".join(str(t.dtype) for t in (q, *others[:2]))
        ),
    )


@torch.library.register_fake("pipeline::causal_attention_fwd")
def _causal_attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(
        q.dim() == 4,
        lambda: f"causal_attention: q must have shape (B, H, T, D), got {list(q.shape)}",
    )
    torch._check(
        k.shape == q.shape and v.shape == q.shape,
        lambda: "causal_attention: q, k and v must have the same shape",
    )
    _check_one_device_and_dtype(q, k, v)
    batch, heads, seq_len, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, seq_len), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("pipeline::causal_attention_bwd")
def _causal_attention_bwd_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    _check_one_device_and_dtype(q, k, v, grad_out, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: _Context, inputs: tuple, output: tuple) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(
    ctx: _Context, grad_out: Tensor, grad_lse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.pipeline.causal_attention_bwd(grad_out, q, k, v, out, lse)


torch.library.register_autograd(
    "pipeline::causal_attention_fwd", _backward, setup_context=_setup_context
)


def _check_packed_qkv(qkv: Tensor, n_head: int) -> None:
    torch._check(
        qkv.dim() == 3,
        lambda: f"causal_attention_qkv: qkv must be (B, T, 3C), got shape {list(qkv.shape)}",
    )
    torch._check(
        n_head > 0 and qkv.shape[2] > 0 and qkv.shape[2] % (3 * n_head) == 0,
        lambda: (
            f"causal_attention_qkv: the last dimension of qkv ({qkv.shape[2]}) must be "
            f"3 * n_head * head_dim with n_head = {n_head}"
        ),
    )


@torch.library.register_fake("pipeline::causal_attention_qkv_fwd")
def _causal_attention_qkv_fwd_fake(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor]:
    _check_packed_qkv(qkv, n_head)
    batch, seq_len, width = qkv.shape
    out = qkv.new_empty((batch, seq_len, width // 3))
    lse = qkv.new_empty((batch, n_head, seq_len), dtype=_lse_dtype(qkv.dtype))
    return out, lse


@torch.library.register_fake("pipeline::causal_attention_qkv_bwd")
def _causal_attention_qkv_bwd_fake(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_head: int
) -> Tensor:
    return qkv.new_empty(qkv.shape)


def _setup_qkv_context(ctx: _QKVContext, inputs: tuple, output: tuple) -> None:
    qkv, n_head = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.n_head = n_head


def _qkv_backward(
    ctx: _QKVContext, grad_out: Tensor, grad_lse: Tensor | None
) -> tuple[Tensor, None]:
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.pipeline.causal_attention_qkv_bwd(grad_out, qkv, out, lse, ctx.n_head), None


torch.library.register_autograd(
    "pipeline::causal_attention_qkv_fwd", _qkv_backward, setup_context=_setup_qkv_context
)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal self-attention, ``softmax(q kᵀ / sqrt(D) + causal mask) v``.

    Same result as ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``; q, k, v are
    (B, H, T, D) CPU tensors of one dtype: float32, float64, bfloat16 or float16. The 16-bit
    types are computed with float32 accumulation (float32 softmax statistics and
    log-sum-exp) and the output and gradients are rounded back to the input dtype.
    Differentiable, and traceable by ``torch.compile(fullgraph=True)``.
    """
    return torch.ops.pipeline.causal_attention_fwd(q, k, v)[0]


def causal_attention_qkv(qkv: Tensor, n_head: int) -> Tensor:
    """`causal_attention` on the packed (B, T, 3C) projection ``[q | k | v]`` of ``n_head`` heads.

    Returns the (B, T, C) output the output projection takes; the backward returns the
    projection's gradient. The kernels read q, k, v where they lie and write the output and
    the gradient in place, so the split, transpose and concatenation copies of the unpacked
    path are gone. Same results as ``causal_attention`` on the split heads.
    """
    return torch.ops.pipeline.causal_attention_qkv_fwd(qkv, n_head)[0]


def cpu_capability() -> str:
    """Instruction set the CPU kernels run with: ``"amx_bf16"``, ``"avx512_bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"default"``. ``avx512_bf16`` is AVX-512 plus bf16 dot
    products, which the forward uses for the scores ``q kᵀ`` of bfloat16 inputs; ``amx_bf16``
    runs both products of the bfloat16 forward on AMX tiles (where Linux grants them).

    Detected at run time; the environment variable ``PIPELINE_CPU_CAPABILITY`` caps it.
    """
    return torch.ops.pipeline.causal_attention_cpu_capability()
