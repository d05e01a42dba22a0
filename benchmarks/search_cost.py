"""Cost of the greedy perplexity search: naive versus prefix reuse (+ early abort), in one run.

Both searches run on the same model and calibration windows; they must return the same plan. Printed:
layer forwards (deterministic) and wall time of each (two runs each, in ABBA order), and their ratios
(reuse / naive).

    python benchmarks/search_cost.py [--model smollm2-135m] [--remove 4] [--granularity layer] [--ctx 128]
                                     [--windows 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import layerlab
from layerlab.corpora import read_text
from layerlab.search import Budget, greedy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--granularity", default="layer", choices=["layer", "attn", "mlp", "sublayer"])
    parser.add_argument("--text", default="wikitext2-valid")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, tokenizer = layerlab.load(args.model, device=args.device)
    text = read_text(args.text)
    runs: dict[str, tuple] = {}
    for name, reuse in (("naive", False), ("reuse+abort", True), ("reuse+abort", True), ("naive", False)):
        start = time.perf_counter()  # ABBA order: a drift in machine load hits both alike
        state = greedy(model, tokenizer, text, Budget(remove=args.remove), args.granularity, ctx=args.ctx,
                       windows=args.windows, reuse=reuse, abort=reuse, progress=False)
        runs[name] = (state, runs.get(name, (None, 0.0))[1] + time.perf_counter() - start)
    (naive, naive_s), (fast, fast_s) = runs["naive"], runs["reuse+abort"]
    print(f"{args.model}: greedy search removing {args.remove} ({args.granularity}), {args.windows} windows of "
          f"{args.ctx} tokens of {args.text}, device {args.device}")
    for name, (state, seconds) in runs.items():
        removed = ", ".join(t["removed"] for t in state.trace)
        print(f"  {name:12s} layer forwards {state.layer_forwards:6d}  {seconds:7.1f} s  removed {removed}  "
              f"ppl {state.trace[-1]['perplexity']:.3f}")
    print(f"  same plan: {fast.plan == naive.plan}")
    print(f"  reuse / naive: layer forwards {fast.layer_forwards / naive.layer_forwards:.3f} (must be <= 0.6), "
          f"time {fast_s / naive_s:.3f}")


if __name__ == "__main__":
    main()
