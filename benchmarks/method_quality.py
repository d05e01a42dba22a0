"""Which way of choosing layers to remove keeps the most quality? Every method side by side, with intervals.

For each granularity (whole layers, attention only, MLP only) and each count n, the plan chosen by:
- `last-n`: the naive baseline, the n layers (or halves) just before the final one;
- `bi`: Block Influence one-shot (ShortGPT) -- whole layers only;
- `angular`: the n consecutive layers with the smallest angular distance (Gromov et al.) -- layers only;
- `cosine`: LLM-Drop's input/output cosine one-shot (for whole layers it ranks as `bi` does);
- `greedy`: greedy perplexity search (the plans after round n of one search to the largest n).
All methods calibrate on one text; the plans are evaluated on texts NOT used for calibration (perplexity,
ctx 512, non-overlapping windows, with a t interval over windows) and on the zero-shot suite (`--tasks`,
lm-eval's scoring; `evaluate/tasks.py`): each task's headline metric, and their average with its 95 %
interval and its difference against the baseline, paired on the same items (`evaluate/stats.py`; `n.s.`
marks a difference inside the noise). Every (plan, task) result is stored in `--out`.results/ as soon as it
is measured (`evaluate/compare.py`), and each greedy search saves its state after every round (beside
--out), so a stopped run keeps what it measured: running it again with the same options reuses it, and
says which results it recomputes because an option changed.

With `--workers N` (or `--ray-address`; the `ray` extra) the work fans out over Ray workers that each load
the model once (`layerlab.parallel`): the one-shot scores on one worker, each greedy round's candidates,
and every (plan, task) of the table, all measured first into the result store; the table is then printed
from the store. The numbers are the serial run's; a worker that dies is replaced, and a stopped run
resumes from the store as above.

    python benchmarks/method_quality.py [--model smollm2-135m] [--counts 4,6,8] [--granularities layer,attn,mlp]
        [--tasks suite] [--rows 0] [--task-data /work/shared/data/tasks] [--ppl-windows 0] [--keep 1.0]
        [--device cuda] [--dtype bfloat16] [--task-batch-size 64] [--out method_quality.json] [--resume]
        [--workers 2 [--ray-address HOST:PORT] [--worker-threads 1]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path

import layerlab
from layerlab import parallel
from layerlab.corpora import read_text
from layerlab.evaluate.compare import evaluate_plans
from layerlab.evaluate.table import delta_text, estimate_text
from layerlab.io import update_file
from layerlab.metrics.similarity import similarity
from layerlab.plan import Plan, Step
from layerlab.search import Budget, greedy, one_shot
from layerlab.settings import EvalSettings, ModelSpec, ParallelSettings

ONE_SHOT = {"layer": ("bi", "angular", "cosine"), "attn": ("cosine",), "mlp": ("cosine",)}


def last_n(n_layers: int, n: int, granularity: str) -> Plan:
    """The n layers (or halves) just before the final layer."""
    dropped = range(n_layers - 1 - n, n_layers - 1)
    steps = [Step(i, granularity == "mlp" or i not in dropped, granularity == "attn" or i not in dropped)
             for i in range(n_layers)]
    return Plan(tuple(s for s in steps if s.attention or s.mlp), n_layers)


def chosen_plans(model, tokenizer, args, pool=None) -> list[dict]:
    """Every (granularity, n, method) with its plan, calibrated on args.calibration (on `pool`'s workers if any)."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    text = read_text(args.calibration)
    if pool is None:
        scores = similarity(model, tokenizer, text, ctx=args.calib_ctx, windows=args.calib_windows)
    else:
        scores = parallel.similarity(pool, text, args.calib_ctx, args.calib_windows, n_layers)
    rows = [{"granularity": "-", "n": 0, "method": "baseline", "plan": Plan.identity(n_layers)}]
    for granularity in args.granularities:
        start = time.perf_counter()
        search = greedy(model, tokenizer, text, Budget(remove=max(args.counts)), granularity, ctx=args.calib_ctx,
                        windows=args.search_windows, keep=args.keep, resume=args.resume,
                        state_path=f"{args.out}.greedy-{granularity}.json", pool=pool)
        print(f"greedy {granularity}: {time.perf_counter() - start:.0f} s, {search.layer_forwards} layer forwards",
              flush=True)
        for n in args.counts:
            plans = {"last-n": last_n(n_layers, n, granularity)}
            plans |= {m: one_shot(scores, m, n, granularity) for m in ONE_SHOT[granularity]}
            plans["greedy"] = Plan.parse(search.trace[n - 1]["plan"], n_layers)
            rows += [{"granularity": granularity, "n": n, "method": m, "plan": p} for m, p in plans.items()]
    return rows


def measurer(model, tokenizer, args, pool=None):
    """`(plans, settings, progress) -> evaluate_plans' results`, here or on `pool`'s workers, into one store."""
    store = f"{args.out}.results"
    if pool is None:
        return lambda plans, settings, progress=False: evaluate_plans(model, tokenizer, plans, settings, store=store,
                                                                      progress=progress)
    return lambda plans, settings, progress=False: parallel.evaluate_plans(pool, plans, settings, store=store,
                                                                           progress=progress)


def text_settings(settings: EvalSettings, texts: list[str]) -> list[EvalSettings]:
    """The table's settings, then perplexity alone on each evaluation text."""
    return [settings] + [replace(settings, tasks=("ppl",), ppl_text=text) for text in texts]


def evaluate(run, baseline: Plan, plan: Plan, settings: EvalSettings, texts: list[str]) -> dict:
    """The plan beside the baseline: perplexity on every text, the zero-shot tasks, their average, paired deltas."""
    plans = [baseline] if plan == baseline else [baseline, plan]
    table, *ppl_only = text_settings(settings, texts)
    rows = run(plans, table)["rows"]
    out = {"tasks": rows[-1].get("tasks", {}), "average": rows[-1].get("average"), "ppl": {}}
    for text, other in zip(texts, ppl_only, strict=True):
        out["ppl"][text] = run(plans, other)["rows"][-1]["ppl"]
    for task in out["tasks"].values():  # keep the JSON small: the per-item results stay in the store
        task.pop("per_item")
    for ppl in out["ppl"].values():
        ppl.pop("per_window")
    return out


def print_row(row: dict, texts: list[str], tasks: tuple[str, ...]) -> None:
    ppl = " ".join(f"{estimate_text(row['ppl'][t]['perplexity'], row['ppl'][t]['interval'], 2):>22s}" for t in texts)
    scores = " ".join(f"{row['tasks'][t]['value']:8.3f}" for t in tasks)
    average = row["average"]
    shown = ""
    if average:
        value = estimate_text(average["value"], average["interval"], 3)
        shown = f" {value:>13s} {delta_text(average.get('delta'), 3):>28s}"
    print(f"{row['granularity']:11s} {row['n']:2d} {row['method']:8s} {ppl} {scores}{shown}  {row['plan']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="4,6,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--granularities", default="layer,attn,mlp", type=lambda s: s.split(","))
    parser.add_argument("--calibration", default="wikitext2-valid")
    parser.add_argument("--calib-ctx", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16, help="windows for the one-shot metrics")
    parser.add_argument("--search-windows", type=int, default=8, help="windows for the greedy search")
    parser.add_argument("--keep", type=float, default=1.0,
                        help="greedy: share of candidates kept each round (1 = no pruning)")
    parser.add_argument("--eval-texts", default="wikitext2-test,pride-and-prejudice", type=lambda s: s.split(","))
    parser.add_argument("--ppl-windows", type=int, default=0, help="first N windows of each text; 0 = all")
    parser.add_argument("--tasks", default="suite", help="zero-shot tasks (lm-eval names, or suite)")
    parser.add_argument("--rows", type=int, default=0, help="rows per task; 0 = all the data has")
    parser.add_argument("--task-data", default=None, help="folder of full task files (default: bundled subsets)")
    parser.add_argument("--batch-size", type=int, default=16, help="perplexity windows per forward pass")
    parser.add_argument("--task-batch-size", type=int, default=None,
                        help="whole task sequences per forward pass (GPU); default: shared contexts (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 (fast on CPUs with AMX), auto")
    parser.add_argument("--out", default="method_quality.json")
    parser.add_argument("--resume", action="store_true", help="continue stopped greedy searches with the same options")
    parser.add_argument("--workers", type=int, help="Ray workers (the ray extra); default: serially here")
    parser.add_argument("--ray-address", help="join the Ray cluster at HOST:PORT instead of starting one")
    parser.add_argument("--worker-threads", type=int, help="torch threads per worker (default: cores // workers)")
    args = parser.parse_args()
    spreading = ParallelSettings(args.workers, args.ray_address, args.worker_threads)
    spreading.check()

    settings = EvalSettings(tasks=("ppl", *(t for t in EvalSettings(tasks=args.tasks).tasks if t != "ppl")),
                            rows=args.rows or None, task_data=args.task_data, task_batch_size=args.task_batch_size,
                            ppl_text=args.eval_texts[0], ctx=512, ppl_windows=args.ppl_windows or None,
                            batch_size=args.batch_size)
    data = settings.check()  # a missing or malformed task file fails now, not after the searches
    with contextlib.ExitStack() as stack:
        pool = None
        if spreading.parallel:  # the workers hold the weights; this process only the model's structure
            spec = ModelSpec(args.model, dtype=args.dtype, device=args.device)
            pool = stack.enter_context(parallel.WorkerPool(spec, spreading))
            model, tokenizer = parallel.structure_model(spec), spec.tokenizer()
        else:
            model, tokenizer = layerlab.load(args.model, dtype=args.dtype, device=args.device)
        table(model, tokenizer, args, settings, data, pool)


def table(model, tokenizer, args, settings: EvalSettings, data: dict, pool=None) -> None:
    """Choose every row's plan, measure them (all at once on a pool), print and save the table row by row."""
    rows = chosen_plans(model, tokenizer, args, pool)
    run = measurer(model, tokenizer, args, pool)
    baseline = rows[0]["plan"]
    if pool is not None:  # every (plan, task) fans out now; the rows below read them from the store
        for each in text_settings(settings, args.eval_texts):
            run([p for p in {r["plan"].to_text(): r["plan"] for r in rows}.values()], each, progress=True)
    tasks = settings.zero_shot
    print(f"{args.model}; calibration {args.calibration}; tasks "
          f"{', '.join(f'{n} ({len(d.items)} rows, {d.task.headline})' for n, d in data.items())}; "
          f"ppl ctx 512 on {', '.join(args.eval_texts)} ({args.ppl_windows or 'all'} windows); 95 % intervals, "
          f"Δ average paired against the baseline (n.s.: not significant)", flush=True)
    print(f"{'granularity':11s} {'n':>2s} {'method':8s} " + " ".join(f"{'ppl ' + t:>22s}" for t in args.eval_texts)
          + " " + " ".join(f"{t[:8]:>8s}" for t in tasks) + f" {'average':>13s} {'Δ average':>28s}  plan",
          flush=True)
    for row in rows:
        row |= evaluate(run, baseline, row["plan"], settings, args.eval_texts)
        row["plan"] = row["plan"].to_text()
        print_row(row, args.eval_texts, tasks)
        done = [r for r in rows if "ppl" in r]
        update_file(Path(args.out), json.dumps({"settings": vars(args), "rows": done}, indent=1))


if __name__ == "__main__":
    main()
