"""Self-speculative decoding: the model drafts with a cheap layer plan and verifies with all its layers.

Draft & Verify (Zhang et al. 2023) without a second model. One KV cache, the full model's, holds
exactly the verified tokens except the last one, `pending`, whose choice is known but which no full
forward has seen yet. A cycle:

1. draft: the draft plan runs token by token from `pending` on a view of the full cache in which
   each draft step uses the slot of its source layer (`runtime.source_slot_cache`), so it reads the
   full model's keys and values; it stops at `max_draft` tokens or once it is unsure (top
   probability below `min_confidence`, or top-1/top-2 ratio below `min_ratio`);
2. verify: the cache is cut back to the verified tokens (the draft's entries are discarded), the
   full model runs once on `[pending, d1..dk]`, the longest agreeing prefix is accepted (greedy) or
   each draft token is accepted with probability min(1, p/q) and a rejection resamples from
   norm(max(p - q, 0)) (Leviathan et al. 2023, exact in distribution); the cache is cut to the
   accepted tokens, which are therefore never recomputed, and the full model's next token becomes
   the new `pending`.
The prompt is processed by the full model only. Output equals plain decoding of the full model
(greedy: token for token); the only effect is speed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .errors import LayerlabError
from .evaluate.speed import prefill_decode_seconds
from .plan import Plan
from .runtime import AppliedPlan, apply_plan, current_plan, source_slot_cache
from .settings import SpeculativeSettings


@dataclass
class SpeculativeStats:
    """Counts and seconds of one run; `plain_seconds_per_token` is set when plain decoding was timed too."""

    new_tokens: int = 0
    verifications: int = 0
    draft_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    plain_seconds_per_token: float | None = None

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed draft tokens that the full model accepted."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens gained per full forward after the prompt (plain decoding gains 1)."""
        return (self.new_tokens - 1) / self.verifications if self.verifications else 1.0

    @property
    def draft_steps_per_verification(self) -> float:
        return self.draft_steps / self.verifications if self.verifications else 0.0

    @property
    def full_step_seconds(self) -> float:
        """One plain decoding step: timed when available, else a verification (which also scores drafts)."""
        if self.plain_seconds_per_token is not None:
            return self.plain_seconds_per_token
        return self.verify_seconds / max(self.verifications, 1)

    @property
    def cost_ratio(self) -> float:
        """Seconds of one draft step over one full decoding step."""
        return self.draft_seconds / max(self.draft_steps, 1) / self.full_step_seconds

    @property
    def predicted_speedup(self) -> float:
        """Leviathan et al.'s estimate from the measured tokens per verification, draft steps and cost ratio."""
        return predicted_speedup(self.tokens_per_verification, self.draft_steps_per_verification, self.cost_ratio)

    @property
    def measured_speedup(self) -> float | None:
        """Plain decoding seconds over speculative decoding seconds for the same tokens (prompt excluded)."""
        if self.plain_seconds_per_token is None:
            return None
        return self.plain_seconds_per_token * (self.new_tokens - 1) / (self.draft_seconds + self.verify_seconds)

    @classmethod
    def combined(cls, runs: list[SpeculativeStats]) -> SpeculativeStats:
        """Several runs as one: counts and seconds add up (the plain step time is the first one set)."""
        total = cls()
        for run in runs:
            for name in ("new_tokens", "verifications", "draft_steps", "proposed", "accepted", "prefill_seconds",
                         "draft_seconds", "verify_seconds"):
                setattr(total, name, getattr(total, name) + getattr(run, name))
        total.new_tokens -= len(runs) - 1  # each run's first token comes from its prompt: keep one
        total.plain_seconds_per_token = next((r.plain_seconds_per_token for r in runs
                                              if r.plain_seconds_per_token is not None), None)
        return total

    def to_dict(self) -> dict:
        names = ("acceptance_rate", "tokens_per_verification", "draft_steps_per_verification", "cost_ratio",
                 "predicted_speedup", "measured_speedup")
        return asdict(self) | {name: getattr(self, name) for name in names}


@dataclass
class SpeculativeResult:
    ids: torch.Tensor  # (1, prompt + new tokens)
    stats: SpeculativeStats


def expected_tokens(acceptance: float, draft_length: float) -> float:
    """Tokens per verification when each of `draft_length` drafts is accepted with probability `acceptance`."""
    if acceptance >= 1:
        return draft_length + 1
    return (1 - acceptance ** (draft_length + 1)) / (1 - acceptance)


def predicted_speedup(tokens_per_verification: float, draft_steps: float, cost_ratio: float) -> float:
    """Speed over plain decoding when a cycle costs `draft_steps * cost_ratio + 1` full steps."""
    return tokens_per_verification / (draft_steps * cost_ratio + 1)


def required_acceptance(draft_length: float, cost_ratio: float) -> float | None:
    """The per-token acceptance at which drafting `draft_length` tokens breaks even; None if none can."""
    if draft_length <= 0 or cost_ratio >= 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):  # expected_tokens grows with the acceptance: bisect
        middle = (low + high) / 2
        low, high = (middle, high) if predicted_speedup(expected_tokens(middle, draft_length), draft_length,
                                                        cost_ratio) < 1 else (low, middle)
    return high


class _Decoder:
    """One speculative run: the shared cache, the draft plan (built once, toggled), the statistics."""

    def __init__(self, model, draft_plan: Plan, settings: SpeculativeSettings) -> None:
        if current_plan(model) is not None:
            raise LayerlabError("restore the plan applied to the model first: the full model verifies the draft")
        self.model = model
        self.settings = settings
        self.draft_plan = draft_plan
        self.draft: AppliedPlan = apply_plan(model, draft_plan)
        self.draft.restore()
        self.cache = DynamicCache(config=model.config)
        self.cache.activate_past_recording()  # sliding-window layers keep what a rollback needs
        self.length = 0  # tokens in the cache: the verified ones except `pending`
        self.generator = torch.Generator(model.device).manual_seed(settings.seed)
        self.stats = SpeculativeStats()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        temperature = self.settings.temperature if self.settings.sample else 1.0
        return torch.softmax(logits.float() / temperature, dim=-1)

    def pick(self, probs: torch.Tensor) -> int:
        if self.settings.sample:
            return int(torch.multinomial(probs, 1, generator=self.generator))
        return int(probs.argmax())

    def unsure(self, probs: torch.Tensor) -> bool:
        top = probs.topk(2).values
        return bool(top[0] < self.settings.min_confidence or top[0] < self.settings.min_ratio * top[1])

    def forward(self, ids: list[int], cache) -> torch.Tensor:
        tensor = torch.tensor([ids], device=self.model.device)
        return self.model(tensor, past_key_values=cache, use_cache=True).logits[0]

    def prefill(self, prompt: list[int]) -> int:
        """The full model reads the prompt; its next token is the first `pending`."""
        start = time.perf_counter()
        token = self.pick(self.probabilities(self.forward(prompt, self.cache)[-1]))
        self.length = len(prompt)
        self.stats.prefill_seconds = time.perf_counter() - start
        return token

    def draft_tokens(self, pending: int, limit: int) -> tuple[list[int], list[torch.Tensor]]:
        """Up to `limit` draft tokens after `pending`, with the draft's distributions."""
        start = time.perf_counter()
        view = source_slot_cache(self.cache, self.draft_plan)
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        with self.draft.reapply():
            while len(tokens) < limit:
                probs = self.probabilities(self.forward([tokens[-1] if tokens else pending], view)[-1])
                tokens.append(self.pick(probs))
                dists.append(probs)
                if self.unsure(probs):
                    break
        self.stats.draft_steps += len(tokens)
        self.stats.draft_seconds += time.perf_counter() - start
        return tokens, dists

    def verify(self, pending: int, drafts: list[int], dists: list[torch.Tensor]) -> list[int]:
        """One full forward over `[pending, *drafts]`; the accepted drafts and the full model's next token."""
        start = time.perf_counter()
        truncate(self.cache, self.length)
        probs = self.probabilities(self.forward([pending, *drafts], self.cache))
        accepted = self.accept(drafts, dists, probs)
        self.length += 1 + len(accepted)
        truncate(self.cache, self.length)
        token = self.pick(probs[len(accepted)]) if len(accepted) == len(drafts) else self.correct(
            probs[len(accepted)], dists[len(accepted)])
        self.stats.verifications += 1
        self.stats.proposed += len(drafts)
        self.stats.accepted += len(accepted)
        self.stats.verify_seconds += time.perf_counter() - start
        return [*accepted, token]

    def accept(self, drafts: list[int], dists: list[torch.Tensor], probs: torch.Tensor) -> list[int]:
        """The accepted prefix: argmax agreement (greedy), or accepted with probability min(1, p/q)."""
        accepted = []
        for i, token in enumerate(drafts):
            if self.settings.sample:
                ratio = probs[i, token] / dists[i][token]
                keep = bool(torch.rand((), generator=self.generator, device=probs.device) < ratio)
            else:
                keep = token == int(probs[i].argmax())
            if not keep:
                break
            accepted.append(token)
        return accepted

    def correct(self, probs: torch.Tensor, draft_probs: torch.Tensor) -> int:
        """The token after a rejection: the full model's argmax, or a sample from norm(max(p - q, 0))."""
        if not self.settings.sample:
            return int(probs.argmax())
        residual = (probs - draft_probs).clamp(min=0)
        return self.pick(residual / residual.sum() if residual.sum() > 0 else probs)


def truncate(cache, length: int) -> None:
    """Cut every cache layer back to `length` tokens (layers a draft skipped may already be there)."""
    for layer in cache.layers:
        layer.crop(-(layer.get_seq_length() - length))


@torch.inference_mode()
def speculative_generate(model, input_ids: torch.Tensor, draft_plan: Plan, max_new_tokens: int,
                         settings: SpeculativeSettings | None = None,
                         eos_token_id: int | None = None) -> SpeculativeResult:
    """Decode `max_new_tokens` (fewer after `eos_token_id`) exactly as the full model would; draft with `draft_plan`."""
    settings = settings or SpeculativeSettings()
    if input_ids.shape[0] != 1:
        raise LayerlabError(f"speculative decoding takes one sequence at a time, got a batch of {input_ids.shape[0]}")
    decoder = _Decoder(model, draft_plan, settings)
    new = [decoder.prefill(input_ids[0].tolist())]
    while len(new) < max_new_tokens and new[-1] != eos_token_id:
        drafts, dists = decoder.draft_tokens(new[-1], min(settings.max_draft, max_new_tokens - len(new) - 1))
        new += decoder.verify(new[-1], drafts, dists)
    if eos_token_id in new:
        new = new[: new.index(eos_token_id) + 1]
    decoder.stats.new_tokens = len(new)
    ids = torch.cat([input_ids, torch.tensor([new], device=input_ids.device)], dim=1)
    return SpeculativeResult(ids, decoder.stats)


def compare_with_plain(model, input_ids: torch.Tensor, draft_plan: Plan, max_new_tokens: int,
                       settings: SpeculativeSettings | None = None) -> SpeculativeResult:
    """A speculative run whose stats also hold the measured plain decoding step (for the measured speedup)."""
    result = speculative_generate(model, input_ids, draft_plan, max_new_tokens, settings)
    decode_tokens = max(result.stats.new_tokens - 1, 1)
    _, seconds = prefill_decode_seconds(model, input_ids, decode_tokens)
    result.stats.plain_seconds_per_token = seconds / decode_tokens
    return result


def break_even_summary(stats: SpeculativeStats) -> str:
    """One line: whether drafting wins, and if not what acceptance would at the measured cost ratio."""
    speedup = stats.predicted_speedup
    if speedup >= 1:
        return f"wins: predicted {speedup:.2f}x, beats plain decoding"
    needed = required_acceptance(max(stats.draft_steps_per_verification, 1.0), stats.cost_ratio)
    need = f"an acceptance of {needed:.2f}" if needed is not None else "a cheaper draft (cost ratio below 1)"
    return (f"no win: predicted {speedup:.2f}x (acceptance {stats.acceptance_rate:.2f} at cost ratio "
            f"{stats.cost_ratio:.2f}); breaking even needs {need} at this cost ratio, or a cost ratio below "
            f"{_break_even_cost(stats):.2f} at this acceptance")


def _break_even_cost(stats: SpeculativeStats) -> float:
    """The draft cost ratio at which the measured tokens per verification would break even."""
    return max(stats.tokens_per_verification - 1, 0.0) / max(stats.draft_steps_per_verification, 1.0)
