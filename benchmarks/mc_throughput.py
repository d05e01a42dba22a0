"""Multiple choice: layerlab versus lm-evaluation-harness's `hf` model on the same rows, in one run.

Both score the same HellaSwag rows (lm-eval through a local task definition over the bundled JSONL,
no hub) with the same loaded model. Printed: items/s of each, the throughput ratio, acc and acc_norm
of each, and how many per-item predictions (acc and acc_norm) agree.

    python benchmarks/mc_throughput.py [--model smollm2-135m] [--rows 1000] [--lm-eval-batch-size 1]
                                       [--batch-size B] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import layerlab
from layerlab.corpora import read_choices, resolve
from layerlab.evaluate.lm_eval_adapter import write_choice_task
from layerlab.evaluate.multiple_choice import multiple_choice


def lm_eval_scores(model, tokenizer, data: str, rows: int, batch_size: int) -> tuple[dict, list[list[float]]]:
    """lm-eval's metrics and per-item log-likelihoods, from its own HFLM on the loaded model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = write_choice_task(resolve(data), tempfile.mkdtemp())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=["layerlab_choice"], task_manager=TaskManager(include_path=str(folder)),
                          limit=rows, log_samples=True)
    samples = sorted(out["samples"]["layerlab_choice"], key=lambda s: s["doc_id"])
    return out["results"]["layerlab_choice"], [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="hellaswag-2k")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--lm-eval-batch-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="layerlab: whole sequences per forward pass (default: one item on its context cache)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, tokenizer = layerlab.load(args.model, device=args.device)
    items = read_choices(args.data, args.rows)

    start = time.perf_counter()
    ours = multiple_choice(model, tokenizer, items, batch_size=args.batch_size)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs, lls = lm_eval_scores(model, tokenizer, args.data, args.rows, args.lm_eval_batch_size)
    theirs_seconds = time.perf_counter() - start

    same = sum(argmax(ll) == s.prediction for ll, s in zip(lls, ours.scores, strict=True))
    same_norm = sum(argmax([v / len(e) for v, e in zip(ll, item.endings, strict=True)]) == s.prediction_norm
                    for ll, item, s in zip(lls, items, ours.scores, strict=True))
    gap = max(abs(a - b) for ll, s in zip(lls, ours.scores, strict=True) for a, b in zip(ll, s.loglikelihoods,
                                                                                        strict=True))
    n = len(items)
    print(f"{args.model} on the first {n} rows of {args.data}, device {args.device}")
    print(f"  layerlab (bs {args.batch_size or 'item'})  acc {ours.acc:.4f}  acc_norm {ours.acc_norm:.4f}  "
          f"{n / ours_seconds:.2f} items/s")
    print(f"  lm-eval hf (bs {args.lm_eval_batch_size})  acc {theirs['acc,none']:.4f}  "
          f"acc_norm {theirs['acc_norm,none']:.4f}  {n / theirs_seconds:.2f} items/s")
    print(f"  throughput ratio layerlab / lm-eval = {theirs_seconds / ours_seconds:.2f}  (must be >= 2)")
    print(f"  per-item predictions equal: acc {same}/{n} ({same / n:.1%}), acc_norm {same_norm}/{n} "
          f"({same_norm / n:.1%}); largest log-likelihood difference {gap:.2e}")


if __name__ == "__main__":
    main()
