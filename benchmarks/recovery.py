"""Which recovery keeps the most of what pruning costs: none / LoRA-LM / KD / patch / patch+KD, side by side.

For each model and number of removed layers, the plan is the one `layerlab prune` chooses (greedy
perplexity search against the best one-shot plan, by calibration perplexity; run here with a minimal
evaluation, or given with --plan). Each recovery runs through `layerlab.recover.recover` at roughly
equal compute, counted in multiply-accumulates of the layers and head each method runs (per token,
the parameters of the linear layers): LoRA-LM gets --lora-steps; a KD step costs the student's
forward and backward (3x its forward) plus the teacher's forward, so KD gets proportionally fewer
steps; patch+KD gets the KD steps left after the patch's own cost (one full-model pass over the
calibration tokens plus two pruned passes for its before/after check). Training and calibration
text: the default mix (WikiText-2 valid, Pride and Prejudice, Frankenstein).

Judged on data used nowhere else: perplexity (ctx 512) on WikiText-2 test and on LAMBADA passages (a
fiction corpus not in the mix), and multiple-choice tasks (acc_norm; HellaSwag from row 1000 of the
bundled 2000 -- the first 1000 serve other benchmarks -- ARC-Easy and PIQA from the shared task files),
with 95 % intervals and paired differences against the unrecovered plan. The task scorer is
`score_tasks`: when `layerlab.evaluate.tasks` (the multi-task suite) lands, it replaces that one function.

    python benchmarks/recovery.py --runs smollm2-135m:6,8 gemma3-270m:4 --state .scratch/recovery.json \\
        | tee benchmarks/results/recovery.txt

The state file keeps every finished row (with per-item correctness), so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from layerlab import LayerlabError, Plan, apply_plan, load
from layerlab.arch import decoder_layers
from layerlab.corpora import read_choices, read_text
from layerlab.evaluate.multiple_choice import multiple_choice
from layerlab.evaluate.perplexity import perplexity
from layerlab.recover import recover
from layerlab.settings import EvalSettings, HealSettings, PatchSettings, PruneSettings, RecoverSettings

METHODS = ("none", "patch", "lora", "kd", "patch+kd", "patch@cosine")  # @cosine: the patch's cosine objective
TASKS = {  # name: (source, first row used)
    "hellaswag": ("hellaswag-2k", 1000),
    "arc_easy": ("arc_easy_test.jsonl", 0),
    "piqa": ("piqa_val.jsonl", 0),
}


def lambada_text(folder: Path, rows: int) -> str:
    """LAMBADA passages (context + last word) joined as one held-out fiction text."""
    lines = (folder / "lambada_openai_test.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
    return "\n\n".join(row["context"] + row["continuation"] for row in map(json.loads, lines))


def score_tasks(model, tokenizer, args) -> dict[str, dict]:
    """Per-task per-item correctness (acc_norm) and chance level. The suite replaces this function."""
    out = {}
    for name in args.tasks:
        source, first = TASKS[name]
        path = source if name == "hellaswag" else str(Path(args.task_data) / source)
        items = read_choices(path, limit=first + args.rows)[first:]
        scores = multiple_choice(model, tokenizer, items, progress=False).scores
        out[name] = {"correct": [int(s.prediction_norm == s.label) for s in scores],
                     "chance": sum(1 / len(i.endings) for i in items) / len(items)}
    return out


def quality(model, tokenizer, args) -> dict:
    """Held-out perplexities and task scores of `model` as it runs now."""
    texts = {"wikitext2-test": read_text("wikitext2-test"), "lambada": lambada_text(Path(args.task_data), 2000)}
    ppl = {name: perplexity(model, tokenizer, text, ctx=512, max_windows=args.ppl_windows, progress=False).perplexity
           for name, text in texts.items()}
    return {"ppl": ppl, "tasks": score_tasks(model, tokenizer, args)}


def forward_cost(model, plan: Plan) -> int:
    """Multiply-accumulates per token of a forward pass under `plan`: the executed layers' and the head's weights."""
    with apply_plan(model, plan):
        layers = sum(p.numel() for p in decoder_layers(model).parameters() if p.dim() == 2)
    return layers + model.get_output_embeddings().weight.numel()


def budgets(model, plan: Plan, args) -> dict[str, int]:
    """Training steps per method at the LoRA-LM budget; `units` is that budget in MACs."""
    full, pruned = forward_cost(model, Plan.identity(plan.num_layers)), forward_cost(model, plan)
    tokens = args.batch_size * args.ctx
    units = args.lora_steps * tokens * 3 * pruned
    patch_units = args.patch_tokens * (full + 2 * pruned)
    kd_step = tokens * (3 * pruned + full)
    return {"lora": args.lora_steps, "kd": units // kd_step, "patch+kd": max(1, (units - patch_units) // kd_step),
            "units": units, "patch_units": patch_units}


def find_plan(model, tokenizer, source: str, remove: int, scratch: Path) -> tuple[str, str]:
    """The plan `layerlab prune` chooses for `remove` layers (its evaluation cut to almost nothing)."""
    from layerlab.prune import prune

    quick = EvalSettings(tasks=("ppl",), ppl_windows=1, max_new_tokens=1, speed_rounds=1, speed_prompt_tokens=8,
                         speed_decode_tokens=1)
    settings = PruneSettings(layers=remove, evaluation=quick, recovery=RecoverSettings(method="none"), export=False)
    data = prune(model, tokenizer, source, scratch / f"prune-{source}-{remove}", settings, resume=True, progress=False)
    return data["plan"], data["chosen_by"]


def run_method(model, tokenizer, plan: Plan, name: str, run: dict, args) -> dict:
    method, _, objective = name.partition("@")
    steps = run["budgets"]
    training = HealSettings(steps=steps.get(method, 1), ctx=run["ctx"], batch_size=run["batch_size"],
                            checkpoint_every=10 ** 6, seed=args.seed)
    patch = PatchSettings(tokens=args.patch_tokens, objective=objective or PatchSettings.objective)
    settings = RecoverSettings(method=method, training=training, patch=patch)
    started = time.perf_counter()
    try:
        recovery = recover(model, tokenizer, plan, settings, progress=args.progress)
    except LayerlabError as exc:  # e.g. a patch over a removed layer 0: a row that says why
        return {"method": name, "error": str(exc)}
    seconds = time.perf_counter() - started
    row = quality(recovery.model.eval(), tokenizer, args)
    record = {k: v for k, v in recovery.record.items() if k != "patch"} | (
        {"patch_blocks": recovery.record["patch"]["blocks"]} if "patch" in recovery.record else {})
    return row | {"method": name, "steps": steps.get(method), "seconds": seconds, "record": record}


def interval(values: list[int]) -> tuple[float, float]:
    """Mean and 95 % half-width (normal approximation) of 0/1 or paired -1/0/1 values."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def report(state: dict, args) -> None:
    """One table per run: perplexities, task accuracies, paired differences against `none`, shares kept."""
    for key, run in state["runs"].items():
        base = state["baselines"][run["model"]]
        rows = run["rows"]
        if not rows:
            continue
        print(f"\n## {key}: plan {run['plan']} (chosen by {run['chosen_by']}), {run['steps_removed']} of "
              f"{run['layers']} layers removed; budget {run['budgets']['units'] / 1e12:.2f} TMAC = "
              f"{run['budgets']['lora']} LoRA-LM steps of {run['batch_size']} x {run['ctx']} tokens")
        texts = list(base["ppl"])
        tasks = list(base["tasks"])
        header = f"{'method':<13}{'steps':>6}{'sec':>7}" + "".join(f"{t[:14] + ' ppl':>19}" for t in texts)
        header += "".join(f"{t:>17}" for t in tasks) + f"{'avg':>7}{'kept':>7}{'margin':>8}"
        print(header)
        chance = sum(base["tasks"][t]["chance"] for t in tasks) / len(tasks)
        base_avg = sum(interval(base["tasks"][t]["correct"])[0] for t in tasks) / len(tasks)
        none = rows.get("none")
        for name, row in [("baseline", base)] + list(rows.items()):
            if "error" in row:
                print(f"{name:<13} n/a: {row['error']}")
                continue
            line = f"{name:<13}{str(row.get('steps') or '-'):>6}{row.get('seconds', 0):>7.0f}"
            for t in texts:
                rise = ""
                if none and name not in ("baseline", "none"):
                    rise = f" ({(row['ppl'][t] - base['ppl'][t]) / (none['ppl'][t] - base['ppl'][t]):.2f})"
                line += f"{row['ppl'][t]:>12.2f}{rise:>7}"
            accs = []
            for t in tasks:
                mean, half = interval(row["tasks"][t]["correct"])
                accs.append(mean)
                line += f"{mean:>10.3f} ±{half:.3f}"
            avg = sum(accs) / len(accs)
            line += f"{avg:>7.3f}{avg / base_avg:>7.1%}{(avg - chance) / (base_avg - chance):>8.1%}"
            print(line)
        if none:
            print("paired difference against none (95 % interval); * = significant drop:")
            for name, row in rows.items():
                if name == "none" or "error" in row:
                    continue
                cells = []
                for t in tasks:
                    diff = [a - b for a, b in zip(row["tasks"][t]["correct"], none["tasks"][t]["correct"], strict=True)]
                    mean, half = interval(diff)
                    cells.append(f"{t} {mean:+.3f} ±{half:.3f}{' *' if mean + half < 0 else ''}")
                print(f"  {name:<13}" + "; ".join(cells))
        print("calibration perplexity before -> after (mix, not evaluation data):")
        for name, row in rows.items():
            before, after = (row.get("record", {}).get(f"calibration_perplexity_{k}") for k in ("before", "after"))
            if before is not None:
                print(f"  {name:<13}{before:.2f} -> {after:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["smollm2-135m:6,8", "gemma3-270m:4"],
                        help="MODEL:N[,N...] runs (layers removed)")
    parser.add_argument("--plan", action="append", default=[], help="MODEL:N=PLAN to skip the search for a run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lora-steps", type=int, default=40, help="LoRA-LM steps: the compute budget of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--patch-tokens", type=int, default=PatchSettings.tokens)
    parser.add_argument("--ppl-windows", type=int, default=16, help="windows of 512 tokens per held-out text")
    parser.add_argument("--rows", type=int, default=300, help="rows per task")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--task-data", default="/work/shared/data/tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--state", default=".scratch/recovery.json", help="finished rows (resume)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    state_path = Path(args.state)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"baselines": {}, "runs": {}}

    def save() -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state))

    given = dict(p.split("=", 1) for p in args.plan)
    scratch = Path(tempfile.gettempdir()) / "layerlab-recovery-bench"
    for run_spec in [] if args.report_only else args.runs:
        source, counts = run_spec.split(":")
        model, tokenizer = load(source)
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        if source not in state["baselines"]:
            state["baselines"][source] = quality(model, tokenizer, args)
            save()
        for remove in map(int, counts.split(",")):
            key = f"{source}:{remove}"
            run = state["runs"].get(key)
            if run is None:
                plan_text, chosen_by = (given[key], "--plan") if key in given else find_plan(
                    model, tokenizer, source, remove, scratch)
                plan = Plan.parse(plan_text, n)
                run = state["runs"][key] = {"model": source, "plan": plan.to_text(), "chosen_by": chosen_by,
                                            "layers": n, "steps_removed": n - len(plan.steps),
                                            "budgets": budgets(model, plan, args), "batch_size": args.batch_size,
                                            "ctx": args.ctx, "rows": {}}
                save()
            plan = Plan.parse(run["plan"], n)
            for method in args.methods.split(","):
                if method in run["rows"]:
                    continue
                print(f"{key} {run['plan']}: {method} ...", flush=True)
                run["rows"][method] = run_method(model, tokenizer, plan, method, run, args)
                save()
        del model
    print(f"perplexity: {args.ppl_windows} windows of 512 tokens per text; tasks: {args.rows} rows each "
          f"(acc_norm; HellaSwag rows {TASKS['hellaswag'][1]}+); (x.xx) after a perplexity: its rise over the "
          "baseline as a share of the unrecovered plan's rise; kept: share of the baseline's average accuracy; "
          "margin: share of its margin above chance")
    report(state, args)


if __name__ == "__main__":
    main()
