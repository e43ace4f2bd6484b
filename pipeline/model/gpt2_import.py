"""GPT-2 weights in any layout: our checkpoint, Hugging Face's or OpenAI's TensorFlow checkpoint.

The one place that tells the layouts apart by their files and hands each to its format module
(`pipeline.model.hf`, `pipeline.model.tf_checkpoint`): what `pretrain.init_from` loads, hashes
and sizes up, and what `import-gpt2` converts into our checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.tokenizer import (
    END_OF_TEXT_ID,
    GPT2_BPE_FILES,
    HF_FILE,
    VOCAB_SIZE,
    import_hf_tokenizer,
)
from pipeline.errors import InputError
from pipeline.io import sha256_bytes
from pipeline.model.architecture import GPTConfig
from pipeline.model.checkpoint import FORMAT as CHECKPOINT_FORMAT
from pipeline.model.checkpoint import (
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
    tokenizer_extra_files,
)
from pipeline.model.gpt import GPT
from pipeline.model.gpt2_tensors import check_dir, read_json
from pipeline.model.hf import (
    HF_CONFIG,
    HF_TOKENIZER_NAMES,
    hf_dir_config,
    hf_weight_files,
    load_hf_gpt2,
)
from pipeline.model.tf_checkpoint import TF_HPARAMS, load_tf_gpt2, tf_dir_config, tf_weight_files

__all__ = ["gpt2_config", "gpt2_layout", "import_gpt2", "load_gpt2", "weight_files"]

log = logging.getLogger(__name__)

# What gpt2_layout calls the three kinds of weights directory.
LAYOUT_CHECKPOINT, LAYOUT_HF, LAYOUT_TF = "checkpoint", "huggingface", "tensorflow"


def gpt2_layout(src: Path) -> str:
    """`checkpoint` (ours), `huggingface` or `tensorflow` (OpenAI's), told apart by the files.

    Our checkpoints and Hugging Face's both have a config.json; ours says which format it is.
    """
    src = Path(src)
    check_dir(src)
    if (src / HF_CONFIG).is_file():
        is_ours = read_json(src / HF_CONFIG).get("format") == CHECKPOINT_FORMAT
        return LAYOUT_CHECKPOINT if is_ours else LAYOUT_HF
    if (src / TF_HPARAMS).is_file():
        return LAYOUT_TF
    raise FileNotFoundError(
        f"{src} holds no GPT-2 weights: it has neither {HF_CONFIG} (a {CHECKPOINT_FORMAT} or "
        f"Hugging Face directory) nor {TF_HPARAMS} (OpenAI's TensorFlow checkpoint)"
    )


def _checkpoint_config(src: Path) -> GPTConfig:
    meta = load_checkpoint_config(src)
    if "classifier" in meta:
        raise InputError(f"{src} is a classifier checkpoint, not a GPT-2 language model")
    try:
        return GPTConfig.from_dict(meta["model"])
    except ValueError as exc:
        raise InputError(f"{src / HF_CONFIG}: {exc}") from exc


def gpt2_config(src: Path) -> GPTConfig:
    """The architecture a weights directory of any layout holds, without reading its tensors,
    so a wrong size fails before gigabytes are loaded."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_CHECKPOINT:
        return _checkpoint_config(src)
    if layout == LAYOUT_HF:
        return hf_dir_config(src)[1]
    return tf_dir_config(src)


def load_gpt2(src: Path) -> GPT:
    """A GPT from our checkpoint, a Hugging Face GPT-2 or OpenAI's TensorFlow checkpoint."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_HF:
        return load_hf_gpt2(src)
    if layout == LAYOUT_TF:
        return load_tf_gpt2(src)
    _checkpoint_config(src)  # refuses a classifier before loading it
    return load_checkpoint(src)


def load_gpt2_as(src: Path, config: GPTConfig) -> GPT:
    """The weights in `src` (any layout `load_gpt2` reads) in a GPT built from `config`: the
    caller's dropouts, not those of the weights' own config (Hugging Face's 0.1, GPT-2's
    training value)."""
    gpt = GPT(config)
    gpt.load_state_dict(load_gpt2(src).state_dict())
    return gpt


def weight_files(src: Path) -> list[Path]:
    """The files `load_gpt2` reads tensors from, in a fixed order: what identifies the weights."""
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_TF:
        return tf_weight_files(src)
    if layout == LAYOUT_CHECKPOINT:
        if not (src / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"checkpoint weights {src / WEIGHTS_FILE} are missing")
        return [src / WEIGHTS_FILE]
    return hf_weight_files(src)


# --- tokenizer files --------------------------------------------------------------------------


def _canonical_bpe_file(name: str, data: bytes) -> bytes | None:
    """OpenAI's exact bytes for encoder.json / vocab.bpe given either OpenAI's or HF's file.

    HF's vocab.json is the same mapping, differently formatted, and its merges.txt may have
    another header line. Both are rewritten the way OpenAI wrote them and accepted only if the
    result has the known sha256, so the checkpoint never holds a file under a false name.
    """
    if sha256_bytes(data) == GPT2_BPE_FILES[name]:
        return data
    try:
        text = data.decode("utf-8")
        if name == "encoder.json":
            canonical = json.dumps(json.loads(text)).encode("utf-8")
        else:
            merges = [line for line in text.splitlines() if not line.startswith("#version")]
            canonical = ("#version: 0.2\n" + "".join(f"{m}\n" for m in merges)).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return canonical if sha256_bytes(canonical) == GPT2_BPE_FILES[name] else None


def _tokenizer_files(src: Path, names: Mapping[str, str], staging: Path) -> dict[str, Path]:
    """extra_files for save_checkpoint: both GPT-2 BPE files, or none if either is off."""
    paths = {ours: src / theirs for ours, theirs in names.items()}
    present = [p for p in paths.values() if p.is_file()]
    if len(present) < len(paths):
        if present:
            log.warning("%s has only %s; not copying the tokenizer", src, present[0].name)
        return {}
    files = {}
    for ours, path in paths.items():
        data = _canonical_bpe_file(ours, path.read_bytes())
        if data is None:
            log.warning(
                "%s is not GPT-2's %s (sha256 differs); not copying the tokenizer", path, ours
            )
            return {}
        (staging / ours).write_bytes(data)
        files[f"{TOKENIZER_DIR}/{ours}"] = staging / ours
    return files


def _own_tokenizer(src: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(metadata, extra_files) for the tokenizer.json export-hf wrote: the files and metadata
    of a checkpoint trained with that tokenizer, so a round trip keeps it."""
    info = import_hf_tokenizer(staging, src / HF_FILE)
    vocab_size = hf_dir_config(src)[1].vocab_size
    if info.n_vocab != vocab_size:
        raise InputError(
            f"{src / HF_FILE}: the tokenizer has {info.n_vocab} ids but the model "
            f"({src / HF_CONFIG}) has vocab_size {vocab_size}; they must be equal"
        )
    return info.as_dict(), tokenizer_extra_files(staging)


def import_gpt2(src: Path, out: Path) -> Path:
    """Convert a Hugging Face or OpenAI TF GPT-2 directory into our checkpoint at `out`.

    The layout is detected from the files (config.json: Hugging Face; hparams.json: OpenAI).
    GPT-2's tokenizer files are copied into `tokenizer/` when SRC has them; a Hugging Face
    directory with a tokenizer.json and neither of them (what export-hf writes for a checkpoint
    with its own tokenizer) keeps that tokenizer.
    """
    src = Path(src)
    layout = gpt2_layout(src)
    if layout == LAYOUT_CHECKPOINT:
        raise InputError(f"{src} is already a {CHECKPOINT_FORMAT} directory; nothing to import")
    names = HF_TOKENIZER_NAMES if layout == LAYOUT_HF else {name: name for name in GPT2_BPE_FILES}
    own = (src / HF_FILE).is_file() and not any((src / n).is_file() for n in names.values())
    with tempfile.TemporaryDirectory() as staging:
        if layout == LAYOUT_HF and own:
            tokenizer, extra_files = _own_tokenizer(src, Path(staging))
        else:
            tokenizer = {"kind": "gpt2", "n_vocab": VOCAB_SIZE, "eot_token": END_OF_TEXT_ID}
            extra_files = _tokenizer_files(src, names, Path(staging))
        model = load_hf_gpt2(src) if layout == LAYOUT_HF else load_tf_gpt2(src)
        metadata = {"stage": "import", "source": str(src), "tokenizer": tokenizer}
        return save_checkpoint(model, out, metadata=metadata, extra_files=extra_files)
