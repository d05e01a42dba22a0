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
   (`healed.json`) and is what gets exported;
6. export: the chosen plan, recovered, as a Hugging Face folder (`model/`);
7. report: `report.html` (self-contained) and `report.json` (analysis/report.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .corpora import read_text
from .errors import LayerlabError
from .evaluate.compare import EvalSettings, add_deltas, evaluate_plans
from .evaluate.perplexity import perplexity
from .evaluate.speed import parameter_bytes
from .heal import HealSettings
from .io import atomic_write_text
from .metrics.similarity import Similarity, similarity
from .plan import Plan, unique_plans
from .recover import RecoverSettings
from .runtime import apply_plan
from .search import Budget, SearchState, greedy, one_shot

ONE_SHOT_METHODS = ("bi", "angular", "cosine")
QUICK_EVAL = EvalSettings(ppl_windows=8, mc_items=50, max_new_tokens=24, speed_rounds=2)


@dataclass(frozen=True)
class PruneSettings:
    """How much to remove and how carefully; the defaults run in minutes on a laptop CPU for a small model."""

    drop: float | None = 0.2  # share of the units (layers, or halves) to remove
    layers: int | None = None  # or a number of units
    target_speedup: float | None = None  # or remove until the executed parameter bytes shrink this much
    granularity: str = "layer"
    calibration: str = "wikitext2-valid"
    calib_ctx: int = 256
    calib_windows: int = 4
    keep: float = 0.5  # greedy: share of candidates kept each round (llama.cpp-style pruning)
    evaluation: EvalSettings = QUICK_EVAL
    heal: str = "auto"  # a recovery of recover.RECOVERIES: `auto` patches when it lowers the calibration loss
    heal_settings: HealSettings = field(default_factory=HealSettings)  # the training loop of lora and kd
    recovery: RecoverSettings = field(default_factory=RecoverSettings)  # patch, distillation and data settings
    export: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.heal, bool):  # the command line's --heal flag, until it takes a method name
            object.__setattr__(self, "heal", "lora" if self.heal else "none")
        RecoverSettings(method=self.heal)  # an unknown method is refused here

    def budget(self, n_layers: int) -> Budget:
        """The search budget; `drop` is a share of the units of the granularity."""
        if self.target_speedup is not None:
            return Budget(target_speedup=self.target_speedup)
        units = n_layers * (2 if self.granularity == "sublayer" else 1)
        remove = self.layers if self.layers is not None else round((self.drop or 0) * units)
        if not 1 <= remove < units:
            raise LayerlabError(f"the budget removes {remove} of {units} units; ask for between 1 and {units - 1}")
        return Budget(remove=remove)


def prune(model, tokenizer, source: str, out: str | Path, settings: PruneSettings | None = None,
          resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Run the whole job into folder `out` and return the report data (also written as report.json)."""
    from .analysis.report import write_report

    settings = settings or PruneSettings()
    out = _prepare(Path(out), resume, force)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    budget = settings.budget(n_layers)
    calibration = read_text(settings.calibration)
    scores = similarity(model, tokenizer, calibration, ctx=settings.calib_ctx, windows=settings.calib_windows,
                        progress=progress)
    state = greedy(model, tokenizer, calibration, budget, settings.granularity, ctx=settings.calib_ctx,
                   windows=settings.calib_windows, keep=settings.keep, state_path=out / "search.json", resume=True,
                   progress=progress)
    one_shots = _one_shot_candidates(model, tokenizer, calibration, scores, len(state.trace), settings)
    best_one_shot = min(one_shots, key=lambda c: c["perplexity"])
    found = {"greedy": (state.trace[-1]["perplexity"], state.plan_text(n_layers)),
             best_one_shot["method"]: (best_one_shot["perplexity"], best_one_shot["plan"])}
    chosen_by = min(found, key=lambda method: found[method][0])  # calibration perplexity only: no peeking
    chosen = Plan.parse(found[chosen_by][1], n_layers)
    plans = unique_plans([Plan.identity(n_layers)] + [Plan.parse(text, n_layers) for _, text in found.values()])
    plans.sort(key=lambda p: (not p.is_identity, p != chosen))  # baseline, chosen, the other
    evaluation = _cached(out / "eval.json", [p.to_text() for p in plans], lambda: evaluate_plans(
        model, tokenizer, plans, ("ppl", "mc", "samples", "speed"), settings.evaluation))
    healed = _recover_row(model, tokenizer, chosen, out, settings, progress)
    if healed is not None:
        add_deltas([dict(evaluation["rows"][0]), healed])  # against the baseline row
    if settings.export and not (out / "model" / "config.json").is_file():
        from .export.hf import export_hf

        export_hf(model, tokenizer, chosen, out / "model")
    data = {
        "model": source, "settings": _settings_dict(settings), "plan": chosen.to_text(), "chosen_by": chosen_by,
        "greedy_plan": found["greedy"][1], "removed": [t["removed"] for t in state.trace],
        "scores": scores.to_dict(), "search": asdict(state),
        "one_shot": one_shots, "best_one_shot": best_one_shot, "evaluation": evaluation, "healed": healed,
        "recovery": json.loads(recovery.read_text()) if (recovery := out / "recovery.json").is_file() else None,
        "candidates": _candidate_points(model, state, one_shots, n_layers),
        "exported": str(out / "model") if settings.export else None,
    }
    write_report(model, tokenizer, data, scores, out)
    return data


def _prepare(out: Path, resume: bool, force: bool) -> Path:
    """The output folder: new, continued (`resume`) or emptied (`force`); never silently mixed."""
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise LayerlabError(f"{out} already holds a run; pass --resume to continue it or --force to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1), force=True)
    return value


def _recover_row(model, tokenizer, plan: Plan, out: Path, settings: PruneSettings, progress: bool) -> dict | None:
    """Recover the chosen plan (`settings.heal`), write it as the exported model, and evaluate it like the
    other rows; None when nothing was recovered (the record of why is in `recovery.json`)."""
    from .recover import recover, save_recovered

    recovery_settings = replace(settings.recovery, method=settings.heal, training=settings.heal_settings)

    def compute() -> dict:
        recovery = recover(model, tokenizer, plan, recovery_settings, checkpoint_dir=out / "healing.checkpoints",
                           resume=True, progress=progress)
        atomic_write_text(out / "recovery.json", json.dumps(recovery.summary(), indent=1), force=True)
        if recovery.method == "none":
            return {}
        if settings.export:
            save_recovered(recovery, tokenizer, out / "model", force=True)
        n = recovery.model.config.get_text_config(decoder=True).num_hidden_layers
        rows = evaluate_plans(recovery.model, tokenizer, [Plan.identity(n)], ("ppl", "mc", "samples"),
                              settings.evaluation)["rows"]
        losses = recovery.record.get("training", {}).get("losses")
        return rows[0] | {"plan": f"{plan.to_text()} + {recovery.method}", "losses": losses,
                          "reason": recovery.record.get("reason")}

    if settings.heal == "none":
        return None
    return _cached(out / "healed.json", [plan.to_text(), repr(recovery_settings)], compute) or None


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


def _settings_dict(settings: PruneSettings) -> dict:
    data = asdict(settings)
    data["evaluation"]["prompts"] = list(settings.evaluation.prompts)
    return data
