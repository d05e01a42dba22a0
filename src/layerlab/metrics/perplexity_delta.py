"""Perplexity change when one unit is skipped: the direct measure of what a step or half contributes.

For every step of a plan (the identity plan for "alone", or an existing plan for "on top of it"), the
calibration perplexity with that step removed, or only its attention, or only its MLP, against the
plan's own perplexity. The hook metrics (similarity.py) are cheap proxies of this number; this one
costs a forward pass per unit, run on the search's loss evaluator so that every candidate starts from
the recorded hidden state of the unchanged prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from ..evaluate.perplexity import calibration_windows, scored_tokens
from ..plan import Plan
from ..search import LossEvaluator, candidates

HALVES = ("layer", "attn", "mlp")


@dataclass(frozen=True)
class UnitDelta:
    key: str  # the unit's name in search traces: "12", "12.attn", "12.mlp" ("12@3" for a repeat)
    step: int
    layer: int
    half: str  # "layer" (the whole step), "attn" or "mlp"
    perplexity: float  # calibration perplexity with the unit skipped
    delta: float  # perplexity - the plan's perplexity


@dataclass(frozen=True)
class PerplexityDeltas:
    plan: Plan
    perplexity: float  # the plan's own calibration perplexity
    tokens: int
    units: list[UnitDelta]

    def get(self, step: int, half: str) -> UnitDelta | None:
        return next((u for u in self.units if u.step == step and u.half == half), None)

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_text(), "perplexity": self.perplexity, "tokens": self.tokens,
                "units": [asdict(u) for u in self.units]}


def perplexity_deltas(model, tokenizer, text: str, plan: Plan | None = None, halves: tuple[str, ...] = HALVES,
                      ctx: int = 256, windows: int = 4, progress: bool = True) -> PerplexityDeltas:
    """Skip each unit of `plan` in turn (whole steps and/or halves) and measure the perplexity."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    plan = plan or Plan.identity(n_layers)
    chunks = calibration_windows(tokenizer, text, ctx, windows)
    tokens = scored_tokens(chunks)
    evaluator = LossEvaluator(model, chunks, reuse=True, abort=False)
    base = math.exp(evaluator.record(plan) / tokens)
    options = [(half, c) for half in halves for c in candidates(plan, half)]
    units = []
    for half, candidate in tqdm(options, desc="perplexity deltas", unit="unit", disable=not progress, leave=False):
        ppl = math.exp(evaluator.loss(candidate) / tokens)
        step = candidate.first_change
        units.append(UnitDelta(candidate.key, step, plan.steps[step].layer, half, ppl, ppl - base))
    return PerplexityDeltas(plan, base, tokens, units)
