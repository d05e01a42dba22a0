"""Decode speed of a skip plan against a physically truncated copy and the full model, side by side.

The three variants are timed in interleaved rounds (the order rotates every round) so that machine
noise hits them alike; the medians, their ratios and the median of per-round ratios are printed.
The plan must not be slower than the truncated copy: `plan / truncated >= 0.98`.

    python benchmarks/plan_overhead.py [--model smollm2-135m] [--plan skip:20-25] [--tokens 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import DynamicCache

import layerlab
from layerlab.export.hf import materialize


@torch.inference_mode()
def decode_tokens_per_second(model, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy decoding with the KV cache, one token per forward; the prompt's prefill is not timed."""
    cache = DynamicCache(config=model.config)
    token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", default="skip:20-25")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    model, tokenizer = layerlab.load(args.model)
    plan = layerlab.Plan.parse(args.plan, model.config.num_hidden_layers)
    truncated = materialize(model, plan)
    prompt = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt")["input_ids"]
    variants = {
        "full": (model, contextlib.nullcontext),
        "plan": (model, lambda: layerlab.apply_plan(model, plan)),
        "truncated": (truncated, contextlib.nullcontext),
    }
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.rounds + 1):  # round 0 warms up and is discarded
        order = names[round_index % 3:] + names[: round_index % 3]
        for name in order:
            target, context = variants[name]
            with context():
                speed = decode_tokens_per_second(target, prompt, args.tokens)
            if round_index:
                speeds[name].append(speed)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    paired = statistics.median(p / t for p, t in zip(speeds["plan"], speeds["truncated"], strict=True))

    print(f"model {args.model}, plan {plan} ({len(plan.steps)} of {plan.num_layers} layers), "
          f"{args.tokens} decode tokens x {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    for name in names:
        values = ", ".join(f"{v:.1f}" for v in speeds[name])
        print(f"  {name:<10} median {median[name]:7.1f} tok/s   [{values}]")
    print(f"  ratio plan / truncated = {median['plan'] / median['truncated']:.3f} of medians, "
          f"{paired:.3f} median of per-round ratios   (must be >= 0.98)")
    print(f"  ratio plan / full      = {median['plan'] / median['full']:.3f}")
    print(f"  ratio truncated / full = {median['truncated'] / median['full']:.3f}")


if __name__ == "__main__":
    main()
