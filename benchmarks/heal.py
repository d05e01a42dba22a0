"""Healing on SmolLM2: the original, the pruned and the healed model side by side.

The plan drops 6 layers (default: the 6 lowest Block Influence layers, scored on WikiText-2 valid);
healing is a LoRA fine-tune on *Frankenstein* with `layerlab.heal`'s defaults. Quality is measured
on texts that are not the healing text: perplexity on WikiText-2 test and *Pride and Prejudice*,
and HellaSwag acc / acc_norm.

    python benchmarks/heal.py [--plan skip:...] [--steps 100] [--ppl-windows 20] [--mc-items 200]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from layerlab import Plan, apply_plan, load
from layerlab.corpora import read_choices, read_text
from layerlab.evaluate.multiple_choice import multiple_choice
from layerlab.evaluate.perplexity import perplexity
from layerlab.heal import HealSettings, heal
from layerlab.metrics.similarity import similarity
from layerlab.search import one_shot

EVAL_TEXTS = ("wikitext2-test", "pride-and-prejudice")


def bi_plan(model, tokenizer, remove: int) -> Plan:
    """ShortGPT's one-shot choice: the `remove` layers with the lowest Block Influence on WikiText-2 valid."""
    scores = similarity(model, tokenizer, read_text("wikitext2-valid"), ctx=512, windows=8, progress=False)
    return one_shot(scores, "bi", remove)


def quality(model, tokenizer, ppl_windows: int, mc_items: int) -> dict[str, float]:
    """Perplexity on each evaluation text and HellaSwag accuracy of `model` as it is now."""
    row = {text: perplexity(model, tokenizer, read_text(text), ctx=512, max_windows=ppl_windows).perplexity
           for text in EVAL_TEXTS}
    mc = multiple_choice(model, tokenizer, read_choices("hellaswag-2k", limit=mc_items))
    return row | {"acc": mc.acc, "acc_norm": mc.acc_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", help="Plan to heal (default: drop the --remove lowest Block Influence layers).")
    parser.add_argument("--remove", type=int, default=6)
    parser.add_argument("--data", default="frankenstein", help="Healing text (not one of the evaluation texts).")
    parser.add_argument("--steps", type=int, default=HealSettings.steps)
    parser.add_argument("--lr", type=float, default=HealSettings.lr)
    parser.add_argument("--ctx", type=int, default=HealSettings.ctx)
    parser.add_argument("--batch-size", type=int, default=HealSettings.batch_size)
    parser.add_argument("--ppl-windows", type=int, default=20, help="Windows of 512 tokens per evaluation text.")
    parser.add_argument("--mc-items", type=int, default=200, help="HellaSwag rows.")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.data in EVAL_TEXTS:
        parser.error(f"--data {args.data} is an evaluation text; heal on another text")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    model, tokenizer = load(args.model, device=args.device)
    n = model.config.num_hidden_layers
    plan = Plan.load(args.plan, n) if args.plan else bi_plan(model, tokenizer, args.remove)
    print(f"plan: {plan.to_text()} ({len(plan.steps)} of {n} layers)")
    rows = {}
    for name, chosen in (("original", Plan.identity(n)), ("pruned", plan)):
        with apply_plan(model, chosen):
            rows[name] = quality(model, tokenizer, args.ppl_windows, args.mc_items)
    settings = HealSettings(steps=args.steps, lr=args.lr, ctx=args.ctx, batch_size=args.batch_size)
    result = heal(model, tokenizer, read_text(args.data), plan, settings)
    rows["healed"] = quality(result.model, tokenizer, args.ppl_windows, args.mc_items)
    print(f"healing on {args.data}: {settings.steps} steps of {settings.batch_size} x {settings.ctx} tokens, "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, {result.seconds:.0f} s "
          f"({result.seconds / settings.steps:.2f} s/step)")
    print(f"perplexity: {args.ppl_windows} windows of 512 tokens; HellaSwag: {args.mc_items} rows")
    print(f"{'model':<10}{'layers':>8}" + "".join(f"{t + ' ppl':>26}" for t in EVAL_TEXTS)
          + f"{'acc':>8}{'acc_norm':>10}")
    for name, row in rows.items():
        layers = n if name == "original" else len(plan.steps)
        print(f"{name:<10}{layers:>8}" + "".join(f"{row[t]:>26.2f}" for t in EVAL_TEXTS)
              + f"{row['acc']:>8.3f}{row['acc_norm']:>10.3f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
