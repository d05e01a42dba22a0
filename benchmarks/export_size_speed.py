"""File size, peak memory and llama.cpp decode speed of an original and a pruned GGUF, side by side.

The pruned file drops whole layers (default: 6 of SmolLM2's 30, those with the lowest Block
Influence; any 6 give the same size and speed). Each measurement runs llama.cpp (llama-cpp-python)
in a fresh process that reports its decode tokens/s and its peak resident memory (VmHWM); original
and pruned alternate over several rounds (a discarded warm-up round first; more rounds, up to
--max-rounds, while the per-round speed-ups disagree: `evaluate/speed.py`). The decode speed-up is the
median of the per-round ratios with its interquartile range, or "unreliable" when the rounds disagree;
memory is compared by medians. Every ratio is printed next to the ideal that the removed share of the
weights implies (decode on CPU reads every weight once per token).

    python benchmarks/export_size_speed.py [--model smollm2-135m] [--plan skip:3,12-15,25] [--rounds 5]
        [--max-rounds 11]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gguf import GGUFReader

from layerlab import Plan
from layerlab.evaluate.artifact import DECODE_CHILD, run_child
from layerlab.evaluate.speed import Rounds, compare_speed
from layerlab.export.gguf import prune_gguf
from layerlab.models import EMBEDDED


def measure(path: Path, tokens: int) -> dict:
    """One llama.cpp decode run in a fresh process (`evaluate.artifact`'s child): tokens/s and peak RSS."""
    return run_child(DECODE_CHILD, path, tokens, 2)


def block_bytes(path: Path) -> tuple[int, dict[int, int]]:
    """All tensor bytes, and the bytes of each `blk.N` block."""
    total, blocks = 0, {}
    for tensor in GGUFReader(str(path)).tensors:
        total += int(tensor.n_bytes)
        if tensor.name.startswith("blk."):
            layer = int(tensor.name.split(".")[1])
            blocks[layer] = blocks.get(layer, 0) + int(tensor.n_bytes)
    return total, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    parser.add_argument("--plan", default="skip:3,12-15,25")  # the 6 lowest Block Influence layers
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds at least")
    parser.add_argument("--max-rounds", type=int, default=11, help="rounds at most, while the speed-ups disagree")
    args = parser.parse_args()
    source = EMBEDDED[args.model].locate()
    total, blocks = block_bytes(source)
    plan = Plan.parse(args.plan, len(blocks))
    kept = sum(blocks[layer] for layer in plan.layers) + total - sum(blocks.values())
    with tempfile.TemporaryDirectory() as folder:
        pruned = prune_gguf(source, plan, Path(folder) / "pruned.gguf")
        measures = {"original": lambda: measure(source, args.tokens), "pruned": lambda: measure(pruned, args.tokens)}
        runs, speedups = compare_speed(measures, "original", Rounds(args.rounds, args.max_rounds),
                                       {"decode": lambda r: 1 / r["tokens_per_s"]})
        sizes = {"original": source.stat().st_size, "pruned": pruned.stat().st_size}
    speed = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    peak = {k: statistics.median(r["peak_mb"] for r in v) for k, v in runs.items()}
    ideal = kept / total
    print(f"{args.model}: plan {plan} ({len(plan.steps)} of {plan.num_layers} layers); removed share of the "
          f"weight bytes {1 - ideal:.1%}; {args.tokens} decode tokens, {len(runs['pruned'])} alternating rounds, "
          f"llama.cpp")
    print(f"  file size   original {sizes['original'] / 2**20:7.1f} MiB  pruned {sizes['pruned'] / 2**20:7.1f} MiB"
          f"  ratio {sizes['pruned'] / sizes['original']:.3f}  (ideal {ideal:.3f})")
    print(f"  peak memory original {peak['original']:7.1f} MiB  pruned {peak['pruned']:7.1f} MiB"
          f"  ratio {peak['pruned'] / peak['original']:.3f}  (ideal for the weights {ideal:.3f}; the rest is runtime)")
    print(f"  decode      original {speed['original']:7.1f} tok/s  pruned {speed['pruned']:7.1f} tok/s (medians)"
          f"  speed-up per round {speedups['decode']['pruned'].text()}  (ideal {1 / ideal:.3f})")


if __name__ == "__main__":
    main()
