"""The main job's report: one self-contained HTML file (images embedded) and the same numbers as JSON.

Sections: the chosen plan; the evaluation table (baseline, chosen plan, best one-shot plan, healed
model if asked); sample generations; the plots (importance bars, angular-distance heatmap, perplexity
versus layers removed, speed versus quality of every candidate tried, attention spectra); the greedy
search trace and the one-shot candidates.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path

from ..evaluate.speed import peak_text
from ..evaluate.table import NOTE, summary_table, task_table
from ..io import TEXT_MARKER, update_file
from ..metrics.similarity import Similarity
from ..plan import Plan
from . import plots
from .attention import attention_maps, spectrum_summary

SPECTRUM_PROMPT = ("The old lighthouse keeper climbed the stairs every evening, lit the lamp, and watched the ships "
                   "pass safely through the narrow channel below.")

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f3f7}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4;padding:1px 4px}
figure{display:inline-block;margin:0.5em;vertical-align:top}figcaption{font-size:13px;color:#555}
img{max-width:520px;border:1px solid #ddd}.sample{white-space:pre-wrap;background:#f8f8f8;padding:6px;margin:4px 0}"""


def figures(model, tokenizer, data: dict, scores: Similarity, folder: Path) -> dict[str, Path]:
    """The report's plots as PNG files in `folder`, by caption."""
    baseline = data["search"]["trace"][0].get("previous_perplexity") if data["search"]["trace"] else None
    out = {
        "Importance of each layer (Block Influence, attention and MLP 1 - cos)":
            plots.importance_bars(scores, folder / "importance.png"),
        "Angular distance between layer l's input and the output n layers later":
            plots.angular_heatmap(scores, folder / "angular.png"),
        "Speed versus quality of every candidate plan tried": plots.speed_vs_quality(data["candidates"],
                                                                                    folder / "candidates.png"),
    }
    if baseline is not None:
        out["Calibration perplexity versus units removed (greedy)"] = plots.perplexity_vs_removed(
            data["search"]["trace"], baseline, folder / "perplexity.png")
    return out | attention_figures(model, tokenizer, data, folder)


def attention_figures(model, tokenizer, data: dict, folder: Path) -> dict[str, Path]:
    """Attention spectra: the high-frequency share per step for each evaluated plan, and the chosen plan's grid."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    plans = [row["plan"] for row in data["evaluation"]["rows"]]
    maps = {text: attention_maps(model, tokenizer, SPECTRUM_PROMPT, Plan.parse(text, n_layers)) for text in plans}
    return {
        "High-frequency share of the attention spectra per step (Fourier transform of each attention map)":
            plots.spectrum_summary_chart({t: spectrum_summary(m) for t, m in maps.items()}, folder / "spectra.png"),
        f"Attention spectra of the chosen plan {data['plan']} (first 4 heads)":
            plots.spectrum_grid(maps[data["plan"]], folder / "spectrum_grid.png", max_heads=4),
    }


def write_report(model, tokenizer, data: dict, scores: Similarity, out: str | Path) -> Path:
    """Write `out/report.html` and `out/report.json`; returns the HTML path."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as temporary:
        images = {caption: _data_uri(path) for caption, path in figures(model, tokenizer, data, scores,
                                                                         Path(temporary)).items()}
    update_file(out / "report.json", json.dumps({"producer": "layerlab", **data}, indent=1))
    return update_file(out / "report.html", render(data, images))


def render(data: dict, images: dict[str, str]) -> str:
    """The HTML text of the report."""
    rows = data["evaluation"]["rows"] + ([data["healed"]] if data.get("healed") else [])
    parts = [
        f"<h1>layerlab prune: {_e(data['model'])}</h1>",
        f"<p>Chosen plan <code>{_e(data['plan'])}</code> ({_e(data['chosen_by'])}: the lower calibration perplexity "
        f"of the greedy plan <code>{_e(data['greedy_plan'])}</code> (removed in this order: "
        f"{_e(', '.join(data['removed']))}) and the best one-shot plan "
        f"<code>{_e(data['best_one_shot']['plan'])}</code> ({_e(data['best_one_shot']['method'])})). "
        f"Peak memory: {_e(peak_text(data.get('peak_memory_mb')))} (the model loaded, and the job's work on it).</p>",
        "<h2>Evaluation</h2>", _table(*_split(summary_table({"rows": rows}), drop="sample")),
        f"<p>{_e(NOTE)}. Perplexity on {_e(data['settings']['evaluation']['ppl_text'])}; tasks: "
        f"{_e(_task_sources(data['evaluation']))}. The file columns are measured on the shipped files as loaded "
        "back from disk (bytes on disk, their ratio to the source's, perplexity).</p>",
        "<details><summary>Every task and metric</summary>", _table(*_split(task_table({"rows": rows}))),
        "</details>",
        _shipped(data.get("shipped", [])),
        "<h2>Sample generations</h2>", *(_samples(r) for r in rows),
        "<h2>Plots</h2>", *(f'<figure><img src="{uri}" alt="{_e(c)}"><figcaption>{_e(c)}</figcaption></figure>'
                            for c, uri in images.items()),
        "<h2>Greedy search</h2>", _table(["round", "removed", "calibration ppl", "candidates", "aborted"],
                                         [[t["round"], t["removed"], f"{t['perplexity']:.3f}", t["candidates"],
                                           t["aborted"]] for t in data["search"]["trace"]]),
        "<h2>One-shot candidates</h2>", _table(["method", "plan", "calibration ppl"],
                                               [[c["method"], c["plan"], f"{c['perplexity']:.3f}"]
                                                for c in data["one_shot"]]),
    ]
    body = "\n".join(parts)
    return (f"<!doctype html>\n{TEXT_MARKER}\n<html><head><meta charset='utf-8'><title>layerlab report</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _split(table: list[list[str]], drop: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a plain-text table, without the column `drop`."""
    keep = [i for i, header in enumerate(table[0]) if header != drop]
    return [table[0][i] for i in keep], [[row[i] for i in keep] for row in table[1:]]


def _task_sources(evaluation: dict) -> str:
    sources = [f"{name} ({key['rows']} rows, {key['data']})" for name, key in evaluation.get("data", {}).items()]
    return "; ".join(sources) or "none"


def _shipped(shipped: list[dict]) -> str:
    """The files the job wrote: format, quantization, bytes and ratio next to the ideal share."""
    if not shipped:
        return "<p>No model was exported (<code>--no-export</code>).</p>"
    return "<h2>Shipped files</h2>" + _table(
        ["file", "format", "quant", "MiB", "size ×", "ideal ×"],
        [[r["path"], r["format"], r["quant"], f"{r['bytes'] / 2**20:.1f}",
          f"{r['ratio']:.3f}" if r.get("ratio") else "-", f"{r['ideal_ratio']:.3f}" if r.get("ideal_ratio") else "-"]
         for r in shipped])


def _samples(row: dict) -> str:
    return "".join(f"<p><code>{_e(row['plan'])}</code></p><div class='sample'><b>{_e(s['prompt'])}</b>"
                   f"{_e(s['text'])}</div>" for s in row.get("samples", []))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _e(value) -> str:
    return html.escape(str(value))
