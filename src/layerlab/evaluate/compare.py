"""Several plans side by side: perplexity, multiple choice, samples, speed; a baseline row and deltas."""

from __future__ import annotations

from ..corpora import read_choices, read_text
from ..errors import SettingsError
from ..plan import Plan
from ..runtime import apply_plan
from ..settings import EVAL_TASKS as TASKS
from ..settings import EvalSettings
from .multiple_choice import multiple_choice
from .perplexity import perplexity
from .samples import generate
from .speed import measure_plans


def evaluate_plans(model, tokenizer, plans: list[Plan], tasks: tuple[str, ...], settings: EvalSettings) -> dict:
    """Run `tasks` for every plan (the first is the baseline) and return the results as plain data."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SettingsError(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}")
    rows = [{"plan": plan.to_text(), "steps": len(plan.steps)} for plan in plans]
    text = read_text(settings.ppl_text) if "ppl" in tasks else None
    items = read_choices(settings.mc_data, settings.mc_items) if "mc" in tasks else None
    for row, plan in zip(rows, plans, strict=True):
        with apply_plan(model, plan):
            if text is not None:
                row["ppl"] = perplexity(model, tokenizer, text, ctx=settings.ctx, stride=settings.stride,
                                        batch_size=settings.batch_size, max_windows=settings.ppl_windows).to_dict()
            if items is not None:
                row["mc"] = multiple_choice(model, tokenizer, items).to_dict()
        if "samples" in tasks:  # generate() applies the plan itself
            row["samples"] = [{"prompt": p, "text": generate(model, tokenizer, p, plan, settings.max_new_tokens).text}
                              for p in settings.prompts]
    if "speed" in tasks:
        speeds = measure_plans(model, tokenizer, plans, read_text("wikitext2-test")[:20000],
                               settings.speed_prompt_tokens, settings.speed_decode_tokens, settings.speed_rounds)
        for row, speed in zip(rows, speeds, strict=True):
            row["speed"] = speed.to_dict()
    add_deltas(rows)
    return {"settings": settings.__dict__ | {"prompts": list(settings.prompts)}, "tasks": list(tasks), "rows": rows}


def add_deltas(rows: list[dict]) -> None:
    """Differences against the first row (the baseline)."""
    base = rows[0]
    for row in rows:
        delta = {}
        if "ppl" in row:
            delta["ppl_pct"] = 100 * (row["ppl"]["perplexity"] / base["ppl"]["perplexity"] - 1)
        if "mc" in row:
            delta["acc"] = row["mc"]["acc"] - base["mc"]["acc"]
            delta["acc_norm"] = row["mc"]["acc_norm"] - base["mc"]["acc_norm"]
        if "speed" in row:
            delta["decode_speedup"] = row["speed"]["decode_tokens_per_s"] / base["speed"]["decode_tokens_per_s"]
            delta["prefill_speedup"] = row["speed"]["prefill_tokens_per_s"] / base["speed"]["prefill_tokens_per_s"]
        row["delta"] = delta
