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
5. recover: by default the training-free linear patch when it lowers the calibration loss (`recover.py`,
   method `auto`), or the method asked for; a recovered model is evaluated as one more row
   (`healed.json`, `recovery.json`, the working copy in `healed/`);
6. ship: the chosen plan (and the recovered model) in the source's format and quantization: a GGUF
   source gives `model.gguf` (and `model-healed.gguf`, its changed tensors re-quantized), a Hugging
   Face source `model/` (and `model-healed/`) in its dtype; each file is then measured as loaded back
   from disk next to the source (bytes, perplexity; llama.cpp's too when installed) (`shipped.json`);
7. report: `report.html` (self-contained) and `report.json` (analysis/report.py).

One-shot pruning (`method` bi, angular or cosine; `run_one_shot`) is the short path for models too big
to load: the scores, the plan they choose, and the export, in a run folder written whole or not at all
(`scores.json`, `report.json`, the model). With `streamed` the scores are read one decoder layer at a
time (`layerwise.py`) and a GGUF source's kept tensors are copied into the new file without being
dequantized, so the whole model is never in memory; without it the model is loaded and scored as the
full job scores it, and the export is the same copy. No evaluation and no recovery: both run the
whole model (`layerlab eval --plans` and `layerlab heal` take the plan afterwards, where it fits).

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
from .errors import OutputError, PlanError
from .evaluate.compare import add_deltas, evaluate_plans
from .evaluate.perplexity import perplexity
from .evaluate.speed import PeakMemory, parameter_bytes
from .io import MANIFEST, check_not_an_input, check_output, check_resumable, own_folder, read_manifest, update_file
from .metrics.similarity import Similarity, similarity
from .models import ModelInfo, inspect_model
from .plan import Plan, unique_plans
from .runtime import apply_plan
from .search import Budget, SearchState, greedy, one_shot
from .settings import ONE_SHOT_METHODS, QUICK_EVAL, PruneJob, PruneSettings, as_dict, check_windows

__all__ = ["QUICK_EVAL", "PruneSettings", "prune", "run_prune"]


def run_prune(job: PruneJob, progress: bool = True) -> dict:
    """The main job from settings: every check, then the model loads, then `prune` (or `run_one_shot`)."""
    if job.settings.method != "auto":
        return run_one_shot(job, progress)
    info = job.model.inspect()
    settings = job.settings
    settings.check(info.num_layers)
    _check_out(Path(job.out), job, info)
    check_windows(job.model, [("--calibration", settings.calibration, settings.calib_ctx),
                              ("the evaluation text", settings.evaluation.ppl_text, settings.evaluation.ctx),
                              *settings.recovery.calibration_needs()])
    if settings.export:
        _shipping_targets(job.model.source, Plan.identity(info.num_layers), Path(job.out), settings)
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
    if settings.export:  # format, quant and writer checked before any work
        _shipping_targets(source, Plan.identity(n_layers), Path(out), settings)
    with _run_folder(Path(out), resume, force, _record(info, settings)) as work, PeakMemory(model.device) as peak:
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
        healed = _recover_row(model, tokenizer, chosen, work, settings, progress, {"model": info.fingerprint})
        if healed is not None:  # against the baseline row, paired on the same items
            add_deltas([dict(evaluation["rows"][0]), healed], settings.evaluation.confidence, settings.evaluation.seed)
        shipped = _ship(model, tokenizer, source, chosen, work, settings, scores, evaluation, healed) \
            if settings.export else []
        data = {
            "model": source, "settings": as_dict(settings), "plan": chosen.to_text(), "chosen_by": chosen_by,
            "greedy_plan": found["greedy"][1], "removed": [t["removed"] for t in state.trace],
            "scores": scores.to_dict(), "search": asdict(state),
            "one_shot": one_shots, "best_one_shot": best_one_shot, "evaluation": evaluation, "healed": healed,
            "recovery": json.loads(recovery.read_text()) if (recovery := work / "recovery.json").is_file() else None,
            "candidates": _candidate_points(model, state, one_shots, n_layers),
            "exported": str(Path(out) / shipped[0]["path"]) if shipped else None,
            "shipped": [record | {"path": str(Path(out) / record["path"])} for record in shipped],
            "peak_memory_mb": peak.so_far(),  # the model loaded, this job's work on it
        }
        write_report(model, tokenizer, data, scores, work)
    return data


def run_one_shot(job: PruneJob, progress: bool = True) -> dict:
    """Score, choose by `settings.method`, export (see the module docstring); the report data is returned."""
    from .export import output_format
    from .export.files import staged_folder
    from .jobs import peak_memory

    info = job.model.inspect()
    settings = job.settings
    settings.check(info.num_layers)
    source = job.model.source
    if job.resume:
        raise OutputError(f"--method {settings.method} runs in one step, so there is nothing to resume; drop --resume")
    if settings.streamed and settings.export and output_format(source, settings.export_format) != "gguf":
        raise OutputError("--streamed exports a GGUF source by copying its tensors; a Hugging Face folder is written "
                          "from the loaded model: drop --streamed, or --no-export and export the plan later")
    if settings.streamed and job.model.device == "auto":
        raise OutputError("--streamed runs one layer at a time on one device; give --device cpu or cuda")
    _check_out(Path(job.out), job, info)
    check_windows(job.model, [("--calibration", settings.calibration, settings.calib_ctx)])
    if settings.export:
        _shipping_targets(source, Plan.identity(info.num_layers), Path(job.out), settings)
    calibration = read_text(settings.calibration)
    with staged_folder(job.out, job.force, kind="prune", run=_record(info, settings)) as staging:
        with peak_memory(job.model) as peak:
            scores, plan, shipped = _one_shot_work(job, calibration, staging, progress)
        data = {"model": source, "settings": as_dict(settings), "plan": plan.to_text(), "chosen_by": settings.method,
                "streamed": settings.streamed, "peak_memory_mb": peak.peak_mb, "scores": scores.to_dict(),
                "shipped": [record | {"path": str(Path(job.out) / record["path"])} for record in shipped]}
        (staging / "scores.json").write_text(json.dumps({"producer": "layerlab", **scores.to_dict()}, indent=1))
        (staging / "report.json").write_text(json.dumps(data, indent=1, default=str))
    return data


def _one_shot_work(job: PruneJob, calibration: str, staging: Path, progress: bool) -> tuple[Similarity, Plan, list]:
    """The scores (streamed, or of the loaded model), the plan they choose, and the export into `staging`."""
    from .export import write_export

    settings = job.settings
    model = tokenizer = None
    if settings.streamed:
        from .metrics.similarity import similarity_streamed

        scores = similarity_streamed(job.model.source, job.model.tokenizer(), calibration, ctx=settings.calib_ctx,
                                     windows=settings.calib_windows, dtype=job.model.torch_dtype(),
                                     device=job.model.device, progress=progress)
    else:
        model, tokenizer = job.model.load()
        scores = similarity(model, tokenizer, calibration, ctx=settings.calib_ctx, windows=settings.calib_windows,
                            progress=progress)
    n_layers = scores.plan.num_layers
    plan = one_shot(scores, settings.method, settings.removals(n_layers), settings.granularity)
    if not settings.export:
        return scores, plan, []
    target = _shipping_targets(job.model.source, plan, staging, settings)["model"]
    result = write_export(target, plan, model, tokenizer, changed=(), importance=_importance(scores, plan))
    return scores, plan, [{"name": "model", **result.to_dict(), "path": result.path.name, "card": result.card.name}]


def _importance(scores: Similarity, plan: Plan) -> list[float]:
    """Each step's Block Influence: how mixed precision ranks the shipped layers (higher keeps more bits)."""
    return [scores.block_influence[step.layer] for step in plan.steps]


def _record(info: ModelInfo, settings: PruneSettings) -> dict:
    """What produces a run: resuming needs the same model, settings and texts."""
    sources = {"calibration": settings.calibration, "evaluation": settings.evaluation.ppl_text}
    recovery = settings.recovery
    if recovery.patches:
        sources |= {f"patch calibration {source}": source for source in recovery.patch.calibration}
    if recovery.trains:
        sources |= {f"training {source}": source for source in recovery.data}
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


def _recover_row(model, tokenizer, plan: Plan, out: Path, settings: PruneSettings, progress: bool,
                 provenance: dict) -> dict | None:
    """Recover the chosen plan (`settings.recovery`), write it as the exported model, and evaluate it like the
    other rows; None when nothing was recovered (the record of why is in `recovery.json`)."""
    from .recover import recover, save_recovered

    def compute() -> dict:
        recovery = recover(model, tokenizer, plan, settings.recovery, checkpoint_dir=out / "healing.checkpoints",
                           resume=True, progress=progress, provenance=provenance)
        update_file(out / "recovery.json", json.dumps({"producer": "layerlab", **recovery.summary()}, indent=1,
                                                      default=str))
        if recovery.method == "none":
            return {}
        save_recovered(recovery, tokenizer, out / "healed", force=True)  # the working copy `_ship` writes out
        n = recovery.model.config.get_text_config(decoder=True).num_hidden_layers
        no_speed = replace(settings.evaluation, tasks=tuple(t for t in settings.evaluation.tasks if t != "speed"))
        rows = evaluate_plans(recovery.model, tokenizer, [Plan.identity(n)], no_speed, progress=progress)["rows"]
        losses = recovery.record.get("training", {}).get("losses")
        return rows[0] | {"plan": f"{plan.to_text()} + {recovery.method}", "losses": losses,
                          "reason": recovery.record.get("reason")}

    if settings.heal == "none":
        return None
    return _cached(out / "healed.json", [plan.to_text(), repr(settings.recovery)], compute) or None


def _shipping_targets(source: str, plan: Plan, out: Path, settings: PruneSettings) -> dict:
    """Where the plain and healed models go, checked before any model work (format, quant, writer); the
    run folder is layerlab's, so its earlier files may be replaced."""
    from .export import output_format, prepare_export
    from .settings import ExportSettings, ModelSpec

    def target(name: str, suffix: str = ""):
        shipping = ExportSettings(model=ModelSpec(source), out=str(out / f"{name}{suffix}"),
                                  format=settings.export_format, quant=settings.quant, force=True, eval_windows=0)
        return prepare_export(shipping, plan, rewrites=name != "model")

    names = ["model"] + (["model-healed"] if settings.recovery.method != "none" else [])
    suffix = ".gguf" if output_format(source, settings.export_format) == "gguf" else ""
    if suffix and settings.granularity != "layer":
        raise PlanError(f"a GGUF export takes whole layers only, and --granularity {settings.granularity} searches "
                        "sublayer plans; use --granularity layer, or --format hf")
    return {name: target(name, suffix) for name in names}


def _ship(model, tokenizer, source: str, plan: Plan, out: Path, settings: PruneSettings, scores: Similarity,
          evaluation: dict, healed: dict | None) -> list[dict]:
    """Write the chosen plan (and the healed model) in the source's format and quantization, measure each file
    from disk next to the source, and add a `file` entry to the evaluation rows (`shipped.json` on resume)."""
    from .evaluate.artifact import ArtifactSettings, measure_exports
    from .export import write_card, write_export
    from .models import load

    ev = settings.evaluation
    measuring = ArtifactSettings(text=ev.ppl_text, ctx=ev.ctx, windows=ev.ppl_windows, speed_rounds=ev.speed_rounds)

    def compute() -> list[dict]:
        targets = _shipping_targets(source, plan, out, settings)
        importance = _importance(scores, plan)
        results = {"model": write_export(targets["model"], plan, model, tokenizer, changed=(), importance=importance)}
        if healed and "model-healed" in targets:  # recovered weights: changed tensors found and re-quantized
            healed_model, _ = load(str(out / "healed"))
            results["model-healed"] = write_export(targets["model-healed"], plan, healed_model, tokenizer,
                                                   materialized=True, importance=importance)
        measured = measure_exports(results, source, measuring, tokenizer)
        for name, result in results.items():
            write_card(result, source, plan, measured[name])
        return [{"name": name, **result.to_dict(), "path": result.path.name, "card": result.card.name,
                 "measured": measured[name]} for name, result in results.items()]  # paths within the run folder

    shipped = _cached(out / "shipped.json", [plan.to_text(), settings.export_format or "", settings.quant,
                                              repr(settings.recovery) if healed else ""], compute)
    rows = {"model": next(r for r in evaluation["rows"] if r["plan"] == plan.to_text()), "model-healed": healed}
    evaluation["rows"][0]["file"] = {"bytes": shipped[0]["source_bytes"], "ratio": 1.0,
                                     "perplexity": shipped[0]["measured"]["source"]["perplexity"]["perplexity"]}
    for record in shipped:
        row = rows[record["name"]]
        row["file"] = {"path": record["path"], "bytes": record["bytes"], "ratio": record["ratio"],
                       "ideal_ratio": record["ideal_ratio"],
                       "perplexity": record["measured"]["export"]["perplexity"]["perplexity"],
                       "llama_cpp": record["measured"]["ratios"]}
    return shipped


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
