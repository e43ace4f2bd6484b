"""Autoregressive text generation: greedy or sampled, streamed token by token, with a KV cache."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.errors import InputError
from pipeline.model.gpt import GPT, KVCache

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

__all__ = ["KVCache", "generate", "generate_tokens", "sample_next", "top_k_filter", "top_p_filter"]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits with everything below the k-th largest (per row) set to -inf; ties are kept."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from a (vocab_size,) row of logits: argmax at temperature 0, else sampled."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for one step, restoring each submodule's mode afterwards.

    Scoped to a single forward rather than the whole generator, so the caller's code between
    yielded tokens never runs with gradients silently disabled.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _validate(
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if len(prompt_ids) == 0:
        raise InputError("prompt_ids is empty; generation needs at least one token")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def _crop_to_context(prompt_ids: Sequence[int], context_length: int) -> list[int]:
    """The prompt's last context_length tokens (all the model can see), warning if it had more."""
    if len(prompt_ids) > context_length:
        log.warning(
            "the prompt has %d tokens, more than the model's context of %d: generating from its "
            "last %d tokens only (the first %d are dropped)",
            len(prompt_ids),
            context_length,
            context_length,
            len(prompt_ids) - context_length,
        )
    return [int(i) for i in prompt_ids[-context_length:]]


def generate_tokens(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Stream up to `max_new_tokens` token ids continuing `prompt_ids`.

    Stops early, without yielding it, when `eos_id` is produced. The model only ever sees the
    last context_length tokens: a longer prompt is cropped to them, with a warning; with the
    cache, it is rebuilt from that window once the sequence outgrows the context, so cached and
    uncached generation produce the same tokens. Arguments are checked here, before the first
    token is requested.
    """
    _validate(prompt_ids, max_new_tokens, temperature, top_k, top_p)
    return _stream(
        model,
        _crop_to_context(prompt_ids, model.config.context_length),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        use_cache=use_cache,
        generator=generator,
    )


def _stream(
    model: GPT,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> Iterator[int]:
    ctx = model.config.context_length
    device = model.tok_emb.weight.device
    cache: KVCache | None = None

    def run(tokens: list[int], kv_cache: KVCache | None) -> Tensor:
        idx = torch.tensor([tokens], dtype=torch.long, device=device)
        with _inference(model):
            return model(idx, kv_cache)[0, -1]

    for _ in range(max_new_tokens):
        if not use_cache:
            logits = run(ids[-ctx:], None)
        elif cache is None or cache.length >= ctx:
            cache = KVCache(model.config.n_layer)
            logits = run(ids[-ctx:], cache)
        else:
            logits = run(ids[-1:], cache)
        next_id = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        if next_id == eos_id:
            return
        ids.append(next_id)
        yield next_id


def generate(
    model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs: Any
) -> list[int]:
    """The new token ids of `generate_tokens` as a list (the prompt is not included)."""
    return list(generate_tokens(model, prompt_ids, max_new_tokens, **kwargs))


def stream_text(token_ids: Iterator[int], tokenizer: tiktoken.Encoding) -> Iterator[str]:
    """Decode token by token without splitting a UTF-8 character across tokens."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        if text := decoder.decode(tokenizer.decode_single_token_bytes(token)):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def stream_until(pieces: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Pass text through until the first stop string, holding back only what could begin one."""
    held = ""
    for piece in pieces:
        held += piece
        hits = [i for i in (held.find(stop) for stop in stops) if i >= 0]
        if hits:
            if head := held[: min(hits)]:
                yield head
            return
        keep = max(
            (n for stop in stops for n in range(1, len(stop)) if held.endswith(stop[:n])),
            default=0,
        )
        if len(held) > keep:
            yield held[: len(held) - keep]
            held = held[len(held) - keep :]
    if held:
        yield held
