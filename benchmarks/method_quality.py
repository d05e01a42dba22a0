"""Which way of choosing layers to remove keeps the most quality? Every method side by side.

For each granularity (whole layers, attention only, MLP only) and each count n, the plan chosen by:
- `last-n`: the naive baseline, the n layers (or halves) just before the final one;
- `bi`: Block Influence one-shot (ShortGPT) -- whole layers only;
- `angular`: the n consecutive layers with the smallest angular distance (Gromov et al.) -- layers only;
- `cosine`: LLM-Drop's input/output cosine one-shot (for whole layers it ranks as `bi` does);
- `greedy`: greedy perplexity search (the plans after round n of one search to the largest n).
All methods calibrate on one text; the plans are evaluated on texts NOT used for calibration
(perplexity, ctx 512, non-overlapping windows) and on HellaSwag rows (acc, acc_norm).
Results are written to --out after every plan, and each greedy search saves its state after every round
(beside --out), so a stopped run keeps what it measured; `--resume` continues it with the same options.

    python benchmarks/method_quality.py [--model smollm2-135m] [--counts 4,6,8] [--granularities layer,attn,mlp]
        [--mc-rows 1000] [--ppl-windows 0] [--device cuda] [--out method_quality.json] [--resume]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import layerlab
from layerlab.corpora import read_choices, read_text
from layerlab.evaluate.multiple_choice import multiple_choice
from layerlab.evaluate.perplexity import perplexity
from layerlab.io import update_file
from layerlab.metrics.similarity import similarity
from layerlab.plan import Plan, Step
from layerlab.runtime import apply_plan
from layerlab.search import Budget, greedy, one_shot

ONE_SHOT = {"layer": ("bi", "angular", "cosine"), "attn": ("cosine",), "mlp": ("cosine",)}


def last_n(n_layers: int, n: int, granularity: str) -> Plan:
    """The n layers (or halves) just before the final layer."""
    dropped = range(n_layers - 1 - n, n_layers - 1)
    steps = [Step(i, granularity == "mlp" or i not in dropped, granularity == "attn" or i not in dropped)
             for i in range(n_layers)]
    return Plan(tuple(s for s in steps if s.attention or s.mlp), n_layers)


def chosen_plans(model, tokenizer, args) -> list[dict]:
    """Every (granularity, n, method) with its plan, calibrated on args.calibration."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    text = read_text(args.calibration)
    scores = similarity(model, tokenizer, text, ctx=args.calib_ctx, windows=args.calib_windows)
    rows = [{"granularity": "-", "n": 0, "method": "baseline", "plan": Plan.identity(n_layers)}]
    for granularity in args.granularities:
        start = time.perf_counter()
        search = greedy(model, tokenizer, text, Budget(remove=max(args.counts)), granularity, ctx=args.calib_ctx,
                        windows=args.search_windows, state_path=f"{args.out}.greedy-{granularity}.json",
                        resume=args.resume)
        print(f"greedy {granularity}: {time.perf_counter() - start:.0f} s, {search.layer_forwards} layer forwards",
              flush=True)
        for n in args.counts:
            plans = {"last-n": last_n(n_layers, n, granularity)}
            plans |= {m: one_shot(scores, m, n, granularity) for m in ONE_SHOT[granularity]}
            plans["greedy"] = Plan.parse(search.trace[n - 1]["plan"], n_layers)
            rows += [{"granularity": granularity, "n": n, "method": m, "plan": p} for m, p in plans.items()]
    return rows


def evaluate(model, tokenizer, plan: Plan, texts: dict[str, str], items, args) -> dict:
    with apply_plan(model, plan):
        result = {name: perplexity(model, tokenizer, text, ctx=512, batch_size=args.batch_size,
                                   max_windows=args.ppl_windows or None, progress=False).perplexity
                  for name, text in texts.items()}
        mc = multiple_choice(model, tokenizer, items, batch_size=args.mc_batch_size, progress=False)
    return result | {"acc": mc.acc, "acc_norm": mc.acc_norm}


def settings(options: dict) -> dict:
    """The options that decide each plan's numbers (not which plans, where they go, or whether to resume)."""
    return {k: v for k, v in options.items() if k not in ("out", "resume", "counts", "granularities")}


def measured_before(args) -> dict[str, dict]:
    """Metrics per plan text from an earlier run of the same settings in --out (for --resume)."""
    out = Path(args.out)
    if not (args.resume and out.exists()):
        return {}
    earlier = json.loads(out.read_text())
    if settings(earlier["settings"]) != settings(vars(args)):
        raise SystemExit(f"{out} was measured with other settings; resume with the same options or another --out")
    metrics = ("acc", "acc_norm", *args.eval_texts)
    return {row["plan"]: {k: row[k] for k in metrics} for row in earlier["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="4,6,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--granularities", default="layer,attn,mlp", type=lambda s: s.split(","))
    parser.add_argument("--calibration", default="wikitext2-valid")
    parser.add_argument("--calib-ctx", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16, help="windows for the one-shot metrics")
    parser.add_argument("--search-windows", type=int, default=8, help="windows for the greedy search")
    parser.add_argument("--eval-texts", default="wikitext2-test,pride-and-prejudice", type=lambda s: s.split(","))
    parser.add_argument("--ppl-windows", type=int, default=0, help="first N windows of each text; 0 = all")
    parser.add_argument("--mc-rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16, help="perplexity windows per forward pass")
    parser.add_argument("--mc-batch-size", type=int, default=None,
                        help="HellaSwag sequences per forward pass (default: one item at a time on its context cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="method_quality.json")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run with the same options")
    args = parser.parse_args()

    model, tokenizer = layerlab.load(args.model, device=args.device)
    texts = {name: read_text(name) for name in args.eval_texts}
    items = read_choices("hellaswag-2k", limit=args.mc_rows)
    measured = measured_before(args)
    rows = chosen_plans(model, tokenizer, args)
    header = (f"{'granularity':11s} {'n':>2s} {'method':8s} " + " ".join(f"{'ppl ' + t:>24s}" for t in texts)
              + f" {'acc':>6s} {'acc_norm':>8s}  plan")
    print(f"{args.model}; calibration {args.calibration}; HellaSwag first {len(items)} rows; "
          f"ppl ctx 512 on {', '.join(texts)} ({args.ppl_windows or 'all'} windows)\n{header}", flush=True)
    for row in rows:
        key = row["plan"].to_text()
        if key not in measured:
            measured[key] = evaluate(model, tokenizer, row["plan"], texts, items, args)
        row |= measured[key] | {"plan": key}
        print(f"{row['granularity']:11s} {row['n']:2d} {row['method']:8s} "
              + " ".join(f"{row[t]:24.3f}" for t in texts) + f" {row['acc']:6.3f} {row['acc_norm']:8.3f}  {key}",
              flush=True)
        update_file(Path(args.out), json.dumps({"settings": vars(args), "rows": [r for r in rows if "acc" in r]},
                                               indent=1))


if __name__ == "__main__":
    main()
