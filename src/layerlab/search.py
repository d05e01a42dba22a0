"""Searching for a plan that removes layers or sublayers under a budget.

- One-shot by a metric (`one_shot`): Block Influence, angular distance (the block of n consecutive
  steps whose input and output are closest, Gromov et al.) or LLM-Drop's sublayer cosine.
- Greedy by perplexity (`greedy`): each round tries removing every remaining unit (a step, or an
  attention / MLP half) on calibration windows and removes the one whose loss is lowest; the
  order changes once units are gone, which is why it is re-scored every round (llama.cpp's
  layer-skip experiment). Speed-ups that keep the result exact:
  * prefix reuse: the current plan's residual stream entering every step is recorded once per round;
    a candidate whose first difference is at step k starts from that state and runs only steps
    k.. (fed as `inputs_embeds`, which these architectures pass straight to the first layer);
  * early abort: windows are scored one by one and a candidate stops once its running loss exceeds
    the best complete candidate of the round (a loss sum only grows, so it cannot win);
  * pruning: after each round only the best `keep` share of the candidates stays in play. Ranking them
    needs every candidate's whole loss, so pruning turns early abort off (with abort, the aborted
    candidates' order was their index order, and pruning kept the lowest-numbered layers).
  The state is saved after every round; `resume=True` continues from it and ends with the same plan
  as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import arch_of, get_path
from .errors import LayerlabError, PlanError, ResumeError
from .evaluate.perplexity import Window, calibration_windows, logits_nll, scored_tokens, window_nll
from .evaluate.speed import parameter_bytes
from .io import PRODUCER, check_resumable, update_file
from .metrics.similarity import Similarity
from .plan import Plan, Step
from .runtime import apply_plan
from .settings import GRANULARITIES, ONE_SHOT_METHODS
from .streams import Recorder, place


@dataclass(frozen=True)
class Candidate:
    key: str  # stable name of the removed unit, e.g. "12" (a step) or "12.attn" / "12.mlp" (a half)
    plan: Plan
    first_change: int  # first step index where the candidate differs from the current plan


def _unit_keys(plan: Plan) -> list[str]:
    """A name per step: its layer, or `layer@step` for a repeated layer (such names change on removal)."""
    layers = plan.layers
    return [f"{s.layer}" if layers.count(s.layer) == 1 else f"{s.layer}@{i}" for i, s in enumerate(plan.steps)]


def candidates(plan: Plan, granularity: str) -> list[Candidate]:
    """Every single-unit removal from `plan` at the given granularity."""
    if granularity not in GRANULARITIES:
        raise PlanError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    out = []
    for k, (step, key) in enumerate(zip(plan.steps, _unit_keys(plan), strict=True)):
        halves = {"layer": [None], "attn": ["attn"], "mlp": ["mlp"], "sublayer": ["attn", "mlp"]}[granularity]
        for half in halves:
            if half == "attn" and not step.attention or half == "mlp" and not step.mlp:
                continue
            replacement = () if half is None else (Step(step.layer, half != "attn" and step.attention,
                                                        half != "mlp" and step.mlp),)
            steps = plan.steps[:k] + tuple(s for s in replacement if s.attention or s.mlp) + plan.steps[k + 1:]
            if steps and any(s.attention for s in steps):
                out.append(Candidate(key if half is None else f"{key}.{half}", Plan(steps, plan.num_layers), k))
    return out


class LossEvaluator:
    """Summed NLL of candidate plans on calibration windows, counting layer forwards."""

    def __init__(self, model, windows: list[Window], reuse: bool = True, abort: bool = True) -> None:
        self.model = model
        self.windows = windows
        self.reuse = reuse and arch_of(model).embeds_are_stream
        self.abort = abort
        self.layer_forwards = 0
        self._prefix: list[list[torch.Tensor]] = []  # per window: the stream entering every step

    @torch.inference_mode()
    def record(self, plan: Plan) -> float:
        """Run the current plan once, keep the stream entering each step, return its loss."""
        self._prefix = []
        total = 0.0
        entering = [place("resid_pre", i) for i in range(len(plan.steps))]
        with apply_plan(self.model, plan), Recorder(self.model, entering) as recorder:
            for window in self.windows:
                total += window_nll(self.model, [window])[0]
                self._prefix.append([recorder[name] for name in entering])
                self.layer_forwards += len(plan.steps)
        return total

    def round(self, options: list[Candidate], desc: str, progress: bool = True) -> dict[str, float]:
        """Every candidate's loss in order, each aborted once it exceeds the best complete loss before it."""
        scores: dict[str, float] = {}
        best = math.inf
        for candidate in tqdm(options, desc=desc, unit="candidate", disable=not progress, leave=False):
            scores[candidate.key] = self.loss(candidate, best)
            best = min(best, scores[candidate.key])
        return scores

    @torch.inference_mode()
    def loss(self, candidate: Candidate, abort_above: float = math.inf) -> float:
        """The candidate's summed NLL, or `inf` once it provably exceeds `abort_above`."""
        suffix = candidate.plan.steps[candidate.first_change:]
        head_only = self.reuse and self._prefix and not suffix  # the last step removed: only the head runs
        from_prefix = self.reuse and self._prefix and any(s.attention for s in suffix)
        runs = Plan(suffix, candidate.plan.num_layers) if from_prefix else candidate.plan
        total = 0.0
        with nullcontext() if head_only else apply_plan(self.model, runs):  # once per candidate, not per window
            for index, window in enumerate(self.windows):
                if head_only:
                    stream = self._prefix[index][-1][:, window.score_from - 1:-1]
                    total += logits_nll(head_logits(self.model, stream), [window], window.score_from)[0]
                else:
                    embeds = self._prefix[index][candidate.first_change] if from_prefix else None
                    total += window_nll(self.model, [window], embeds)[0]
                    self.layer_forwards += len(runs.steps)
                if self.abort and total > abort_above:
                    return math.inf
        return total


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to a residual stream: final norm, output embedding, optional soft-capping."""
    logits = model.get_output_embeddings()(get_path(model, arch_of(model).final_norm)(hidden))
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class SearchState:
    """Everything needed to continue a greedy search after an interruption."""

    plan: dict
    alive: list[str] | None
    ranking: list[str] = field(default_factory=list)  # candidate keys of the last round, best first
    trace: list[dict] = field(default_factory=list)
    layer_forwards: int = 0
    settings: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        update_file(path, json.dumps({"producer": PRODUCER, **asdict(self)}, indent=2))

    def plan_text(self, n_layers: int) -> str:
        return Plan.from_dict(self.plan, n_layers).to_text()

    @classmethod
    def load(cls, path: str | Path) -> SearchState:
        """A saved state; a file that is not one is a one-line error, not a traceback."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            data.pop("producer", None)
            state = cls(**data)
            if not isinstance(state.plan, dict) or not isinstance(state.trace, list):
                raise TypeError("plan or trace has the wrong type")
            return state
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise ResumeError(f"{path} is not a search state layerlab can resume ({type(exc).__name__}: "
                              f"{str(exc)[:80]}); start over with --force or another --state") from None


@dataclass(frozen=True)
class Budget:
    """How much to remove: a number of units, or until the parameter bytes shrink by a factor."""

    remove: int | None = None
    target_speedup: float | None = None

    def done(self, rounds: int, model, plan: Plan, full_bytes: int) -> bool:
        if self.remove is not None:
            return rounds >= self.remove
        with apply_plan(model, plan):
            return full_bytes / parameter_bytes(model) >= self.target_speedup


def state_record(text: str, budget: Budget, granularity: str = "layer", start: Plan | None = None, ctx: int = 256,
                 windows: int = 4, keep: float = 1.0, reuse: bool = True, abort: bool = True,
                 provenance: dict | None = None) -> dict:
    """What a greedy search's state records about the run that produced it (compared on resume)."""
    return {"granularity": granularity, "ctx": ctx, "windows": windows, "keep": keep, "reuse": reuse, "abort": abort,
            **asdict(budget), "start": start.to_text() if start is not None else None,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), **(provenance or {})}


def resumable_state(path: str | Path, record: dict) -> SearchState:
    """The state saved at `path`, if it was written by a run with this `record`; else a one-line error."""
    state = SearchState.load(path)
    check_resumable(state.settings, record, str(path))
    return state


def greedy(model, tokenizer, text: str, budget: Budget, granularity: str = "layer", start: Plan | None = None,
           ctx: int = 256, windows: int = 4, keep: float = 1.0, reuse: bool = True, abort: bool = True,
           state_path: str | Path | None = None, resume: bool = False, max_rounds: int | None = None,
           progress: bool = True, provenance: dict | None = None, pool=None) -> SearchState:
    """Greedy perplexity search (see the module docstring). `max_rounds` stops this call early.

    The state records the settings, the calibration text's hash and `provenance` (the model's
    fingerprint); resuming a state that differs in any of them is an error naming the difference.
    With `pool` (`parallel.WorkerPool`) each round's candidates fan out over its workers, with the same
    result; `model` may then be the weightless `parallel.structure_model`.
    """
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    chunks = calibration_windows(tokenizer, text, ctx, windows)
    if keep < 1 and start is not None and len(set(start.layers)) < len(start.steps):
        raise PlanError("pruning candidates (keep < 1) needs a start plan without repeated layers")
    if start is not None and start.kv:
        raise PlanError("the greedy search removes units from plans without KV sharing; search the layers first, "
                        "then the KV map (kv_search.search_kv)")
    abort = abort and keep >= 1  # pruning ranks the candidates by whole losses: an aborted one has none
    settings = state_record(text, budget, granularity, start, ctx, windows, keep, reuse, abort, provenance)
    if resume and state_path and Path(state_path).exists():
        state = resumable_state(state_path, settings)
    else:
        state = SearchState(Plan.identity(n_layers).to_dict() if start is None else start.to_dict(), None,
                            settings=settings)
    evaluator = pool.evaluator(chunks, reuse, abort) if pool is not None else LossEvaluator(model, chunks, reuse, abort)
    evaluator.layer_forwards = state.layer_forwards
    with apply_plan(model, Plan.identity(n_layers)):
        full_bytes = parameter_bytes(model)
    tokens = scored_tokens(chunks)
    rounds_here = 0
    while not budget.done(len(state.trace), model, Plan.from_dict(state.plan, n_layers), full_bytes):
        if max_rounds is not None and rounds_here >= max_rounds:
            break
        plan = Plan.from_dict(state.plan, n_layers)
        base_loss = evaluator.record(plan) if reuse else math.nan
        options = [c for c in candidates(plan, granularity) if state.alive is None or c.key in state.alive]
        rank = {key: i for i, key in enumerate(state.ranking)}  # last round's best first: more early aborts
        options.sort(key=lambda c: rank.get(c.key, len(rank)))
        if not options and state.alive is not None:
            state.alive = None  # pruning left nothing: put every remaining unit back in play
            continue
        if not options:
            raise LayerlabError("no unit is left to remove; lower the budget")
        scores = evaluator.round(options, f"round {len(state.trace) + 1}", progress)
        chosen = min(options, key=lambda c: (scores[c.key], c.first_change, c.key))  # ties: a fixed order
        ranked = sorted((c.key for c in options if c.key != chosen.key), key=lambda k: scores[k])
        needed = budget.remove - len(state.trace) - 1 if budget.remove is not None else 1
        survivors = ranked[: max(needed, math.ceil(keep * len(ranked)))] if keep < 1 else ranked
        state.alive = survivors if keep < 1 else None
        state.ranking = ranked
        state.plan = chosen.plan.to_dict()
        state.layer_forwards = evaluator.layer_forwards
        state.trace.append({
            "round": len(state.trace) + 1, "removed": chosen.key, "plan": chosen.plan.to_text(),
            "loss": scores[chosen.key], "perplexity": math.exp(scores[chosen.key] / tokens),
            "previous_perplexity": math.exp(base_loss / tokens) if reuse else None,
            "candidates": len(options), "aborted": sum(math.isinf(v) for v in scores.values()),
            "layer_forwards": evaluator.layer_forwards,
        })
        if state_path:
            state.save(state_path)
        rounds_here += 1
    return state


def one_shot(similarity: Similarity, metric: str, remove: int, granularity: str = "layer") -> Plan:
    """Remove the `remove` least important units by a metric of a single scoring pass.

    metric: `bi` (Block Influence, whole steps), `angular` (the block of `remove` consecutive steps
    with the smallest angular distance, Gromov et al.), `cosine` (LLM-Drop: steps by block cosine,
    or attention / MLP halves by their own cosine with granularity attn / mlp / sublayer).
    """
    plan = similarity.plan
    steps = list(plan.steps)
    if metric == "angular":
        starts = [(row[remove - 1], start) for start, row in enumerate(similarity.angular)
                  if remove - 1 < len(row) and row[remove - 1] is not None]
        _, first = min(starts)
        return Plan(tuple(steps[:first] + steps[first + remove:]), plan.num_layers)
    if metric == "bi" or (metric == "cosine" and granularity == "layer"):
        drop = sorted(range(len(steps)), key=lambda i: similarity.block_influence[i])[:remove]
        return Plan(tuple(s for i, s in enumerate(steps) if i not in drop), plan.num_layers)
    if metric != "cosine":
        raise PlanError(f"unknown metric {metric!r}; choose from {', '.join(ONE_SHOT_METHODS)}")
    units = []
    if granularity in ("attn", "sublayer"):
        units += [(v, i, "attn") for i, v in enumerate(similarity.attention_importance) if v is not None]
    if granularity in ("mlp", "sublayer"):
        units += [(v, i, "mlp") for i, v in enumerate(similarity.mlp_importance) if v is not None]
    for _, i, half in sorted(units)[:remove]:
        steps[i] = Step(steps[i].layer, steps[i].attention and half != "attn", steps[i].mlp and half != "mlp")
    return Plan(tuple(s for s in steps if s.attention or s.mlp), plan.num_layers)
