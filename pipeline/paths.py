"""Where everything lives, derived from the `paths` settings: one place for Snakefile and
stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    data: Path
    results: Path
    resume: Path
    weights: Path = Path("models")
    """Downloaded pretrained weights, one directory per model (`pretrain.init_from` names)."""

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def tokens(self) -> Path:
        return self.data / "tokens"

    @property
    def bpe(self) -> Path:
        return self.raw / "gpt2-bpe"

    @property
    def bpe_files(self) -> list[Path]:
        """The downloaded GPT-2 BPE files (the names of `pipeline.data.tokenizer.GPT2_BPE_FILES`,
        which imports tiktoken)."""
        return [self.bpe / "encoder.json", self.bpe / "vocab.bpe"]

    @property
    def tokenizer(self) -> Path:
        """The tokenizer stage's files (pipeline/data/tokenizer.py's format)."""
        return self.data / "tokenizer"

    @property
    def token_parts(self) -> Path:
        """Where `prepare --part` writes each group of files' tokens before they are gathered."""
        return self.data / "token-parts"

    def token_part(self, name: str) -> Path:
        return self.token_parts / name

    def source(self, name: str) -> Path:
        return self.raw / name

    def stage(self, name: str) -> Path:
        return self.results / name

    def stage_resume(self, name: str) -> Path:
        return self.resume / name
