"""Models larger than memory: running a plan one decoder layer at a time.

The whole-model path loads every weight, then pushes each calibration window through every layer. Here
the loops are swapped: the windows' residual streams are kept (tokens x hidden size each, small), and the
plan's steps run in order, each with ONLY its own layer in memory:

1. `LayerSource` reads the model's config and an index of where each tensor's bytes are, in a GGUF file
   (dequantized with the `gguf` package and its tensor names mapped to the model's with transformers'
   own map and tensor processor, which undoes llama.cpp's Q/K row permutation for Llama-family files and
   Gemma's +1 on norm weights) or in safetensors files. Bytes are read with plain `os.pread` calls, never
   a memory map, so a tensor is resident only while it is used; the embedding matrix is never read
   whole, only the rows of the tokens in the windows.
2. `LayerStack` is the model's own base model built from its config with no decoder layer and a
   vocabulary of just those tokens: its embedding (Gemma's scaling included), rotary embeddings, masks
   and final loop are the model's own. Each plan step instantiates the model's decoder-layer class on the
   meta device, assigns the layer's tensors, and runs through `runtime.apply_plan` as a one-step plan
   (skipped halves included), so each window's stream leaves the step exactly as in the whole model.
3. `stream_steps` yields, step by step, the streams entering the step, between its halves and leaving
   it; metrics reduce them (`metrics/similarity.similarity_streamed`) and let them go.

Peak memory is about one decoder layer plus the windows' streams, whatever the model's depth.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ARCHITECTURES, Arch, get_path, unsupported
from .errors import ModelLoadError, SettingsError
from .models import metadata_folder, read_config, resolve_source
from .plan import Plan, Step
from .runtime import skip_halves

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a file, and how to read them."""

    file: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]  # as stored (GGUF: numpy's view of the raw data, e.g. rows x bytes per row)
    kind: object  # a GGMLQuantizationType (GGUF) or a torch dtype (safetensors)


def _pread(file: Path, offset: int, nbytes: int) -> bytearray:
    """Bytes of a file by plain reads (no memory map: nothing stays mapped into the process)."""
    out = bytearray(nbytes)
    view = memoryview(out)
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ModelLoadError(f"{file} ended early: is the file complete?")
            done += got
    finally:
        os.close(fd)
    return out


class LayerSource:
    """A model's config and its tensors, one decoder layer (or some embedding rows) at a time."""

    def __init__(self, source: str, config, arch: Arch, tensors: dict[str, StoredTensor], names: dict[str, str]):
        self.source = source
        self.config = config  # the text config of the model
        self.arch = arch
        self.num_layers = int(config.num_hidden_layers)
        self._tensors = tensors  # stored name -> location
        self._names = names  # the model's (Hugging Face) parameter name -> stored name
        meta = _meta_model(config)
        self.embedding_name = next(name for name, module in meta.named_modules()
                                   if module is meta.get_input_embeddings()) + ".weight"
        self._layer_class = type(get_path(meta, arch.layers)[0])
        # every decoder layer of these architectures has the same parameter names: read them off layer 0
        self._layer_keys = [name[len(f"{arch.layers}.0."):] for name in meta.state_dict()
                            if name.startswith(f"{arch.layers}.0.")]

    @classmethod
    def open(cls, source: str, trust_remote_code: bool = False) -> LayerSource:
        """The layer source of a .gguf file, an embedded model, or a safetensors model folder."""
        resolved = resolve_source(source)
        if not isinstance(resolved, Path):
            raise ModelLoadError(f"model {source!r} is a hub id; streaming reads local files: download it to a "
                                 "folder or use a .gguf file")
        if resolved.suffix.lower() == ".gguf":
            return _gguf_source(source, resolved)
        return _safetensors_source(source, resolved, trust_remote_code)

    def read(self, name: str) -> torch.Tensor:
        """The model's tensor `name`, as float (dequantized and un-permuted for GGUF)."""
        raise NotImplementedError

    def rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (sorted, unique) of the 2-D tensor `name`, reading only those rows."""
        raise NotImplementedError

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer `layer`, named as inside the layer module (`self_attn.q_proj.weight`)."""
        prefix = f"{self.arch.layers}.{layer}."
        return {name: self.read(prefix + name) for name in self._layer_keys}

    def build_layer(self, layer: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """Decoder layer `layer`: the model's own class, built on the meta device, its tensors assigned."""
        with torch.device("meta"):
            module = self._layer_class(self.config, layer_idx=layer)
        state = {name: value.to(dtype) for name, value in self.layer_state(layer).items()}
        module.load_state_dict(state, strict=True, assign=True)
        left = [name for name, value in [*module.named_parameters(), *module.named_buffers()] if value.is_meta]
        if left:
            raise ModelLoadError(f"streaming cannot build layer {layer} of {self.source}: {left[0]} has no stored "
                                 "value (a buffer computed at construction); load the model whole instead")
        return module.to(device).eval()


def _meta_model(config) -> nn.Module:
    """The causal LM of `config` with every tensor on the meta device (names and classes, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _text_config(config):
    text = config.get_text_config(decoder=True)
    if text.model_type not in ARCHITECTURES:
        raise unsupported(text.model_type)
    arch = ARCHITECTURES[text.model_type]
    if not arch.embeds_are_stream:
        raise SettingsError(f"streaming feeds the stream to each layer as inputs_embeds, which {text.model_type} "
                            "changes (learned position embeddings); load the model whole")
    return text, arch


# ------------------------------------------------------------------------------------------ GGUF
class _GGUFSource(LayerSource):
    def __init__(self, *args, processor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._processor = processor

    def _process(self, stored: str, weights: np.ndarray) -> torch.Tensor:
        """transformers' own per-architecture fix-ups (Q/K un-permutation, Gemma's norm offset)."""
        result = self._processor.process(weights=weights, name=stored, tensor_key_mapping={},
                                         parsed_parameters={"tensors": {}})
        return torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True))

    def _raw(self, where: StoredTensor, offset: int, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
        from gguf import GGMLQuantizationType

        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(where.kind, np.uint8)
        return np.frombuffer(_pread(where.file, offset, nbytes), dtype=dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        stored = self._names[name]
        where = self._tensors[stored]
        return self._process(stored, dequantize(self._raw(where, where.offset, where.nbytes, where.shape), where.kind))

    def rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        from gguf import dequantize

        stored = self._names[name]
        where = self._tensors[stored]
        row_bytes = where.nbytes // where.shape[0]
        raw = np.concatenate([self._raw(where, where.offset + int(r) * row_bytes, row_bytes, (1, *where.shape[1:]))
                              for r in rows])
        return self._process(stored, dequantize(raw, where.kind))


def _gguf_source(source: str, path: Path) -> LayerSource:
    from gguf import GGMLQuantizationType
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    folder = metadata_folder(path)  # config, tokenizer and tensor index, parsed once per file
    index = json.loads((folder / "tensors.json").read_text())
    text, arch = _text_config(AutoConfig.from_pretrained(str(folder)))
    tensors = {name: StoredTensor(path, t["offset"], t["nbytes"], tuple(t["shape"]), GGMLQuantizationType(t["type"]))
               for name, t in index["tensors"].items()}
    processor = TENSOR_PROCESSORS.get(index["architecture"], TensorProcessor)(config=text.to_dict())
    names = _gguf_names(_meta_model(text), processor, index["architecture"], text.num_hidden_layers)
    return _GGUFSource(source, text, arch, tensors, names, processor=processor)


def _gguf_names(meta: nn.Module, processor, architecture: str, num_layers: int) -> dict[str, str]:
    """The model's parameter names -> GGUF tensor names, as transformers' `get_gguf_hf_weights_map` maps them
    at the top level (gguf's name table for the file's architecture); built once, not once per submodule."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    table = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), num_layers)
    names = {}
    for hf_name in meta.state_dict():
        base, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
        stored = table.get_name(base) if suffix in ("weight", "bias") else None
        if stored is not None:
            names[hf_name] = f"{stored}{dot}{suffix}"
    return names


# ------------------------------------------------------------------------------------------ safetensors
class _SafetensorsSource(LayerSource):
    def read(self, name: str) -> torch.Tensor:
        where = self._tensors[self._names[name]]
        data = _pread(where.file, where.offset, where.nbytes)
        return torch.frombuffer(data, dtype=where.kind).reshape(where.shape) if where.nbytes else \
            torch.empty(where.shape, dtype=where.kind)

    def rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        where = self._tensors[self._names[name]]
        row_bytes = where.nbytes // where.shape[0]
        return torch.stack([torch.frombuffer(_pread(where.file, where.offset + int(r) * row_bytes, row_bytes),
                                             dtype=where.kind) for r in rows])


def _safetensors_index(file: Path) -> dict[str, StoredTensor]:
    """Tensor locations from a safetensors header (8-byte length, JSON, then the data)."""
    header_size = int.from_bytes(_pread(file, 0, 8), "little")
    header = json.loads(bytes(_pread(file, 8, header_size)))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{file}: tensor {name} has dtype {entry['dtype']}, which streaming does not read")
        begin, end = entry["data_offsets"]
        out[name] = StoredTensor(file, 8 + header_size + begin, end - begin, tuple(entry["shape"]),
                                 SAFETENSORS_DTYPES[entry["dtype"]])
    return out


def _safetensors_source(source: str, folder: Path, trust_remote_code: bool) -> LayerSource:
    config = read_config(source, folder, trust_remote_code)
    text, arch = _text_config(config)
    if getattr(text, "drop_attn_list", None) or getattr(text, "drop_mlp_list", None):
        raise SettingsError(f"{source} is an export with LLM-Drop lists; streaming reads whole layers: load it whole")
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    if not all((folder / f).is_file() for f in files):
        raise ModelLoadError(f"streaming reads safetensors weights; {source} has none (or misses a shard): "
                             "convert it with save_pretrained(safe_serialization=True)")
    tensors = {}
    for file in files:
        tensors |= _safetensors_index(folder / file)
    meta_names = _meta_model(config).state_dict()
    names = {name: name for name in meta_names}
    return _SafetensorsSource(source, text, arch, tensors, names)


# ------------------------------------------------------------------------------------------ running
class LayerStack:
    """The model's base model with no decoder layers of its own and a vocabulary of the tokens in use.

    `run(layer, step, streams)` puts one decoder layer in, runs each window's stream through it as a
    one-step plan (as `inputs_embeds`: masks and rotary embeddings are the model's own), and returns the
    streams between the layer's halves and after it.
    """

    def __init__(self, source: LayerSource, tokens: torch.Tensor, dtype: torch.dtype, device: torch.device | str):
        from transformers import AutoModelForCausalLM

        self.source = source
        self.arch = source.arch
        self.layer_types = list(getattr(source.config, "layer_types", None) or [])
        config = copy.deepcopy(source.config)
        config.num_hidden_layers = 0
        config.vocab_size = len(tokens)
        config.pad_token_id = None
        self.model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
        self.config = self.model.config.get_text_config(decoder=True)
        source.config._attn_implementation = self.config._attn_implementation  # layers attend as the model does
        self.model.get_input_embeddings().weight.data = source.rows(source.embedding_name, tokens).to(dtype)
        self.model.to(device)
        self.base = get_path(self.model, self.arch.layers.rpartition(".")[0])
        self.device = torch.device(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The stream entering the first layer, for token ids already mapped to the stack's vocabulary."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    @torch.inference_mode()
    def run(self, layer: nn.Module, index: int, step: Step, streams: list[torch.Tensor]) \
            -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(streams between the halves, streams leaving the step) of each window for decoder layer `index`.

        The step's skipped halves are replaced as `runtime.apply_plan` replaces them (the layer is this
        stack's own copy), and the config describes one layer of `index`'s kind (Gemma 3's masks and
        rotary embeddings are chosen by `layer_types`).
        """
        skip_halves(layer, self.arch, attention=not step.attention, mlp=not step.mlp)
        self.base.layers = nn.ModuleList([layer])
        self.config.num_hidden_layers = 1
        if self.layer_types:
            self.config.layer_types = [self.layer_types[index]]
        middle, after = [], []
        seen: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", _first(out)))]
        if step.attention and step.mlp:
            hooks.append(layer._modules[self.arch.mlp_norms[0]].register_forward_pre_hook(
                lambda m, args, kwargs: seen.__setitem__("mid", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        try:
            for stream in streams:
                self.base(inputs_embeds=stream, use_cache=False)
                after.append(seen["out"])
                middle.append(seen["mid"] if "mid" in seen else seen["out"] if step.attention else stream)
        finally:
            for hook in hooks:
                hook.remove()
            self.base.layers = nn.ModuleList()
            self.config.num_hidden_layers = 0
        return middle, after


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class StepStreams:
    """The residual streams of one plan step, one (1, tokens, d) tensor per window."""

    index: int  # the step's position in the plan
    step: Step
    before: list[torch.Tensor]  # entering the step (resid_pre)
    middle: list[torch.Tensor]  # between attention and MLP (resid_mid)
    after: list[torch.Tensor]  # leaving the step (resid_post)


def stream_steps(source: LayerSource, windows: list[list[int]], plan: Plan | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 progress: bool = True) -> Iterator[StepStreams]:
    """Run token windows through `plan`'s steps (identity by default) holding one decoder layer at a time."""
    plan = plan or Plan.identity(source.num_layers)
    if plan.num_layers != source.num_layers:
        raise SettingsError(f"the plan was written for {plan.num_layers} layers, but {source.source} has "
                            f"{source.num_layers}")
    ids = [torch.tensor([w]) for w in windows]
    tokens, inverse = torch.unique(torch.cat([i[0] for i in ids]), return_inverse=True)
    stack = LayerStack(source, tokens, dtype, device)
    local = torch.split(inverse, [i.shape[1] for i in ids])
    with torch.inference_mode():
        streams = [stack.embed(w[None]) for w in local]
    for index, step in enumerate(tqdm(plan.steps, desc="layers", unit="layer", disable=not progress, leave=False)):
        layer = source.build_layer(step.layer, dtype, device)
        middle, after = stack.run(layer, step.layer, step, streams)
        del layer
        yield StepStreams(index, step, streams, middle, after)
        streams = after


class StreamArchive:
    """Tensors parked in an unlinked temporary file and read back one at a time by plain reads.

    The angular distance pairs the stream entering every step with every later one; keeping all of them
    in memory would grow with depth, so the earlier ones wait here and only one is resident at a time.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="layerlab-streams-", dir=folder)  # noqa: SIM115 closed in close()
        self._where: dict[object, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        self._end = 0

    def add(self, key: object, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
        os.pwrite(self._file.fileno(), raw, self._end)
        self._where[key] = (self._end, len(raw), tuple(data.shape), data.dtype)
        self._end += len(raw)

    def get(self, key: object) -> torch.Tensor:
        offset, nbytes, shape, dtype = self._where[key]
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        data = bytearray(nbytes)
        os.preadv(self._file.fileno(), [data], offset)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StreamArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
