"""The evaluation results as plain-text tables (lists of rows of strings), for the CLI and the HTML report.

`summary_table`: one row per plan -- perplexity, each task's headline metric, the average over tasks, their
differences against the baseline, speed-up, size, a sample. `task_table`: one row per plan, task and
metric, with exact intervals and p-values. Every value carries its 95 % interval (`±` half-width, or
`[low, high]`), and a difference that is not significant (`evaluate/stats.py`) is marked `n.s.`.
"""

from __future__ import annotations

from .speed import Ratio

NOTE = ("± and [low, high]: 95 % intervals; n.s.: not significant (the difference's interval includes 0, or for "
        "an accuracy the exact McNemar test gives p >= 0.05); "
        "Δ: paired against the baseline (first row) on the same items or windows; speed: median speed-up over "
        "interleaved rounds (interquartile range), 'unreliable' when the rounds disagree")
TASK_DELTAS_INLINE = 2  # at most this many zero-shot tasks get a Δ column each in the summary


def estimate_text(value: float, interval: list | None, digits: int) -> str:
    """`0.452 ±0.069`: the value and the half-width of its interval."""
    if not interval or interval[0] is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ±{(interval[1] - interval[0]) / 2:.{digits}f}"


def delta_text(delta: dict | None, digits: int, unit: str = "") -> str:
    """`-0.040 [-0.090, +0.010] n.s.`: a difference, its interval, and `n.s.` unless significant."""
    if not delta:
        return "-"
    low, high = delta["interval"]
    text = f"{delta['value']:+.{digits}f}{unit}"
    if low is not None:
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    return text if delta["significant"] else text + " n.s."


def summary_table(results: dict) -> list[list[str]]:
    """Header row, then one row per plan of `evaluate_plans`' results (extra rows, e.g. healed, included)."""
    rows = results["rows"]
    first = rows[0]
    tasks = list(first.get("tasks", {}))
    columns: list[tuple[str, object]] = []
    if "ppl" in first:
        columns += [("ppl", lambda r: estimate_text(r["ppl"]["perplexity"], r["ppl"].get("interval"), 2)),
                    ("Δppl", lambda r: delta_text(r["ppl"].get("delta"), 1, "%"))]
    for task in tasks:
        metric = first["tasks"][task]["metric"]
        columns.append((f"{task} {metric}",
                        lambda r, t=task: estimate_text(r["tasks"][t]["value"], r["tasks"][t]["interval"], 3)))
        if len(tasks) <= TASK_DELTAS_INLINE:
            columns.append((f"Δ{metric}",
                            lambda r, t=task, m=metric: delta_text(r["tasks"][t].get("delta", {}).get(m), 3)))
    if "average" in first and len(tasks) > 1:
        columns += [("average", lambda r: estimate_text(r["average"]["value"], r["average"]["interval"], 3)),
                    ("Δaverage", lambda r: delta_text(r["average"].get("delta"), 3))]
    if "speed" in first:
        columns += [("decode ×", lambda r: _ratio(r, "decode")),
                    ("prefill ×", lambda r: _ratio(r, "prefill")),
                    ("params MB", lambda r: f"{r['speed']['parameter_bytes'] / 2**20:.0f}")]
    if any("file" in r for r in rows):  # shipped files, measured as loaded back from disk
        columns += [("file MiB", lambda r: f"{r['file']['bytes'] / 2**20:.1f}"),
                    ("size ×", lambda r: f"{r['file']['ratio']:.3f}"),
                    ("file ppl", lambda r: f"{r['file']['perplexity']:.2f}")]
    if "samples" in first:
        columns.append(("sample", lambda r: r["samples"][0]["prompt"] + r["samples"][0]["text"] if "samples" in r
                        else "-"))
    out = [["plan", "steps", *(header for header, _ in columns)]]
    for row in rows:
        out.append([row["plan"], str(row.get("steps", "-")), *(_cell(cell, row) for _, cell in columns)])
    return out


def _cell(cell, row: dict) -> str:
    try:
        return cell(row)
    except (KeyError, TypeError):  # a row without this measure (e.g. a healed row has no speed, a row no file)
        return "-"


def _ratio(row: dict, kind: str) -> str:
    return Ratio(**row["speed"][f"{kind}_speedup"]).text()


def task_table(results: dict) -> list[list[str]]:
    """Header row, then one row per plan, task and metric: value [interval], Δ [interval], p, verdict."""
    out = [["plan", "task", "metric", "n", "value [95 %]", "Δ vs baseline [95 %]", "p", "verdict"]]
    for row in results["rows"]:
        if "ppl" in row:
            ppl = row["ppl"]
            out.append(_task_row(row["plan"], "ppl", "perplexity", ppl["windows"], ppl["perplexity"],
                                 ppl.get("interval"), ppl.get("delta"), 2, lower_is_better=True, unit="%"))
        for task, value in row.get("tasks", {}).items():
            for metric, estimate in value["metrics"].items():
                ppl_like = metric == "perplexity"
                out.append(_task_row(row["plan"], task, metric, value["n"], estimate["value"], estimate["interval"],
                                     value.get("delta", {}).get(metric), 2 if ppl_like else 3, ppl_like,
                                     "%" if ppl_like else ""))
            for group, estimate in value.get("groups", {}).items():
                if len(value["groups"]) > 1:
                    out.append(_task_row(row["plan"], f"{task}/{group}", "acc", estimate["n"], estimate["value"],
                                         estimate["interval"], None, 3))
        if "average" in row:
            average = row["average"]
            out.append(_task_row(row["plan"], "average", "headline", len(average["tasks"]), average["value"],
                                 average["interval"], average.get("delta"), 3))
    return out


def _task_row(plan: str, task: str, metric: str, n: int, value: float, interval: list | None, delta: dict | None,
              digits: int, lower_is_better: bool = False, unit: str = "") -> list[str]:
    shown = f"{value:.{digits}f}"
    if interval and interval[0] is not None:
        shown += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    if not delta:
        return [plan, task, metric, str(n), shown, "-", "-", "-"]
    verdict = "n.s."
    if delta["significant"]:
        verdict = "worse" if (delta["value"] > 0) == lower_is_better else "better"
    p = "-" if delta["p"] is None else f"{delta['p']:.3g}"
    return [plan, task, metric, str(n), shown, delta_text(delta, 1 if unit else digits, unit).removesuffix(" n.s."), p,
            verdict]
