"""KV-cache compression: sharing budgets x cache types, side by side, as a Pareto table and a plot.

1. search: the KV-sharing search (`layerlab.kv_search`) to the largest budget, once per pair order,
   calibrated on --calibration; the map for a smaller budget is the map after that many accepted pairs.
   extend: where the search's tolerance stops it short of a budget, the same search of --order with
   --extend-tolerance gives that budget's map (what more sharing costs); it reuses the first search's
   per-pair scores, so it tries only pairs that alone stay within the first tolerance. Where that too
   stops short, the `loss` search's per-pair scores give a one-shot map of exactly the budget
   (`kv_search.one_shot_kv`: best pairs alone, not re-checked together).
2. quality, for every budget x cache type (maps of --order): KV bytes per token (the cache's tensors
   after a prefill of --bytes-tokens tokens, measured), perplexity on --ppl-text in non-overlapping
   windows of 2048 and 4096 tokens (per-window paired differences against the baseline), and the
   zero-shot suite (`evaluate.tasks.SUITE`, first --suite-rows rows of each task; headline metric per
   item, paired against the baseline); the other orders' maps get perplexity at 2048 only.
   --merge-plan adds a MiniCache row (`kvmerge:`): its perplexity is fed in chunks of --merge-chunk
   tokens (a merge acts only across forwards), and the suite is not run for it (one forward per
   row: a merge changes nothing there).
3. speed: decode tokens/s after a prefill of --speed-context tokens, for --speed-configs, in
   interleaved rounds (order rotating, a warm-up round dropped); ratios to the full cache per round,
   median and range; peak memory over each round (peak RSS on CPU: includes the weights).
Everything lands in --out (JSON, after every configuration; --resume skips what is there) and the
table in --out with .txt, the chart with .png.

    python benchmarks/kv.py [--model smollm2-135m] [--budgets 0,0.15,0.3,0.5] [--caches full,int8]
        [--tolerance 0.1] [--extend-tolerance 0.5] [--orders loss,dissimilar,similar] [--order loss]
        [--stages search,extend,quality,speed]
        [--speed-configs 0:full,0.3:full,0:int8,0.3:int8,merge:full] [--speed-context 4096] [--speed-rounds 3]
        [--merge-plan "kvmerge:15+16,...,27+28"] [--merge-chunk 64] [--suite-rows 25] [--maps DIR]
        [--out benchmarks/results/kv.json] [--resume] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import layerlab
from layerlab.analysis.plots import _save, plt
from layerlab.corpora import read_text
from layerlab.evaluate.perplexity import bos_id, chunked_window_nll, encode_text, make_windows, window_nll
from layerlab.evaluate.speed import PeakMemory, interleaved, prefill_decode_seconds
from layerlab.evaluate.tasks import SUITE, load_task, run_task
from layerlab.io import update_file
from layerlab.kv import cache_bytes
from layerlab.kv_search import KVSearchSettings, accepted_pairs, consumers_allowed, one_shot_kv, search_kv
from layerlab.kvcache import CacheSettings, kv_cache
from layerlab.plan import Plan
from layerlab.runtime import apply_plan
from layerlab.search import SearchState


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="0,0.15,0.3,0.5")
    parser.add_argument("--caches", default="full,int8")
    parser.add_argument("--tolerance", type=float, default=0.1, help="calibration perplexity growth the search allows")
    parser.add_argument("--extend-tolerance", type=float, default=0.5,
                        help="a second search with this tolerance fills the budgets the first does not reach")
    parser.add_argument("--orders", default="loss,dissimilar,similar")
    parser.add_argument("--order", default="loss", help="whose maps fill the table")
    parser.add_argument("--calibration", default="wikitext2-valid")
    parser.add_argument("--calib-ctx", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=2)
    parser.add_argument("--ppl-text", default="pride-and-prejudice")
    parser.add_argument("--windows-2k", type=int, default=4)
    parser.add_argument("--windows-4k", type=int, default=2, help="0 skips the 4096-token perplexity")
    parser.add_argument("--suite-rows", type=int, default=25, help="rows of each zero-shot task (0: no suite)")
    parser.add_argument("--merge-plan", default="kvmerge:15+16,17+18,19+20,21+22,23+24,25+26,27+28",
                        help="a kvmerge: plan for the MiniCache row ('' for none)")
    parser.add_argument("--merge-chunk", type=int, default=64, help="chunk of tokens for the merge row's perplexity")
    parser.add_argument("--maps", help="folder holding the search state files (default: next to --out)")
    parser.add_argument("--bytes-tokens", type=int, default=2048)
    parser.add_argument("--stages", default="search,extend,quality,speed")
    parser.add_argument("--speed-configs", default="0:full,0.3:full,0:int8,0.3:int8,merge:full")
    parser.add_argument("--speed-context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/kv.json")
    parser.add_argument("--resume", action="store_true")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------ maps
def state_path(args, order: str, extended: bool = False) -> Path:
    stem = Path(args.maps) / Path(args.out).name if args.maps else Path(args.out)
    return Path(f"{stem}.search-{order}{'-extended' if extended else ''}.json")


def search(model, tokenizer, args, order: str, run: bool, extended: bool = False) -> dict | None:
    """The search of one order (run or resumed when `run`, else read from its state file) as a summary.

    `extended`: the same search with --extend-tolerance, for the budgets the main one does not reach.
    """
    path = state_path(args, order, extended)
    if run and extended and not path.exists():
        seed_scores(args, order, path)
    if run:
        settings = KVSearchSettings(budget=max(args.budgets) if max(args.budgets) > 0 else 0.5,
                                    tolerance=args.extend_tolerance if extended else args.tolerance, order=order,
                                    ctx=args.calib_ctx, windows=args.calib_windows)
        start = time.perf_counter()
        search_kv(model, tokenizer, read_text(args.calibration), settings, state_path=path, resume=True)
        print(f"search {order}{' extended' if extended else ''}: {time.perf_counter() - start:.0f} s this run",
              flush=True)
    if not path.exists():
        return None
    state = SearchState.load(path)
    accepted = accepted_pairs(state)
    done = len(state.ranking) == len(state.trace) - 1 or len(accepted) >= consumers_allowed(
        Plan.identity(state.plan["num_layers"]), state.settings["budget"])
    return {"start_perplexity": state.trace[0]["start_perplexity"], "tried": len(state.trace) - 1,
            "pairs": len(state.ranking), "finished": done, "layer_forwards": state.layer_forwards,
            "tolerance": state.settings["tolerance"],
            "accepted": [{"pair": e["pair"], "kv": e["kv"], "perplexity": e["perplexity"]} for e in accepted]}


def seed_scores(args, order: str, path: Path) -> None:
    """Start the extended search from the first one's per-pair scores (same start plan and calibration):
    it then tries only the pairs that alone stay within the first tolerance, best first, and skips
    scoring every pair again (an hour on a shared 2-core CPU)."""
    first = SearchState.load(state_path(args, order))
    settings = first.settings | {"tolerance": args.extend_tolerance}
    SearchState(first.plan if not first.plan.get("kv_sources") else
                {k: v for k, v in first.plan.items() if k != "kv_sources"}, None,
                trace=first.trace[:1], settings=settings).save(path)


def plan_for(args, order: str, budget: float, n_layers: int) -> tuple[Plan, str]:
    """The map for a budget, with how it was made: the first search's accepted pairs up to the budget; where
    its tolerance stopped it short, the extended search's; where that stops short too, a one-shot map of
    the budget from the loss search's per-pair scores (or the largest map found, without them)."""
    wanted = consumers_allowed(Plan.identity(n_layers), budget)
    if not wanted:
        return Plan.identity(n_layers), "-"
    best = (Plan.identity(n_layers), "search (none accepted)")
    for extended in (False, True):
        if state_path(args, order, extended).exists():
            state = SearchState.load(state_path(args, order, extended))
            accepted = [Plan.parse(e["kv"], n_layers) for e in accepted_pairs(state)]
            accepted = [plan for plan in accepted if len(plan.kv) <= wanted]
            if accepted and len(accepted[-1].kv) > len(best[0].kv):
                short = "" if len(accepted[-1].kv) == wanted else ", short of the budget"
                best = (accepted[-1], f"search {state.settings['tolerance']:.0%}{short}")
    scored = state_path(args, "loss")
    if order == "loss" and len(best[0].kv) < wanted and scored.exists():
        state = SearchState.load(scored)
        if "alone_perplexity" in state.trace[0]:
            return one_shot_kv(state, wanted), "one-shot (pairs by loss alone)"
    return best


# ------------------------------------------------------------------------------------------ quality
@torch.inference_mode()
def window_perplexities(model, tokenizer, text: str, ctx: int, count: int) -> list[float]:
    """NLL per scored token of each of the first `count` non-overlapping windows of `ctx` tokens."""
    windows = make_windows(encode_text(tokenizer, text), ctx, None, bos_id(tokenizer), False)[:count]
    return [window_nll(model, [w])[0] / (len(w.ids) - w.score_from) for w in windows]


@torch.inference_mode()
def chunked_perplexities(model, tokenizer, text: str, ctx: int, count: int, chunk: int) -> list[float]:
    """`window_perplexities` with each window fed in chunks of `chunk` tokens on one cache (as in decoding)."""
    windows = make_windows(encode_text(tokenizer, text), ctx, None, bos_id(tokenizer), False)[:count]
    return [chunked_window_nll(model, w, chunk)[0] / (len(w.ids) - w.score_from) for w in windows]


@torch.inference_mode()
def kv_bytes_per_token(model, tokens: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = model(ids, use_cache=True).past_key_values
    return cache_bytes(cache) / tokens


def quality(model, tokenizer, plan: Plan, cache: str, args, texts: dict, tasks, full: bool = True) -> dict:
    """KV bytes, perplexity at 2k (and 4k, the suite when `full`); a merge plan's perplexity fed in chunks."""
    def ppl(ctx: int, count: int) -> list[float]:
        if plan.merge:
            return chunked_perplexities(model, tokenizer, texts["ppl"], ctx, count, args.merge_chunk)
        return window_perplexities(model, tokenizer, texts["ppl"], ctx, count)

    with apply_plan(model, plan), kv_cache(model, CacheSettings(cache)):
        row = {"kv_bytes_per_token": kv_bytes_per_token(model, args.bytes_tokens), "nll_2k": ppl(2048, args.windows_2k)}
        if full and args.windows_4k:
            row["nll_4k"] = ppl(4096, args.windows_4k)
        if full and not plan.merge:
            row["suite"] = {data.task.name: list(run_task(model, tokenizer, data, progress=False)
                                                 .per_item[data.task.headline]) for data in tasks}
    return row


# ------------------------------------------------------------------------------------------ speed
def speed(model, configs: dict[str, tuple[Plan, str]], args) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, args.speed_context), generator=torch.Generator().manual_seed(1))

    def runner(plan: Plan, cache: str):
        def run() -> tuple:
            with apply_plan(model, plan), kv_cache(model, CacheSettings(cache)), PeakMemory(model.device) as peak:
                prefill, decode = prefill_decode_seconds(model, ids, args.decode_tokens)
            return args.decode_tokens / decode, peak.peak_mb
        return run

    samples = interleaved({name: runner(*config) for name, config in configs.items()}, args.speed_rounds)
    base = next(iter(configs))
    out = {}
    for name in configs:
        ratios = [s[0] / b[0] for s, b in zip(samples[name], samples[base], strict=True)]
        out[name] = {"decode_tokens_per_s": statistics.median(s[0] for s in samples[name]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "peak_mb": max((s[1] for s in samples[name] if s[1] is not None), default=None)}
    return out


# ------------------------------------------------------------------------------------------ report
def paired(values: list[float], base: list[float]) -> tuple[float, float]:
    """Mean and standard error of paired differences."""
    diffs = [a - b for a, b in zip(values, base, strict=True)]
    mean = statistics.fmean(diffs)
    return mean, (statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"))


def ppl_cell(row: dict, base: dict, key: str) -> str:
    if key not in row:
        return "-"
    ppl = math.exp(statistics.fmean(row[key]))
    if row is base:
        return f"{ppl:.2f}"
    mean, se = paired(row[key], base[key])
    return f"{ppl:.2f} ({100 * math.expm1(mean):+.1f}% ±{100 * se:.1f})"


def suite_items(row: dict) -> list[float]:
    """Every suite row's headline value, task after task (equal rows per task: their mean is the suite's)."""
    return [value for task in sorted(row["suite"]) for value in row["suite"][task]]


def suite_cell(row: dict, base: dict) -> str:
    if "suite" not in row:
        return "n/a" if "kvmerge:" in row["plan"] else "-"
    values = suite_items(row)
    mean = statistics.fmean(values)
    if row is base:
        return f"{mean:.3f} ±{1.96 * math.sqrt(mean * (1 - mean) / len(values)):.3f}"
    delta, se = paired(values, suite_items(base))
    return f"{mean:.3f} ({delta:+.3f} ±{1.96 * se:.3f})"


def targets(rows: dict, base: dict) -> list[str]:
    """How far the issue's targets are: -30 % KV at <= +5 % ppl 2k, -60 % KV at <= +6 % with 8-bit KV."""
    def points(cache: str, reference: float) -> list[tuple[float, float, str]]:
        out = []
        for name, row in rows.items():
            if name.endswith(":" + cache):
                saved = 1 - row["kv_bytes_per_token"] / reference
                out.append((saved, math.expm1(paired(row["nll_2k"], base["nll_2k"])[0]) if row is not base else 0.0,
                            name))
        return out

    lines = ["", "targets (ppl 2k paired against 0:full; KV saved against the float32 cache, and a 16-bit one):"]
    full = base["kv_bytes_per_token"]
    for label, cache, kv_goal, ppl_goal in (("sharing", "full", 0.30, 0.05), ("with 8-bit KV", "int8", 0.60, 0.06)):
        for ref_name, reference in (("float32", full), ("16-bit", full / 2)):
            pts = points(cache, reference)
            within = [p for p in pts if p[1] <= ppl_goal]
            enough = [p for p in pts if p[0] >= kv_goal]
            best_kv = max(within, default=None)
            best_ppl = min(enough, key=lambda p: p[1], default=None)
            met = best_ppl is not None and best_ppl[1] <= ppl_goal
            lines.append(
                f"  -{kv_goal:.0%} KV at <= +{ppl_goal:.0%} ppl ({label}, vs {ref_name}): "
                + ("met" if met else "missed") + "; most KV saved within the ppl limit: "
                + (f"{best_kv[0]:.1%} ({best_kv[2]}, {best_kv[1]:+.1%} ppl)" if best_kv else "none")
                + "; least ppl among rows saving enough: "
                + (f"{best_ppl[1]:+.1%} ({best_ppl[2]}, {best_ppl[0]:.1%} saved)" if best_ppl
                   else "no row saves enough"))
    return lines


def table(results: dict, args, n_layers: int) -> str:
    rows = results["quality"]
    base = rows["0:full"]
    full_bytes = base["kv_bytes_per_token"]
    lines = [f"# python benchmarks/kv.py {' '.join(sys.argv[1:])}",
             f"# model {args.model}; maps: KV search on {args.calibration} ({args.calib_windows} x {args.calib_ctx} "
             f"tokens, tolerance {args.tolerance:.0%} calibration perplexity), order {args.order}; perplexity: "
             f"{args.ppl_text}, first {args.windows_2k} windows of 2048 / {args.windows_4k} of 4096 tokens "
             f"(Δ: paired per window, ± one standard error); suite: first {args.suite_rows} rows of each of "
             f"{', '.join(SUITE)} (mean headline metric ±95%; Δ paired per row)", ""]
    head = ["budget", "map", "cache", "consumers", "KV B/token", "KV vs full", "vs 16-bit", "ppl 2k", "ppl 4k",
            "suite", f"decode x ({args.speed_context} ctx)"]
    body = []
    for name, row in rows.items():
        budget, cache = name.split(":")
        plan = Plan.parse(row["plan"], n_layers)
        speed_row = results.get("speed", {}).get(name)
        decode = (f"{speed_row['ratio_median']:.2f} [{speed_row['ratio_min']:.2f}-{speed_row['ratio_max']:.2f}]"
                  if speed_row else "-")
        layers = f"{len(plan.merge)} pairs merged" if plan.merge else str(len(plan.kv))
        body.append([budget if plan.merge else f"{float(budget):.0%}", row.get("map", "-"), cache, layers,
                     f"{row['kv_bytes_per_token']:.0f}",
                     f"{row['kv_bytes_per_token'] / full_bytes - 1:+.1%}",
                     f"{row['kv_bytes_per_token'] / (full_bytes / 2) - 1:+.1%}",
                     ppl_cell(row, base, "nll_2k"), ppl_cell(row, base, "nll_4k"), suite_cell(row, base), decode])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    lines += ["", "KV vs full: against the model's own cache (float32 here); vs 16-bit: against a bf16/fp16 cache "
              "of the same shape (half the float32 bytes, computed). map: search T = the accepted pairs of the search "
              "with tolerance T (the extended search where the first stopped short of the budget; 'short' when "
              "that too ran out of pairs before the budget: then the row repeats the largest map found); one-shot = "
              "the budget's best pairs by their loss alone, not re-checked together. merge: MiniCache pairs "
              f"(kvmerge:), perplexity fed in chunks of {args.merge_chunk} tokens (each chunk's own tokens exact); "
              "suite n/a "              "(one forward per row, which a merge does not change)."]
    lines += targets(rows, base)
    lines += ["", "maps:"] + [f"  {name}: {row['plan']}" for name, row in rows.items() if row["plan"] != "all"]
    for order, searched in results.get("search", {}).items():
        trail = ", ".join(f"{len(Plan.parse(e['kv'], n_layers).kv)}: {e['perplexity']:.2f}"
                          for e in searched["accepted"])
        lines.append(f"search {order} (tolerance {searched['tolerance']:.0%}): start "
                     f"{searched['start_perplexity']:.2f}, {searched['tried']} of "
                     f"{searched['pairs']} pairs tried{'' if searched['finished'] else ' (stopped early)'}, "
                     f"{searched['layer_forwards']} layer forwards; consumers: calibration ppl after each "
                     f"accepted pair: {trail or 'none accepted'}")
    for name, row in results.get("other_orders", {}).items():
        lines.append(f"order {name}: ppl 2k {ppl_cell(row, base, 'nll_2k')}, {row['plan']}")
    if "speed" in results:
        lines += ["", f"decode after a {args.speed_context}-token prefill, {args.decode_tokens} tokens, "
                  f"{args.speed_rounds} interleaved rounds (x = ratio to 0%/full per round: median [min-max]); "
                  "peak memory (CPU: peak RSS of the process, weights included):"]
        lines += [f"  {name}: {s['decode_tokens_per_s']:.2f} tok/s, x{s['ratio_median']:.2f} "
                  f"[{s['ratio_min']:.2f}-{s['ratio_max']:.2f}], peak {s['peak_mb']:.0f} MB"
                  for name, s in results["speed"].items()]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    rows = results["quality"]
    base = rows["0:full"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for cache in dict.fromkeys(name.split(":")[1] for name in rows):
        mine = [(name, row) for name, row in rows.items() if name.endswith(":" + cache) and name[0].isdigit()]
        x = [row["kv_bytes_per_token"] / base["kv_bytes_per_token"] for _, row in mine]
        y = [math.exp(statistics.fmean(row["nll_2k"])) for _, row in mine]
        ax.plot(x, y, marker="o", label=f"{cache} cache")
        for (name, _), xi, yi in zip(mine, x, y, strict=True):
            ax.annotate(f"{float(name.split(':')[0]):.0%}", (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for name, row in rows.items():
        if not name[0].isdigit():
            x, y = row["kv_bytes_per_token"] / base["kv_bytes_per_token"], math.exp(statistics.fmean(row["nll_2k"]))
            ax.plot([x], [y], marker="s", ls="", label=f"{name} (MiniCache)")
    ax.axhline(math.exp(statistics.fmean(base["nll_2k"])) * 1.05, color="grey", ls="--", lw=0.8, label="+5% ppl")
    ax.set_xlabel("KV bytes per token, relative to the full float32 cache")
    ax.set_ylabel("perplexity at 2048 tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, 110)


def main() -> None:
    args = options()
    torch.set_num_threads(args.threads)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    out = Path(args.out)
    results = json.loads(out.read_text()) if args.resume and out.exists() else {}
    model, tokenizer = layerlab.load(args.model)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    def save() -> None:
        update_file(out, json.dumps(results, indent=1))

    stages = args.stages.split(",")
    searched = {order: search(model, tokenizer, args, order, "search" in stages) for order in args.orders.split(",")}
    searched[f"{args.order} extended"] = search(model, tokenizer, args, args.order, "extend" in stages, extended=True)
    results["search"] = {order: summary for order, summary in searched.items() if summary is not None}
    save()
    if args.order not in results["search"]:
        raise SystemExit(f"no {args.order} search yet: run with --stages search first")
    made = {b: plan_for(args, args.order, b, n_layers) for b in args.budgets}
    maps = {b: plan for b, (plan, _) in made.items()}
    merge_plan = Plan.parse(args.merge_plan, n_layers) if args.merge_plan else None
    texts = {"ppl": read_text(args.ppl_text)}
    tasks = [load_task(name, rows=args.suite_rows) for name in SUITE] if args.suite_rows else []
    if "quality" in stages:
        results.setdefault("quality", {})
        for budget in args.budgets:
            for cache in args.caches.split(","):
                name = f"{budget:g}:{cache}"
                if results["quality"].get(name, {}).get("plan") == maps[budget].to_text():
                    continue
                same = [row for other, row in results["quality"].items()
                        if other.endswith(":" + cache) and row["plan"] == maps[budget].to_text()]
                if same:  # a budget the search could not fill: the same map as a smaller budget
                    results["quality"][name] = same[0]
                    continue
                start = time.perf_counter()
                results["quality"][name] = {"plan": maps[budget].to_text(), "map": made[budget][1]} | quality(
                    model, tokenizer, maps[budget], cache, args, texts, tasks)
                save()
                print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.merge_plan and results["quality"].get("merge:full", {}).get("plan") != merge_plan.to_text():
            start = time.perf_counter()
            results["quality"]["merge:full"] = {"plan": merge_plan.to_text(), "map": "fixed"} | quality(
                model, tokenizer, merge_plan, "full", args, texts, tasks)
            save()
            print(f"merge:full: {time.perf_counter() - start:.0f} s", flush=True)
        results.setdefault("other_orders", {})
        for order in (o for o in results["search"] if o != args.order and " " not in o):
            for budget in (b for b in args.budgets if b > 0):
                plan = plan_for(args, order, budget, n_layers)[0]
                name = f"{order} {budget:.0%}"
                done = {row["plan"] for row in results["other_orders"].values()}
                if plan.kv and plan.to_text() not in done:
                    results["other_orders"][name] = {"plan": plan.to_text()} | quality(
                        model, tokenizer, plan, "full", args, texts, tasks, full=False)
                    save()
    if "speed" in stages:
        configs = {}
        for config in args.speed_configs.split(","):
            budget, cache = config.split(":")
            if budget == "merge":
                configs[config] = (merge_plan, cache)
            else:
                configs[f"{float(budget):g}:{cache}"] = (maps[float(budget)], cache)
        results["speed"] = speed(model, configs, args)
        save()
    if "quality" not in results:
        return
    text = table(results, args, n_layers)
    update_file(out.with_suffix(".txt"), text)
    chart(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
