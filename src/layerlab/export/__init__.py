"""Physically smaller models built from plans, in the source's format and precision by default.

A GGUF source gives a pruned GGUF (`gguf.py`): untouched tensors are copied byte for byte and
tensors whose values changed (healing, patches, any weight edit) are quantized back to their source
type, or to the closest type the writers at hand can write (`quant.py`); `--quant` picks another
type, a llama.cpp mixture or importance-aware mixed precision. A Hugging Face source gives a folder
(`hf.py`) in the source's dtype. Three steps, each with its own entry point:
1. `prepare_export(settings, plan)` checks everything that needs no model (format,
   quant type, plan, output path) and opens the source GGUF once;
2. `write_export(target, plan, model, tokenizer, ...)` only writes, and returns an `ExportResult`
   (bytes on disk of source and output, their ratio, what happened to each tensor);
3. `layerlab.evaluate.artifact` measures the written file as loaded back from disk; `write_card`
   rewrites the model card with those numbers.
`export(...)` runs the three for the command line.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SettingsError
from ..io import atomic_write_text, check_output
from ..models import resolve_source
from ..plan import Plan
from ..quant import Quant
from ..settings import ExportSettings, check_shipping
from .card import card_text, folder_bytes
from .gguf import GgufSource, TensorRecord, shape_of


@dataclass(frozen=True)
class ExportTarget:
    """What `write_export` will write, decided before any model loads."""

    source: str
    format: str
    out: Path
    card: Path
    settings: ExportSettings
    quant: Quant
    gguf: GgufSource | None = None  # the source file, opened once, when writing GGUF
    source_path: Path | None = None  # a local source: file or folder (its bytes are counted)


@dataclass
class ExportResult:
    """The written model: where, how big next to its source, and what happened to each GGUF tensor."""

    path: Path
    format: str
    quant: str
    card: Path
    source_bytes: int | None
    bytes: int
    ideal_bytes: int | None  # source bytes x the kept tensors' share of the source's tensor bytes
    parameters: tuple[int | None, int]  # source (None when unknown), output
    dtype: str | None = None  # Hugging Face folders
    tensors: list[TensorRecord] = field(default_factory=list)  # GGUF files
    peak_memory_mb: float | None = None  # the process's peak while exporting (set by `jobs.export`)

    @property
    def ratio(self) -> float | None:
        return self.bytes / self.source_bytes if self.source_bytes else None

    @property
    def ideal_ratio(self) -> float | None:
        return self.ideal_bytes / self.source_bytes if self.source_bytes and self.ideal_bytes else None

    def to_dict(self) -> dict:
        """JSON-ready; tensors copied unchanged are counted, the others listed."""
        return {"path": str(self.path), "format": self.format, "quant": self.quant, "card": str(self.card),
                "source_bytes": self.source_bytes, "bytes": self.bytes, "ratio": self.ratio,
                "ideal_bytes": self.ideal_bytes, "ideal_ratio": self.ideal_ratio,
                "parameters": list(self.parameters), "dtype": self.dtype,
                "copied_tensors": sum(t.action == "copied" for t in self.tensors),
                "tensors": [t.to_dict() for t in self.tensors if t.action != "copied"]}


def output_format(source: str, fmt: str | None) -> str:
    """The format asked for, else the source's: GGUF for a .gguf source, a Hugging Face folder otherwise."""
    resolved = resolve_source(source)
    return fmt or ("gguf" if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf" else "hf")


def prepare_export(settings: ExportSettings, plan: Plan, rewrites: bool = False,
                   inputs: Sequence[str | Path] = ()) -> ExportTarget:
    """Check the export before any model loads: format, quant, plan, output path (`settings.out`), and for
    `rewrites` (changed weights will be written, e.g. healing) that the GGUF writer knows the architecture."""
    from .gguf_weights import gguf_arch

    plan.refuse_merge("an export")
    source = settings.model.source
    quant = check_shipping(settings.format, settings.quant)
    resolved = resolve_source(source)
    local = resolved if isinstance(resolved, Path) else None
    is_gguf = local is not None and local.suffix.lower() == ".gguf"
    fmt = output_format(source, settings.format)
    if fmt == "gguf" and not is_gguf:
        raise SettingsError(f"GGUF output reuses a GGUF source's tokenizer and metadata, and {source!r} is not a "
                            ".gguf file; use --format hf, or convert it with llama.cpp's convert_hf_to_gguf.py first")
    out = Path(settings.out)
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise SettingsError(f"--out {out} is where a GGUF file goes (the source is a GGUF, or --format gguf), and "
                            f"GGUF loaders know a file by its name: use {out.with_suffix('.gguf')}, or --format hf "
                            "for a folder")
    card = out / "README.md" if fmt == "hf" else out.with_suffix(".md")
    check_output(out, folder=fmt == "hf", force=settings.force, inputs=inputs)
    gguf = None
    if fmt == "gguf":
        check_output(card, folder=False, force=settings.force, inputs=inputs)
        gguf = GgufSource.open(local)
        gguf.check(plan)
        if rewrites:
            gguf_arch(gguf.arch)
    return ExportTarget(source, fmt, out, card, settings, quant, gguf, local)


def write_export(target: ExportTarget, plan: Plan, model=None, tokenizer=None, materialized: bool = False,
                 changed: Iterable[str] | None = None, importance: Sequence[float] | None = None) -> ExportResult:
    """Write the plan's model; measure nothing.

    `model` is the source's model with `plan` to apply, or with `materialized=True` a model whose
    layers already are the plan's steps (a healed model). For a GGUF, its weights are compared with
    the source's dequantized tensors to find the changed ones, unless `changed` names them (an
    empty set: nothing changed, no model needed). `importance` (one score per step, higher = more
    sensitive) ranks layers for mixed precision. A folder is written in the source's dtype.
    """
    if target.format == "gguf":
        result = _write_gguf(target, plan, model, materialized, changed, importance)
    else:
        result = _write_hf(target, plan, model, tokenizer, materialized)
    atomic_write_text(result.card, card_text(target.source, plan, result), force=True)
    return result


def write_card(result: ExportResult, source: str, plan: Plan, measured: dict | None) -> Path:
    """Rewrite the model card with numbers measured on the written file (`evaluate.artifact`)."""
    return atomic_write_text(result.card, card_text(source, plan, result, measured), force=True)


def _write_gguf(target: ExportTarget, plan: Plan, model, materialized: bool, changed: Iterable[str] | None,
                importance: Sequence[float] | None) -> ExportResult:
    from .gguf import dequantized, write_gguf
    from .gguf_weights import ModelWeights, differs
    from .quant import choose_types

    source, quant = target.gguf, target.quant
    if quant.kind == "uniform" and quant.type.tensor is None and source.file_type() == quant.type.ftype:
        quant = Quant("source")  # the source's own llama.cpp mixture: keep its tensors, do not quantize twice
    planned = source.planned(plan)
    values = {}
    wanted = None if changed is None else set(changed)
    if model is not None and wanted != set():
        weights = ModelWeights(model, source.arch, range(len(plan.steps)) if materialized else plan.layers)
        for name, tensor in planned:
            mine = weights.values(name) if wanted is None or name in wanted else None
            if mine is not None and (wanted is not None or differs(mine, dequantized(tensor), weights.dtype)):
                values[name] = mine
    units = {f"blk.{j}": score for j, score in enumerate(importance or [])}
    targets = choose_types(quant, {name: (shape_of(t), t.tensor_type) for name, t in planned}, values, units)
    records = write_gguf(source, plan, target.out, targets, values, target.settings.force,
                         file_type=_file_type(quant), llama_ftype=_llama_ftype(quant, source))
    all_elements = sum(int(t.n_elements) for t in source.reader.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in source.reader.tensors)
    source_bytes = source.path.stat().st_size
    kept = sum(int(t.n_bytes) for _, t in planned)
    ideal = round(source_bytes * kept / tensor_bytes) if quant.kind == "source" else None  # the weights' share
    return ExportResult(target.out, "gguf", quant.to_text(), target.card, source_bytes, target.out.stat().st_size,
                        ideal, (all_elements, sum(int(t.n_elements) for _, t in planned)), tensors=records)


def _file_type(quant: Quant) -> int | None:
    """`general.file_type` of a numpy-written file: the uniform type's, or mixed precision's low type's."""
    chosen = quant.type if quant.kind == "uniform" else quant.low if quant.kind == "mixed" else None
    return None if chosen is None or chosen.needs_llama_cpp else int(chosen.ftype)


def _llama_ftype(quant: Quant, source: GgufSource) -> int | None:
    """The file type llama.cpp's quantizer pass runs under (it must name a quantized type)."""
    from gguf import LlamaFileType

    floats = {LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16, LlamaFileType.MOSTLY_BF16}
    for chosen in (quant.type, quant.high, quant.low):
        if chosen is not None and chosen.ftype not in floats:
            return int(chosen.ftype)
    file_type = source.file_type()
    return file_type if file_type is not None and file_type not in floats else None


def _write_hf(target: ExportTarget, plan: Plan, model, tokenizer, materialized: bool) -> ExportResult:
    from .hf import materialize, save_folder

    if model is None or tokenizer is None:
        raise ValueError("a Hugging Face export needs the loaded model and tokenizer")
    quant = target.quant
    dtype = _hf_dtype(quant, target)
    source_params = None if materialized else sum(p.numel() for p in model.parameters())
    new = model if materialized else materialize(model, plan)
    if new.dtype != dtype:
        new = (copy.deepcopy(new) if new is model else new).to(dtype)
    save_folder(new, tokenizer, target.out, target.settings.force, target.settings.remote_code)
    source_bytes = folder_bytes(target.source_path) if target.source_path is not None else None
    return ExportResult(target.out, "hf", quant.to_text(), target.card, source_bytes, folder_bytes(target.out),
                        None, (source_params, sum(p.numel() for p in new.parameters())), dtype=str(dtype))


def _hf_dtype(quant: Quant, target: ExportTarget) -> torch.dtype:
    """The folder's dtype: the one asked for, else the source's (a GGUF source: float32, its exact values)."""
    from transformers import AutoConfig

    if quant.kind == "uniform":
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[quant.type.name]
    if target.source_path is not None and target.source_path.suffix.lower() == ".gguf":
        return torch.float32
    declared = AutoConfig.from_pretrained(str(target.source_path or target.source)).dtype  # the config's dtype
    return declared if isinstance(declared, torch.dtype) else torch.float32


def export(settings: ExportSettings, plan: Plan, target: ExportTarget | None = None) -> ExportResult:
    """Export `plan` applied to the settings' model at `settings.out` with a model card; measure the written
    file when `settings.eval_windows` > 0 (`layerlab export`; `jobs.export` checks everything first)."""
    from ..evaluate.artifact import ArtifactSettings, measure_export

    target = target or prepare_export(settings, plan)
    model, tokenizer = settings.model.load()
    importance = step_importance(model, tokenizer, plan) if target.quant.kind == "mixed" else None
    result = write_export(target, plan, model, tokenizer, changed=(), importance=importance)
    if settings.eval_windows:
        measured = measure_export(result, target.source, ArtifactSettings(windows=settings.eval_windows),
                                  tokenizer=tokenizer)
        write_card(result, target.source, plan, measured)
    return result


def step_importance(model, tokenizer, plan: Plan, text: str = "wikitext2-valid", ctx: int = 256,
                    windows: int = 4) -> list[float]:
    """Block Influence of each step of the plan, run as planned: which layers mixed precision keeps at more bits."""
    from ..corpora import read_text
    from ..metrics.similarity import similarity

    return similarity(model, tokenizer, read_text(text), plan, ctx=ctx, windows=windows,
                      progress=False).block_influence
