"""The main job: score, search, evaluate, export and report, in one resumable run.

Each step leaves its result in the output folder, so an interrupted run (`resume=True`) continues
where it stopped instead of starting over:
1. score: the hook metrics on the calibration text (one pass; recomputed on resume, it is cheap);
2. search: greedy perplexity search to the budget, its state saved in `search.json` after every round;
3. one-shot: Block Influence, angular distance and LLM-Drop cosine plans removing as many units, and
   the best of them by calibration perplexity; the chosen plan is the greedy or the best one-shot plan,
   whichever has the lower calibration perplexity (greedy with pruning is not guaranteed to win, and
   the evaluation text is never used to choose);
4. evaluate: baseline, greedy plan and best one-shot plan side by side (`eval.json`);
5. heal (optional): LoRA on the chosen plan, evaluated as one more row (`healed.json`, `healed/`);
6. export: the chosen plan as a Hugging Face folder (`model/`);
7. report: `report.html` (self-contained) and `report.json` (analysis/report.py).

The run folder: a new (or empty) `out` is created with a manifest recording what produces the run
(model fingerprint, settings, hashes of the texts); `resume=True` continues it only when all of these
are the same (else an error names the difference). A run that fails or is interrupted keeps its
finished steps for `--resume`; one that fails before finishing any leaves `out` as it was. With
`force`, an earlier run folder (layerlab's own, holding nothing else) is replaced only when the new
run succeeds: the new one is built in a temporary sibling meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from .corpora import read_text
from .errors import OutputError
from .evaluate.compare import add_deltas, evaluate_plans
from .evaluate.perplexity import perplexity
from .evaluate.speed import parameter_bytes
from .io import MANIFEST, check_not_an_input, check_output, check_resumable, own_folder, read_manifest, update_file
from .metrics.similarity import Similarity, similarity
from .models import ModelInfo, inspect_model
from .plan import Plan, unique_plans
from .runtime import apply_plan
from .search import Budget, SearchState, greedy, one_shot
from .settings import ONE_SHOT_METHODS, QUICK_EVAL, PruneJob, PruneSettings, as_dict, check_windows

__all__ = ["QUICK_EVAL", "PruneSettings", "prune", "run_prune"]


def run_prune(job: PruneJob, progress: bool = True) -> dict:
    """The main job from settings: every check, then the model loads, then `prune`."""
    info = job.model.inspect()
    settings = job.settings
    settings.check(info.num_layers)
    _check_out(Path(job.out), job, info)
    check_windows(job.model, [("--calibration", settings.calibration, settings.calib_ctx),
                              ("the evaluation text", settings.evaluation.ppl_text, settings.evaluation.ctx)] +
                  ([("the healing text", settings.heal_text, settings.heal_settings.ctx)] if settings.heal else []))
    model, tokenizer = job.model.load()
    return prune(model, tokenizer, job.model.source, job.out, job.settings, resume=job.resume, force=job.force,
                 progress=progress, info=info)


def prune(model, tokenizer, source: str, out: str | Path, settings: PruneSettings | None = None,
          resume: bool = False, force: bool = False, progress: bool = True, info: ModelInfo | None = None) -> dict:
    """Run the whole job into folder `out` and return the report data (also written as report.json)."""
    from .analysis.report import write_report

    settings = settings or PruneSettings()
    info = info or inspect_model(source)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    budget = Budget(settings.removals(n_layers), settings.target_speedup)
    settings.check(n_layers)
    job = PruneJob(settings=settings, out=str(out), resume=resume, force=force)
    _check_out(Path(out), job, info)
    with _run_folder(Path(out), resume, force, _record(info, settings)) as work:
        calibration = read_text(settings.calibration)
        scores = similarity(model, tokenizer, calibration, ctx=settings.calib_ctx, windows=settings.calib_windows,
                            progress=progress)
        state = greedy(model, tokenizer, calibration, budget, settings.granularity, ctx=settings.calib_ctx,
                       windows=settings.calib_windows, keep=settings.keep, state_path=work / "search.json",
                       resume=True, progress=progress, provenance={"model": info.fingerprint})
        one_shots = _one_shot_candidates(model, tokenizer, calibration, scores, len(state.trace), settings)
        best_one_shot = min(one_shots, key=lambda c: c["perplexity"])
        found = {"greedy": (state.trace[-1]["perplexity"], state.plan_text(n_layers)),
                 best_one_shot["method"]: (best_one_shot["perplexity"], best_one_shot["plan"])}
        chosen_by = min(found, key=lambda method: found[method][0])  # calibration perplexity only: no peeking
        chosen = Plan.parse(found[chosen_by][1], n_layers)
        plans = unique_plans([Plan.identity(n_layers)] + [Plan.parse(text, n_layers) for _, text in found.values()])
        plans.sort(key=lambda p: (not p.is_identity, p != chosen))  # baseline, chosen, the other
        evaluation = _cached(work / "eval.json", [p.to_text() for p in plans], lambda: evaluate_plans(
            model, tokenizer, plans, settings.evaluation, store=work / "eval", progress=progress))
        healed = _heal_row(model, tokenizer, chosen, work, settings, progress) if settings.heal else None
        if healed is not None:  # against the baseline row, paired on the same items
            add_deltas([dict(evaluation["rows"][0]), healed], settings.evaluation.confidence, settings.evaluation.seed)
        if settings.export and not (work / "model" / "config.json").is_file():
            from .export.hf import export_hf

            export_hf(model, tokenizer, chosen, work / "model")
        data = {
            "model": source, "settings": as_dict(settings), "plan": chosen.to_text(), "chosen_by": chosen_by,
            "greedy_plan": found["greedy"][1], "removed": [t["removed"] for t in state.trace],
            "scores": scores.to_dict(), "search": asdict(state),
            "one_shot": one_shots, "best_one_shot": best_one_shot, "evaluation": evaluation, "healed": healed,
            "candidates": _candidate_points(model, state, one_shots, n_layers),
            "exported": str(Path(out) / "model") if settings.export else None,
        }
        write_report(model, tokenizer, data, scores, work)
    return data


def _record(info: ModelInfo, settings: PruneSettings) -> dict:
    """What produces a run: resuming needs the same model, settings and texts."""
    sources = {"calibration": settings.calibration, "evaluation": settings.evaluation.ppl_text}
    if settings.heal:
        sources["healing"] = settings.heal_text
    texts = {name: hashlib.sha256(read_text(source).encode("utf-8")).hexdigest()[:16]
             for name, source in sources.items()}
    texts |= {f"task {name}": data.sha256[:16] for name, data in settings.evaluation.check().items()}
    return {"model": info.fingerprint, "settings": as_dict(settings), "texts": texts}


def _check_out(out: Path, job: PruneJob, info: ModelInfo) -> None:
    """The run folder can be created, continued or (with force) replaced without losing anything."""
    saved = read_manifest(out) if out.is_dir() else None
    if job.resume and saved is not None:  # continued in place, if it is the same run
        check_not_an_input(out, job.inputs(info))
        check_resumable(saved.get("run", {}), _record(info, job.settings), str(out))
        return
    if out.is_dir() and any(out.iterdir()) and not job.force:
        if job.resume:
            raise OutputError(f"{out} is not a layerlab run folder, so --resume cannot continue it; "
                              "choose another --out")
        if saved is None:
            raise OutputError(f"{out} already exists and was not written by layerlab; choose another --out")
        raise OutputError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
    check_output(out, folder=True, force=job.force, inputs=job.inputs(info))


@contextlib.contextmanager
def _run_folder(out: Path, resume: bool, force: bool, record: dict) -> Iterator[Path]:
    """The folder the run works in (see the module docstring)."""
    from .export.files import staged_folder

    saved = read_manifest(out) if out.is_dir() else None
    if resume and saved is not None:
        check_resumable(saved.get("run", {}), record, str(out))
        yield out
        return
    if out.is_dir() and any(out.iterdir()):  # force: checked to be an earlier run of layerlab's
        with staged_folder(out, force=True, kind="prune", run=record) as staging:
            yield staging
        return
    existed = out.exists()
    own_folder(out, "prune", run=record)
    try:
        yield out
    except BaseException:
        if [p.name for p in out.iterdir()] == [MANIFEST]:  # nothing finished: leave `out` as it was
            (out / MANIFEST).unlink()
            if not existed:
                out.rmdir()
        raise


def _one_shot_candidates(model, tokenizer, text: str, scores: Similarity, remove: int,
                         settings: PruneSettings) -> list[dict]:
    """Each one-shot method's plan removing `remove` units, with its calibration perplexity."""
    methods = ONE_SHOT_METHODS if settings.granularity == "layer" else ("cosine",)
    out = []
    for method in methods:
        plan = one_shot(scores, method, remove, settings.granularity)
        with apply_plan(model, plan):  # the greedy search's windows: the same calibration perplexity
            ppl = perplexity(model, tokenizer, text, ctx=settings.calib_ctx, max_windows=settings.calib_windows,
                             progress=False).perplexity
        out.append({"method": method, "plan": plan.to_text(), "perplexity": ppl})
    return out


def _cached(path: Path, key: list[str], compute) -> dict:
    """`compute()`'s result, reused from `path` when an earlier run stored it for the same plans."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    value = compute()
    update_file(path, json.dumps({"producer": "layerlab", "key": key, "value": value}, indent=1))
    return value


def _heal_row(model, tokenizer, plan: Plan, out: Path, settings: PruneSettings, progress: bool) -> dict:
    """Heal the chosen plan with LoRA, save the healed model, and evaluate it like the other rows."""
    from .heal import heal, save_healed

    def compute() -> dict:
        result = heal(model, tokenizer, read_text(settings.heal_text), plan, settings.heal_settings,
                      checkpoint_dir=out / "healing.checkpoints", resume=True, progress=progress)
        save_healed(result, tokenizer, out / "healed", force=True)
        n = result.model.config.get_text_config(decoder=True).num_hidden_layers
        no_speed = replace(settings.evaluation, tasks=tuple(t for t in settings.evaluation.tasks if t != "speed"))
        rows = evaluate_plans(result.model, tokenizer, [Plan.identity(n)], no_speed, progress=progress)["rows"]
        return rows[0] | {"plan": f"{plan.to_text()} + LoRA", "losses": result.losses}

    return _cached(out / "healed.json", [plan.to_text(), repr(settings.heal_settings)], compute)


def _candidate_points(model, state: SearchState, one_shots: list[dict], n_layers: int) -> list[dict]:
    """Every plan the job tried: its calibration perplexity and parameter-byte speedup (speed vs quality)."""
    full = Plan.identity(n_layers)
    tried = [{"source": "greedy", "plan": t["plan"], "perplexity": t["perplexity"]} for t in state.trace]
    tried += [{"source": c["method"], "plan": c["plan"], "perplexity": c["perplexity"]} for c in one_shots]
    with apply_plan(model, full):
        full_bytes = parameter_bytes(model)
    for point in tried:
        with apply_plan(model, Plan.parse(point["plan"], n_layers)):
            point["speedup"] = full_bytes / parameter_bytes(model)
    return tried
