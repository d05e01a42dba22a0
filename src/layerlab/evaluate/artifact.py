"""Measuring an exported file as it is on disk, not the in-memory model it came from.

Each file is loaded back the way a user would load it: a GGUF through transformers' GGUF loader
(`gguf_file=`, which dequantizes every tensor; no conversion cache is written), a folder through
`layerlab.load` (which honours LLM-Drop lists). Its perplexity is measured with layerlab's windows
(the same as `evaluate.compare`, so it sits next to the in-memory rows). When llama-cpp-python is
installed, a GGUF is also measured in llama.cpp: perplexity the way llama.cpp's `perplexity` tool
computes it (second half of each window scored), and decode tokens/s, each measurement in a fresh
process, source and export alternating over rounds (the median and the spread are reported; timings
on a busy machine are noise).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..corpora import read_text
from ..errors import LayerlabError
from ..quant import llama_cpp_available
from .perplexity import perplexity


@dataclass(frozen=True)
class ArtifactSettings:
    """What to measure on each file; `speed_rounds=0` skips llama.cpp's decode timing."""

    text: str = "wikitext2-test"
    ctx: int = 512
    windows: int | None = 8
    llama_cpp: bool = True  # also measure GGUF files in llama.cpp, when llama-cpp-python is installed
    speed_rounds: int = 3
    decode_tokens: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.ctx < 2 or (self.windows is not None and self.windows < 1):
            raise LayerlabError(f"artifact perplexity needs ctx >= 2 and windows >= 1 (got {self.ctx}, {self.windows})")
        if self.speed_rounds < 0 or self.decode_tokens < 1:
            raise LayerlabError("speed_rounds must be >= 0 and decode_tokens >= 1")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def load_file(path: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` from a written file or folder, as a user would load it (no layerlab cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.gguf import gguf_load_kwargs
    from ..models import load

    path = Path(path)
    if not is_gguf(path):
        model, own = load(str(path), dtype=dtype)
        return model, tokenizer or own
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 **gguf_load_kwargs(path))
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@torch.no_grad()
def file_perplexity(path: str | Path, settings: ArtifactSettings, tokenizer=None) -> dict:
    """layerlab perplexity of the model stored at `path`."""
    model, tokenizer = load_file(path, tokenizer)
    try:
        return perplexity(model, tokenizer, read_text(settings.text), ctx=settings.ctx,
                          max_windows=settings.windows, progress=False).to_dict()
    finally:
        del model
        gc.collect()


def llama_cpp_perplexity(path: str | Path, text: str, ctx: int, chunks: int | None,
                         threads: int | None = None) -> tuple[float, int, int]:
    """Perplexity, scored tokens and chunks, computed the way llama.cpp's perplexity tool does.

    The tokens are cut into non-overlapping chunks of `ctx`, BOS first in each chunk when the
    vocabulary asks for BOS, and the second half of every chunk is scored.
    """
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False,
                          n_threads=threads)
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
    llm.close()
    return math.exp(nll / scored), scored, count


PERPLEXITY_CHILD = r"""
import json, sys
from layerlab.evaluate.artifact import llama_cpp_perplexity
path, ctx, chunks, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None, int(sys.argv[4]) or None
print(json.dumps(llama_cpp_perplexity(path, sys.stdin.read(), ctx, chunks, threads)))
"""


def run_child(script: str, path: Path, *args: object, stdin: str | None = None):
    """Run a llama.cpp measuring `script` on `path` in a fresh Python process and return the JSON of its last
    output line. A crash inside llama.cpp (some llama-cpp-python builds segfault on some CPUs) becomes a
    LayerlabError here instead of killing the job."""
    done = subprocess.run([sys.executable, "-c", script, str(path), *map(str, args)], input=stdin,
                          capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise LayerlabError(f"llama.cpp could not run {path}: {reason}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_perplexity_isolated(path: Path, settings: ArtifactSettings) -> tuple[float, int, int]:
    """`llama_cpp_perplexity` in a child process (`run_child`)."""
    ppl, tokens, chunks = run_child(PERPLEXITY_CHILD, path, settings.ctx, settings.windows or 0,
                                    settings.threads or 0, stdin=read_text(settings.text))
    return ppl, tokens, chunks


DECODE_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
prompt = llm.tokenize(b"Once upon a time, in a small village by the sea,", add_bos=True)
def last_logits():  # the context's logits of the last token (eval() keeps none without logits_all)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
llm.eval(prompt)
token = int(np.argmax(last_logits()))
start = time.perf_counter()
for _ in range(tokens):
    llm.eval([token])
    token = int(np.argmax(last_logits()))
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"tokens_per_s": tokens / seconds, "peak_mb": peak / 1024}))
"""


def llama_cpp_decode(paths: dict[str, Path], rounds: int, tokens: int, threads: int | None = None) -> dict[str, dict]:
    """Greedy decode tokens/s of each file in llama.cpp, one fresh process per run, the order rotating each
    round; round 0 warms the page cache and is discarded. The median and every round's value per file."""
    names = list(paths)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(rounds + 1):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            run = run_child(DECODE_CHILD, paths[name], tokens, threads or 0)
            if index:
                runs[name].append(run)
    out = {}
    for name, samples in runs.items():
        speeds = [s["tokens_per_s"] for s in samples]
        out[name] = {"decode_tokens_per_s": statistics.median(speeds), "decode_samples": speeds,
                     "peak_mb": statistics.median(s["peak_mb"] for s in samples), "rounds": rounds}
    return out


def measure_files(files: dict[str, Path], settings: ArtifactSettings | None = None, tokenizer=None) -> dict:
    """Every file's bytes and layerlab perplexity, and when every file is a GGUF llama.cpp's perplexity and
    decode speed (measured side by side), keyed like `files`."""
    settings = settings or ArtifactSettings()
    rows = {name: {"path": str(path), "bytes": _bytes(Path(path)),
                   "perplexity": file_perplexity(path, settings, tokenizer)} for name, path in files.items()}
    ggufs = {name: Path(path) for name, path in files.items() if is_gguf(Path(path))}
    if settings.llama_cpp and len(ggufs) == len(files) and llama_cpp_available():  # side by side, or not at all
        try:
            for name, path in ggufs.items():
                ppl, tokens, chunks = llama_cpp_perplexity_isolated(path, settings)
                rows[name]["llama_cpp"] = {"perplexity": ppl, "tokens": tokens, "chunks": chunks}
            if settings.speed_rounds:
                for name, speed in llama_cpp_decode(ggufs, settings.speed_rounds, settings.decode_tokens,
                                                    settings.threads).items():
                    rows[name]["llama_cpp"] |= speed
        except LayerlabError as exc:  # llama.cpp is an extra measurement: its failure is reported, not fatal
            warnings.warn(f"llama.cpp measurements skipped: {exc}", stacklevel=2)
            for name in ggufs:
                rows[name]["llama_cpp"] = {"error": str(exc)}
    return rows


def measure_exports(results: dict, source: str, settings: ArtifactSettings | None = None, tokenizer=None) -> dict:
    """Each exported file next to its source, all as on disk and measured side by side (llama.cpp's decode
    runs alternate over all of them): `{name: {"source", "export", "settings", "ratios"}}` for `results`,
    a dict of name -> `ExportResult`. A hub-id source is loaded with `layerlab.load`."""
    from ..models import resolve_source

    settings = settings or ArtifactSettings()
    resolved = resolve_source(source)
    files = {"source": resolved if isinstance(resolved, Path) else Path(str(resolved))}
    files |= {name: Path(result.path) for name, result in results.items()}
    rows = measure_files(files, settings, tokenizer)
    return {name: {"source": rows["source"], "export": rows[name], "settings": asdict(settings),
                   "ratios": _ratios(rows["source"], rows[name], result.ratio)} for name, result in results.items()}


def measure_export(result, source: str, settings: ArtifactSettings | None = None, tokenizer=None) -> dict:
    """One exported file next to its source: `{"source", "export", "settings", "ratios"}`."""
    return measure_exports({"export": result}, source, settings, tokenizer)["export"]


def _ratios(source: dict, export: dict, size_ratio: float | None) -> dict:
    ppl = export["perplexity"]["perplexity"] / source["perplexity"]["perplexity"]
    ratios = {"bytes": size_ratio, "perplexity": ppl}
    a, b = source.get("llama_cpp", {}), export.get("llama_cpp", {})
    if "perplexity" in a and "perplexity" in b:  # measured (not skipped after a llama.cpp failure)
        ratios["llama_cpp_perplexity"] = b["perplexity"] / a["perplexity"]
        if "decode_samples" in a:  # paired by round: both ran back to back
            paired = [y / x for x, y in zip(a["decode_samples"], b["decode_samples"], strict=True)]
            ratios["llama_cpp_decode"] = statistics.median(paired)
            ratios["llama_cpp_decode_range"] = [min(paired), max(paired)]
    return ratios


def _bytes(path: Path) -> int | None:
    from ..export.card import folder_bytes

    return folder_bytes(path) if path.exists() else None  # a hub id has no local bytes
