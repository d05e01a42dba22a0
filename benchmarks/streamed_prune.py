"""One-shot pruning streamed (one decoder layer, then one tensor, in memory at a time) versus the model loaded whole.

Each mode runs `layerlab prune --method METHOD --layers N` in a fresh child process, so each peak resident set
(VmHWM, what `report.json` records as `peak_memory_mb`) is that mode's alone:
- streamed, the GGUF's own types (kept tensors copied byte for byte);
- streamed into `--quant` (each kept tensor dequantized and quantized again, one at a time);
- loaded whole into `--quant` (the model is loaded to score it; the file is written the same way).
Printed: each peak, the streamed / whole ratios, each file's size, and whether the two `--quant` files are
byte-identical (the same plan written by the same writer). Run `layerlab generate -m MODEL -n 1` once
beforehand so that a GGUF's one-time conversion to a cached folder is not counted in the whole-model run.

    python benchmarks/streamed_prune.py [--model qwen2.5-1.5b] [--layers 6] [--quant Q8_0] [--ctx 128] [--windows 2]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(args, folder: Path, name: str, streamed: bool, quant: str) -> dict:
    """One `layerlab prune` in a child process; its report, with the written file's path."""
    out = folder / name
    command = [str(Path(sys.executable).parent / "layerlab"), "prune", "-m", args.model, "--method", args.method,
               "--layers", str(args.layers), "--ctx", str(args.ctx), "--windows", str(args.windows),
               "--quant", quant, "--out", str(out)] + (["--streamed"] if streamed else [])
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return report | {"file": out / "model.gguf"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--method", default="bi")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--quant", default="Q8_0", help="a type the gguf package writes (no llama.cpp needed)")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        runs = {"streamed, source types": run(args, folder, "copy", True, "source"),
                f"streamed, {args.quant}": run(args, folder, "streamed", True, args.quant),
                f"whole model, {args.quant}": run(args, folder, "whole", False, args.quant)}
        whole = runs[f"whole model, {args.quant}"]
        same = filecmp.cmp(runs[f"streamed, {args.quant}"]["file"], whole["file"], shallow=False)
        print(f"{args.model}: prune --method {args.method} --layers {args.layers} ({args.windows} windows of "
              f"{args.ctx} tokens), CPU float32; plan {whole['plan']}")
        for name, report in runs.items():
            print(f"  {name:24s} peak RSS {report['peak_memory_mb']:7.0f} MB  "
                  f"({report['peak_memory_mb'] / whole['peak_memory_mb']:.3f} of the whole model's)  "
                  f"model.gguf {report['file'].stat().st_size / 2**20:7.0f} MiB  plan {report['plan']}")
        print(f"  the two {args.quant} files are byte-identical: {same}")


if __name__ == "__main__":
    main()
