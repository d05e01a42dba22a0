"""Quantization types an export can ask for (the `--quant` registry), parsed and checked without any model.

Names are llama.cpp's. Two writers (`export/quant.py` picks each tensor's type, `export/gguf.py`
writes): the `gguf` package quantizes F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 in numpy (it
can only *read* K-quants); the K-quants are written by llama.cpp's own quantizer
(`llama_model_quantize` in llama-cpp-python, the `llamacpp` extra).
- a *tensor type* (Q4_0, Q8_0, Q6_K ...) is given to every quantizable tensor;
- a *mixture* (Q4_K_M, Q5_K_S ...) lets llama.cpp choose per tensor, exactly as `llama-quantize` does;
- `source` (the default) keeps every tensor's type: kept tensors are copied byte for byte and changed
  ones are quantized back to their source type, or to the closest type the writers at hand can write;
- `HIGH/LOW@BUDGET` (e.g. `Q8_0/Q4_0@Q5_0`) is importance-aware mixed precision: every tensor starts
  at LOW, then the embeddings and output, and then whole layers from the most sensitive down, move
  to HIGH while the file stays within the bytes the uniform BUDGET type would take.

This module is light (no gguf, numpy or torch import): the settings check `--quant` with it before
any work, and the CLI lists its registry. The gguf enums are looked up when a writer needs them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import SettingsError, require

LLAMA_CPP_MODULE = "llama_cpp"  # llama-cpp-python, the `llamacpp` extra
NUMPY_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # the gguf package writes these
FLOAT_TYPES = ("F32", "F16", "BF16")  # the ones a Hugging Face folder can hold


@dataclass(frozen=True)
class QuantType:
    """One entry of the registry: a tensor type, or a llama.cpp mixture (`tensor_name` is None)."""

    name: str
    tensor_name: str | None  # gguf.GGMLQuantizationType member
    ftype_name: str  # gguf.LlamaFileType member: the file type llama.cpp's quantizer runs under
    bits: float | None  # bits per weight of a tensor type
    description: str

    @property
    def needs_llama_cpp(self) -> bool:
        return self.tensor_name not in NUMPY_TYPE_NAMES

    @property
    def tensor(self):
        """The `gguf.GGMLQuantizationType` (None for a mixture)."""
        from gguf import GGMLQuantizationType

        return None if self.tensor_name is None else GGMLQuantizationType[self.tensor_name]

    @property
    def ftype(self):
        from gguf import LlamaFileType

        return LlamaFileType[self.ftype_name]


def _type(name: str, ftype: str, bits: float | None, description: str, tensor: str | None = "") -> QuantType:
    return QuantType(name, name if tensor == "" else tensor, ftype, bits, description)


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    _type("F32", "ALL_F32", 32, "32-bit float: exact"),
    _type("F16", "MOSTLY_F16", 16, "16-bit float"),
    _type("BF16", "MOSTLY_BF16", 16, "bfloat16"),
    _type("Q8_0", "MOSTLY_Q8_0", 8.5, "8.5 bits per weight"),
    _type("Q5_1", "MOSTLY_Q5_1", 6.0, "6.0 bits per weight"),
    _type("Q5_0", "MOSTLY_Q5_0", 5.5, "5.5 bits per weight"),
    _type("Q4_1", "MOSTLY_Q4_1", 5.0, "5.0 bits per weight"),
    _type("Q4_0", "MOSTLY_Q4_0", 4.5, "4.5 bits per weight"),
    _type("Q6_K", "MOSTLY_Q6_K", 6.5625, "6.56 bits per weight (llama.cpp)"),
    _type("Q5_K", "MOSTLY_Q5_K_S", 5.5, "5.5 bits per weight (llama.cpp)"),
    _type("Q4_K", "MOSTLY_Q4_K_S", 4.5, "4.5 bits per weight (llama.cpp)"),
    _type("Q3_K", "MOSTLY_Q3_K_S", 3.4375, "3.44 bits per weight (llama.cpp)"),
    _type("Q2_K", "MOSTLY_Q2_K", 2.625, "2.63 bits per weight (llama.cpp)"),
    _type("Q5_K_M", "MOSTLY_Q5_K_M", None, "llama.cpp's Q5_K mixture, medium", None),
    _type("Q5_K_S", "MOSTLY_Q5_K_S", None, "llama.cpp's Q5_K mixture, small", None),
    _type("Q4_K_M", "MOSTLY_Q4_K_M", None, "llama.cpp's Q4_K mixture, medium", None),
    _type("Q4_K_S", "MOSTLY_Q4_K_S", None, "llama.cpp's Q4_K mixture, small", None),
    _type("Q3_K_L", "MOSTLY_Q3_K_L", None, "llama.cpp's Q3_K mixture, large", None),
    _type("Q3_K_M", "MOSTLY_Q3_K_M", None, "llama.cpp's Q3_K mixture, medium", None),
    _type("Q3_K_S", "MOSTLY_Q3_K_S", None, "llama.cpp's Q3_K mixture, small", None),
)}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec(LLAMA_CPP_MODULE) is not None


def require_llama_cpp(purpose: str) -> None:
    """A one-line error naming the `llamacpp` extra when llama-cpp-python is missing."""
    require(LLAMA_CPP_MODULE, "llamacpp", purpose)


def lookup(name: str, purpose: str = "--quant") -> QuantType:
    """The registry entry for `name`, or a one-line error listing the names (or naming the missing extra)."""
    entry = QUANT_TYPES.get(name.strip().upper())
    if entry is None:
        raise SettingsError(f"unknown quantization type {name!r} for {purpose}; choose from source, "
                            f"{', '.join(QUANT_TYPES)}, or HIGH/LOW@BUDGET such as Q8_0/Q4_0@Q5_0")
    if entry.needs_llama_cpp:
        require_llama_cpp(f"{purpose} {entry.name} (written by llama.cpp's quantizer)")
    return entry


@dataclass(frozen=True)
class Quant:
    """A parsed `--quant` value: `source`, one registry type, or mixed precision HIGH/LOW@BUDGET."""

    kind: str  # "source", "uniform" or "mixed"
    type: QuantType | None = None  # uniform
    high: QuantType | None = None  # mixed
    low: QuantType | None = None
    budget: QuantType | None = None

    @classmethod
    def parse(cls, text: str | Quant) -> Quant:
        if isinstance(text, Quant):
            return text
        text = text.strip()
        if text.lower() == "source":
            return cls("source")
        if "/" not in text:
            return cls("uniform", type=lookup(text))
        pair, _, budget = text.partition("@")
        high, _, low = pair.partition("/")
        if not budget:
            raise SettingsError(f"mixed precision {text!r} needs a byte budget: HIGH/LOW@BUDGET, such as "
                                "Q8_0/Q4_0@Q5_0 (as many bytes as uniform Q5_0)")
        parts = [lookup(part, "mixed precision") for part in (high, low, budget)]
        if any(p.tensor_name is None for p in parts):
            raise SettingsError(f"mixed precision {text!r} takes tensor types (such as Q8_0, Q6_K, Q4_0), "
                                "not llama.cpp mixtures")
        if parts[0].bits <= parts[1].bits:
            raise SettingsError(f"mixed precision {text!r}: HIGH must have more bits per weight than LOW")
        return cls("mixed", high=parts[0], low=parts[1], budget=parts[2])

    def to_text(self) -> str:
        if self.kind == "mixed":
            return f"{self.high.name}/{self.low.name}@{self.budget.name}"
        return self.type.name if self.kind == "uniform" else "source"

    @property
    def needs_llama_cpp(self) -> bool:
        return any(q is not None and q.needs_llama_cpp for q in (self.type, self.high, self.low))

    @property
    def floats_only(self) -> bool:
        """What a Hugging Face folder can hold: the source's dtype or a float type."""
        return self.kind == "source" or (self.kind == "uniform" and self.type.name in FLOAT_TYPES)
