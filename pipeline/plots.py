"""Figures logged by the stages (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.io import atomic_open


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss per logged step, and every evaluated `*_loss` (train/val) at its step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [h["step"] for h in history if "loss" in h]
    if steps:
        ax.plot(
            steps,
            [h["loss"] for h in history if "loss" in h],
            color="0.7",
            lw=1,
            label="training batch",
        )
    eval_keys = sorted({k for h in history for k in h if k.endswith("_loss") and k != "loss"})
    for key in eval_keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return Path(path)


def plot_confusion_matrix(counts: Any, labels: Sequence[str], path: Path, title: str = "") -> Path:
    """counts[true, predicted] as an annotated heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 1.4 * len(labels) + 1.5), dpi=120)
    ax.imshow(counts, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for i in ticks:
        for j in ticks:
            color = "white" if counts[i, j] > threshold else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return Path(path)
