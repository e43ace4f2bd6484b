"""A checkpoint loaded for answering: what `generate`, `chat` and `classify` and the served MLflow
models share, so the command line and a served model answer alike."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.data.instruct import format_prompt, get_template
from pipeline.errors import InputError
from pipeline.model import GPT, load_checkpoint
from pipeline.model.attention import choose_attention
from pipeline.model.checkpoint import (
    checkpoint_tokenizer,
    load_checkpoint_config,
    recorded_template,
)
from pipeline.model.classifier import GPTClassifier, encode_texts, predict_probabilities
from pipeline.model.generate import generate_tokens, stream_text, stream_until
from pipeline.train import pick_device

log = logging.getLogger("pipeline.serving")


def load_for_inference(checkpoint: Path, device: str = "auto", attention: str = "auto",
                       key: str = "--") -> tuple[Any, torch.device]:  # fmt: skip
    """A checkpoint's model in eval mode on `device`, running the `attention` backend; `key`
    prefixes the option names in errors (`--device`)."""
    dev = pick_device(device, key=f"{key}device")
    choose_attention(attention, dev, key=f"{key}attention")  # fails before the loading
    model = load_checkpoint(checkpoint, device=dev)
    choice = choose_attention(attention, dev, model.config.attn_dropout, f"{key}attention")
    model.set_attention(choice.name)
    return model.eval(), dev


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt (the `generate` / `chat` options, the served models' params)."""

    max_new_tokens: int = 100
    temperature: float = 0.0
    """0: greedy."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    use_cache: bool = True


class Generation:
    """A language-model checkpoint loaded for sampling, with its tokenizer and saved config."""

    def __init__(self, checkpoint: Path, device: str = "auto", attention: str = "auto",
                 key: str = "--") -> None:  # fmt: skip
        self.model, self.device = load_for_inference(checkpoint, device, attention, key)
        if type(self.model) is not GPT:
            raise InputError(f"{checkpoint} is not a language-model checkpoint")
        self.checkpoint = checkpoint
        self.config = load_checkpoint_config(checkpoint)
        self.tokenizer = checkpoint_tokenizer(checkpoint)

    def generator(self, sampling: Sampling) -> torch.Generator | None:
        """The random source `sampling.seed` asks for (None: torch's global one)."""
        if sampling.seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(sampling.seed)

    def stream(self, prompt: str, sampling: Sampling, generator: torch.Generator | None = None,
               stop_at_eot: bool = True) -> Iterator[str]:  # fmt: skip
        """The continuation of `prompt`, piece by piece."""
        ids = generate_tokens(
            self.model,
            self.tokenizer.encode_ordinary(prompt),
            sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_id=self.tokenizer.eot_token if stop_at_eot else None,
            use_cache=sampling.use_cache,
            generator=generator,
        )
        return stream_text(ids, self.tokenizer)

    def template(self, override: str | None = None) -> str:
        """The prompt template the checkpoint was tuned with (alpaca, with a warning, when its
        config records none); `override` wins."""
        template = override or recorded_template(self.config)
        if template is None:
            log.warning("%s records no prompt template; using alpaca", self.checkpoint)
            return "alpaca"
        return template

    def answer(self, template: str, instruction: str, input_text: str, sampling: Sampling,
               generator: torch.Generator | None = None) -> Iterator[str]:  # fmt: skip
        """The answer to one instruction wrapped in `template`, cut at the template's next turn,
        without the whitespace that opens it."""
        prompt = format_prompt({"instruction": instruction, "input": input_text}, template)
        stops = get_template(template).stops
        pieces = stream_until(self.stream(prompt, sampling, generator), stops)
        if first := next(pieces, "").lstrip():
            yield first
        yield from pieces


def check_texts(texts: Sequence[Any]) -> None:
    """Each text to classify is a string with something in it."""
    for i, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"text {i} is empty")


class Classification:
    """A classifier checkpoint loaded for labelling texts as its stage calibrated it."""

    def __init__(self, checkpoint: Path, device: str = "auto", attention: str = "auto",
                 key: str = "--") -> None:  # fmt: skip
        self.model, _ = load_for_inference(checkpoint, device, attention, key)
        if not isinstance(self.model, GPTClassifier):
            raise InputError(f"{checkpoint} is a language model, not a classifier checkpoint")
        self.tokenizer = checkpoint_tokenizer(checkpoint)
        self.head = load_checkpoint_config(checkpoint)["classifier"]

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, float]]:
        """(label, probability) per text: the most likely label, in input order."""
        check_texts(texts)
        max_length = self.head.get("max_length") or self.model.config.context_length
        ids, truncated = encode_texts(texts, self.tokenizer, max_length)
        if truncated:
            log.info("%d text(s) truncated to %d tokens, as in training", truncated, max_length)
        # calibrated as the stage fitted it; checkpoints older than calibration hold no temperature
        temperature = self.head.get("temperature", 1.0)
        probs = predict_probabilities(self.model, ids, batch_size, temperature)
        best = probs.argmax(dim=-1).tolist()
        return [(self.model.labels[b], float(p[b])) for b, p in zip(best, probs, strict=True)]
