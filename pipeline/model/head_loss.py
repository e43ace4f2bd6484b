"""The LM head's matmul and its cross-entropy fused: chunks of tokens, never the full logits.

`F.cross_entropy(hidden @ W.T, targets)` materialises (tokens × vocab) logits, their
log-softmax and its gradient (412 MB each for 2,048 tokens × 50,257 in fp32). Here each chunk of
`CHUNK_TOKENS` tokens computes its logits, log-softmax and — for the mean loss, whose gradient is
known up to the scalar `grad_output` — its share of the hidden and weight gradients right away,
so no chunk outlives its iteration. Only learned targets (not `ignore_index`) reach the head.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Targets with this value (prompt tokens, padding) are not learned."""

CHUNK_TOKENS = 256
"""Tokens per chunk: 256 × 50,257 fp32 logits is 51 MB; smaller chunks re-read the weight
gradient (vocab × n_embd) more often, larger ones leave the last-level cache."""


def _compute_dtype(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, softmax dtype): autocast's dtype if it is on, as `nn.Linear` would run;
    the softmax and every accumulation stay at least fp32."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        return low, torch.float32
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype, torch.promote_types(dtype, torch.float32)


def _chunk_log_softmax(h: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """log_softmax(h @ w.T) over the vocabulary, written into `out` (one chunk's rows of a
    buffer reused across chunks: a fresh 51 MB tensor per chunk costs its page faults)."""
    if out.dtype == h.dtype:
        torch.mm(h, w.t(), out=out)
    else:
        out.copy_(torch.mm(h, w.t()))
    # torch's private op: the log_softmax that writes `out`; row by row, in place is exact
    return torch._log_softmax(out, 1, False, out=out)  # pyright: ignore[reportPrivateImportUsage]


def _buffer(n: int, chunk: int, w: Tensor, acc: torch.dtype) -> Tensor:
    return torch.empty((min(n, chunk), w.shape[0]), dtype=acc, device=w.device)


def _accumulate_grads(
    d: Tensor, h: Tensor, w: Tensor, grad_h: Tensor | None, grad_w: Tensor | None
) -> None:
    """grad_h = d @ w and grad_w += d.T @ h for one chunk's logit gradient `d`, in place
    (BLAS accumulates into grad_w: no vocab × n_embd temporary per chunk); None: not wanted
    (LoRA freezes the head's weight)."""
    if grad_h is not None:
        if grad_h.dtype == d.dtype:
            torch.mm(d, w, out=grad_h)
        else:  # low-precision matmul, fp32 result
            grad_h.copy_(torch.mm(d, w))
    if grad_w is not None:
        if grad_w.dtype == d.dtype:
            grad_w.addmm_(d.t(), h)
        else:
            grad_w.add_(torch.mm(d.t(), h))


class _MeanNLL(torch.autograd.Function):
    """Mean of −log p(target) over N rows; the gradients are computed in the forward pass."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, grad: bool
    ) -> Tensor:
        dtype, acc = _compute_dtype(hidden, weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        # needs_input_grad stays True under no_grad: `grad` is torch.is_grad_enabled() outside.
        need_h, need_w = (grad and need for need in ctx.needs_input_grad[:2])
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n = h.shape[0]
            total = torch.zeros((), dtype=acc, device=h.device)
            grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
            buf = _buffer(n, chunk, w, acc)
            for start in range(0, n, chunk):
                hc, tc = h[start : start + chunk], targets[start : start + chunk]
                logp = _chunk_log_softmax(hc, w, buf[: len(tc)])
                rows = torch.arange(len(tc), device=tc.device)
                total += logp[rows, tc].sum()
                if need_h or need_w:
                    p = logp.exp_()  # d(−log p_t)/d logits = softmax − onehot(t)
                    p[rows, tc] -= 1
                    gh = None if grad_h is None else grad_h[start : start + chunk]
                    _accumulate_grads(p.to(dtype), hc, w, gh, grad_w)
            ctx.n = n
            ctx.save_for_backward(grad_h, grad_w)
        return -total / n  # 0 rows: NaN, as F.cross_entropy with every target ignored

    # one output, so one gradient: torch declares the base as backward(ctx, *grad_outputs)
    @staticmethod
    def backward(ctx, grad_output: Tensor):  # pyright: ignore[reportIncompatibleMethodOverride]
        grad_h, grad_w = ctx.saved_tensors
        dh, dw = ctx.dtypes
        scale = grad_output / ctx.n if ctx.n else torch.zeros_like(grad_output)  # no target
        gh = None if grad_h is None else (grad_h * scale).to(dh)
        gw = None if grad_w is None else (grad_w * scale).to(dw)
        return gh, gw, None, None, None


class _TargetLogprobs(torch.autograd.Function):
    """log p(target) per row (N,); the backward pass recomputes each chunk's softmax, since
    the gradient of each row is scaled differently (DPO's summed response log-probabilities)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        dtype, acc = _compute_dtype(hidden, weight)
        ctx.meta = dtype, acc, chunk
        ctx.save_for_backward(hidden, weight, targets)
        out = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            buf = _buffer(h.shape[0], chunk, w, acc)
            for start in range(0, h.shape[0], chunk):
                tc = targets[start : start + chunk]
                logp = _chunk_log_softmax(h[start : start + chunk], w, buf[: len(tc)])
                out[start : start + chunk] = logp[torch.arange(len(tc), device=tc.device), tc]
        return out

    # one output, so one gradient: torch declares the base as backward(ctx, *grad_outputs)
    @staticmethod
    def backward(ctx, grad_output: Tensor):  # pyright: ignore[reportIncompatibleMethodOverride]
        hidden, weight, targets = ctx.saved_tensors
        dtype, acc, chunk = ctx.meta
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            need_h, need_w = ctx.needs_input_grad[:2]
            grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
            buf = _buffer(h.shape[0], chunk, w, acc)
            for start in range(0, h.shape[0], chunk):
                hc, tc = h[start : start + chunk], targets[start : start + chunk]
                g = grad_output[start : start + chunk].to(acc)
                rows = torch.arange(len(tc), device=tc.device)
                d = _chunk_log_softmax(hc, w, buf[: len(tc)]).exp_().mul_(-g.unsqueeze(1))
                d[rows, tc] += g  # d log p_t / d logits = onehot(t) − softmax
                gh = None if grad_h is None else grad_h[start : start + chunk]
                _accumulate_grads(d.to(dtype), hc, w, gh, grad_w)
        gh = None if grad_h is None else grad_h.to(hidden.dtype)
        return gh, None if grad_w is None else grad_w.to(weight.dtype), None, None


def _learned(hidden: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mask, hidden rows, targets) of the learned positions, flattened over leading dims."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    mask = targets != ignore_index
    if bool(mask.all()):
        return mask, hidden, targets
    return mask, hidden[mask], targets[mask]


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk: int = CHUNK_TOKENS,
) -> Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=...)` (the mean over learned
    targets; NaN if there are none) without the logits. `hidden` (..., C), `targets` (...)."""
    _, h, t = _learned(hidden, targets, ignore_index)
    return _MeanNLL.apply(h, weight, t, chunk, torch.is_grad_enabled())


def target_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk: int = CHUNK_TOKENS,
) -> Tensor:
    """log softmax(hidden @ weight.T)[target] at each position (shape of `targets`), 0 where
    the target is `ignore_index`; differentiable, without the logits."""
    mask, h, t = _learned(hidden, targets, ignore_index)
    picked = _TargetLogprobs.apply(h, weight, t, chunk)
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return out.masked_scatter(mask, picked).reshape(targets.shape)
