"""PNG charts of importance metrics and of what happens inside a plan (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..metrics.similarity import Similarity  # noqa: E402
from .attention import AttentionMaps, fourier_spectrum  # noqa: E402

DPI = 80
MAX_TOKEN_LABELS = 16  # label the axes with tokens only when they stay readable


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
    return _save(fig, path, 110)


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
    return _save(fig, path, 110)


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
    return _save(fig, path, 110)


def _map_grid(result: AttentionMaps, images: list[torch.Tensor | None], title: str, path: str | Path,
              max_heads: int, cmap: str, token_axes: bool) -> Path:
    """One row per step that has attention, one column per head (the first `max_heads`)."""
    rows = [(name, image) for name, image in zip(result.names, images, strict=True) if image is not None]
    heads = min(max_heads, rows[0][1].shape[0])
    labels = token_axes and len(result.tokens) <= MAX_TOKEN_LABELS
    panel = 1.9 if labels else 1.3
    fig, axes = plt.subplots(len(rows), heads, figsize=(heads * panel + 1.2, len(rows) * panel + 0.6), squeeze=False)
    ticks = range(len(result.tokens))
    names = [repr(t)[1:-1] for t in result.tokens]  # newlines and tabs stay on one line
    for r, (name, image) in enumerate(rows):
        for h in range(heads):
            ax = axes[r][h]
            ax.imshow(image[h].numpy(), cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(name, fontsize=7)
            if labels and h == 0:
                ax.set_yticks(ticks, names, fontsize=5)
            if labels and r == len(rows) - 1:
                ax.set_xticks(ticks, names, fontsize=5, rotation=90)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, DPI)


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
    return _save(fig, path, 110)


def attention_grid(result: AttentionMaps, path: str | Path, max_heads: int = 8) -> Path:
    """Attention probabilities: rows = steps (query down, key across), columns = heads."""
    return _map_grid(result, result.maps, f"attention of {result.plan.to_text()} (rows: query, columns: key)",
                     path, max_heads, "viridis", token_axes=True)


def spectrum_grid(result: AttentionMaps, path: str | Path, max_heads: int = 8) -> Path:
    """log(1 + |F|) of each attention map's centred 2-D Fourier transform, in the same layout."""
    spectra = [None if m is None else fourier_spectrum(m).float() for m in result.maps]
    return _map_grid(result, spectra, f"attention spectra of {result.plan.to_text()} (zero frequency at the centre)",
                     path, max_heads, "magma", token_axes=False)


def spectrum_summary_chart(shares: dict[str, list[float | None]], path: str | Path) -> Path:
    """High-frequency share of the attention spectra per step, one line per plan."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in shares.items():
        ax.plot(range(len(values)), [float("nan") if v is None else v for v in values], marker="o", markersize=3,
                label=name)
    ax.set_xlabel("plan step")
    ax.set_ylabel("spectral energy outside the low-frequency disc")
    ax.set_title("high-frequency share of attention maps (mean over heads)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, DPI)


def cosine_heatmap(matrix: torch.Tensor, names: list[str], path: str | Path, title: str) -> Path:
    """Mean cosine between the residual streams x^i and x^j; `names` label the steps (x^i enters step i)."""
    labels = [f"in {n}" for n in names] + ["output"]
    size = min(16, 3 + 0.3 * len(labels))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=min(0.0, float(matrix.min())), vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean cos(x^i, x^j) over tokens")
    return _save(fig, path, DPI)


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write and close a figure (closing frees it: reports draw many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
