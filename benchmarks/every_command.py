"""Every command that runs a model, once, on one model with small budgets: does it run, how long, how much memory.

Each command runs in a fresh child process (its peak resident set is its own, from the kernel's rusage); the
table shows the exit status, wall time, peak RSS and the command's last line of output. Two caveats on the
peak: it counts the pages of memory-mapped files the process read (a model loaded in bfloat16 from the
float32 cache of a GGUF reads all of that file; the kernel can reclaim those pages), and a command that
measures its own peak resets the high-water mark when its measurement starts (`eval` after the model
loads), so for those it is the peak the command itself reports. The budgets are
small (a few windows, five rows per task, ten training steps): this shows that a model goes through every
command, not what the numbers are -- the quality tables are `method_quality.py` and `recovery.py`.

    python benchmarks/every_command.py [--model qwen2.5-0.5b] [--plan skip:10-13] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(args, out: Path) -> dict[str, list[str]]:
    """Each command with the small budget this benchmark runs it at."""
    plan, ctx = ["-p", args.plan], ["--ctx", "128"]
    return {
        "generate": ["generate", *plan, "-n", "8"],
        "eval": ["eval", *plan, "-t", "ppl,arc_easy,samples,speed", "--rows", "5", "--ppl-windows", "2", *ctx,
                 "-n", "8", "--speed-rounds", "1", "-o", str(out / "eval")],
        "score": ["score", "--windows", "2", *ctx, "-o", str(out / "score")],
        "score --streamed": ["score", "--windows", "2", *ctx, "--streamed", "-o", str(out / "score-streamed")],
        "analyze": ["analyze", *plan, "--max-heads", "2", "-o", str(out / "analyze")],
        "search --method angular": ["search", "-r", "4", "--method", "angular", "--windows", "2", *ctx],
        "search (greedy)": ["search", "-r", "2", "--windows", "1", *ctx, "--keep", "0.25",
                            "--state", str(out / "search.json")],
        "export gguf": ["export", *plan, "-o", str(out / "export.gguf"), "--eval-windows", "1"],
        "export hf": ["export", *plan, "-f", "hf", "-o", str(out / "export-hf"), "--eval-windows", "1"],
        "heal patch": ["heal", *plan, "--method", "patch", "--calib-tokens", "1024", *ctx, "--eval-windows", "1",
                       "-o", str(out / "heal-patch")],
        "heal lora": ["heal", *plan, "--method", "lora", "--steps", "10", *ctx, "--eval-windows", "1",
                      "-o", str(out / "heal-lora")],
        "speculate": ["speculate", "-d", args.plan, "--prompt", "Once upon a time", "-n", "16"],
        "prune --method bi --streamed": ["prune", "--method", "bi", "--layers", "4", "--windows", "2", *ctx,
                                         "--streamed", "-o", str(out / "prune-bi")],
        "prune (the main job)": ["prune", "--layers", "2", "--windows", "1", *ctx, "--keep", "0.25",
                                 "--ppl-windows", "1", "-t", "ppl,arc_easy", "--rows", "5", "--heal", "patch",
                                 "-o", str(out / "prune")],
    }


def run(argv: list[str]) -> tuple[int, float, float, str]:
    """Exit status, wall seconds, peak RSS in MB and the last output line of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = [line.strip() for line in log.read().replace("\r", "\n").splitlines() if line.strip()]
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024, (lines or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--plan", default="skip:10-13")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    layerlab = str(Path(sys.executable).parent / "layerlab")
    print(f"{args.model} ({args.dtype}), plan {args.plan}; each command in its own process")
    print(f"{'command':30s} {'exit':>4s} {'wall s':>7s} {'peak MB':>8s}  last line of output")
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, argv in commands(args, Path(folder)).items():
            code, seconds, peak, last = run([layerlab, argv[0], "-m", args.model, "--dtype", args.dtype, *argv[1:]])
            failed += code != 0
            print(f"{name:30s} {code:4d} {seconds:7.1f} {peak:8.0f}  {last[:110]}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
