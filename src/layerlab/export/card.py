"""The README written next to every export: source, plan, format, sizes, and numbers measured on the file.

The card only formats what it is given: sizes from the writer (`ExportResult`), quality and speed
from `layerlab.evaluate.artifact`, which loads the written file back from disk.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..io import TEXT_MARKER
from ..plan import Plan


def folder_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file in a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: int | None) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "-"


def card_text(source: str, plan: Plan, result, measured: dict | None = None) -> str:
    """Markdown model card for an `ExportResult`, with `measured` numbers when given."""
    dropped = sorted(set(range(plan.num_layers)) - set(plan.layers))
    load = {
        "hf": "`AutoModelForCausalLM.from_pretrained(DIR)`"
        + ("" if plan.whole_layers and not plan.kv else " with `trust_remote_code=True` (if written with "
           "`--remote-code`), or `layerlab.load(DIR)`")
        + (" (plain loading ignores `kv_sources` and runs every layer on its own keys and values)" if plan.kv else ""),
        "gguf": "llama.cpp (`llama-cli -m FILE`), llama-cpp-python, transformers (`gguf_file=`), "
                "or `layerlab.load(FILE)`",
    }[result.format]
    what = (f"Hugging Face safetensors, {result.dtype}" if result.format == "hf" else
            f"GGUF, quantization `{result.quant}`" + (" (every tensor keeps its source type)"
                                                      if result.quant == "source" else ""))
    ratio = f" ({result.ratio:.3f} of the source" + (f"; ideal {result.ideal_ratio:.3f}" if result.ideal_ratio
                                                     else "") + ")" if result.ratio else ""
    params = result.parameters
    rows = [("decoder layers", str(plan.num_layers), str(len(plan.steps))),
            ("parameters", f"{params[0] / 1e6:.1f} M" if params[0] else "-", f"{params[1] / 1e6:.1f} M"),
            ("bytes on disk", mib(result.source_bytes), mib(result.bytes) + ratio)]
    rows += _measured_rows(measured)
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""{TEXT_MARKER}
# layerlab export of {source}

- source: `{source}`
- plan: `{plan.to_text()}` ({len(plan.steps)} steps over {plan.num_layers} layers; dropped: \
{", ".join(map(str, dropped)) or "none"})
- format: {what}
- load with: {load}

| | source | export |
| --- | --- | --- |
{table}
{_tensor_lines(result.tensors)}{_measured_note(measured)}"""


def _measured_rows(measured: dict | None) -> list[tuple[str, str, str]]:
    if not measured:
        return [("perplexity", "not measured", "not measured")]
    src, out, settings = measured["source"], measured["export"], measured["settings"]
    rows = [(f"perplexity, {settings['text']} ({settings['windows']} windows of {settings['ctx']}), layerlab",
             f"{src['perplexity']['perplexity']:.3f}", f"{out['perplexity']['perplexity']:.3f}")]
    a, b = src.get("llama_cpp", {}), out.get("llama_cpp", {})
    if "error" in a or "error" in b:
        rows.append(("llama.cpp", "not measured", (a.get("error") or b.get("error"))[:200]))
    elif "perplexity" in a and "perplexity" in b:
        rows.append(("perplexity, llama.cpp (second half of each window scored)",
                     f"{a['perplexity']:.3f}", f"{b['perplexity']:.3f}"))
        speedup = measured["ratios"].get("llama_cpp_decode")
        if speedup:
            rows.append(("decode tok/s, llama.cpp", f"{a['decode_tokens_per_s']:.1f}",
                         f"{b['decode_tokens_per_s']:.1f} ({speedup:.2f}x, paired median)"))
    return rows


def _tensor_lines(tensors: list) -> str:
    if not tensors:
        return ""
    counts = Counter(t.action for t in tensors)
    kinds = Counter(f"{t.source_type} -> {t.type}" for t in tensors if t.action != "copied")
    notes = sorted({t.note for t in tensors if t.note})
    lines = [f"\nTensors: {counts['copied']} copied byte for byte, {counts['requantized']} re-quantized from the "
             f"source's values, {counts['rewritten']} rewritten with changed values."]
    if kinds:
        lines.append("Types changed: " + ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items())) + ".")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _measured_note(measured: dict | None) -> str:
    if not measured:
        return ""
    return ("\nMeasured by `layerlab.evaluate.artifact` on the files as loaded back from disk "
            "(source and export side by side).\n")
