"""Several plans side by side on several tasks, in one model load: values, intervals, paired deltas, an average.

`evaluate_plans` runs every task of `EvalSettings.tasks` for every plan (the first plan is the
baseline) and returns plain data: per plan, perplexity with its interval, each zero-shot task's
metrics with intervals (`evaluate/tasks.py`, `evaluate/stats.py`), the average of the tasks' headline
metrics with its interval, sample continuations and speed-ups with their spread over rounds; every
row after the first also carries its differences against the baseline, paired on the same items or
windows, each with an interval and a `significant` flag (`add_deltas`).

Resuming: with `store=FOLDER`, each (plan, task) result is saved as soon as it is measured, under a key
recording what produced it (model fingerprint, plan text, task, rows and data file, settings that decide
the numbers). A later run reuses results whose key matches, and recomputes -- saying which setting
changed -- those whose key does not. Speed is always measured afresh: timings from another session
are not comparable side by side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..corpora import read_text
from ..io import own_folder, record_name, update_file
from ..plan import Plan
from ..runtime import apply_plan
from ..settings import MEASURES, EvalSettings, as_dict
from . import stats
from .perplexity import perplexity
from .samples import generate
from .speed import Rounds, measure_plans
from .tasks import TaskData, TaskResult, paired, run_task, summarize


def model_fingerprint(model, tokenizer) -> str:
    """A short hash of the architecture, the weights (a sample of every tensor) and the tokenizer."""
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode() + sample.tobytes())
    probe = tokenizer("layerlab fingerprint: The quick brown fox jumps over the lazy dog.")["input_ids"]
    digest.update(f"{type(tokenizer).__name__}{len(tokenizer)}{list(probe)}".encode())
    return digest.hexdigest()[:16]


class ResultStore:
    """One JSON file per (plan, task) in a folder, holding the result and the key that produced it."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.reused: list[str] = []
        self.recomputed: list[str] = []

    def _path(self, key: dict) -> Path:
        name = hashlib.sha256(f"{key['plan']}\n{key['task']}".encode()).hexdigest()[:12]
        return self.folder / f"{key['task']}-{name}.json"

    def get(self, key: dict):
        """The stored value for `key`, or None (noting why a stored one for the same plan and task was not used)."""
        if self.folder is None or not self._path(key).is_file():
            return None
        stored = json.loads(self._path(key).read_text())
        if stored["key"] == key:
            self.reused.append(f"{key['task']} of {key['plan']}")
            return stored["value"]
        changed = [f"{k} {stored['key'].get(k)!r} -> {v!r}" for k, v in key.items() if stored["key"].get(k) != v]
        self.recomputed.append(f"{key['task']} of {key['plan']} ({'; '.join(changed)})")
        return None

    def put(self, key: dict, value) -> None:
        if self.folder is None:
            return
        if not self.folder.is_dir():  # layerlab's own folder, listed in its parent's manifest (a prune run's)
            own_folder(self.folder, "eval-results")
            record_name(self.folder)
        update_file(self._path(key), json.dumps({"producer": "layerlab", "key": key, "value": value}))


def evaluate_plans(model, tokenizer, plans: list[Plan], settings: EvalSettings, store: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Run `settings.tasks` for every plan (the first is the baseline) and return the results as plain data."""
    return evaluate_with(LocalMeasurer(model, tokenizer, settings, progress), plans, settings, store, progress)


class LocalMeasurer:
    """What `evaluate_with` needs measured, measured here on the loaded model, one (plan, task) after another.

    `parallel.PoolMeasurer` is the same on worker processes; both call `measure` and `speed_rows`."""

    def __init__(self, model, tokenizer, settings: EvalSettings, progress: bool = True) -> None:
        self.model, self.tokenizer, self.settings, self.progress = model, tokenizer, settings, progress

    def fingerprint(self) -> str:
        return model_fingerprint(self.model, self.tokenizer)

    def measure(self, items: list[tuple[Plan, str]], data: dict[str, TaskData],
                text: str | None) -> Iterator[tuple[int, object]]:
        for index, (plan, task) in enumerate(items):
            yield index, measure(self.model, self.tokenizer, plan, task, self.settings, data, text, self.progress)

    def speeds(self, plans: list[Plan]) -> list[dict]:
        return speed_rows(self.model, self.tokenizer, plans, self.settings)


def task_inputs(settings: EvalSettings) -> tuple[dict[str, TaskData], str | None]:
    """Every zero-shot task's rows (checked) and the perplexity text, as `measure` takes them."""
    return settings.check(), read_text(settings.ppl_text) if "ppl" in settings.tasks else None


def evaluate_with(measurer, plans: list[Plan], settings: EvalSettings, store: str | Path | None = None,
                  progress: bool = True) -> dict:
    """`evaluate_plans` with the measuring done by `measurer` (`LocalMeasurer`, or `parallel.PoolMeasurer`):
    the (plan, task) results not in the store are measured (in any order), each saved as soon as it is in,
    then summarized here in the plans' order, so the rows do not depend on who measured them."""
    data, text = task_inputs(settings)
    results = ResultStore(store)
    fingerprint = measurer.fingerprint()
    work = {task: _task_key(task, settings, data, text) for task in settings.tasks if task != "speed"}
    rows = [{"plan": plan.to_text(), "steps": len(plan.steps)} for plan in plans]
    keys = [(row, plan, task, {"model": fingerprint, "plan": row["plan"], "task": task, **task_key})
            for row, plan in zip(rows, plans, strict=True) for task, task_key in work.items()]
    values = {i: value for i, (_, _, _, key) in enumerate(keys) if (value := results.get(key)) is not None}
    missing = [i for i in range(len(keys)) if i not in values]
    with tqdm(total=len(keys), initial=len(values), desc="evaluate", unit="task", disable=not progress) as bar:
        for index, value in measurer.measure([keys[i][1:3] for i in missing], data, text):
            row, _, task, key = keys[missing[index]]
            bar.set_postfix_str(f"{row['plan'][:30]}: {task}")
            results.put(key, value)
            values[missing[index]] = value
            bar.update()
    for i, (row, _, task, _) in enumerate(keys):
        if task in MEASURES:
            row[task] = values[i]
        else:
            row.setdefault("tasks", {})[task] = values[i]
    for row in rows:  # intervals come from the per-item (per-window) results, so a store never holds stale ones
        if "ppl" in row:
            estimate = stats.perplexity(row["ppl"]["per_window"]["nll"], row["ppl"]["per_window"]["tokens"],
                                        settings.confidence)
            row["ppl"]["interval"] = [estimate.low, estimate.high]
        for task, value in row.get("tasks", {}).items():
            row["tasks"][task] = summarize(TaskResult.from_dict(value), settings.confidence)
        if settings.zero_shot:
            row["average"] = _average(row, settings)
    if "speed" in settings.tasks:
        for row, speed in zip(rows, measurer.speeds(plans), strict=True):
            row["speed"] = speed
    add_deltas(rows, settings.confidence, settings.seed)
    if progress and (results.reused or results.recomputed):
        tqdm.write(f"resumed: {len(results.reused)} results reused from {store}"
                   + "".join(f"\nrecomputed {line}" for line in results.recomputed))
    return {"settings": as_dict(settings), "tasks": list(settings.tasks), "fingerprint": fingerprint,
            "data": {name: d.key() for name, d in data.items()}, "rows": rows,
            "resumed": {"reused": results.reused, "recomputed": results.recomputed}}


def speed_rows(model, tokenizer, plans: list[Plan], settings: EvalSettings) -> list[dict]:
    """The plans' decoding speeds, timed side by side in interleaved rounds (never stored: see the docstring)."""
    speeds = measure_plans(model, tokenizer, plans, read_text("wikitext2-test")[:20000],
                           settings.speed_prompt_tokens, settings.speed_decode_tokens,
                           Rounds(settings.speed_rounds, settings.speed_max_rounds, settings.speed_max_spread))
    return [speed.to_dict() for speed in speeds]


def _task_key(task: str, settings: EvalSettings, data: dict[str, TaskData], text: str | None) -> dict:
    """The settings that decide `task`'s numbers, for the result store."""
    if task in data:
        return data[task].key()
    if task == "ppl":
        return {"text": settings.ppl_text, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "ctx": settings.ctx, "stride": settings.stride, "windows": settings.ppl_windows}
    return {"prompts": list(settings.prompts), "max_new_tokens": settings.max_new_tokens}  # samples


def measure(model, tokenizer, plan: Plan, task: str, settings: EvalSettings, data: dict[str, TaskData],
             text: str | None, progress: bool = True):
    """One task under one plan, as plain data (per-item results for zero-shot tasks)."""
    if task == "samples":  # generate() applies the plan itself
        return [{"prompt": p, "text": generate(model, tokenizer, p, plan, settings.max_new_tokens).text}
                for p in settings.prompts]
    with apply_plan(model, plan):
        if task == "ppl":
            return perplexity(model, tokenizer, text, ctx=settings.ctx, stride=settings.stride,
                              batch_size=settings.batch_size, max_windows=settings.ppl_windows,
                              progress=progress).to_dict()
        return run_task(model, tokenizer, data[task], settings.task_batch_size, progress=progress).to_dict()


def _average(row: dict, settings: EvalSettings) -> dict:
    """The mean of the tasks' headline metrics, with its stratified bootstrap interval."""
    tasks = [row["tasks"][t] for t in settings.zero_shot]
    estimate = stats.average([t["per_item"][t["metric"]] for t in tasks], settings.confidence, seed=settings.seed)
    chance = sum(t["chance"] for t in tasks) / len(tasks)
    return estimate.to_dict() | {"tasks": list(settings.zero_shot), "chance": chance}


def add_deltas(rows: list[dict], confidence: float = stats.CONFIDENCE, seed: int = 0) -> None:
    """Differences of every row after the first against the first (the baseline), paired on the same items."""
    base = rows[0]
    for row in rows[1:]:
        if "ppl" in row and "ppl" in base:
            row["ppl"]["delta"] = stats.paired_perplexity(
                base["ppl"]["per_window"]["nll"], row["ppl"]["per_window"]["nll"],
                base["ppl"]["per_window"]["tokens"], confidence).to_dict()
        for task, value in row.get("tasks", {}).items():
            if task in base.get("tasks", {}):
                value["delta"] = paired(base["tasks"][task], value, confidence)
        if "average" in row and "average" in base:
            names = row["average"]["tasks"]
            diff = stats.paired_average([_headline(base["tasks"][t]) for t in names],
                                        [_headline(row["tasks"][t]) for t in names], confidence, seed=seed)
            row["average"]["delta"] = diff.to_dict() | {"margin_kept": _margin_kept(base["average"], row["average"])}


def _headline(task: dict) -> list[float]:
    return task["per_item"][task["metric"]]


def _margin_kept(base: dict, row: dict) -> float | None:
    """Share of the baseline's above-chance margin the row keeps (small models sit near chance on some tasks)."""
    margin = base["value"] - base["chance"]
    return (row["value"] - row["chance"]) / margin if margin > 0 else None
