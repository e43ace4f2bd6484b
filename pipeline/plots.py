"""Figures logged by the stages (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.io import atomic_open


def plot_training_curves(
    history: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
    ylabel: str = "cross-entropy loss",
) -> Path:
    """Training loss per logged step, and every evaluated `*_loss` (train/val) at its step;
    `ylabel` says which loss it is."""
    import matplotlib  # deferred: matplotlib takes ~0.3 s (pyplot ~1 s); only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib above

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
    ax.set_ylabel(ylabel)
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
    import matplotlib  # deferred: matplotlib takes ~0.3 s (pyplot ~1 s); only a plot needs it

    matplotlib.use("Agg")
    # deferred: pyplot as matplotlib above, and numpy (~0.1 s): only drawing needs them
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


def plot_reliability(curves: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Reliability diagrams side by side, one per `ReliabilityBins` in `curves` (e.g. before and
    after calibration): accuracy per confidence bin (bars) beside the bin's mean confidence (a
    red tick: the gap is the miscalibration), the diagonal of perfect calibration, the ECE."""
    import matplotlib  # deferred: matplotlib takes ~0.3 s (pyplot ~1 s); only a plot needs it

    matplotlib.use("Agg")
    # deferred: pyplot as matplotlib above, and numpy (~0.1 s): only drawing needs them
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4.2), dpi=120, squeeze=False)
    for ax, (name, bins) in zip(axes[0], curves.items(), strict=True):
        edges = np.linspace(0, 1, len(bins.counts) + 1)
        used = bins.counts > 0
        width = edges[1] - edges[0]
        ax.bar(edges[:-1][used], bins.accuracy[used], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy")  # fmt: skip
        ax.plot((edges[:-1] + width / 2)[used], bins.confidence[used], "_", color="tab:red",
                ms=14, mew=2, label="mean confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="0.5", label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               ylabel="accuracy", title=f"{name}: ECE {bins.ece:.4f}")  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return Path(path)
