"""Plan x quantization on SmolLM2 and Gemma 3: which file to ship.

For each model, three plans -- no removal; 20 % of the layers removed (one-shot Block Influence on
wikitext2-valid); the same plus a short LoRA healing on Frankenstein -- each exported as a GGUF at
the source's quantization, Q8_0, Q5_0, Q4_0 and importance-aware mixed precision Q8_0/Q4_0@Q5_0
(embeddings and the highest-Block-Influence layers at Q8_0, the rest at Q4_0, within the bytes of
uniform Q5_0, so that row and the Q5_0 row compare at equal bytes). Every file is measured as
loaded back from disk (transformers' GGUF loader): size, size ratio vs the source file, perplexity
on wikitext2-test (windows of 512; the delta vs the source file is paired per window, with a 95 %
t interval), HellaSwag acc_norm (paired per item, 95 % normal interval), and, with llama-cpp-python,
llama.cpp's own perplexity of the file (its perplexity tool's scoring: second half of each window)
and decode tokens/s relative to the source (fresh process per run, all files alternating each
round; median of the per-round ratios, and the range) next to the ideal speed-up (source tensor
bytes / file tensor bytes: decode on CPU reads every weight once per token).

Targets it reports against: size <= ideal share + 1 %; exported perplexity within 1 % of the
in-memory plan where no weights changed; re-quantizing the healed weights costs no more perplexity
than the source's own quantization; llama.cpp decode >= 0.95 of the ideal speed-up.

    python benchmarks/quant_plans.py [--models smollm2-135m gemma3-270m] [--ppl-windows 16] [--mc-items 300]
                                     [--heal-steps 20] [--speed-rounds 0] [--work DIR]
    python benchmarks/quant_plans.py --llama-cpp-only --speed-rounds 5    # llama.cpp on an earlier run's files

Finished rows are kept in WORK/rows.json, so a stopped run continues where it stopped. The
no-removal file at the source's quantization holds the source's tensors byte for byte (checked), so
it takes the source file's numbers instead of being measured again.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from pathlib import Path

import torch

import layerlab
from layerlab import Plan, apply_plan
from layerlab.corpora import read_choices, read_text
from layerlab.evaluate.artifact import llama_cpp_decode, llama_cpp_perplexity, load_file
from layerlab.evaluate.multiple_choice import multiple_choice
from layerlab.evaluate.perplexity import bos_id, encode_text, make_windows, window_nll
from layerlab.export import prepare_export, step_importance, write_export
from layerlab.export.gguf import scan_gguf
from layerlab.heal import HealSettings, heal
from layerlab.metrics.similarity import similarity
from layerlab.models import cache_root, resolve_source
from layerlab.quant import llama_cpp_available
from layerlab.search import one_shot
from layerlab.settings import ExportSettings, ModelSpec

QUANTS = ("source", "Q8_0", "Q5_0", "Q4_0", "Q8_0/Q4_0@Q5_0")
# two-sided 95 % t critical values by number of windows (n - 1 degrees of freedom)
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 8: 2.365, 12: 2.201, 16: 2.131, 20: 2.093, 32: 2.040, 64: 1.998}


@torch.no_grad()
def quality(model, tokenizer, windows, items) -> dict:
    """Mean NLL of every window (equal lengths: ppl = exp of their mean) and HellaSwag correctness per item."""
    nll = [window_nll(model, [w])[0] / (len(w.ids) - w.score_from) for w in windows]
    row = {"nll": nll, "ppl": math.exp(statistics.fmean(nll))}
    if items:
        choice = multiple_choice(model, tokenizer, items, progress=False)
        row |= {"acc_norm": choice.acc_norm, "correct": [int(s.prediction_norm == s.label) for s in choice.scores]}
    return row


def paired(base: list[float], other: list[float], t: float) -> tuple[float, float]:
    """Mean difference and the half-width of its interval (t = critical value)."""
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    return statistics.fmean(diffs), t * statistics.stdev(diffs) / math.sqrt(len(diffs))


def measure(path: Path, tokenizer, windows, items) -> dict:
    model, _ = load_file(path, tokenizer)
    try:
        return quality(model, tokenizer, windows, items)
    finally:
        del model
        gc.collect()


def run_model(name: str, args, rows: dict, save) -> None:
    model, tokenizer = layerlab.load(name)
    source = resolve_source(name)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    windows = make_windows(encode_text(tokenizer, read_text("wikitext2-test")), 512, None, bos_id(tokenizer),
                           False)[:args.ppl_windows]
    items = read_choices("hellaswag-2k", args.mc_items)
    key = f"{name}|source file"
    if key not in rows:
        rows[key] = {"model": name, "plan": "source file", "path": str(source), "bytes": source.stat().st_size,
                     "tensor_bytes": scan_gguf(source).tensor_bytes(), **measure(source, tokenizer, windows, items)}
        save()
    scores = similarity(model, tokenizer, read_text("wikitext2-valid"), ctx=256, windows=4, progress=False)
    pruned = one_shot(scores, "bi", round(0.2 * n), "layer")
    plans = {"none": Plan.identity(n), "20%": pruned, "20% + LoRA": pruned}
    folder = Path(args.work) / name
    for label, plan in plans.items():
        weights, materialized = model, False
        if all(f"{name}|{label}|{q}" in rows for q in (*QUANTS, "in memory")):
            continue
        if label.endswith("LoRA"):
            result = heal(model, tokenizer, read_text("frankenstein"), plan, HealSettings(steps=args.heal_steps),
                          checkpoint_dir=folder / "healing", resume=True, progress=False)
            weights, materialized = result.model, True
        memory_key = f"{name}|{label}|in memory"
        if memory_key not in rows:
            with apply_plan(weights, Plan.identity(len(plan.steps)) if materialized else plan):  # perplexity only
                rows[memory_key] = {"model": name, "plan": label, "quant": "in memory (float32)",
                                    "plan_text": plan.to_text(), **quality(weights, tokenizer, windows, [])}
            save()
        importance = step_importance(weights, tokenizer, Plan.identity(len(plan.steps)) if materialized else plan)
        for quant in QUANTS:
            key = f"{name}|{label}|{quant}"
            if key in rows:
                continue
            stem = f"{label.replace(' ', '').replace('%', 'pct').replace('+', '-')}-{quant.replace('/', '-')}"
            out = folder / f"{stem}.gguf"
            target = prepare_export(ExportSettings(model=ModelSpec(name), out=str(out), quant=quant, force=True), plan)
            written = write_export(target, plan, weights, tokenizer, materialized=materialized,
                                   changed=None if materialized else (), importance=importance)
            copy = all(t.action == "copied" for t in written.tensors) and plan.is_identity
            rows[key] = {"model": name, "plan": label, "quant": quant, "plan_text": plan.to_text(),
                         "path": str(out), "bytes": written.bytes, "ideal_ratio": written.ideal_ratio,
                         "tensor_bytes": scan_gguf(out).tensor_bytes(),
                         "rewritten": sum(t["action"] == "rewritten" for t in written.to_dict()["tensors"]),
                         # every tensor copied byte for byte: the same model as the source file, its numbers
                         **({k: rows[f"{name}|source file"][k] for k in ("nll", "ppl", "acc_norm", "correct")}
                            if copy else measure(out, tokenizer, windows, items))}
            save()
        del weights
        gc.collect()


def in_llama_cpp(rows: dict, args, save) -> None:
    """Every file in llama.cpp: perplexity as its perplexity tool computes it (a file llama.cpp misreads,
    such as a Gemma 3 pattern it derives wrongly, shows here), and decode tokens/s of every file of a model
    and its source, alternating; ratios per round."""
    text = read_text("wikitext2-test")
    for name in args.models:
        files = {k: Path(r["path"]) for k, r in rows.items() if r["model"] == name and "path" in r}
        if not files:
            continue
        for key, path in files.items():
            if "llama_cpp_ppl" not in rows[key]:
                rows[key]["llama_cpp_ppl"] = llama_cpp_perplexity(path, text, 512, args.ppl_windows)[0]
                save()
        if not args.speed_rounds:
            continue
        runs = llama_cpp_decode(files, args.speed_rounds, args.decode_tokens)
        base = runs[f"{name}|source file"]["decode_samples"]
        for k, run in runs.items():
            ratios = [b / a for a, b in zip(base, run["decode_samples"], strict=True)]
            rows[k]["decode"] = {"tokens_per_s": run["decode_tokens_per_s"], "ratio": statistics.median(ratios),
                                 "range": [min(ratios), max(ratios)], "rounds": args.speed_rounds}
        save()


def table(rows: dict, args) -> str:
    lines = []
    for name in args.models:
        src = rows.get(f"{name}|source file")
        if src is None:
            continue
        t_ppl = T95.get(len(src["nll"]), 2.0)
        lcpp = f", llama.cpp ppl {src['llama_cpp_ppl']:.3f}" if "llama_cpp_ppl" in src else ""
        speed = f", llama.cpp decode {src['decode']['tokens_per_s']:.1f} tok/s" if "decode" in src else ""
        lines.append(f"\n{name}: source {Path(src['path']).name}, {src['bytes'] / 2**20:.1f} MiB, "
                     f"ppl {src['ppl']:.3f}, acc_norm {src['acc_norm']:.3f}{lcpp}{speed}; "
                     f"{len(src['nll'])} windows, {len(src['correct'])} HellaSwag rows")
        lines.append(f"{'plan':<11} {'quant':<15} {'MB':>7} {'size x':>7} {'ideal':>6} {'ppl':>8} "
                     f"{'dppl % (95% CI)':>18} {'vs mem %':>8} {'acc_norm':>8} {'dacc_norm (95% CI)':>20} "
                     f"{'rewr':>4} {'lcpp ppl':>8} {'decode x':>8} {'ideal x':>7}")
        for row in rows.values():
            if row["model"] != name or "path" not in row or row["plan"] == "source file":
                continue
            mean, half = paired(src["nll"], row["nll"], t_ppl)
            dacc, dhalf = paired(src["correct"], row["correct"], 1.96)
            memory = rows.get(f"{name}|{row['plan']}|in memory")  # perplexity only
            vs_mem = 100 * (row["ppl"] / memory["ppl"] - 1) if memory else float("nan")
            ideal = f"{row['ideal_ratio']:.3f}" if row.get("ideal_ratio") else "-"
            decode = (f"{row['decode']['ratio']:.2f} [{row['decode']['range'][0]:.2f},{row['decode']['range'][1]:.2f}]"
                      if "decode" in row else "-")
            lcpp = f"{row['llama_cpp_ppl']:.3f}" if "llama_cpp_ppl" in row else "-"
            lines.append(
                f"{row['plan']:<11} {row['quant']:<15} {row['bytes'] / 1e6:7.1f} {row['bytes'] / src['bytes']:7.3f} "
                f"{ideal:>6} {row['ppl']:8.3f} {100 * (math.exp(mean) - 1):+7.2f} "
                f"[{100 * (math.exp(mean - half) - 1):+.1f},{100 * (math.exp(mean + half) - 1):+.1f}] "
                f"{vs_mem:+8.2f} {row['acc_norm']:8.3f} {dacc:+8.3f} [{dacc - dhalf:+.3f},{dacc + dhalf:+.3f}] "
                f"{row['rewritten']:4d} {lcpp:>8} {decode:>8} {src['tensor_bytes'] / row['tensor_bytes']:7.2f}")
        for row in rows.values():
            if row["model"] == name and row.get("quant", "").startswith("in memory"):
                lines.append(f"  in memory, float32: {row['plan']:<11} ({row['plan_text']}) ppl {row['ppl']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--mc-items", type=int, default=300)
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--speed-rounds", type=int, default=0, help="llama.cpp decode rounds (0: skip)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp-only", action="store_true", help="only measure in llama.cpp (earlier files)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--work", default=str(cache_root() / "bench-quant-plans"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Path(args.work) / "rows.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(store.read_text()) if store.is_file() else {}

    def save() -> None:
        store.write_text(json.dumps(rows))

    if not args.llama_cpp_only:
        for name in args.models:
            run_model(name, args, rows, save)
    if llama_cpp_available():
        in_llama_cpp(rows, args, save)
    print(table(rows, args))


if __name__ == "__main__":
    main()
