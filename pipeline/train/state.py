"""Resume checkpoints: everything needed to continue a run bit-for-bit after a kill.

A checkpoint is a directory ``resume_dir`` holding ``model.safetensors``, ``optimizer.pt``,
``rng.safetensors`` and ``state.json``. It is written into a sibling temp directory and swapped
in with renames, so a kill at any moment leaves either the old or the new checkpoint complete.
Only ``torch.load(weights_only=True)`` is used to read the optimizer state: nothing else is
unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from pipeline.io import atomic_directory, old_sibling
from pipeline.train.distributed import is_main_process

log = logging.getLogger("pipeline.train")

STATE_VERSION = 3
READABLE_VERSIONS = (2, 3)
"""Version 2 states lack `tracking_run`; they resume, and the run logs to a new MLflow run."""
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
_FILES = frozenset({MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE})
STAGE_FINGERPRINT = "fingerprint"
"""The key a resume fingerprint (`resume_fingerprint`) holds the stage's own fingerprint under,
beside `train`: a mismatch names the stage's settings without it (`section.epochs`, `train.lr`)."""
NAMED_DIFFERENCES = 4
"""How many changed settings a mismatch names before "and N more"."""


@dataclass
class FitState:
    """A run's counters: what `fit` keeps between steps and exactly what a checkpoint's
    `state.json` holds beside the tensors (model, optimizer, RNGs)."""

    step: int = 0
    train_time_s: float = 0.0
    tokens_seen: int = 0
    history: list[dict] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    data_state: dict = field(default_factory=dict)
    """The batch stream's state (`Batches.state_dict`) at `step`."""
    tracking_run: str = ""
    """The MLflow run this training logs to (empty: none), so a resumed job continues it."""


def canonical_json(obj: Any) -> Any:
    """JSON round-trip so fingerprints compare equal however they were built (tuples, key order)."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _is_ours(path: Path) -> bool:
    """True when ``path`` holds nothing but checkpoint files, so replacing/deleting it is safe."""
    return path.is_dir() and all(p.name in _FILES for p in path.iterdir())


def _locate(resume_dir: Path) -> Path | None:
    """The directory holding a complete checkpoint; the ``.old`` one if a swap was interrupted."""
    for candidate in (resume_dir, old_sibling(resume_dir)):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        tensors["mps"] = torch.mps.get_rng_state()
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has RNG states for %d GPUs, %d visible; CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
    mps = getattr(torch.backends, "mps", None)
    if "mps" in tensors and mps is not None and mps.is_available():
        torch.mps.set_rng_state(tensors["mps"])


def check_resume_dir(resume_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, if ``resume_dir`` is someone else's."""
    resume_dir = Path(resume_dir)
    if resume_dir.exists() and not _is_ours(resume_dir):
        raise FileExistsError(
            f"{resume_dir} exists and holds files other than a resume checkpoint; refusing to "
            "use it as resume_dir"
        )


def save_resume_state(
    resume_dir: Path,
    *,
    model: nn.Module,
    optimizer_state: dict,
    state: FitState,
    fingerprint: Any,
) -> None:
    """Atomically replace the checkpoint in ``resume_dir`` with the current training state.

    ``optimizer_state`` is ``Optimizer.state_dict()``'s format (full tensors, keyed by index).
    """
    resume_dir = Path(resume_dir)
    check_resume_dir(resume_dir)
    resume_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(resume_dir) as tmp:
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        rng = {k: v.contiguous() for k, v in _rng_tensors().items()}
        safetensors.torch.save_file(rng, str(tmp / RNG_FILE))
        meta = {
            "version": STATE_VERSION,
            "fingerprint": canonical_json(fingerprint),
            **dataclasses.asdict(state),
        }
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))


def read_resume_meta(resume_dir: Path) -> dict | None:
    """The ``state.json`` of the checkpoint in ``resume_dir``, or None when there is none."""
    found = _locate(Path(resume_dir))
    if found is None:
        return None
    return json.loads((found / STATE_FILE).read_text())


def _mismatch(meta: dict, fingerprint: Any) -> str | None:
    """Why a checkpoint's `state.json` cannot continue the run `fingerprint` names (None:
    it can)."""
    if meta.get("version") not in READABLE_VERSIONS:
        return f"format version {meta.get('version')}"
    expected = canonical_json(fingerprint)
    stored = meta.get("fingerprint")
    if stored == expected:
        return None
    stage = f"{STAGE_FINGERPRINT}."  # named as the stage's settings: section.epochs
    changed = sorted(p.removeprefix(stage) for p in _differing_leaves(stored, expected) if p)
    if not changed:  # not two dicts
        return "fingerprint differs"
    named = ", ".join(changed[:NAMED_DIFFERENCES])
    more = len(changed) - NAMED_DIFFERENCES
    return f"fingerprint differs in {named}" + (f" and {more} more" if more > 0 else "")


def _differing_leaves(stored: Any, expected: Any, path: str = "") -> Iterator[str]:
    """The dotted path of each leaf where two fingerprints differ: a value that is not a dict
    (a list is one value), or a key only one of them has."""
    if not (isinstance(stored, dict) and isinstance(expected, dict)):
        if stored != expected:
            yield path
        return
    missing = object()
    for key in stored.keys() | expected.keys():
        inner = f"{path}.{key}" if path else str(key)
        yield from _differing_leaves(stored.get(key, missing), expected.get(key, missing), inner)


def recorded_run(resume_dir: Path, fingerprint: Any) -> tuple[str, bool]:
    """(the MLflow run the checkpoint in ``resume_dir`` logged to, or "", and whether
    `load_resume_state` will resume it): a stage continues that run, or ends it."""
    meta = read_resume_meta(resume_dir)
    if meta is None:
        return "", False
    return meta.get("tracking_run", ""), _mismatch(meta, fingerprint) is None


def load_resume_state(
    resume_dir: Path,
    *,
    model: nn.Module,
    fingerprint: Any,
    device: torch.device,
) -> tuple[FitState, dict] | None:
    """Load a matching checkpoint into ``model`` and the RNGs and return its state and the
    optimizer state (for the optimizer built on whatever module trains ``model``).

    Returns None (training starts fresh) when there is no checkpoint or its fingerprint differs;
    the stale checkpoint is left in place until the new run writes its first one.
    """
    found = _locate(Path(resume_dir))
    if found is None:
        return None
    meta = json.loads((found / STATE_FILE).read_text())
    mismatch = _mismatch(meta, fingerprint)
    if mismatch is not None:
        if is_main_process():  # every rank discards it; one says so
            log.warning(
                "discarding resume state in %s (step %s): %s; starting fresh",
                found, meta.get("step"), mismatch,
            )  # fmt: skip
        return None
    safetensors.torch.load_model(model, str(found / MODEL_FILE), strict=True, device=str(device))
    optimizer_state = torch.load(found / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    _restore_rng(safetensors.torch.load_file(str(found / RNG_FILE)))
    fields = {f.name for f in dataclasses.fields(FitState)}
    return FitState(**{k: v for k, v in meta.items() if k in fields}), optimizer_state


def clear_resume_state(resume_dir: Path) -> None:
    """Delete a run's resume checkpoint once the stage's final outputs are safely written."""
    resume_dir = Path(resume_dir)
    for path in (resume_dir, old_sibling(resume_dir)):
        if path.exists():
            if not _is_ours(path):
                raise FileExistsError(
                    f"{path} holds files other than a resume checkpoint; not deleting it"
                )
            shutil.rmtree(path)
    if resume_dir.parent.is_dir():
        for stale in resume_dir.parent.glob(f".{resume_dir.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
