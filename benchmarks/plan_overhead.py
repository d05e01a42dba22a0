"""Decode speed of a skip plan against a physically truncated copy and the full model, side by side.

The three variants are timed in interleaved rounds (the order rotates every round, round 0 warms up)
so that machine noise hits them alike; the medians, their ratios and the median of per-round ratios
are printed. The plan must not be slower than the truncated copy: `plan / truncated >= 0.98`.

    python benchmarks/plan_overhead.py [--model smollm2-135m] [--plan skip:20-25] [--tokens 64] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import layerlab
from layerlab.evaluate.speed import interleaved, prefill_decode_seconds
from layerlab.export.hf import materialize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", default="skip:20-25")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    model, tokenizer = layerlab.load(args.model)
    plan = layerlab.Plan.parse(args.plan, model.config.num_hidden_layers)
    truncated = materialize(model, plan)
    prompt = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt")["input_ids"]

    def planned() -> tuple[float, float]:
        with layerlab.apply_plan(model, plan):
            return prefill_decode_seconds(model, prompt, args.tokens)

    samples = interleaved({
        "full": lambda: prefill_decode_seconds(model, prompt, args.tokens),
        "plan": planned,
        "truncated": lambda: prefill_decode_seconds(truncated, prompt, args.tokens),
    }, args.rounds)
    speeds = {name: [args.tokens / s[1] for s in values] for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in speeds.items()}
    paired = statistics.median(p / t for p, t in zip(speeds["plan"], speeds["truncated"], strict=True))

    print(f"model {args.model}, plan {plan} ({len(plan.steps)} of {plan.num_layers} layers), "
          f"{args.tokens} decode tokens x {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    for name, values in speeds.items():
        print(f"  {name:<10} median {median[name]:7.1f} tok/s   [{', '.join(f'{v:.1f}' for v in values)}]")
    print(f"  ratio plan / truncated = {median['plan'] / median['truncated']:.3f} of medians, "
          f"{paired:.3f} median of per-round ratios   (must be >= 0.98)")
    print(f"  ratio plan / full      = {median['plan'] / median['full']:.3f}")
    print(f"  ratio truncated / full = {median['truncated'] / median['full']:.3f}")


if __name__ == "__main__":
    main()
