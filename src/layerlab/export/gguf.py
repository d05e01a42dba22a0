"""Pruning a GGUF file directly: kept tensors are copied as they are (still quantized).

`blk.N.*` tensors are renumbered to the plan's step order (a repeated layer is written once per
step), `<arch>.block_count` becomes the number of steps, and every per-layer metadata array (an
array under the architecture's namespace with one entry per layer) follows the plan. Gemma 3 is
special: llama.cpp derives its sliding/global pattern from the layer index (every 6th layer is
global), so a plan that would move a global layer to a sliding position, or the reverse, is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter
from tqdm.auto import tqdm

from ..errors import PlanError
from ..io import GGUF_PRODUCER_KEY, PRODUCER
from ..plan import Plan
from .files import staged_file

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
SWA_PATTERNS = {"gemma3": 6}  # llama.cpp: layer i is global when i % n == n - 1


def gguf_architecture(reader: GGUFReader) -> tuple[str, int]:
    arch = reader.fields["general.architecture"].contents()
    return arch, int(reader.fields[f"{arch}.block_count"].contents())


def check_swa_pattern(arch: str, plan: Plan) -> None:
    """Refuse plans that change which layers llama.cpp treats as global (index-derived pattern)."""
    period = SWA_PATTERNS.get(arch)
    if period is None:
        return
    for new_index, step in enumerate(plan.steps):
        if (step.layer % period == period - 1) != (new_index % period == period - 1):
            kind = "global" if step.layer % period == period - 1 else "sliding-window"
            raise PlanError(
                f"step {new_index} puts {kind} layer {step.layer} where llama.cpp expects a "
                f"{'global' if kind != 'global' else 'sliding-window'} layer ({arch} derives the pattern from the "
                f"index: every {period}th layer is global); keep whole groups of {period}, e.g. 'skip:6-11'"
            )


def check_gguf_plan(plan: Plan) -> None:
    """Refuse what llama.cpp cannot express (before any work)."""
    if plan.kv:
        raise PlanError("a GGUF export cannot carry KV sharing (kv:): llama.cpp has no way to make a layer read "
                        "another layer's keys and values; export --format hf (with --remote-code) instead")
    if not plan.whole_layers:
        raise PlanError("a GGUF export takes whole layers only; llama.cpp has no per-layer sublayer drops")


def prune_gguf(source: str | Path, plan: Plan, out: str | Path, force: bool = False) -> Path:
    """Write a GGUF file holding only the plan's layers, in its order; never touches `source`."""
    check_gguf_plan(plan)
    reader = GGUFReader(str(source))
    arch, count = gguf_architecture(reader)
    if plan.num_layers != count:
        raise PlanError(f"the plan was written for {plan.num_layers} layers, but {source} has {count}")
    check_swa_pattern(arch, plan)
    with staged_file(out, force) as staging:
        writer = GGUFWriter(str(staging), arch, endianess=reader.endianess)
        _copy_metadata(reader, writer, arch, plan)
        writer.add_string(GGUF_PRODUCER_KEY, PRODUCER)  # lets a later --force know layerlab wrote this file
        tensors = _planned_tensors(reader, plan)
        for name, tensor in tensors:
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, tensor in tqdm(tensors, desc="writing GGUF", unit="tensor", leave=False):
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
    return Path(out)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, arch: str, plan: Plan) -> None:
    for field in reader.fields.values():
        if field.name in ("general.architecture", GGUF_PRODUCER_KEY) or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if field.name == f"{arch}.block_count":
            value = len(plan.steps)
        elif kind == GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(value) == plan.num_layers:
            value = [value[i] for i in plan.layers]
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)


def _planned_tensors(reader: GGUFReader, plan: Plan) -> list:
    """(new name, tensor) pairs: global tensors first as in the source, then blocks in step order."""
    by_layer: dict[int, list] = {}
    planned = []
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append((match.group(2), tensor))
        else:
            planned.append((tensor.name, tensor))
    for new_index, layer in enumerate(plan.layers):
        planned.extend((f"blk.{new_index}.{rest}", tensor) for rest, tensor in by_layer.get(layer, []))
    return planned
