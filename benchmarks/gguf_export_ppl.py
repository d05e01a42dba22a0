"""Pruned GGUF fidelity: llama.cpp's perplexity of the pruned file against layerlab's for the same plan.

For each embedded model a whole-layer plan is written out as a pruned GGUF (`prune_gguf`), llama.cpp
(llama-cpp-python) computes its perplexity as its `perplexity` tool does, and layerlab computes the
perplexity of the same plan applied at run time on the source, scoring the same tokens. They must
agree within 2 %.

    python benchmarks/gguf_export_ppl.py [--chunks 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ppl_vs_llamacpp import llama_cpp_perplexity

import layerlab
from layerlab import Plan, apply_plan
from layerlab.corpora import read_text
from layerlab.evaluate.perplexity import perplexity
from layerlab.export.gguf import prune_gguf
from layerlab.models import EMBEDDED

# smollm2: the 6 layers with the lowest Block Influence on wikitext2-valid (`layerlab score`); dropping
# the last layers before the final one instead (skip:23-28) breaks the model (perplexity ~5e7).
# gemma3: a whole group of 6, so llama.cpp's index-derived global layers stay where they were.
PLANS = {"smollm2-135m": "skip:3,12-15,25", "gemma3-270m": "skip:6-11"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=list(PLANS), choices=list(PLANS))
    args = parser.parse_args()
    text = read_text("wikitext2-test")
    print(f"wikitext2-test, ctx {args.ctx}, first {args.chunks} chunks, second half of each chunk scored")
    for name in args.models:
        plan_text = PLANS[name]
        model, tokenizer = layerlab.load(name)
        plan = Plan.parse(plan_text, model.config.num_hidden_layers)
        with tempfile.TemporaryDirectory() as folder:
            pruned = prune_gguf(EMBEDDED[name].locate(), plan, Path(folder) / "pruned.gguf")
            reference, _, _ = llama_cpp_perplexity(str(pruned), text, args.ctx, args.chunks)
        with apply_plan(model, plan):
            ours = perplexity(model, tokenizer, text, ctx=args.ctx, llama_cpp=True, max_windows=args.chunks)
        gap = abs(ours.perplexity - reference) / reference
        print(f"  {name:<13} plan {plan_text:<10} llama.cpp (pruned GGUF) {reference:9.3f}   "
              f"layerlab (plan) {ours.perplexity:9.3f}   difference {gap:.2%}  (must be <= 2%)")
        del model


if __name__ == "__main__":
    main()
