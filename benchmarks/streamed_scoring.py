"""Scoring streamed (one decoder layer in memory at a time) versus the whole model loaded: peak RSS and scores.

Each mode runs `layerlab score` (through `jobs.score`) in a fresh child process, so each peak resident
set (VmHWM, what `scores.json` reports as `peak_memory_mb`) is that mode's alone. Printed: both peaks
and their ratio (target <= 0.3), and the largest relative difference between the two runs' scores
(Block Influence, attention / MLP importance, angular distances; target <= 1e-4). Run the whole-model
mode once beforehand (or `layerlab generate -m MODEL -n 1`) so that a GGUF's one-time conversion to a
cached folder is not counted.

    python benchmarks/streamed_scoring.py [--model qwen2.5-0.5b] [--ctx 128] [--windows 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys
from layerlab import jobs
from layerlab.settings import ModelSpec, ScoreSettings
model, text, ctx, windows, streamed, out = sys.argv[1:]
jobs.score(ScoreSettings(ModelSpec(model, device="cpu"), text=text, ctx=int(ctx), windows=int(windows),
                         out=out, streamed=streamed == "1"))
"""


def run(args, streamed: bool, folder: Path) -> dict:
    out = folder / ("streamed" if streamed else "whole")
    subprocess.run([sys.executable, "-c", CHILD, args.model, args.text, str(args.ctx), str(args.windows),
                    "1" if streamed else "0", str(out)], check=True, stdin=subprocess.DEVNULL)
    return json.loads((out / "scores.json").read_text())


def numbers(scores: dict) -> list[float]:
    """Every score of a scores.json, flattened in a fixed order (None where a step has no such half)."""
    out = []
    for key in ("block_influence", "attention_importance", "mlp_importance", "angular_distance"):
        values = scores[key]
        flat = [v for row in values for v in row] if values and isinstance(values[0], list) else values
        out += [v for v in flat if v is not None]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--text", default="wikitext2-valid")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        whole, streamed = run(args, False, Path(folder)), run(args, True, Path(folder))
    a, b = numbers(whole), numbers(streamed)
    assert len(a) == len(b), "the two runs scored different units"
    relative = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))
    ratio = streamed["peak_memory_mb"] / whole["peak_memory_mb"]
    print(f"{args.model}: score on {args.windows} windows of {args.ctx} tokens of {args.text}, CPU float32")
    print(f"  whole model  peak RSS {whole['peak_memory_mb']:7.0f} MB")
    print(f"  streamed     peak RSS {streamed['peak_memory_mb']:7.0f} MB")
    print(f"  streamed / whole: {ratio:.3f} (target <= 0.3)")
    print(f"  scores compared: {len(a)}; largest relative difference {relative:.2e} (target <= 1e-4)")


if __name__ == "__main__":
    main()
