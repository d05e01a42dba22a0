"""Perplexity fidelity: layerlab versus llama.cpp (llama-cpp-python) on the same GGUF, in one run.

llama.cpp's `perplexity` tool cuts the tokens into non-overlapping chunks of n_ctx, puts BOS first in
each chunk when the vocabulary asks for BOS, and scores the second half of every chunk; it is
reproduced through llama-cpp-python's logits (`layerlab.evaluate.artifact.llama_cpp_perplexity`), and
layerlab runs with `llama_cpp=True`, which scores the same tokens. Each side uses its own tokenizer,
as each tool would. Needs `pip install 'layerlab[llamacpp]'` (builds from source, about 8 minutes on 2 cores).

    python benchmarks/ppl_vs_llamacpp.py [--model smollm2-135m] [--text wikitext2-test] [--ctx 512] [--chunks N]
"""

from __future__ import annotations

import argparse
import time

import torch

import layerlab
from layerlab.corpora import read_text
from layerlab.evaluate.artifact import llama_cpp_perplexity
from layerlab.evaluate.perplexity import perplexity
from layerlab.models import EMBEDDED, resolve_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(EMBEDDED))
    parser.add_argument("--text", default="wikitext2-test")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="first N chunks only (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.text)

    start = time.perf_counter()
    reference, ref_tokens, ref_chunks = llama_cpp_perplexity(str(resolve_source(args.model)), text, args.ctx,
                                                             args.chunks, args.threads)
    llama_seconds = time.perf_counter() - start
    model, tokenizer = layerlab.load(args.model)
    start = time.perf_counter()
    ours = perplexity(model, tokenizer, text, ctx=args.ctx, llama_cpp=True, max_windows=args.chunks)
    ours_seconds = time.perf_counter() - start
    print(f"{args.model} on {args.text}, ctx {args.ctx}, non-overlapping, second half of each chunk scored")
    print(f"  llama.cpp  ppl {reference:.4f}  ({ref_tokens} tokens in {ref_chunks} chunks, {llama_seconds:.0f} s)")
    print(f"  layerlab   ppl {ours.perplexity:.4f}  ({ours.tokens} tokens in {ours.windows} windows, "
          f"{ours_seconds:.0f} s)")
    print(f"  relative difference {abs(ours.perplexity - reference) / reference:.4%}  (must be <= 1%)")


if __name__ == "__main__":
    main()
