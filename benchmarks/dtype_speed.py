"""float32 against bfloat16 on this machine: forward and decode speed side by side, and what bf16 costs in perplexity.

Both copies of each model are in memory; a 512-token forward (prefill) and a greedy decode are timed in
interleaved rounds (the order rotates, round 0 warms up), and the per-round ratios float32 / bfloat16 are
printed with their spread. Perplexity (ctx 512, WikiText-2 test) is measured in both dtypes on the same windows.
`--dtype auto` picks bfloat16 on a CPU with Intel AMX (`models.parse_dtype`) on the strength of this table.

    python benchmarks/dtype_speed.py [--models smollm2-135m,qwen2.5-1.5b] [--rounds 5] [--tokens 16] [--windows 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import layerlab
from layerlab.corpora import read_text
from layerlab.evaluate.perplexity import perplexity
from layerlab.evaluate.speed import interleaved, prefill_decode_seconds
from layerlab.models import parse_dtype

DTYPES = ("float32", "bfloat16")


def forward_seconds(model, ids: torch.Tensor) -> float:
    """One forward pass over `ids`, timed."""
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    """Median [min, max] of per-round ratios."""
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def measure(name: str, args) -> None:
    """Print one model's speed ratios and perplexities."""
    loaded = {dtype: layerlab.load(name, dtype=dtype) for dtype in DTYPES}
    models, tokenizer = {d: m for d, (m, _) in loaded.items()}, loaded["float32"][1]
    text = read_text("wikitext2-test")
    ids = tokenizer(text[:20000], return_tensors="pt")["input_ids"][:, :512]
    prompt = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt")["input_ids"]
    forward = interleaved({d: (lambda m=m: forward_seconds(m, ids)) for d, m in models.items()}, args.rounds)
    decode = interleaved({d: (lambda m=m: prefill_decode_seconds(m, prompt, args.tokens)[1])
                          for d, m in models.items()}, args.rounds)
    print(f"{name}: {ids.shape[1]}-token forward and {args.tokens}-token greedy decode, {args.rounds} interleaved "
          f"rounds, torch threads {torch.get_num_threads()}; bf16 speed-up = fp32 / bf16 time, median [min, max]")
    for label, samples in (("forward", forward), ("decode", decode)):
        ratios = [f / b for f, b in zip(samples["float32"], samples["bfloat16"], strict=True)]
        times = "  ".join(f"{d} {statistics.median(samples[d]):.2f} s" for d in DTYPES)
        print(f"  {label:8s} {times}  bf16 speed-up {spread(ratios)}")
    ppl = {d: perplexity(m, tokenizer, text, ctx=512, max_windows=args.windows, progress=False)
           for d, m in models.items()}
    paired = [b - f for f, b in zip(ppl["float32"].window_nll, ppl["bfloat16"].window_nll, strict=True)]
    tokens = ppl["float32"].tokens
    print(f"  perplexity on {args.windows} windows: float32 {ppl['float32'].perplexity:.3f}  bfloat16 "
          f"{ppl['bfloat16'].perplexity:.3f}  ({ppl['bfloat16'].perplexity / ppl['float32'].perplexity - 1:+.2%}; "
          f"mean NLL per token, paired by window: {sum(paired) / tokens:+.4f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16, help="greedy decode tokens per round")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows of 512 tokens")
    args = parser.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; --dtype auto here: {parse_dtype('auto', 'cpu')}")
    for name in args.models.split(","):
        measure(name, args)


if __name__ == "__main__":
    main()
