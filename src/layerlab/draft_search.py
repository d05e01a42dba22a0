"""Choosing a draft plan for self-speculative decoding by predicted speedup, not by quality alone.

Candidates come from one similarity pass over calibration text: the k steps of lowest Block
Influence (whole layers) and the 2k attention / MLP halves of lowest LLM-Drop cosine (sublayers),
for k at several shares of the depth. Each candidate drafts on a few prompts; its acceptance,
tokens per verification and draft steps per verification are measured, and the cost ratio is
TIMED: seconds per draft step over seconds per plain decoding step (timed once, side by side).
The predicted speedup (Leviathan et al.) ranks them. When none beats 1.0 the report says by how
much, and what acceptance the best cost ratio would need.

With a worker pool (`parallel.WorkerPool`) the scores come from one worker and each candidate is one
task: its counts (acceptance, tokens and draft steps per verification) are the serial run's exactly;
its seconds are timed on its worker, the plain decoding too (right before the candidate), so each
cost ratio compares two timings taken under the same load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .evaluate.speed import prefill_decode_seconds
from .metrics.similarity import similarity
from .plan import Plan
from .search import one_shot
from .speculative import (
    SpeculativeSettings,
    SpeculativeStats,
    break_even_summary,
    required_acceptance,
    speculative_generate,
)

SHARES = (0.2, 0.35, 0.5, 0.65)  # of the steps a candidate removes


@dataclass(frozen=True)
class DraftCandidate:
    plan: Plan
    kind: str  # "layers" or "sublayers"
    stats: SpeculativeStats

    @property
    def predicted_speedup(self) -> float:
        return self.stats.predicted_speedup

    @property
    def needed_acceptance(self) -> float | None:
        """The acceptance at which this plan's cost ratio and draft length would break even."""
        return required_acceptance(max(self.stats.draft_steps_per_verification, 1.0), self.stats.cost_ratio)


@dataclass(frozen=True)
class DraftSearch:
    ranking: list[DraftCandidate]  # best predicted speedup first
    plain_seconds_per_token: float

    @property
    def best(self) -> DraftCandidate:
        return self.ranking[0]

    @property
    def wins(self) -> bool:
        return self.best.predicted_speedup > 1.0

    def summary(self) -> str:
        """One line: the best plan and whether it beats plain decoding, or what a win would need."""
        return f"best draft plan {self.best.plan} ({self.best.kind}): {break_even_summary(self.best.stats)}"


def draft_candidates(model, tokenizer, text: str, ctx: int = 256, windows: int = 4,
                     shares: tuple[float, ...] = SHARES, pool=None) -> list[tuple[Plan, str]]:
    """Whole-layer (Block Influence) and sublayer (LLM-Drop cosine) skips at several depths, deduplicated.

    With `pool` the scores are computed on a worker (`model` may then be weightless: only its config is read)."""
    if pool is None:
        scores = similarity(model, tokenizer, text, ctx=ctx, windows=windows, progress=False)
    else:
        from . import parallel

        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        scores = parallel.similarity(pool, text, ctx, windows, n_layers)
    steps = len(scores.plan.steps)
    out: list[tuple[Plan, str]] = []
    for share in shares:
        remove = max(1, min(round(share * steps), steps - 1))
        for plan, kind in ((one_shot(scores, "bi", remove), "layers"),
                           (one_shot(scores, "cosine", 2 * remove, "sublayer"), "sublayers")):
            if any(s.attention for s in plan.steps) and plan not in [p for p, _ in out]:
                out.append((plan, kind))
    return out


@torch.inference_mode()
def search_draft_plan(model, tokenizer, prompts: list[str], text: str, max_new_tokens: int = 32,
                      settings: SpeculativeSettings | None = None, ctx: int = 256, windows: int = 4,
                      shares: tuple[float, ...] = SHARES, pool=None) -> DraftSearch:
    """Rank draft plans by the speedup their measured acceptance and timed cost ratio predict.

    With `pool` the candidates are measured on its workers (see the module docstring); `model` may be
    the weightless `parallel.structure_model`."""
    candidates = draft_candidates(model, tokenizer, text, ctx, windows, shares, pool)
    if pool is None:
        encoded = encode(tokenizer, prompts, model.device)
        plain = plain_seconds_per_token(model, encoded, max_new_tokens)
        measured = [draft_stats(model, encoded, plan, max_new_tokens, settings, plain) for plan, _ in candidates]
    else:
        from . import parallel

        decoding = asdict(settings or SpeculativeSettings())
        calls = [parallel.task("draft", plan.to_text(), list(prompts), max_new_tokens, decoding)
                 for plan, _ in candidates]
        measured = [SpeculativeStats(**stats) for stats in pool.run(calls, "draft plans")]
        plain = sum(s.plain_seconds_per_token for s in measured) / len(measured)
    ranking = [DraftCandidate(plan, kind, stats) for (plan, kind), stats in zip(candidates, measured, strict=True)]
    ranking.sort(key=lambda c: -c.predicted_speedup)
    return DraftSearch(ranking, plain)


def encode(tokenizer, prompts: list[str], device) -> list[torch.Tensor]:
    """Each prompt's token ids, on the model's device."""
    return [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]


@torch.inference_mode()
def draft_stats(model, encoded: list[torch.Tensor], plan: Plan, max_new_tokens: int,
                settings: SpeculativeSettings | None, plain: float) -> SpeculativeStats:
    """One draft plan's speculative runs on every prompt, as one set of statistics against `plain` s/token."""
    runs = [speculative_generate(model, ids, plan, max_new_tokens, settings).stats for ids in encoded]
    stats = SpeculativeStats.combined(runs)
    stats.plain_seconds_per_token = plain
    return stats


@torch.inference_mode()
def plain_seconds_per_token(model, encoded: list[torch.Tensor], tokens: int) -> float:
    """Seconds per plain greedy decoding step, over the same prompts (after one warm-up)."""
    prefill_decode_seconds(model, encoded[0], 2)
    seconds = sum(prefill_decode_seconds(model, ids, tokens)[1] for ids in encoded)
    return seconds / (tokens * len(encoded))
