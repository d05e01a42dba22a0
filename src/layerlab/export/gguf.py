"""Writing a GGUF file from a GGUF source: pruned to a plan, kept tensors copied byte for byte.

`blk.N.*` tensors are renumbered to the plan's step order (a repeated layer is written once per
step), `<arch>.block_count` becomes the number of steps, and every per-layer metadata array (an
array under the architecture's namespace with one entry per layer) follows the plan. Gemma 3 is
special: llama.cpp derives its sliding/global pattern from the layer index (every 6th layer is
global) unless the file carries `<arch>.attention.sliding_window_pattern`, one flag per layer (true =
sliding window), which recent llama.cpp reads (`load_swa_pattern`). A plan that keeps every layer's
kind at its new index writes no array (every reader gets it right); one that moves a global layer
gets the array, and `gguf_layer_types` gives transformers-based loaders (layerlab's) the same
pattern, since transformers' GGUF loader ignores the array.

Each output tensor has a target type (`quant.choose_types`). A tensor whose values did not change
and whose type stays is copied as it is. Otherwise its values (the changed ones, or the source's
dequantized) are quantized: by the `gguf` package for the numpy types (a small change is anchored to
the source tensor's own rounding, `quant.anchored`); for K-quants the tensor is
first written as F32 and llama.cpp's quantizer then writes the final file, told each tensor's type
(it copies a tensor already in its type byte for byte, as layerlab does).
"""

from __future__ import annotations

import functools
import mmap
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize
from tqdm.auto import tqdm

from ..errors import PlanError
from ..io import GGUF_PRODUCER_KEY, PRODUCER
from ..plan import Plan
from .files import staged_file
from .quant import NUMPY_TYPES, Target, anchored, quantize, tensor_bytes

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
SWA_PATTERNS = {"gemma3": 6}  # llama.cpp: layer i is global when i % n == n - 1


@dataclass(frozen=True)
class TensorRecord:
    """What happened to one output tensor (the card and the report list the ones not copied)."""

    name: str
    source_type: str
    type: str
    action: str  # "copied", "requantized" (the source's values in a new type) or "rewritten" (changed values)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class GgufSource:
    """A GGUF file opened once: its reader, architecture and block count (`GgufSource.open` reuses it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))  # seconds for a large vocabulary: open each file once
        self.arch, self.blocks = gguf_architecture(self.reader)

    @staticmethod
    def open(path: str | Path) -> GgufSource:
        """The source for `path`, shared while the file is unchanged (size and mtime)."""
        stat = Path(path).stat()
        return _open_source(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)

    def planned(self, plan: Plan) -> list[tuple[str, object]]:
        """(output name, source tensor) pairs: global tensors first as in the source, then blocks in step order."""
        by_layer: dict[int, list] = {}
        planned = []
        for tensor in self.reader.tensors:
            match = _BLOCK.match(tensor.name)
            if match:
                by_layer.setdefault(int(match.group(1)), []).append((match.group(2), tensor))
            else:
                planned.append((tensor.name, tensor))
        for new_index, layer in enumerate(plan.layers):
            planned.extend((f"blk.{new_index}.{rest}", tensor) for rest, tensor in by_layer.get(layer, []))
        return planned

    def check(self, plan: Plan) -> None:
        """Refuse plans a GGUF cannot take: KV sharing, sublayer drops, the wrong layer count."""
        if plan.kv:
            raise PlanError("a GGUF export cannot carry KV sharing (kv:): llama.cpp has no way to make a layer read "
                            "another layer's keys and values; export --format hf (with --remote-code) instead")
        if not plan.whole_layers:
            raise PlanError("a GGUF export takes whole layers only; llama.cpp has no per-layer sublayer drops "
                            "(use --format hf)")
        if plan.num_layers != self.blocks:
            raise PlanError(f"the plan was written for {plan.num_layers} layers, but {self.path} has {self.blocks}")

    def sliding_pattern(self, plan: Plan) -> list[bool] | None:
        """Per-step sliding-window flags to write when the plan moves a layer of an index-derived pattern."""
        period = SWA_PATTERNS.get(self.arch)
        key = f"{self.arch}.attention.sliding_window_pattern"
        if period is None or key in self.reader.fields:
            return None  # no pattern, or the file has its own array (re-indexed like every per-layer array)
        sliding = [step.layer % period != period - 1 for step in plan.steps]
        return None if sliding == [j % period != period - 1 for j in range(len(plan.steps))] else sliding

    def file_type(self) -> int | None:
        field = self.reader.fields.get("general.file_type")
        return int(field.contents()) if field is not None else None


@functools.lru_cache(maxsize=2)
def _open_source(path: str, size: int, mtime: int) -> GgufSource:
    return GgufSource(path)


def shape_of(tensor) -> tuple[int, ...]:
    """A reader tensor's element shape in numpy order (rows last)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def dequantized(tensor) -> np.ndarray:
    """A reader tensor's values as float32, in numpy order."""
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape_of(tensor))


def requantized(tensor, kind: GGMLQuantizationType, slab_bytes: int = 64 * 2**20) -> np.ndarray:
    """A source tensor's values quantized to `kind`, a slab of rows at a time.

    Why: quantization never crosses a row (blocks lie along it), so slabs give the whole tensor's bytes,
    while only one slab is ever in float32 -- the token embedding of a 1.5B model is 0.9 GB in float32 and
    the `gguf` package's quantizer holds several temporaries of that size."""
    raw = tensor.data.reshape(-1, tensor.data.shape[-1])  # one tensor row per row of stored blocks
    step = max(1, slab_bytes // (4 * shape_of(tensor)[-1]))
    slabs = [quantize(np.asarray(dequantize(raw[i:i + step], tensor.tensor_type), dtype=np.float32), kind)
             for i in range(0, len(raw), step)]
    return np.concatenate(slabs).reshape(*shape_of(tensor)[:-1], -1)


def _release(reader: GGUFReader, tensor) -> None:
    """Drop a written tensor's pages of the source from this process's resident set.

    Why: the reader memory-maps the file, so by the end of a write every page of the source would count
    in the writer's RSS (the whole model, what `--streamed` avoids); the pages stay in the page cache and
    fault back in if read again."""
    mapped = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap here
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)


def gguf_architecture(reader: GGUFReader) -> tuple[str, int]:
    arch = reader.fields["general.architecture"].contents()
    return arch, int(reader.fields[f"{arch}.block_count"].contents())


def gguf_layer_types(path: str | Path) -> list[str] | None:
    """The `layer_types` a file's per-layer sliding-window array describes (None without one).

    transformers' GGUF loader derives Gemma 3's pattern from the index; a loader passes these
    to the config instead, so a pruned file whose global layers moved loads as llama.cpp runs it.
    """
    fields = read_metadata(path, lambda key: key == "general.architecture" or key.endswith(".sliding_window_pattern"))
    flags = fields.get(f"{fields['general.architecture']}.attention.sliding_window_pattern")
    return None if flags is None else ["sliding_attention" if flag else "full_attention" for flag in flags]


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GgufIndex:
    """What a quick scan of a GGUF file's header finds: the wanted metadata, tensor infos, where data starts."""

    fields: dict[str, object]
    tensors: dict[str, tuple[tuple[int, ...], GGMLQuantizationType]]  # name -> (numpy shape, type)
    data_offset: int

    def tensor_bytes(self) -> int:
        return sum(tensor_bytes(kind, shape) for shape, kind in self.tensors.values())


def read_metadata(path: str | Path, wanted) -> dict[str, object]:
    """The metadata values whose key `wanted(key)` accepts (see `scan_gguf`)."""
    return scan_gguf(path, wanted).fields


def scan_gguf(path: str | Path, wanted=lambda key: False) -> GgufIndex:
    """Read a GGUF header without GGUFReader: the metadata `wanted(key)` accepts, and every tensor's info.

    GGUFReader builds a numpy view for every string of the vocabulary (about 10 s for SmolLM2's, 40 s
    for Gemma 3's); skipping over what is not wanted takes a fraction of a second.
    """
    import mmap
    import struct

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        def scalar(fmt: str, offset: int):
            return struct.unpack_from("<" + fmt, data, offset)[0], offset + struct.calcsize(fmt)

        def string(offset: int) -> tuple[str, int]:
            n, offset = scalar("Q", offset)
            return data[offset:offset + n].decode("utf-8"), offset + n

        def value(kind: int, offset: int, keep: bool):
            if kind == 8:
                return string(offset) if keep else (None, offset + 8 + scalar("Q", offset)[0])
            if kind == 9:
                item, count = scalar("I", offset)[0], scalar("Q", offset + 4)[0]
                offset += 12
                if item in _SCALARS:  # fixed-size items: one unpack
                    fmt = f"<{count}{_SCALARS[item]}"
                    end = offset + struct.calcsize(fmt)
                    return (list(struct.unpack_from(fmt, data, offset)) if keep else None), end
                items = []
                for _ in range(count):
                    got, offset = value(item, offset, keep)
                    items.append(got)
                return (items if keep else None), offset
            return scalar(_SCALARS[kind], offset) if keep else (None, offset + struct.calcsize(_SCALARS[kind]))

        if data[:4] != b"GGUF":
            raise PlanError(f"{path} is not a GGUF file")
        tensor_count, offset = scalar("Q", 8)
        kv_count, offset = scalar("Q", offset)
        fields: dict[str, object] = {}
        alignment = 32
        for _ in range(kv_count):
            key, offset = string(offset)
            kind, offset = scalar("I", offset)
            keep = wanted(key) or key == "general.alignment"
            got, offset = value(kind, offset, keep)
            if key == "general.alignment":
                alignment = int(got)
            if wanted(key):
                fields[key] = got
        tensors = {}
        for _ in range(tensor_count):
            name, offset = string(offset)
            dims, offset = scalar("I", offset)
            shape = struct.unpack_from(f"<{dims}Q", data, offset)
            offset += 8 * dims
            kind, offset = scalar("I", offset)
            offset += 8  # the tensor's offset within the data section
            tensors[name] = (tuple(reversed(shape)), GGMLQuantizationType(kind))
        return GgufIndex(fields, tensors, offset + (-offset) % alignment)


def write_gguf(source: GgufSource, plan: Plan, out: str | Path, targets: Mapping[str, Target] | None = None,
               values: Mapping[str, np.ndarray] | None = None, force: bool = False,
               file_type: int | None = None, llama_ftype: int | None = None) -> list[TensorRecord]:
    """Write the plan's tensors of `source` to `out`; never touches the source.

    `targets` gives output tensors their types (default: the source's), `values` the float32 values
    of tensors that changed (GGUF layout). `file_type` replaces `general.file_type` (a numpy-written
    file); `llama_ftype` is the llama.cpp file type of the quantizer pass K-quants need.
    """
    from .llamacpp import llama_quantize

    source.check(plan)
    targets, values = dict(targets or {}), dict(values or {})
    planned = source.planned(plan)
    kinds = {name: targets.get(name, Target(tensor.tensor_type)).type for name, tensor in planned}
    later = [name for name, tensor in planned
             if kinds[name] not in NUMPY_TYPES and not _copied(name, tensor, kinds, values)]
    with staged_file(out, force) as staging:
        first = staging.with_name(staging.name + ".f32.gguf") if later else staging
        _write(source, plan, planned, kinds, values, first, file_type)
        written = kinds
        if later:
            overrides = {name: kind for name, kind in kinds.items() if kind is not None}
            llama_quantize(first, staging, llama_ftype, overrides)
            first.unlink()
            written = {t.name: t.tensor_type for t in GGUFReader(str(staging)).tensors}  # llama.cpp's choices
        return _records(planned, targets, kinds, values, written)


def prune_gguf(source: str | Path, plan: Plan, out: str | Path, force: bool = False) -> Path:
    """Write a GGUF file holding only the plan's layers, in its order, every tensor copied as it is."""
    write_gguf(GgufSource.open(source), plan, out, force=force)
    return Path(out)


def _write(source: GgufSource, plan: Plan, planned: list, kinds: Mapping[str, GGMLQuantizationType | None],
           values: Mapping[str, np.ndarray], path: Path, file_type: int | None) -> None:
    """One pass of the writer: copied tensors as they are, the others quantized (K-quant targets as F32)."""
    reader = source.reader
    writer = GGUFWriter(str(path), source.arch, endianess=reader.endianess)
    _copy_metadata(reader, writer, source.arch, plan, file_type, source.sliding_pattern(plan))
    jobs = []
    for name, tensor in planned:
        kind, copy = kinds[name], _copied(name, tensor, kinds, values)
        if not copy and kind not in NUMPY_TYPES:
            kind = GGMLQuantizationType.F32  # llama.cpp's quantizer writes its final type
        nbytes = int(tensor.n_bytes) if copy else tensor_bytes(kind, shape_of(tensor))
        writer.add_tensor_info(name, shape_of(tensor), np.float32, nbytes, raw_dtype=kind)
        jobs.append((name, tensor, kind, copy))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor, kind, copy in tqdm(jobs, desc="writing GGUF", unit="tensor", leave=False):
        if copy:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        else:
            writer.write_tensor_data(np.ascontiguousarray(_quantized(tensor, kind, values.get(name))))
        _release(reader, tensor)
    writer.close()


def _quantized(tensor, kind: GGMLQuantizationType, new: np.ndarray | None) -> np.ndarray:
    """The bytes of a tensor not copied: the source's values in `kind` (slab by slab), or its changed values."""
    if new is None:
        return requantized(tensor, kind)
    new = np.asarray(new, dtype=np.float32)
    if kind != tensor.tensor_type:  # on the old type's grid there are no ties to anchor
        new = anchored(new, dequantized(tensor), kind)
    return quantize(new, kind)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, arch: str, plan: Plan, file_type: int | None,
                   sliding: list[bool] | None) -> None:
    for field in reader.fields.values():
        if field.name in ("general.architecture", GGUF_PRODUCER_KEY) or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        kind = field.types[0]
        sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if field.name == f"{arch}.block_count":
            value = len(plan.steps)
        elif field.name == "general.file_type" and file_type is not None:
            value = file_type
        elif field.name == "general.alignment":
            writer.data_alignment = int(value)
        elif kind == GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(value) == plan.num_layers:
            value = [value[i] for i in plan.layers]
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
    if sliding is not None:
        writer.add_key_value(f"{arch}.attention.sliding_window_pattern", sliding, GGUFValueType.ARRAY,
                             sub_type=GGUFValueType.BOOL)
    writer.add_string(GGUF_PRODUCER_KEY, PRODUCER)  # lets a later --force know layerlab wrote this file


def _copied(name: str, tensor, kinds: Mapping[str, GGMLQuantizationType | None], values: Mapping) -> bool:
    """A tensor whose values did not change and whose type stays: its bytes are copied."""
    return name not in values and kinds[name] == tensor.tensor_type


def _records(planned: list, targets: Mapping[str, Target], kinds: Mapping[str, GGMLQuantizationType | None],
             values: Mapping[str, np.ndarray], types: Mapping[str, GGMLQuantizationType]) -> list[TensorRecord]:
    records = []
    for name, tensor in planned:
        action = ("rewritten" if name in values else "copied" if _copied(name, tensor, kinds, values)
                  else "requantized")
        records.append(TensorRecord(name, tensor.tensor_type.name, types[name].name, action,
                                    targets.get(name, Target(None)).note))
    return records


def gguf_load_kwargs(path: str | Path) -> dict:
    """Extra `from_pretrained(..., gguf_file=...)` arguments that make transformers run the file as llama.cpp does:
    a config carrying the file's per-layer sliding-window pattern, when it has one, and for Gemma 3 llama.cpp's
    attention scale (transformers' GGUF loader leaves `query_pre_attn_scalar` at its default 256, while
    llama.cpp scales by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the 62-layer 27B)."""
    fields = read_metadata(path, lambda key: key == "general.architecture")
    types = gguf_layer_types(path)
    if types is None and fields["general.architecture"] != "gemma3":
        return {}
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    text = config.get_text_config(decoder=True)
    if types is not None:
        text.layer_types = types
    if fields["general.architecture"] == "gemma3":
        text.query_pre_attn_scalar = (text.hidden_size // text.num_attention_heads if text.num_hidden_layers == 62
                                      else text.head_dim)
    return {"config": config}
