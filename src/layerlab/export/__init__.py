"""Physically smaller models built from plans: Hugging Face folders (`hf.py`) and pruned GGUF files (`gguf.py`)."""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..errors import PlanError
from ..io import atomic_write_text, check_output
from ..models import converted_folder, layer_count, resolve_source
from ..plan import Plan
from .card import card_text, folder_bytes, measure

FORMATS = ("hf", "gguf")


def export(source: str, plan_text: str, out: str | Path, fmt: str = "hf", force: bool = False,
           remote_code: bool = False, eval_windows: int = 8) -> Path:
    """Export `plan_text` applied to `source` as a new model at `out`, with a model card beside it."""
    from .gguf import check_gguf_plan, check_swa_pattern, gguf_architecture, prune_gguf
    from .hf import export_hf

    if fmt not in FORMATS:
        raise PlanError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    resolved = resolve_source(source)
    gguf_source = isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf"
    if fmt == "gguf" and not gguf_source:
        raise PlanError(f"a GGUF export needs a .gguf source; {source!r} is not one")
    check_output(out, folder=fmt == "hf", force=force)  # before loading and measuring, which take a while
    if fmt == "gguf":
        check_output(out.with_suffix(".md"), folder=False, force=force)
    plan = Plan.load(plan_text, layer_count(source))
    if fmt == "gguf":
        from gguf import GGUFReader

        check_gguf_plan(plan)
        check_swa_pattern(gguf_architecture(GGUFReader(str(resolved)))[0], plan)  # fail before loading
    model, tokenizer = models.load(source)
    measured = measure(model, tokenizer, plan, eval_windows)
    if fmt == "gguf":
        prune_gguf(resolved, plan, out, force)
        card = card_text(source, plan, fmt, measured, (folder_bytes(resolved), folder_bytes(out)))
        atomic_write_text(out.with_suffix(".md"), card, force=force)
        return out
    source_folder = converted_folder(resolved) if gguf_source else Path(str(resolved))
    source_bytes = folder_bytes(source_folder) if source_folder.exists() else 0
    return export_hf(model, tokenizer, plan, out, force, remote_code,
                     card=lambda folder: card_text(source, plan, fmt, measured, (source_bytes, folder_bytes(folder))))
