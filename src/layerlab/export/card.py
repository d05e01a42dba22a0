"""The README written next to every export: source, plan, and measured quality and size beside the source's."""

from __future__ import annotations

from pathlib import Path

from ..corpora import read_text
from ..evaluate.perplexity import perplexity
from ..io import TEXT_MARKER
from ..plan import Plan
from ..runtime import apply_plan


def measure(model, tokenizer, plan: Plan, windows: int, ctx: int = 512) -> dict[str, dict]:
    """Perplexity and parameter count of the source and of the plan (what the export computes)."""
    text = read_text("wikitext2-test")
    rows = {}
    for name, chosen in (("source", Plan.identity(plan.num_layers)), ("export", plan)):
        with apply_plan(model, chosen):
            ppl = perplexity(model, tokenizer, text, ctx=ctx, max_windows=windows, progress=False) if windows else None
            rows[name] = {
                "layers": len(chosen.steps),
                "parameters": sum(p.numel() for p in model.parameters()) + _repeat_extra(model, chosen),
                "perplexity": ppl.perplexity if ppl else None,
            }
    rows["settings"] = {"text": "wikitext2-test", "ctx": ctx, "windows": windows}
    return rows


def _repeat_extra(model, plan: Plan) -> int:
    """Parameters that repeated layers add once they are written out as copies."""
    from ..arch import decoder_layers

    layers = decoder_layers(model)  # the plan's step modules share parameters; exports copy them
    seen: set[int] = set()
    extra = 0
    for step, module in zip(plan.steps, layers, strict=True):
        if step.layer in seen:
            extra += sum(p.numel() for p in module.parameters())
        seen.add(step.layer)
    return extra


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def card_text(source: str, plan: Plan, fmt: str, measured: dict, sizes: tuple[int, int]) -> str:
    """Markdown model card."""
    dropped = sorted(set(range(plan.num_layers)) - set(plan.layers))
    src, exp, settings = measured["source"], measured["export"], measured["settings"]

    def ppl(row: dict) -> str:
        return f"{row['perplexity']:.3f}" if row["perplexity"] is not None else "not measured"

    load = {
        "hf": "`AutoModelForCausalLM.from_pretrained(DIR)`"
        + ("" if plan.whole_layers and not plan.kv else " with `trust_remote_code=True` (if written with "
           "`--remote-code`), or `layerlab.load(DIR)`")
        + (" (plain loading ignores `kv_sources` and runs every layer on its own keys and values)" if plan.kv else ""),
        "gguf": "llama.cpp (`llama-cli -m FILE`), llama-cpp-python, or `layerlab.load(FILE)`",
    }[fmt]
    return f"""{TEXT_MARKER}
# layerlab export of {source}

- source: `{source}`
- plan: `{plan.to_text()}` ({len(plan.steps)} steps over {plan.num_layers} layers; dropped: \
{", ".join(map(str, dropped)) or "none"})
- format: {"Hugging Face safetensors" if fmt == "hf" else "GGUF (kept tensors copied unchanged, still quantized)"}
- load with: {load}

| | source | export |
| --- | --- | --- |
| decoder layers | {src["layers"]} | {exp["layers"]} |
| parameters | {src["parameters"] / 1e6:.1f} M | {exp["parameters"] / 1e6:.1f} M |
| bytes on disk | {sizes[0] / 2**20:.1f} MiB | {sizes[1] / 2**20:.1f} MiB |
| perplexity, {settings["text"]} ({settings["windows"]} windows of {settings["ctx"]}) | {ppl(src)} | {ppl(exp)} |

Perplexity is measured by layerlab on the float weights with the plan applied, which gives the
export's logits (layerlab's tests check this); a GGUF export keeps the source's quantization.
"""
