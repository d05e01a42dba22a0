"""Every zero-shot task: layerlab against lm-evaluation-harness's `hf` model on the same rows, in one run.

For each task, the same rows (the first N; MMLU's round-robin over subjects) are written to a local JSONL
file and scored by lm-eval 0.4.13 through a local task definition (`lm_eval_adapter.write_task`: no hub;
WinoGrande as multiple inputs, LAMBADA as loglikelihood with an empty delimiter) and by layerlab
(`evaluate/tasks.py`), with the same loaded model. Printed per task: each side's metrics, per-item
agreement (every metric lm-eval reports for the item: the prediction, or LAMBADA's greedy match), the
largest log-likelihood difference, items/s of each and the throughput ratio. The two sides are timed
side by side in interleaved rounds (order alternating; both warmed up on two rows first); with several
rounds the ratio is the median of per-round ratios with its spread (`evaluate/speed.py`).

    python benchmarks/tasks_vs_lm_eval.py [--model smollm2-135m] [--tasks suite] [--rows 200]
        [--data /work/shared/data/tasks] [--rounds 1] [--lm-eval-batch-size 1] [--batch-size B] [--device cpu]
        [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import layerlab
from layerlab.evaluate.lm_eval_adapter import write_task_rows
from layerlab.evaluate.speed import Rounds, compare_speed
from layerlab.evaluate.tasks import TASKS, TaskData, load_task, parse_tasks, run_task, summarize


def lm_eval_run(lm, task_manager, name: str) -> tuple[dict, list[dict]]:
    """lm-eval's aggregate metrics and its per-document samples, in document order."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[name], task_manager=task_manager, log_samples=True, verbosity="ERROR",
                          bootstrap_iters=0)  # no stderr bootstrap: only the model's work is timed
    return out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])


def agreement(data: TaskData, ours, samples: list[dict]) -> dict:
    """Per-item agreement of every metric lm-eval reports per document, and the largest log-likelihood gap."""
    same = {}
    for metric in data.task.metrics:
        if metric == "perplexity":
            continue
        same[metric] = sum(float(s[metric]) == v for s, v in zip(samples, ours.per_item[metric], strict=True))
    gap = max(abs(a - r[0]) for s, lls in zip(samples, ours.loglikelihoods, strict=True)
              for a, r in zip(lls, s["filtered_resps"], strict=True))
    return {"same": same, "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="suite")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--data", default=None, help="folder of full task files (default: the bundled subsets)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of both sides, interleaved")
    parser.add_argument("--lm-eval-batch-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="layerlab: whole sequences per forward pass (default: shared contexts, CPU batches)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = layerlab.load(args.model, device=args.device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch_size)
    names = [n for n in parse_tasks(args.tasks) if n in TASKS]
    folder = Path(tempfile.mkdtemp(prefix="layerlab-tasks-"))
    datas = {n: load_task(n, args.rows, args.data) for n in names}
    warm = {n: replace(d, items=d.items[:2]) for n, d in datas.items()}
    local = {n: write_task_rows(d, folder) for n, d in datas.items()}
    local |= {f"warm:{n}": write_task_rows(d, folder, f"layerlab_{n}_warmup") for n, d in warm.items()}
    task_manager = TaskManager(include_path=str(folder))
    print(f"{args.model} on {args.device}; the first {args.rows} rows of each task ({args.data or 'bundled subsets'}); "
          f"lm-eval {lm.batch_size} per batch, layerlab {args.batch_size or 'shared contexts'}; "
          f"{args.rounds} timed round(s), interleaved; torch threads {torch.get_num_threads()}", flush=True)
    totals = {"ours": 0.0, "theirs": 0.0, "items": 0}
    for name, data in datas.items():
        run_task(model, tokenizer, warm[name], args.batch_size, progress=False)
        lm_eval_run(lm, task_manager, local[f"warm:{name}"])
        kept: dict[str, object] = {}

        def ours(data=data, kept=kept):
            start = time.perf_counter()
            kept["ours"] = run_task(model, tokenizer, data, args.batch_size, progress=False)
            return time.perf_counter() - start

        def theirs(name=name, kept=kept):
            start = time.perf_counter()
            kept["theirs"] = lm_eval_run(lm, task_manager, local[name])
            return time.perf_counter() - start

        samples, ratios = compare_speed({"layerlab": ours, "lm-eval": theirs}, "lm-eval",
                                        Rounds(args.rounds, args.rounds, warmup=False))
        result, (metrics, docs) = kept["ours"], kept["theirs"]
        summary, check, n = summarize(result), agreement(data, result, docs), len(data.items)
        seconds = {side: sorted(values)[len(values) // 2] for side, values in samples.items()}
        totals["ours"] += seconds["layerlab"]
        totals["theirs"] += seconds["lm-eval"]
        totals["items"] += n
        shown = "  ".join(f"{m} {summary['metrics'][m]['value']:.4f} / {metrics[m + ',none']:.4f}"
                          for m in data.task.metrics)
        same = "  ".join(f"{m} {k}/{n} ({k / n:.1%})" for m, k in check["same"].items())
        print(f"{name:15s} rows {n}  layerlab / lm-eval: {shown}\n"
              f"{'':15s} per-item agreement: {same}; largest log-likelihood difference {check['gap']:.2e}\n"
              f"{'':15s} items/s layerlab {n / seconds['layerlab']:.2f}, lm-eval {n / seconds['lm-eval']:.2f}; "
              f"throughput ratio {ratios['time']['layerlab'].text()}", flush=True)
    print(f"all tasks: {totals['items']} items, layerlab {totals['items'] / totals['ours']:.2f} items/s, lm-eval "
          f"{totals['items'] / totals['theirs']:.2f} items/s, time ratio lm-eval / layerlab "
          f"{totals['theirs'] / totals['ours']:.2f}")


if __name__ == "__main__":
    main()
