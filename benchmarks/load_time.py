"""First (GGUF conversion) versus cached load time of an embedded model, in one run.

Each load runs in a fresh Python process against a new, empty cache folder, so the first load
includes dequantizing the GGUF and writing the safetensors copy, and the second reads that copy.

    python benchmarks/load_time.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
import layerlab, transformers, torch
start = time.perf_counter()
layerlab.load(sys.argv[1])
print(time.perf_counter() - start)
"""


def timed_load(model: str, cache: str) -> tuple[float, float]:
    """Seconds of the whole process and of the `load()` call alone (after imports)."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, model], check=True, capture_output=True, text=True,
                           env={**os.environ, "LAYERLAB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start, float(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(args.model, cache)
        cached = timed_load(args.model, cache)
    print(f"model {args.model}: load() {first[1]:.1f} s first (converts the GGUF), {cached[1]:.1f} s cached, "
          f"ratio {first[1] / cached[1]:.1f}; whole process {first[0]:.1f} s vs {cached[0]:.1f} s")


if __name__ == "__main__":
    main()
