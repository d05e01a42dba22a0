"""PNG charts of importance metrics (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..metrics.similarity import Similarity  # noqa: E402


def importance_bars(result: Similarity, path: str | Path) -> Path:
    """Block Influence, attention and MLP importance per step, one panel each."""
    labels = [str(layer) for layer in result.plan.layers]
    series = [("Block Influence (ShortGPT)", result.block_influence),
              ("attention 1 - cos (LLM-Drop)", result.attention_importance),
              ("MLP 1 - cos (LLM-Drop)", result.mlp_importance)]
    fig, axes = plt.subplots(len(series), 1, figsize=(max(6, len(labels) * 0.35), 7), sharex=True)
    for ax, (title, values) in zip(axes, series, strict=True):
        ax.bar(labels, [v if v is not None else 0 for v in values], color="#4477aa")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("layer (plan step order)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def angular_heatmap(result: Similarity, path: str | Path) -> Path:
    """Angular distance between the stream entering step l and the one n steps later (Gromov et al. fig. 1)."""
    steps = len(result.plan.steps)
    grid = [[v if v is not None else float("nan") for v in row] for row in result.angular]
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r",
                      extent=(0.5, steps + 0.5, -0.5, steps - 0.5))
    ax.set_xlabel("block size n (steps)")
    ax.set_ylabel("first step l")
    ax.set_title("angular distance d(x^l, x^(l+n))")
    fig.colorbar(image, ax=ax, label="arccos(cos) / pi")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
