"""Perplexity fidelity: layerlab versus llama.cpp (llama-cpp-python) on the same GGUF, in one run.

llama.cpp's `perplexity` tool cuts the tokens into non-overlapping chunks of n_ctx, puts BOS first in
each chunk when the vocabulary asks for BOS, and scores the second half of every chunk; it is
reproduced here through llama-cpp-python's logits, and layerlab runs with `llama_cpp=True`, which
scores the same tokens. Each side uses its own tokenizer, as each tool would. Needs
`pip install llama-cpp-python` (builds from source, about 8 minutes on 2 cores).

    python benchmarks/ppl_vs_llamacpp.py [--model smollm2-135m] [--text wikitext2-test] [--ctx 512] [--chunks N]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import layerlab
from layerlab.corpora import read_text
from layerlab.evaluate.perplexity import perplexity
from layerlab.models import EMBEDDED, resolve_source


def llama_cpp_perplexity(gguf: str, text: str, ctx: int, chunks: int | None,
                         threads: int | None = None) -> tuple[float, int, int]:
    """Perplexity, scored tokens and chunks, computed the way llama.cpp's perplexity tool does."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=threads)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # adds BOS only if add_bos
    count = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    first, nll, scored = ctx // 2, 0.0, 0
    for i in range(count):
        chunk = tokens[i * ctx:(i + 1) * ctx]
        if add_bos:
            chunk = [llm.token_bos()] + chunk[1:]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[first:ctx - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logprobs[np.arange(len(logits)), chunk[first + 1:ctx]].sum()
        scored += len(logits)
    return math.exp(nll / scored), scored, count


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
