"""The commands as library calls: settings in, results out, every check before the model loads.

Each job follows the same order, so a mistake costs a second and never a model load or lost data:
1. the settings object validated its values when it was built (`settings.py`);
2. `inspect`: the model's config is read (no weights) and the device checked;
3. `check`: input files readable, plans parsed against the model's layer count, outputs writable
   and not replacing anything layerlab did not write (nor any input);
4. the model loads and the work runs; outputs are written atomically.
The CLI (`cli.py`) only parses arguments into settings, calls one of these, and prints the result.
The main job, `prune`, has its own module (`prune.py`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import PlanError
from .io import atomic_write_json
from .models import ModelInfo
from .plan import Plan, unique_plans
from .settings import (
    AnalyzeSettings,
    EvalJob,
    ExportSettings,
    GenerateSettings,
    HealJob,
    ModelSpec,
    ScoreSettings,
    SearchSettings,
    SpeculateSettings,
    check_kv_types,
    check_windows,
    plan_inputs,
)


def load_plan(info: ModelInfo, source: str) -> Plan:
    """A plan (text or file) checked against the model's config: layer count, and KV pairs' attention types."""
    plan = Plan.load(source, info.num_layers)
    check_kv_types(plan, info.layer_types)
    return plan


def peak_memory(model: ModelSpec):
    """A `PeakMemory` block for a job's device: the CUDA allocator's peak, or the process's peak RSS (VmHWM).

    Every job measures its whole run (the model load included) and returns the peak in MB."""
    import torch

    from .evaluate.speed import PeakMemory

    cuda = model.device.startswith("cuda") or (model.device == "auto" and torch.cuda.is_available())
    return PeakMemory(torch.device(model.device if model.device.startswith("cuda") else "cuda" if cuda else "cpu"))


def plans_with_baseline(info: ModelInfo, plans: tuple[str, ...]) -> list[Plan]:
    """The identity plan first, then each given plan (text or file) checked against the model, without repeats."""
    return unique_plans([Plan.identity(info.num_layers)] + [load_plan(info, p) for p in plans])


# ------------------------------------------------------------------------------------------ generate
def generate(settings: GenerateSettings) -> tuple[list[Plan], list, float | None]:
    """Every prompt under every plan (baseline first): `(plans, samples, peak memory MB)`, plan-major order."""
    from .evaluate.samples import generate_table

    settings.check()
    plans = plans_with_baseline(settings.model.inspect(), settings.plans)
    with peak_memory(settings.model) as peak:
        model, tokenizer = settings.model.load()
        samples = generate_table(model, tokenizer, list(settings.prompts), plans,
                                 max_new_tokens=settings.max_new_tokens, do_sample=settings.sample, seed=settings.seed)
    return plans, samples, peak.peak_mb


# ------------------------------------------------------------------------------------------ eval
def evaluate(job: EvalJob, progress: bool = True) -> dict:
    """Several plans side by side in one model load; the results are written to `job.out` and returned."""
    from .evaluate.compare import evaluate_plans
    from .kvcache import kv_cache

    info = job.model.inspect()
    job.check(info)
    plans = plans_with_baseline(info, job.plans)
    if "ppl" in job.evaluation.tasks:
        check_windows(job.model, [("--ppl-text", job.evaluation.ppl_text, job.evaluation.ctx)])
    with peak_memory(job.model) as peak:
        if job.parallel.parallel:  # one Ray task per (plan, task); the workers hold the model
            from .parallel import WorkerPool
            from .parallel import evaluate_plans as evaluate_in_parallel

            with WorkerPool(job.model, job.parallel, progress=progress) as pool:
                results = evaluate_in_parallel(pool, plans, job.evaluation, store=job.store, progress=progress)
                results["workers"] = pool.memory()
        else:
            model, tokenizer = job.model.load()
            with kv_cache(model, job.cache):
                results = evaluate_plans(model, tokenizer, plans, job.evaluation, store=job.store, progress=progress)
    results |= {"model": job.model.source, "peak_memory_mb": peak.peak_mb, "kv_cache": job.cache.kind}
    atomic_write_json(job.out, results, force=job.force)
    return results


# ------------------------------------------------------------------------------------------ score
@dataclass
class ScoreResult:
    plan: Plan
    similarity: object  # metrics.similarity.Similarity
    deltas: object | None  # metrics.perplexity_delta.PerplexityDeltas, when asked for
    out: Path
    peak_memory_mb: float | None = None


def score(settings: ScoreSettings) -> ScoreResult:
    """The hook metrics (and perplexity deltas) of a plan's steps; scores.json and plots written to `out`."""
    from .analysis.plots import angular_heatmap, importance_bars
    from .corpora import read_text
    from .export.files import staged_folder
    from .metrics.perplexity_delta import perplexity_deltas
    from .metrics.similarity import similarity

    info = settings.model.inspect()
    settings.check(info)
    plan = load_plan(info, settings.plan)
    calibration = read_text(settings.text)
    check_windows(settings.model, [("--text", settings.text, settings.ctx)])
    deltas = None
    with peak_memory(settings.model) as peak:
        if settings.streamed:
            result = _similarity_streamed(settings.model, calibration, plan, settings.ctx, settings.windows,
                                          settings.tokens)
        else:
            model, tokenizer = settings.model.load()
            result = similarity(model, tokenizer, calibration, plan=plan, ctx=settings.ctx, windows=settings.windows,
                                tokens=settings.tokens)
            deltas = perplexity_deltas(model, tokenizer, calibration, plan, ctx=settings.ctx,
                                       windows=settings.windows) if settings.ppl_delta else None
    scores = {"producer": "layerlab", **result.to_dict(),
              **({"perplexity_delta": deltas.to_dict()} if deltas else {}),
              "streamed": settings.streamed, "peak_memory_mb": peak.peak_mb}
    with staged_folder(settings.out, settings.force, kind="score") as staging:
        (staging / "scores.json").write_text(json.dumps(scores, indent=2))
        importance_bars(result, staging / "importance.png")
        angular_heatmap(result, staging / "angular.png")
    return ScoreResult(plan, result, deltas, Path(settings.out), peak.peak_mb)


def _similarity_streamed(model: ModelSpec, text: str, plan: Plan | None, ctx: int, windows: int, tokens: str = "all"):
    """The hook metrics read one decoder layer at a time: only the tokenizer and one layer are ever loaded."""
    from .metrics.similarity import similarity_streamed

    return similarity_streamed(model.source, model.tokenizer(), text, plan=plan, ctx=ctx, windows=windows,
                               tokens=tokens, dtype=model.torch_dtype(), device=model.device)


# ------------------------------------------------------------------------------------------ analyze
def analyze(settings: AnalyzeSettings) -> dict:
    """Attention maps, spectra, hidden-state cosine and logit lens of each plan, written to `out`."""
    from .analysis.analyze import analyze as run_analyze

    info = settings.model.inspect()
    settings.check(info)
    plans = plans_with_baseline(info, settings.plans)
    with peak_memory(settings.model) as peak:
        model, tokenizer = settings.model.load()
        results = run_analyze(model, tokenizer, {p.to_text(): p for p in plans}, settings.prompt, settings.out,
                              max_heads=settings.max_heads, top_k=settings.top_k, force=settings.force)
    return results | {"peak_memory_mb": peak.peak_mb}


# ------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    plan: Plan
    state: object | None  # search.SearchState of a greedy search
    peak_memory_mb: float | None = None  # this process (with --workers: the driver, which holds no weights)
    workers: list[dict] | None = None  # with --workers: each worker's pid, threads and peak memory


def search(settings: SearchSettings) -> SearchResult:
    """A plan removing layers or halves: greedy by calibration perplexity (resumable), or one-shot by a metric."""
    from .corpora import read_text
    from .search import Budget, resumable_state, state_record

    info = settings.model.inspect()
    settings.check(info)
    if settings.kv is not None:
        return _search_kv(settings, info)
    remove = settings.removals(info.num_layers)
    calibration = read_text(settings.text)
    budget = Budget(remove, settings.target_speedup)
    provenance = {"model": info.fingerprint}
    if settings.resume and settings.state and Path(settings.state).exists():  # refuse another run's state now
        resumable_state(settings.state, state_record(calibration, budget, settings.granularity, None, settings.ctx,
                                                     settings.windows, settings.keep, provenance=provenance))
    check_windows(settings.model, [("--text", settings.text, settings.ctx)])
    options = dict(ctx=settings.ctx, windows=settings.windows, keep=settings.keep, state_path=settings.state,
                   resume=settings.resume, provenance=provenance)
    with peak_memory(settings.model) as peak:  # the peak is known once the block is left
        found = _search(settings, info, calibration, budget, remove, options)
    found.peak_memory_mb = peak.peak_mb
    return found


def _search(settings: SearchSettings, info: ModelInfo, calibration: str, budget, remove: int,
            options: dict) -> SearchResult:
    """The search itself: on Ray workers, streamed one-shot scores, or the whole model here."""
    from .metrics.similarity import similarity
    from .search import greedy, one_shot

    if settings.parallel.parallel:  # the workers hold the weights; this process only their structure
        from .parallel import WorkerPool, structure_model

        with WorkerPool(settings.model, settings.parallel) as pool:
            state = greedy(structure_model(settings.model), settings.model.tokenizer(), calibration, budget,
                           settings.granularity, pool=pool, **options)
            workers = pool.memory()
        return SearchResult(Plan.from_dict(state.plan, info.num_layers), state, workers=workers)
    if settings.streamed:
        scores = _similarity_streamed(settings.model, calibration, None, settings.ctx, settings.windows)
        return SearchResult(one_shot(scores, settings.method, remove, settings.granularity), None)
    model, tokenizer = settings.model.load()
    if settings.method == "greedy":
        state = greedy(model, tokenizer, calibration, budget, settings.granularity, **options)
        return SearchResult(Plan.from_dict(state.plan, info.num_layers), state)
    scores = similarity(model, tokenizer, calibration, ctx=settings.ctx, windows=settings.windows)
    return SearchResult(one_shot(scores, settings.method, remove, settings.granularity), None)


def _search_kv(settings: SearchSettings, info: ModelInfo) -> SearchResult:
    """A KV-sharing map on top of the start plan (KVSharer-style, resumable); its plan carries the map."""
    from .corpora import read_text
    from .kv_search import kv_state_record, search_kv
    from .search import resumable_state

    start = load_plan(info, settings.start) if settings.start else None
    if start is not None and (start.kv or len(set(start.layers)) < len(start.steps)):
        raise PlanError("--start must be a plan without a kv: clause that runs each layer at most once")
    calibration = read_text(settings.text)
    provenance = {"model": info.fingerprint}
    if settings.resume and settings.state and Path(settings.state).exists():  # refuse another run's state now
        record = kv_state_record(calibration, settings.kv, start or Plan.identity(info.num_layers), provenance)
        resumable_state(settings.state, record)
    check_windows(settings.model, [("--text", settings.text, settings.kv.ctx)])
    with peak_memory(settings.model) as peak:
        model, tokenizer = settings.model.load()
        state = search_kv(model, tokenizer, calibration, settings.kv, start, state_path=settings.state,
                          resume=settings.resume, provenance=provenance)
    return SearchResult(Plan.from_dict(state.plan, info.num_layers), state, peak.peak_mb)


# ------------------------------------------------------------------------------------------ heal
@dataclass
class HealOutcome:
    plan: Plan
    result: object  # heal.HealResult (lora), recover.Recovery (the other methods)
    perplexities: list[tuple[str, int, float]]  # (model, layers, perplexity) on the held-out text
    peak_memory_mb: float | None = None


def heal(job: HealJob) -> HealOutcome:
    """Recover a pruned model (`job.method`), measure held-out perplexity before and after, write the model."""
    from .corpora import read_text

    info = job.model.inspect()
    job.check(info)
    plan = load_plan(info, job.plan)
    held_out = read_text(job.eval_text) if job.eval_windows else None
    check_windows(job.model, job.recovery().calibration_needs() +
                  ([("--eval-text", job.eval_text, 512)] if held_out is not None else []))
    with peak_memory(job.model) as peak:
        result, rows = _heal_and_save(job, info, plan, held_out)
    return HealOutcome(plan, result, rows, peak.peak_mb)


def _heal_and_save(job: HealJob, info: ModelInfo, plan: Plan, held_out: str | None) -> tuple[object, list]:
    """Load, measure the held-out perplexity before, recover, measure after, write the model."""
    from .heal import checkpoint_folder
    from .runtime import apply_plan

    model, tokenizer = job.model.load()
    rows = []
    if held_out is not None:
        chosen = [("original", Plan.identity(plan.num_layers))] if not plan.is_identity else []
        for name, p in [*chosen, ("pruned" if chosen else "before", plan)]:
            with apply_plan(model, p):
                rows.append((name, len(p.steps), _perplexity(model, tokenizer, held_out, job.eval_windows)))
    checkpoints = checkpoint_folder(job.out)
    result = _run_recovery(job, model, tokenizer, plan, checkpoints, {"model": info.fingerprint})
    if held_out is not None:
        rows.append(("healed", len(plan.steps), _perplexity(result.model, tokenizer, held_out, job.eval_windows)))
    if job.method == "lora":
        from .heal import save_healed

        save_healed(result, tokenizer, job.out, job.force)
    else:
        from .recover import save_recovered

        save_recovered(result, tokenizer, job.out, job.force)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result, rows


def _run_recovery(job: HealJob, model, tokenizer, plan: Plan, checkpoints: Path, provenance: dict):
    """LoRA on the one --data text (with its adapter kept apart), or any other method through `recover`."""
    if job.method == "lora":
        from .corpora import read_text
        from .heal import heal as run_heal

        return run_heal(model, tokenizer, read_text(job.data), plan, job.training, checkpoint_dir=checkpoints,
                        resume=job.resume, provenance=provenance)
    from .recover import recover

    return recover(model, tokenizer, plan, job.recovery(), checkpoint_dir=checkpoints, resume=job.resume,
                   provenance=provenance)


def _perplexity(model, tokenizer, text: str, windows: int) -> float:
    """Held-out perplexity over `windows` windows of 512 tokens."""
    from .evaluate.perplexity import perplexity

    return perplexity(model, tokenizer, text, ctx=512, max_windows=windows, progress=False).perplexity


# ------------------------------------------------------------------------------------------ speculate
@dataclass
class SpeculateOutcome:
    plan: Plan
    num_layers: int
    text: str  # the continuation of the prompt
    result: object  # speculative.SpeculativeResult
    draft_search: object | None  # draft_search.DraftSearch when the plan was searched
    peak_memory_mb: float | None = None


def speculate(settings: SpeculateSettings) -> SpeculateOutcome:
    """Self-speculative decoding with a given or searched draft plan; the plain decoding speed timed too."""
    from .corpora import read_text
    from .draft_search import search_draft_plan
    from .speculative import compare_with_plain

    settings.check()
    info = settings.model.inspect()
    plan = None if settings.draft_plan == "auto" else Plan.load(settings.draft_plan, info.num_layers)
    found = None
    search = dict(max_new_tokens=24, settings=settings.decoding)
    if plan is None and settings.parallel.parallel:  # the candidates on Ray workers, closed before decoding here
        from .parallel import WorkerPool, structure_model

        with WorkerPool(settings.model, settings.parallel) as pool:
            found = search_draft_plan(structure_model(settings.model), settings.model.tokenizer(), [settings.prompt],
                                      read_text(settings.search_text), pool=pool, **search)
        plan = found.best.plan
    with peak_memory(settings.model) as peak:
        model, tokenizer = settings.model.load()
        if plan is None:
            found = search_draft_plan(model, tokenizer, [settings.prompt], read_text(settings.search_text), **search)
            plan = found.best.plan
        ids = tokenizer(settings.prompt, return_tensors="pt")["input_ids"].to(model.device)
        result = compare_with_plain(model, ids, plan, settings.max_new_tokens, settings.decoding)
        text = tokenizer.decode(result.ids[0, ids.shape[1]:], skip_special_tokens=True)
    return SpeculateOutcome(plan, info.num_layers, text, result, found, peak.peak_mb)


# ------------------------------------------------------------------------------------------ export
def export(settings: ExportSettings):
    """A physically smaller model in the source's format and quantization (or the asked ones), with its model
    card; every check (format, quant, plan, output) runs before the model loads. Returns the `ExportResult`."""
    from .export import export as run_export
    from .export import prepare_export

    info = settings.model.inspect()
    settings.check(info)
    plan = load_plan(info, settings.plan)  # a bad plan fails before the export loads anything
    target = prepare_export(settings, plan, inputs=info.input_paths + plan_inputs((settings.plan,)))
    with peak_memory(settings.model) as peak:
        result = run_export(settings, plan, target)
    return replace(result, peak_memory_mb=peak.peak_mb)

