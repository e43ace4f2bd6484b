"""A model's answers to instruction records, as the instruction and alignment stages score them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tiktoken
import torch

from pipeline.data.instruct import format_prompt
from pipeline.evaluate.text import extract_response
from pipeline.model.generate import generate_tokens
from pipeline.model.gpt import GPT
from pipeline.settings import Generation


def respond(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    record: Mapping[str, Any],
    template: str,
    generation: Generation,
    generator: torch.Generator | None = None,
) -> str:
    """The model's answer to one record: generated after the prompt (KV cache), cut at
    end-of-text or at the template's next-turn marker (temperature 0 is greedy)."""
    ids = generate_tokens(
        model,
        tokenizer.encode_ordinary(format_prompt(dict(record), template)),
        generation.max_new_tokens,
        temperature=generation.temperature,
        top_k=generation.top_k,
        top_p=generation.top_p,
        eos_id=tokenizer.eot_token,
        generator=generator,
    )
    return extract_response(tokenizer.decode(list(ids)), template)
