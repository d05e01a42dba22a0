"""What a linear patch costs: fit time and peak memory against the calibration token budget.

Each (budget, objective) runs in its own process, so the peak resident memory (ru_maxrss) is that
run's alone; the rounds are interleaved (budget order reversed every other round) so a busy machine
slows all budgets alike. The least-squares fit keeps d x d sums and the cosine objective streams its
tokens to disk, so memory should not grow with the budget; time grows linearly (one full-model pass
over the calibration tokens, plus two pruned passes for the before / after check).

    python benchmarks/patch_cost.py --budgets 8192 65536 --objectives lstsq cosine --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time


def child(model: str, plan_text: str, tokens: int, objective: str, threads: int) -> None:
    """One patch fit; prints its seconds and the process's peak RSS as JSON."""
    import torch

    from layerlab import Plan, load
    from layerlab.patch import patch
    from layerlab.settings import PatchSettings

    torch.set_num_threads(threads)
    loaded, tokenizer = load(model)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan = Plan.parse(plan_text, loaded.config.num_hidden_layers)
    started = time.perf_counter()
    result = patch(loaded, tokenizer, plan, PatchSettings(tokens=tokens, objective=objective), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - started, "fit_seconds": result.fit_seconds,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_mb": loaded_rss,
                      "ppl": [result.summary()["perplexity_before"], result.summary()["perplexity_after"]]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", default="skip:13-18")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--objectives", nargs="+", default=["lstsq", "cosine"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.plan, int(args.child[0]), args.child[1], args.threads)
        return
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    runs = [(b, o) for b in args.budgets for o in args.objectives]
    results: dict[tuple, list[dict]] = {run: [] for run in runs}
    for round_index in range(args.rounds):
        for budget, objective in runs if round_index % 2 == 0 else runs[::-1]:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--plan", args.plan, "--threads",
                                  str(args.threads), "--child", str(budget), objective],
                                 capture_output=True, text=True, check=True)
            results[(budget, objective)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}: {budget} tokens, {objective}: {results[(budget, objective)][-1]}",
                  flush=True)
    print(f"\n{args.model}, plan {args.plan}, {args.threads} threads; median (min-max) of {args.rounds} rounds")
    print(f"{'tokens':>8} {'objective':>9} {'fit s':>16} {'total s':>16} {'peak RSS MB':>12} {'after load MB':>14} "
          "calibration ppl")
    for (budget, objective), rows in results.items():
        def cell(key: str, rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"
        print(f"{budget:>8} {objective:>9} {cell('fit_seconds'):>16} {cell('seconds'):>16} "
              f"{max(r['peak_mb'] for r in rows):>12.0f} {max(r['loaded_mb'] for r in rows):>14.0f} "
              f"{rows[0]['ppl'][0]:.2f} -> {rows[0]['ppl'][1]:.2f}")


if __name__ == "__main__":
    main()
