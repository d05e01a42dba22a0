"""Every look-inside analysis of several plans for one prompt, written to one folder.

Per plan i (in the order given): `attention_<i>.png` (attention maps), `spectrum_<i>.png` (their
Fourier spectra), `cosine_<i>.png` (hidden-state cosine heatmap); across plans `spectrum_summary.png`
(high-frequency share per step, one line per plan); and `analysis.json` with the numbers. This is
what `layerlab analyze` runs, and what a report can call.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..export.files import staged_folder
from ..metrics.similarity import hidden_cosine
from ..plan import Plan
from .attention import attention_maps, spectrum_summary
from .lens import logit_lens
from .plots import attention_grid, cosine_heatmap, spectrum_grid, spectrum_summary_chart


def analyze(model, tokenizer, plans: dict[str, Plan], prompt: str, out_folder: str | Path, max_heads: int = 8,
            top_k: int = 5, radius: float = 0.25, force: bool = False) -> dict:
    """Run every analysis for each named plan and write the folder atomically (refused if it is not empty,
    unless `force`). Returns what `analysis.json` holds; file names in it are relative to `out_folder`."""
    results: dict = {"prompt": prompt, "radius": radius, "plans": []}
    shares = {}
    with staged_folder(out_folder, force, kind="analysis") as staging:
        for i, (name, plan) in enumerate(plans.items()):
            maps = attention_maps(model, tokenizer, prompt, plan)
            cosine = hidden_cosine(model, tokenizer, prompt, plan)
            shares[name] = spectrum_summary(maps, radius)
            files = {"attention": f"attention_{i}.png", "spectrum": f"spectrum_{i}.png", "cosine": f"cosine_{i}.png"}
            attention_grid(maps, staging / files["attention"], max_heads)
            spectrum_grid(maps, staging / files["spectrum"], max_heads)
            cosine_heatmap(cosine, maps.names, staging / files["cosine"], f"hidden-state cosine of {name}")
            results["tokens"] = maps.tokens
            results["plans"].append({
                "name": name, "plan": plan.to_text(), "steps": maps.names, "high_frequency_share": shares[name],
                "logit_lens": [row.to_dict() for row in logit_lens(model, tokenizer, prompt, plan, top_k)],
                "cosine": cosine.tolist(), "files": files,
            })
        results["spectrum_summary"] = "spectrum_summary.png"
        spectrum_summary_chart(shares, staging / results["spectrum_summary"])
        (staging / "analysis.json").write_text(json.dumps(results, indent=2))
    return results
