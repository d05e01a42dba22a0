"""Self-speculative decoding against plain greedy and Hugging Face assisted generation, side by side.

For each model: the draft-plan search picks a plan (predicted speedup from measured acceptance and
timed cost ratio); then plain greedy `generate`, assisted generation with a physically pruned copy of
that plan as assistant (`materialize`), and layerlab self-speculation with the plan decode the same
prompts in interleaved rounds (round 0 warms up; more rounds, up to --max-rounds, while the per-round
speed-ups disagree; `evaluate/speed.py`). Prints tokens/s (medians), each speed-up over plain greedy as
the median of per-round ratios with its interquartile range (or "unreliable" when the rounds disagree),
whether the output equals plain greedy, acceptance, measured against predicted speedup, and what a win
would need.

    python benchmarks/speculative.py [--models smollm2-135m,gemma3-270m] [--max-new-tokens 64] [--rounds 3]
        [--max-rounds 9] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import layerlab
from layerlab.corpora import read_text
from layerlab.draft_search import search_draft_plan
from layerlab.evaluate.speed import Rounds, compare_speed
from layerlab.export.hf import materialize
from layerlab.speculative import SpeculativeSettings, SpeculativeStats, break_even_summary, speculative_generate

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


def timed(run) -> tuple[float, torch.Tensor, SpeculativeStats | None]:
    start = time.perf_counter()
    ids, stats = run()
    return time.perf_counter() - start, ids, stats


def bench_model(name: str, prompts: list[str], new_tokens: int, rounds: Rounds, settings: SpeculativeSettings,
                device: str, dtype: str) -> None:
    model, tokenizer = layerlab.load(name, dtype=dtype, device=device)
    found = search_draft_plan(model, tokenizer, prompts, read_text("wikitext2-valid"), max_new_tokens=24,
                              settings=settings)
    plan = found.best.plan
    assistant = materialize(model, plan)
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"].to(model.device) for p in prompts]
    # every method decodes exactly `new_tokens` tokens, through an end-of-sequence token too (no EOS
    # suppression, which would change the greedy choice: self-speculation does not stop at EOS either)
    fixed = {"max_new_tokens": new_tokens, "eos_token_id": None, "do_sample": False}

    def plain():
        return [model.generate(ids, **fixed) for ids in encoded], None

    def assisted():
        return [model.generate(ids, assistant_model=assistant, **fixed) for ids in encoded], None

    def self_speculative():
        results = [speculative_generate(model, ids, plan, new_tokens, settings) for ids in encoded]
        return [r.ids for r in results], SpeculativeStats.combined([r.stats for r in results])

    with torch.inference_mode():
        methods = {"plain greedy": plain, "HF assisted (pruned copy)": assisted,
                   "layerlab self-speculative": self_speculative}
        samples, speedups = compare_speed({m: lambda run=run: timed(run) for m, run in methods.items()},
                                          "plain greedy", rounds, {"time": lambda s: s[0]})
    reference = samples["plain greedy"][0][1]
    plain_seconds = statistics.median(s[0] for s in samples["plain greedy"])
    print(f"\n{name}: {len(prompts)} prompts x {new_tokens} tokens, {len(samples['plain greedy'])} interleaved rounds, "
          f"{model.dtype}, torch threads {torch.get_num_threads()}")
    print("  draft-plan search (predicted speedup, acceptance, cost ratio):")
    for candidate in found.ranking:
        stats = candidate.stats
        print(f"    {candidate.plan!s:<45} {candidate.kind:<9} {stats.predicted_speedup:5.2f}x  "
              f"{stats.acceptance_rate:.2f}  {stats.cost_ratio:.2f}")
    print(f"  {found.summary()}")
    for method, values in samples.items():
        seconds = statistics.median(s[0] for s in values)
        same = all(torch.equal(a, b) for a, b in zip(values[0][1], reference, strict=True))
        line = (f"  {method:<28} {len(prompts) * new_tokens / seconds:7.1f} tok/s  "
                f"speed-up {speedups['time'][method].text()} (prompt included)  same tokens as plain greedy: {same}")
        stats = values[-1][2]
        if stats is not None:
            stats.plain_seconds_per_token = plain_seconds / (len(prompts) * new_tokens)  # same rounds, interleaved
            line += (f"\n    acceptance {stats.acceptance_rate:.2f}, tokens/verification "
                     f"{stats.tokens_per_verification:.2f}, predicted x{stats.predicted_speedup:.2f}; "
                     f"{break_even_summary(stats)}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="How many of the built-in prompts.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at least")
    parser.add_argument("--max-rounds", type=int, default=9, help="rounds at most, while the speed-ups disagree")
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 (fast on CPUs with AMX), auto")
    args = parser.parse_args()
    settings = SpeculativeSettings(max_draft=args.max_draft)
    for name in args.models.split(","):
        bench_model(name, PROMPTS[: args.prompts], args.max_new_tokens, Rounds(args.rounds, args.max_rounds), settings,
                    args.device, args.dtype)


if __name__ == "__main__":
    main()
