"""The zero-shot tasks: where each task's rows come from, and how it is scored.

The registry (lm-evaluation-harness 0.4.13's names: `arc_easy`, `piqa`, `winogrande`, `boolq`,
`openbookqa`, `lambada_openai`, `hellaswag`, `mmlu`, its groups `mmlu_stem`, `mmlu_humanities`,
`mmlu_social_sciences`, `mmlu_other` and its 57 subjects `mmlu_<subject>`; the `suite` shorthand;
`parse_tasks`) lives in `settings.py`, so a `--tasks` text is checked before torch or a model loads.

Rows are the exact requests lm-eval builds (see `data/tasks/README.md`): read from the subsets bundled
with layerlab, or from a folder holding the full files under the same names (`task_data`; a task whose
file the folder lacks falls back to the bundled subset, and the result says which file was used).
Scoring follows lm-eval: `acc`/`acc_norm` for multiple choice (`evaluate/multiple_choice.py`),
WinoGrande's partial scoring, LAMBADA's greedy-match `acc` and per-row `perplexity`, MMLU's subject
and group scores as plain means over rows. Each task has a headline metric (shown in tables and
averaged over the suite): `acc_norm` where lm-eval reports it, `acc` elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..corpora import Item, read_items
from ..errors import DataError
from ..settings import GROUP_OF, MEASURES, MMLU_GROUPS, SUITE, Task, parse_tasks
from ..settings import ZERO_SHOT_TASKS as TASKS
from . import stats

__all__ = ["MEASURES", "MMLU_GROUPS", "SUITE", "TASKS", "Task", "TaskData", "TaskResult", "load_task", "paired",
           "parse_tasks", "run_task", "summarize"]
BUNDLED = {"hellaswag": "hellaswag_val_2k.jsonl"}  # bundled under another name, in data/ itself


@dataclass(frozen=True)
class TaskData:
    """A task's rows as they will be scored, and which file they came from."""

    task: Task
    items: tuple[Item, ...]
    source: str  # "bundled:<file>" or the file's path
    sha256: str  # of the whole file the rows were read from

    def key(self) -> dict:
        """What decides this task's numbers (besides model and plan), for resumable results."""
        return {"task": self.task.name, "rows": len(self.items), "data": self.source, "data_sha256": self.sha256}


def task_file(task: Task, folder: str | Path | None) -> tuple[Path, str]:
    """The file holding `task`'s rows: in `folder` when it has one, else the bundled subset."""
    if folder is not None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise DataError(f"task data folder {folder} does not exist; give a folder of task files "
                            f"(e.g. {TASKS['arc_easy'].file}) or leave it out to use the bundled subsets")
        if (folder / task.file).is_file():
            return folder / task.file, str((folder / task.file).resolve())
    if task.name in BUNDLED:
        return Path(str(files("layerlab").joinpath("data", BUNDLED[task.name]))), f"bundled:{BUNDLED[task.name]}"
    return Path(str(files("layerlab").joinpath("data", "tasks", task.file))), f"bundled:{task.file}"


def load_task(name: str, rows: int | None = None, folder: str | Path | None = None) -> TaskData:
    """The rows of task `name` (all, or the first `rows`; MMLU groups take them round-robin over subjects)."""
    task = TASKS[name]
    path, source = task_file(task, folder)
    items = read_items(path, task.kind)
    if task.subjects:
        items = _subject_rows(items, task, path, rows)
    elif rows is not None:
        items = items[:rows]
    return TaskData(task, items, source, _sha256(path, path.stat().st_mtime_ns))


def _subject_rows(items: tuple[Item, ...], task: Task, path: Path, rows: int | None) -> tuple[Item, ...]:
    """The task's subjects' rows, subject by subject; a limit takes row 1 of each subject, then row 2, ..."""
    by_subject: dict[str, list[Item]] = {s: [] for s in task.subjects}
    for item in items:
        if getattr(item, "subject", None) in by_subject:
            by_subject[item.subject].append(item)
    missing = [s for s, rows_of in by_subject.items() if not rows_of]
    if missing:
        raise DataError(f"{path} has no rows for the MMLU subject(s) {', '.join(missing[:3])} that {task.name} needs")
    take = dict.fromkeys(task.subjects, 0)  # rows taken from each subject, in round-robin turns
    while rows is not None and sum(take.values()) < rows:
        open_subjects = [s for s in task.subjects if take[s] < len(by_subject[s])]
        if not open_subjects:
            break
        for subject in open_subjects[: rows - sum(take.values())]:
            take[subject] += 1
    return tuple(item for s in task.subjects for item in (by_subject[s] if rows is None else by_subject[s][:take[s]]))


@functools.lru_cache(maxsize=32)
def _sha256(path: Path, stamp: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TaskResult:
    """Per-item outcomes of one task under one plan: enough for its metrics, intervals and paired deltas."""

    task: str
    per_item: dict[str, tuple[float, ...]]  # metric -> one value per item (0/1; LAMBADA also "loglikelihood")
    chance: tuple[float, ...]  # per item, the expected accuracy of a uniform guess
    subjects: tuple[str, ...] | None = None  # MMLU: each item's subject
    loglikelihoods: tuple[tuple[float, ...], ...] = ()  # per item, per choice (not stored; for agreement checks)

    def to_dict(self) -> dict:
        return {"task": self.task, "per_item": {k: list(v) for k, v in self.per_item.items()},
                "chance": list(self.chance), "subjects": list(self.subjects) if self.subjects else None}

    @classmethod
    def from_dict(cls, data: dict) -> TaskResult:
        return cls(data["task"], {k: tuple(v) for k, v in data["per_item"].items()}, tuple(data["chance"]),
                   tuple(data["subjects"]) if data.get("subjects") else None)


def run_task(model, tokenizer, data: TaskData, batch_size: int | None = None, progress: bool = True) -> TaskResult:
    """Score every row of `data` under `model` as it is now (apply a plan around the call)."""
    from .loglikelihood import CPU_BATCH, loglikelihoods  # torch loads here, not when settings check the rows
    from .multiple_choice import score_items

    task, items = data.task, list(data.items)
    if task.kind == "cloze":
        results = loglikelihoods(model, tokenizer, [item.requests()[0] for item in items],
                                 batch_size=batch_size or CPU_BATCH, share_contexts=batch_size is None,
                                 progress=progress, desc=task.name)
        return TaskResult(task.name, {"acc": tuple(float(r.greedy) for r in results),
                                      "loglikelihood": tuple(r.logprob for r in results)},
                          (0.0,) * len(items), loglikelihoods=tuple((r.logprob,) for r in results))
    scores = score_items(model, tokenizer, items, batch_size, progress, desc=task.name)
    per_item = {"acc": tuple(float(s.prediction == s.label) for s in scores),
                "acc_norm": tuple(float(s.prediction_norm == s.label) for s in scores)}
    subjects = tuple(item.subject for item in items) if task.subjects else None
    return TaskResult(task.name, {m: per_item[m] for m in task.metrics}, tuple(1 / len(i.requests()) for i in items),
                      subjects, tuple(s.loglikelihoods for s in scores))


def summarize(result: TaskResult, confidence: float = stats.CONFIDENCE) -> dict:
    """Metrics with intervals (and MMLU subject and group scores) of one task result, as plain data."""
    task = TASKS[result.task]
    metrics = {}
    for metric in task.metrics:
        if metric == "perplexity":  # lm-eval: exp(-mean over rows of the continuation's log-likelihood)
            lls = result.per_item["loglikelihood"]
            metrics[metric] = stats.perplexity([-v for v in lls], [1] * len(lls), confidence).to_dict()
        else:
            metrics[metric] = stats.accuracy(result.per_item[metric], confidence).to_dict()
    head = metrics[task.headline]
    out = {"metric": task.headline, "value": head["value"], "interval": head["interval"],
           "n": len(result.chance), "chance": sum(result.chance) / len(result.chance), "metrics": metrics,
           "per_item": {k: list(v) for k, v in result.per_item.items()}}
    if result.subjects:
        out["subjects"] = _grouped(result, lambda s: s, confidence)
        out["groups"] = _grouped(result, GROUP_OF.__getitem__, confidence)
    return out


def _grouped(result: TaskResult, group_of, confidence: float) -> dict:
    """Headline accuracy of each subject (or group): plain means over its rows, as lm-eval weights them."""
    members: dict[str, list[float]] = {}
    for subject, value in zip(result.subjects, result.per_item["acc"], strict=True):
        members.setdefault(group_of(subject), []).append(value)
    return {name: stats.accuracy(values, confidence).to_dict() | {"n": len(values)}
            for name, values in sorted(members.items())}


def paired(base: dict, other: dict, confidence: float = stats.CONFIDENCE) -> dict:
    """Differences of every metric against the baseline's summary of the same task, paired on items."""
    if base["n"] != other["n"]:
        raise ValueError("paired differences need the same items on both sides")
    out = {}
    for metric in base["metrics"]:
        if metric == "perplexity":
            ones = [1] * len(base["per_item"]["loglikelihood"])
            diff = stats.paired_perplexity([-v for v in base["per_item"]["loglikelihood"]],
                                           [-v for v in other["per_item"]["loglikelihood"]], ones, confidence)
        else:
            diff = stats.paired_accuracy(base["per_item"][metric], other["per_item"][metric], confidence)
        out[metric] = diff.to_dict()
    return out
