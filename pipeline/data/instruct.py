"""Instruction data: load and validate records, split them, format prompts, tokenise and collate.

A record is ``{"instruction", "input", "output"}`` (the preference file adds ``chosen`` and
``rejected``; pass those as ``required`` / ``response_key`` to reuse this module for DPO).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from pipeline.errors import InputError

RecordT = TypeVar("RecordT")

MAX_LISTED_ERRORS = 20
"""Invalid records named in an error message before the rest are only counted."""

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "str",
    bool: "bool",
    int: "int",
    float: "float",
    type(None): "null",
}


@dataclass(frozen=True)
class PromptTemplate:
    """The text around a record's fields; ``format_prompt`` joins the parts in this order."""

    name: str
    preamble: str
    instruction: str
    input: str
    response: str
    stops: tuple[str, ...]
    """Markers that open a new turn; generated text is cut at the first of them."""


_TEMPLATES = {
    "alpaca": PromptTemplate(
        name="alpaca",
        preamble=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        ),
        instruction="\n\n### Instruction:\n{instruction}",
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n",
        stops=("\n\n### ", "### Instruction:", "### Input:", "### Response:"),
    ),
    "phi3": PromptTemplate(
        name="phi3",
        preamble="",
        instruction="<|user|>\n{instruction}",
        input="\n{input}",
        response="\n<|assistant|>\n",
        stops=("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    ),
}
TEMPLATES = tuple(_TEMPLATES)


def get_template(name: str) -> PromptTemplate:
    """The template called `name`; unknown names list the known ones."""
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise InputError(
            f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}"
        ) from None


def format_prompt(record: Mapping[str, Any], template: str) -> str:
    """Everything the model is given: instruction, the input if any, and the response header.

    An input that is empty or only whitespace gets no section at all.
    """
    t = get_template(template)
    text = t.preamble + t.instruction.format(instruction=record["instruction"])
    input_text = record.get("input", "")
    if input_text.strip():
        text += t.input.format(input=input_text)
    return text + t.response


def _record_problems(record: Any, required: Sequence[str]) -> list[str]:
    if not isinstance(record, dict):
        return [f"not an object (got {_JSON_TYPES.get(type(record), type(record).__name__)})"]
    problems = []
    for key in required:
        if key not in record:
            problems.append(f"missing key {key!r}")
        elif not isinstance(record[key], str):
            kind = _JSON_TYPES.get(type(record[key]), type(record[key]).__name__)
            problems.append(f"{key!r} is {kind}, expected str")
        elif key == "instruction" and not record[key].strip():
            problems.append("'instruction' is empty")
    return problems


def load_records(
    path: str | Path,
    required: Sequence[str] = ("instruction", "input", "output"),
    *,
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The records of a JSON list file, and the (index, reason) of each invalid one skipped.

    Valid: an object whose `required` keys are all strings, with a non-blank ``instruction``
    (other fields may be empty). Invalid records raise one ValueError listing every one of them
    (the first MAX_LISTED_ERRORS spelled out), unless `skip_invalid`, which drops them instead.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        kind = _JSON_TYPES.get(type(data), type(data).__name__)
        raise InputError(f"{path}: expected a JSON list of records, got {kind}")
    valid, invalid = [], []
    for i, record in enumerate(data):
        problems = _record_problems(record, required)
        if problems:
            invalid.append((i, "; ".join(problems)))
        else:
            valid.append(record)
    if invalid and not skip_invalid:
        listed = [f"record {i}: {reason}" for i, reason in invalid[:MAX_LISTED_ERRORS]]
        if len(invalid) > MAX_LISTED_ERRORS:
            listed.append(f"... and {len(invalid) - MAX_LISTED_ERRORS} more")
        raise InputError(
            f"{path}: {len(invalid)} of {len(data)} records invalid: " + "; ".join(listed)
        )
    return valid, invalid


def split_records(
    records: Sequence[RecordT], train: float = 0.85, val: float = 0.05, seed: int = 1234
) -> tuple[list[RecordT], list[RecordT], list[RecordT]]:
    """(train, val, test) after a seeded shuffle; test gets whatever train and val leave.

    Sizes are ``round(n * train)`` and ``round(n * val)`` (round half to even, val capped so the
    two fit in n): 935 / 55 / 110 for 1,100 records. `random.Random(seed)` makes the split the
    same on every run and Python version, whatever PYTHONHASHSEED is.
    """
    if not 0.0 < train <= 1.0 or not 0.0 <= val < 1.0 or train + val > 1.0:
        raise InputError(
            f"need 0 < train <= 1, 0 <= val < 1 and train + val <= 1; got train={train}, val={val}"
        )
    n = len(records)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = round(n * train)
    n_val = min(round(n * val), n - n_train)
    shuffled = [records[i] for i in order]
    return (
        shuffled[:n_train],
        shuffled[n_train : n_train + n_val],
        shuffled[n_train + n_val :],
    )


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class InstructionExample:
    """Token ids of one record's prompt and response, without the end-of-text token.

    The two parts are tokenised separately: the mask boundary is then exact, and the prompt's
    ids are the ones generation starts from. `collate` appends the end-of-text token.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InputError("an instruction example needs at least one prompt token")

    @property
    def num_tokens(self) -> int:
        """Length of the full training sequence: prompt + response + end-of-text."""
        return len(self.prompt_ids) + len(self.response_ids) + 1


def encode_example(
    record: Mapping[str, Any],
    template: str,
    tokenizer: _Encoder,
    *,
    response_key: str = "output",
) -> InstructionExample:
    """Tokenise a record; user text never becomes a special token (``encode_ordinary``)."""
    prompt = format_prompt(record, template)
    return InstructionExample(
        prompt_ids=tuple(tokenizer.encode_ordinary(prompt)),
        response_ids=tuple(tokenizer.encode_ordinary(record[response_key])),
    )


def count_truncated(examples: Sequence[InstructionExample], context_length: int) -> int:
    """How many examples `collate` cuts: those with more than context_length targets."""
    return sum(ex.num_tokens - 1 > context_length for ex in examples)


def collate(
    examples: Sequence[InstructionExample],
    *,
    context_length: int,
    eos_id: int,
    pad_id: int | None = None,
    ignore_index: int = -100,
    mask_prompt: bool = True,
) -> tuple[Tensor, Tensor]:
    """(inputs, targets), int64 tensors of shape (B, T), T = min(longest - 1, context_length).

    Each sequence is prompt + response + [eos_id] (the tokenizer's end-of-text); inputs are its
    tokens but the last, targets its tokens but the first. Inputs are padded with `pad_id`
    (default `eos_id`); targets past the sequence are
    `ignore_index`, so the one end-of-text target (stop here) is learned and padding is not.
    With `mask_prompt`, targets that are prompt tokens are `ignore_index` too.

    A sequence longer than context_length + 1 tokens is cut to a window of that many: its first
    tokens (the response's tail is lost), or, if the prompt alone fills them, the last prompt
    tokens and the first response token. So every row has at least one learned target and a
    mean cross-entropy never divides by zero (NaN). `count_truncated` counts the cut examples.
    """
    if not examples:
        raise InputError("collate needs at least one example")
    if context_length < 1:
        raise InputError(f"context_length must be >= 1, got {context_length}")
    t = min(max(ex.num_tokens for ex in examples) - 1, context_length)
    inputs = torch.full((len(examples), t), eos_id if pad_id is None else pad_id,
                        dtype=torch.int64)  # fmt: skip
    targets = torch.full((len(examples), t), ignore_index, dtype=torch.int64)
    for row, ex in enumerate(examples):
        seq = [*ex.prompt_ids, *ex.response_ids, eos_id]
        window = min(len(seq), context_length + 1)
        # slide right only if the prompt alone fills the window, to end at the first response
        # token: the last prompt tokens predict it, as generation sees an over-long prompt
        start = max(0, len(ex.prompt_ids) + 1 - window)
        ids = torch.tensor(seq[start : start + window], dtype=torch.int64)
        n = window - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        if mask_prompt:
            # target j is token start + j + 1: a prompt token while that index < len(prompt)
            targets[row, : max(0, len(ex.prompt_ids) - start - 1)] = ignore_index
    return inputs, targets


def bucketed_order(
    lengths: Sequence[int],
    batch_size: int,
    rng: random.Random | int,
    *,
    bucket_batches: int = 50,
) -> list[int]:
    """A permutation of range(len(lengths)) whose consecutive batches have similar lengths.

    Shuffle, sort each chunk of ``bucket_batches * batch_size`` by length, cut into batches and
    shuffle the batch order, so padding shrinks while batches stay random. The one short batch
    (if len % batch_size) stays last, so slicing every batch_size indices gives these batches.
    `rng` (or ``random.Random(rng)`` for an int) makes the order deterministic.
    """
    if batch_size < 1 or bucket_batches < 1:
        raise InputError(
            f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}"
        )
    if isinstance(rng, int):
        rng = random.Random(rng)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = bucket_batches * batch_size
    for lo in range(0, len(order), chunk):
        order[lo : lo + chunk] = sorted(order[lo : lo + chunk], key=lambda i: lengths[i])
    batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if tail is not None:
        batches.append(tail)
    return [i for batch in batches for i in batch]
