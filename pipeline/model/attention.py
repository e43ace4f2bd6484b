"""Causal self-attention backends.

Every backend takes already projected queries, keys and values of shape (B, H, T, D) and returns
(B, H, T, D); `attend_packed` takes the model's packed (B, T, 3C) projection instead and returns
(B, T, C), which `fused` computes without splitting or merging heads. None holds weights, so a
model can switch backend without touching its state dict and every backend must give the same
outputs.

The three reference backends follow chapter 3 of *Build a Large Language Model (From Scratch)*:
`simple` masks after the softmax and renormalises, `causal` masks before the softmax one head at
a time, `multihead` does all heads in one batched matmul. `sdpa` is PyTorch's built-in kernel
and `fused` is this project's compiled op (pipeline/kernels).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import InputError

FUSED_KERNEL_DEVICES = ("cpu", "cuda")
"""Device types the fused op has kernels for (CUDA's where the extension was built with them)."""
FUSED_CUDA_SPEEDUPS = Path(__file__).with_name("fused_cuda_speedups.json")
"""The CUDA kernel's measured speed against SDPA flash per GPU and shape, shipped with the code:
what `auto` decides from on a GPU."""


@dataclass(frozen=True)
class AttentionWorkload:
    """What `auto` weighs on a GPU: the attention inputs' dtype, head width and length, and
    whether it trains (forward + backward) or only runs forward."""

    dtype: torch.dtype
    head_dim: int
    seq_len: int
    backward: bool = True


@dataclass(frozen=True)
class AttentionChoice:
    """The backend a run uses and why (logged, and recorded in MLflow)."""

    name: str
    reason: str


def split_heads(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of a packed (B, T, 3C) projection as (B, H, T, D) views."""
    b, t, width = qkv.shape
    c = width // 3
    q, k, v = qkv.split(c, dim=2)
    q, k, v = [z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v)]
    return q, k, v


def merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, D) heads back to the (B, T, C) layout of the output projection."""
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


class AttentionBackend(nn.Module):
    """A causal attention backend: ``forward(q, k, v)`` on (B, H, T, D) heads."""

    def attend_packed(self, qkv: Tensor, n_head: int) -> Tensor:
        """Attention of the packed (B, T, 3C) projection, as (B, T, C)."""
        return merge_heads(self(*split_heads(qkv, n_head)))


class SimpleSelfAttention(AttentionBackend):
    """Scaled dot-product attention made causal the book's first way.

    Softmax over all keys, then zero the weights of future tokens with a lower-triangular mask
    and renormalise each row to sum to 1. That equals a masked softmax, but the future still
    takes part in the softmax, which can underflow the past when future scores are large:
    the reason the book moves on to masking with -inf.
    """

    def __init__(self, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(attn_dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t, d = q.shape[-2], q.shape[-1]
        scores = q @ k.transpose(-2, -1)
        weights = torch.softmax(scores / math.sqrt(d), dim=-1)
        keep = torch.tril(torch.ones(t, t, device=q.device, dtype=weights.dtype))
        weights = weights * keep
        weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = self.dropout(weights)
        return weights @ v


class CausalSelfAttention(nn.Module):
    """One attention head: future scores set to -inf before the softmax, so they get weight 0.

    Takes (B, T, D) for a single head; `MultiHeadAttentionWrapper` runs it once per head.
    """

    def __init__(self, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(attn_dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t, d = q.shape[-2], q.shape[-1]
        scores = q @ k.transpose(-2, -1)
        future = torch.triu(torch.ones(t, t, device=q.device, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        weights = torch.softmax(scores / math.sqrt(d), dim=-1)
        weights = self.dropout(weights)
        return weights @ v


class MultiHeadAttentionWrapper(AttentionBackend):
    """Multi-head attention as independent heads: one `CausalSelfAttention` call per head.

    The results are stacked on the head axis, which is the book's concatenation along the
    feature axis once the model merges heads back to (B, T, C). Clear, but H small matmuls.
    """

    def __init__(self, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.head = CausalSelfAttention(attn_dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        heads = [self.head(q[:, h], k[:, h], v[:, h]) for h in range(q.shape[1])]
        return torch.stack(heads, dim=1)


class MultiHeadAttention(AttentionBackend):
    """All heads in one batched matmul, with the causal mask built once as a buffer.

    The buffer is non-persistent: it is derived from context_length, so it stays out of the
    state dict and checkpoints are the same whichever backend wrote them.
    """

    mask: Tensor

    def __init__(self, context_length: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(attn_dropout)
        future = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        self.register_buffer("mask", future, persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t, d = q.shape[-2], q.shape[-1]
        scores = q @ k.transpose(-2, -1)
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        weights = torch.softmax(scores / math.sqrt(d), dim=-1)
        weights = self.dropout(weights)
        return weights @ v


class SDPAttention(AttentionBackend):
    """PyTorch's `scaled_dot_product_attention`: flash or memory-efficient kernels if available."""

    def __init__(self, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_dropout = attn_dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        dropout_p = self.attn_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class FusedAttention(AttentionBackend):
    """This project's compiled causal-attention op (pipeline/kernels); no attention dropout.

    The kernel takes float32, float64, bfloat16 and float16 directly; 16-bit inputs (bf16
    autocast) are accumulated in float32 inside the kernel and the output keeps the input dtype.
    The model calls `attend_packed`: the kernels read q, k, v in place from the (B, T, 3C)
    projection and write (B, T, C), so no head is split, transposed or merged by copying.
    """

    def __init__(self, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_dropout = attn_dropout

    def _kernels(self, device: torch.device) -> ModuleType:
        """`pipeline.kernels`, once the call is known to be one its CPU kernels can run."""
        if self.training and self.attn_dropout > 0:
            raise InputError(
                f"the 'fused' attention backend does not implement attention dropout "
                f"(attn_dropout={self.attn_dropout}); set `model.attn_dropout: 0` "
                f"or choose `model.attention: sdpa`"
            )
        try:
            # deferred: the compiled extension is optional; only this backend loads it
            import pipeline.kernels
        except ImportError as exc:
            raise ImportError(
                f"the 'fused' attention backend needs the compiled extension "
                f"pipeline/kernels/_C, which could not be imported ({exc}); build it with "
                f"`make setup` or choose another backend, e.g. `model.attention: sdpa`"
            ) from exc
        return pipeline.kernels

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._kernels(q.device).causal_attention(q, k, v)

    def attend_packed(self, qkv: Tensor, n_head: int) -> Tensor:
        return self._kernels(qkv.device).causal_attention_qkv(qkv, n_head)


_BUILDERS = {
    "fused": lambda context_length, attn_dropout: FusedAttention(attn_dropout),
    "sdpa": lambda context_length, attn_dropout: SDPAttention(attn_dropout),
    "simple": lambda context_length, attn_dropout: SimpleSelfAttention(attn_dropout),
    "causal": lambda context_length, attn_dropout: MultiHeadAttentionWrapper(attn_dropout),
    "multihead": MultiHeadAttention,
}
ATTENTION_BACKENDS: tuple[str, ...] = tuple(_BUILDERS)


def build_attention(
    name: str, *, context_length: int, attn_dropout: float = 0.0
) -> AttentionBackend:
    """The backend module called `name`; the single place that maps names to classes."""
    if name not in _BUILDERS:
        raise InputError(
            f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    return _BUILDERS[name](context_length, attn_dropout)


def choose_attention(
    requested: str,
    device: torch.device,
    attn_dropout: float = 0.0,
    key: str = "model.attention",
    workload: AttentionWorkload | None = None,
) -> AttentionChoice:
    """The backend a run uses on `device`, and why: the one place that decides what runs where.

    `auto` is sdpa with attention dropout (the op has none); else the fused op on the CPU, and
    on a GPU only where FUSED_CUDA_SPEEDUPS measured it faster for that GPU generation and
    `workload`; sdpa everywhere else. A backend named explicitly is used as it is, except
    `fused` where the op has no kernel for the device. Errors name `key`: the setting, or the
    command-line option, that asked.
    """
    device = torch.device(device)
    if requested not in ("auto", *_BUILDERS):
        raise InputError(
            f"{key}: unknown backend {requested!r}; expected auto or one of "
            f"{', '.join(ATTENTION_BACKENDS)}"
        )
    fused_here, why_not = _fused_kernel(device)
    if requested == "fused" and not fused_here:
        raise InputError(f"{key}: 'fused' {why_not}; use auto (sdpa on this device) or sdpa")
    if requested != "auto":
        return AttentionChoice(requested, f"{key} asks for {requested}")
    if attn_dropout:
        return AttentionChoice("sdpa", f"attention dropout {attn_dropout} (the fused op has none)")
    if not fused_here:
        return AttentionChoice("sdpa", f"the fused op {why_not}")
    if device.type == "cpu":
        return AttentionChoice("fused", "the fused op's CPU kernels (faster than SDPA on CPUs)")
    return measured_choice(torch.cuda.get_device_capability(device), workload)


def _fused_kernel(device: torch.device) -> tuple[bool, str]:
    """Whether the fused op has a kernel for `device`, and if not, why not (in words)."""
    if device.type not in FUSED_KERNEL_DEVICES:
        return False, f"has kernels for {', '.join(FUSED_KERNEL_DEVICES)} only, not {device.type}"
    if device.type == "cpu":
        return True, ""
    try:
        # deferred: the compiled extension is optional; importing it registers the op
        import pipeline.kernels  # noqa: F401
    except ImportError:
        return False, "needs the compiled extension pipeline/kernels/_C, which is not built"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("pipeline::causal_attention_fwd", "CUDA"):
        return False, "was built without its CUDA kernels (a CPU-only torch at build time)"
    return True, ""


def measured_choice(
    capability: tuple[int, int],
    workload: AttentionWorkload | None,
    measurements: Path = FUSED_CUDA_SPEEDUPS,
) -> AttentionChoice:
    """fused on a GPU of compute `capability` if `measurements` found it faster than SDPA flash
    for that generation, the workload's dtype, head width and a length within 2x, else sdpa."""
    if workload is None:
        return AttentionChoice("sdpa", "no workload given to weigh the measurements against")
    dtype = str(workload.dtype).removeprefix("torch.")
    shape = f"sm_{capability[0]}{capability[1]} {dtype} D{workload.head_dim} T{workload.seq_len}"
    rows = [
        row for row in json.loads(measurements.read_text())["measurements"]
        if tuple(row["capability"]) == tuple(capability) and row["dtype"] == dtype
        and row["head_dim"] == workload.head_dim
        and abs(math.log2(row["seq_len"] / workload.seq_len)) <= 1
    ]  # fmt: skip
    if not rows:
        return AttentionChoice("sdpa", f"no measurement of the fused op for {shape}")
    row = min(rows, key=lambda r: abs(math.log2(r["seq_len"] / workload.seq_len)))
    passes = "forward_backward" if workload.backward else "forward"
    speed = row[passes]
    said = (
        f"{speed:.2f}x SDPA flash measured on {row['gpu']} ({dtype}, D{row['head_dim']}, "
        f"T{row['seq_len']}, {passes.replace('_', '+')}, commit {row['commit']}) for {shape}"
    )
    return AttentionChoice("fused" if speed > 1 else "sdpa", said)


def attend_to_cache(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Attention of Tq new query rows over Tk >= Tq keys, the last Tq of which are theirs.

    Used when decoding with a KV cache. The causal mask is aligned bottom-right: query row i
    sits at absolute position Tk - Tq + i. (`is_causal=True` would align it top-left.)
    """
    tq, tk = q.shape[-2], k.shape[-2]
    mask = None
    if tq > 1:
        mask = torch.ones(tq, tk, device=q.device, dtype=torch.bool).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
