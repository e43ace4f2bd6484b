"""This project's compiled kernels: a fused causal attention op (csrc/causal_attention.cpp).

Importing this package loads `pipeline.kernels._C`, which registers the operators
`torch.ops.pipeline.causal_attention_fwd` / `causal_attention_bwd`, and adds what autograd
and `torch.compile` need: fake (meta) implementations and the backward formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from pipeline.kernels import _C  # noqa: F401  (loading it registers the operators)
except ImportError as exc:
    raise ImportError(
        "pipeline.kernels._C is not built: run `make setup` "
        "(or `python setup.py build_ext --inplace`)"
    ) from exc

__all__ = ["causal_attention", "cpu_capability"]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels, which is also the dtype of the log-sum-exp.

    float64 for float64 inputs, float32 for everything else: the kernels convert bfloat16 and
    float16 tiles to float32 as they load them.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    batch, heads, seq_len, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, seq_len), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("pipeline::causal_attention_bwd")
def _causal_attention_bwd_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor, grad_lse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return torch.ops.pipeline.causal_attention_bwd(grad_out, q, k, v, out, lse)


torch.library.register_autograd(
    "pipeline::causal_attention_fwd", _backward, setup_context=_setup_context
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


def cpu_capability() -> str:
    """Instruction set the CPU kernels run with: ``"avx512"``, ``"avx2"`` or ``"default"``.

    Detected at run time; the environment variable ``PIPELINE_CPU_CAPABILITY`` caps it.
    """
    return torch.ops.pipeline.causal_attention_cpu_capability()
