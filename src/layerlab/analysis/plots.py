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


def perplexity_vs_removed(trace: list[dict], baseline: float, path: str | Path) -> Path:
    """Calibration perplexity after each greedy round: where quality starts to fall off a cliff."""
    removed = [0] + [t["round"] for t in trace]
    values = [baseline] + [t["perplexity"] for t in trace]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(removed, values, marker="o", color="#4477aa")
    for x, t in zip(removed[1:], trace, strict=True):
        ax.annotate(t["removed"], (x, t["perplexity"]), textcoords="offset points", xytext=(0, 6), fontsize=7,
                    ha="center")
    ax.set_xlabel("units removed (greedy order)")
    ax.set_ylabel("calibration perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def speed_vs_quality(points: list[dict], path: str | Path) -> Path:
    """Every candidate plan tried: parameter-byte speedup against calibration perplexity, by method."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for source in dict.fromkeys(p["source"] for p in points):
        mine = [p for p in points if p["source"] == source]
        ax.scatter([p["speedup"] for p in mine], [p["perplexity"] for p in mine], label=source, s=24)
    ax.set_xlabel("parameter bytes, full / plan (≈ decode speedup)")
    ax.set_ylabel("calibration perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
