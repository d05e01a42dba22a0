"""Greedy search serially versus on N Ray workers: the same plan, wall time and memory per worker.

Runs (in ABBA order: serial, parallel, parallel, serial) the greedy search of `layerlab search` through
`jobs.search`, serially with `--threads` torch threads, and on `--workers` local Ray workers with
threads // workers each (the cores split fairly). Printed: whether every run chose the same plan and
trace, each run's wall time, the ratio serial / parallel (mean and the spread over the two pairs), the
driver's peak RSS and each worker's. The Ray start-up and the workers' model loads are inside the
parallel time: that is what a user waits for.

    python benchmarks/parallel_search.py [--model smollm2-135m] [--remove 3] [--workers 2] [--threads 2]
                                         [--ctx 64] [--windows 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from layerlab import jobs
from layerlab.settings import ModelSpec, ParallelSettings, SearchSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="Torch threads in all (serial: all of them).")
    parser.add_argument("--text", default="wikitext2-valid")
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-address", help="Use a running cluster instead of a local Ray runtime.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(args.model, device=args.device)
    common = dict(remove=args.remove, text=args.text, ctx=args.ctx, windows=args.windows)
    parallel = ParallelSettings(args.workers, args.ray_address, max(1, args.threads // args.workers))
    runs: list[tuple[str, float, jobs.SearchResult]] = []
    for name in ("serial", "parallel", "parallel", "serial"):
        settings = SearchSettings(spec, **common, parallel=parallel if name == "parallel" else ParallelSettings())
        start = time.perf_counter()
        found = jobs.search(settings)
        runs.append((name, time.perf_counter() - start, found))
    print(f"{args.model}: greedy search removing {args.remove}, {args.windows} windows of {args.ctx} tokens of "
          f"{args.text}, device {args.device}; serial on {args.threads} threads vs {args.workers} Ray workers "
          f"x {parallel.threads} threads")
    fields = ("removed", "plan", "loss", "candidates", "aborted")
    reference = [{k: t[k] for k in fields} for t in runs[0][2].state.trace]
    for name, seconds, found in runs:
        same = [{k: t[k] for k in fields} for t in found.state.trace] == reference
        workers = "" if found.workers is None else "  workers peak RSS " + ", ".join(
            f"{w['peak_rss_mb']:.0f} MB" for w in found.workers)
        print(f"  {name:8s} {seconds:7.1f} s  plan {found.plan.to_text()}  same trace as the first: {same}  "
              f"driver peak RSS {found.peak_memory_mb or 0:.0f} MB{workers}")
    pairs = [runs[0][1] / runs[1][1], runs[3][1] / runs[2][1]]  # serial / parallel, ABBA halves
    print(f"  serial / parallel: {sum(pairs) / 2:.2f}x (pairs {pairs[0]:.2f}, {pairs[1]:.2f}); "
          f"target >= {0.7 * args.workers:.1f}x where there are {args.workers} independent devices")


if __name__ == "__main__":
    main()
