"""Quantization types a GGUF export can write, and which type each tensor of the output gets.

Two writers: the `gguf` package quantizes F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 in numpy
(it can only *read* K-quants); the K-quants are written by llama.cpp's own quantizer
(`llama_model_quantize` in llama-cpp-python, the `llamacpp` extra). Names are llama.cpp's:
- a *tensor type* (Q4_0, Q8_0, Q6_K ...) is given to every quantizable tensor by layerlab's rule below;
- a *mixture* (Q4_K_M, Q5_K_S ...) lets llama.cpp choose per tensor, exactly as `llama-quantize` does;
- `source` (the default) keeps every tensor's type: kept tensors are copied byte for byte and changed
  ones are quantized back to their source type, or to the closest type the writers at hand can write;
- `HIGH/LOW@BUDGET` (e.g. `Q8_0/Q4_0@Q5_0`) is importance-aware mixed precision: every tensor starts
  at LOW, then the embeddings and output, and then whole layers from the most sensitive down, move
  to HIGH while the file stays within the bytes the uniform BUDGET type would take.

Quantizable means what llama.cpp quantizes: weights with two or more dimensions that are not norms.
A type whose block does not divide a tensor's rows falls back to the closest type (in bits per
weight) that does, and the per-tensor record says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import LayerlabError

T = GGMLQuantizationType
LLAMACPP_EXTRA = "pip install 'layerlab[llamacpp]'"


class QuantError(LayerlabError):
    """A quantization type that is unknown or cannot be written here."""


@dataclass(frozen=True)
class QuantType:
    """One entry of the registry: a tensor type, or a llama.cpp mixture (`tensor` is None)."""

    name: str
    tensor: GGMLQuantizationType | None
    ftype: LlamaFileType
    description: str

    @property
    def needs_llama_cpp(self) -> bool:
        return self.tensor is None or self.tensor not in NUMPY_TYPES


NUMPY_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0)
LLAMA_CPP_TYPES = (T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K)
F = LlamaFileType
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("F32", T.F32, F.ALL_F32, "32-bit float: exact"),
    QuantType("F16", T.F16, F.MOSTLY_F16, "16-bit float"),
    QuantType("BF16", T.BF16, F.MOSTLY_BF16, "bfloat16"),
    QuantType("Q8_0", T.Q8_0, F.MOSTLY_Q8_0, "8.5 bits per weight"),
    QuantType("Q5_1", T.Q5_1, F.MOSTLY_Q5_1, "6.0 bits per weight"),
    QuantType("Q5_0", T.Q5_0, F.MOSTLY_Q5_0, "5.5 bits per weight"),
    QuantType("Q4_1", T.Q4_1, F.MOSTLY_Q4_1, "5.0 bits per weight"),
    QuantType("Q4_0", T.Q4_0, F.MOSTLY_Q4_0, "4.5 bits per weight"),
    QuantType("Q6_K", T.Q6_K, F.MOSTLY_Q6_K, "6.56 bits per weight (llama.cpp)"),
    QuantType("Q5_K", T.Q5_K, F.MOSTLY_Q5_K_S, "5.5 bits per weight (llama.cpp)"),
    QuantType("Q4_K", T.Q4_K, F.MOSTLY_Q4_K_S, "4.5 bits per weight (llama.cpp)"),
    QuantType("Q3_K", T.Q3_K, F.MOSTLY_Q3_K_S, "3.44 bits per weight (llama.cpp)"),
    QuantType("Q2_K", T.Q2_K, F.MOSTLY_Q2_K, "2.63 bits per weight (llama.cpp)"),
    QuantType("Q5_K_M", None, F.MOSTLY_Q5_K_M, "llama.cpp's Q5_K mixture, medium"),
    QuantType("Q5_K_S", None, F.MOSTLY_Q5_K_S, "llama.cpp's Q5_K mixture, small"),
    QuantType("Q4_K_M", None, F.MOSTLY_Q4_K_M, "llama.cpp's Q4_K mixture, medium"),
    QuantType("Q4_K_S", None, F.MOSTLY_Q4_K_S, "llama.cpp's Q4_K mixture, small"),
    QuantType("Q3_K_L", None, F.MOSTLY_Q3_K_L, "llama.cpp's Q3_K mixture, large"),
    QuantType("Q3_K_M", None, F.MOSTLY_Q3_K_M, "llama.cpp's Q3_K mixture, medium"),
    QuantType("Q3_K_S", None, F.MOSTLY_Q3_K_S, "llama.cpp's Q3_K mixture, small"),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")  # the ones a Hugging Face folder can hold


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def writable_types() -> tuple[GGMLQuantizationType, ...]:
    """Tensor types this installation can write."""
    return NUMPY_TYPES + (LLAMA_CPP_TYPES if llama_cpp_available() else ())


def bits_per_weight(kind: GGMLQuantizationType) -> float:
    block, size = GGML_QUANT_SIZES[kind]
    return size * 8 / block


def tensor_bytes(kind: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy `shape` (rows last) stored as `kind`."""
    block, size = GGML_QUANT_SIZES[kind]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * shape[-1] // block * size


def fits(kind: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """Whether rows of this tensor divide into the type's blocks."""
    return shape[-1] % GGML_QUANT_SIZES[kind][0] == 0


def closest(kind: GGMLQuantizationType, shape: tuple[int, ...],
            allowed: Iterable[GGMLQuantizationType] | None = None) -> GGMLQuantizationType:
    """`kind` if it can be written and fits, else the allowed type nearest in bits per weight (ties: more bits)."""
    allowed = tuple(allowed or writable_types())
    if kind in allowed and fits(kind, shape):
        return kind
    candidates = [t for t in allowed if fits(t, shape)]
    return min(candidates, key=lambda t: (abs(bits_per_weight(t) - bits_per_weight(kind)), -bits_per_weight(t)))


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's rule: weights of two or more dimensions that are not norms."""
    return len(shape) >= 2 and name.endswith(".weight") and "_norm." not in name


def lookup(name: str, purpose: str = "--quant") -> QuantType:
    """The registry entry for `name`, or a one-line error listing the names."""
    entry = QUANT_TYPES.get(name.upper())
    if entry is None:
        raise QuantError(f"unknown quantization type {name!r} for {purpose}; choose from source, "
                         f"{', '.join(QUANT_TYPES)}, or HIGH/LOW@BUDGET such as Q8_0/Q4_0@Q5_0")
    if entry.needs_llama_cpp and not llama_cpp_available():
        raise QuantError(f"{entry.name} is written by llama.cpp's quantizer, which needs llama-cpp-python: "
                         f"{LLAMACPP_EXTRA}")
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
            raise QuantError(f"mixed precision {text!r} needs a byte budget: HIGH/LOW@BUDGET, such as Q8_0/Q4_0@Q5_0 "
                             "(as many bytes as uniform Q5_0)")
        parts = [lookup(part, "mixed precision") for part in (high, low, budget)]
        if any(p.tensor is None for p in parts):
            raise QuantError(f"mixed precision {text!r} takes tensor types (such as Q8_0, Q6_K, Q4_0), "
                             "not llama.cpp mixtures")
        if bits_per_weight(parts[0].tensor) <= bits_per_weight(parts[1].tensor):
            raise QuantError(f"mixed precision {text!r}: HIGH must have more bits per weight than LOW")
        return cls("mixed", high=parts[0], low=parts[1], budget=parts[2])

    def to_text(self) -> str:
        if self.kind == "mixed":
            return f"{self.high.name}/{self.low.name}@{self.budget.name}"
        return self.type.name if self.kind == "uniform" else "source"

    @property
    def needs_llama_cpp(self) -> bool:
        return any(q is not None and q.needs_llama_cpp for q in (self.type, self.high, self.low))


@dataclass(frozen=True)
class Target:
    """The type chosen for one output tensor, and why when it is not the one asked for."""

    type: GGMLQuantizationType | None  # None: llama.cpp's mixture chooses (written as F32 for it first)
    note: str = ""


def choose_types(quant: Quant, tensors: Mapping[str, tuple[tuple[int, ...], GGMLQuantizationType]],
                 changed: Iterable[str] = (), importance: Mapping[str, float] | None = None) -> dict[str, Target]:
    """The target type of every output tensor.

    `tensors` maps output names to (numpy shape, source type); `changed` names the tensors whose
    values differ from the source's; `importance` maps a unit ("embeddings" or "blk.N") to a score,
    higher = more sensitive, for mixed precision.
    """
    changed = set(changed)
    if quant.kind == "source":
        return {name: _source_target(name, shape, kind, name in changed) for name, (shape, kind) in tensors.items()}
    if quant.kind == "uniform" and quant.type.tensor is None:  # a llama.cpp mixture
        return {name: Target(None) if quantizable(name, shape) else _source_target(name, shape, kind, name in changed)
                for name, (shape, kind) in tensors.items()}
    if quant.kind == "uniform":
        return {name: _uniform_target(name, shape, kind, quant.type.tensor, name in changed)
                for name, (shape, kind) in tensors.items()}
    return _mixed_targets(quant, tensors, changed, importance or {})


def _source_target(name: str, shape, kind: GGMLQuantizationType, changed: bool) -> Target:
    if not changed:
        return Target(kind)
    chosen = closest(kind, shape)
    return Target(chosen, "" if chosen == kind else f"{kind.name} cannot be written here: closest {chosen.name}"
                  + ("" if llama_cpp_available() else f" ({LLAMACPP_EXTRA} writes K-quants)"))


def _uniform_target(name: str, shape, kind: GGMLQuantizationType, wanted: GGMLQuantizationType,
                    changed: bool) -> Target:
    if not quantizable(name, shape):
        return _source_target(name, shape, kind, changed)
    chosen = closest(wanted, shape)
    return Target(chosen, "" if chosen == wanted else f"rows of {shape[-1]} do not fit {wanted.name} blocks: "
                  f"closest {chosen.name}")


def unit_of(name: str) -> str | None:
    """The mixed-precision unit a quantizable tensor belongs to: a layer `blk.N`, or `embeddings`."""
    if name.startswith("blk."):
        return ".".join(name.split(".")[:2])
    return "embeddings" if name.split(".")[0] in ("token_embd", "output") else None


def _mixed_targets(quant: Quant, tensors, changed: set[str], importance: Mapping[str, float]) -> dict[str, Target]:
    """LOW everywhere, then HIGH for the embeddings and the most sensitive layers while within BUDGET's bytes."""
    high, low, budget_type = quant.high.tensor, quant.low.tensor, quant.budget.tensor
    targets = {name: _uniform_target(name, shape, kind, low, name in changed)
               for name, (shape, kind) in tensors.items()}
    weights = {name: shape for name, (shape, _) in tensors.items() if quantizable(name, shape)}
    budget = sum(tensor_bytes(closest(budget_type, shape), shape) for shape in weights.values())
    used = sum(tensor_bytes(targets[name].type, shape) for name, shape in weights.items())
    units: dict[str, list[str]] = {}
    for name in weights:
        if unit_of(name) is not None:
            units.setdefault(unit_of(name), []).append(name)
    order = sorted(units, key=lambda u: (u != "embeddings", -importance.get(u, 0.0), u))
    for unit in order:
        upgraded = {name: Target(closest(high, weights[name]), f"mixed: {unit} at the high type")
                    for name in units[unit]}
        extra = sum(tensor_bytes(t.type, weights[n]) - tensor_bytes(targets[n].type, weights[n])
                    for n, t in upgraded.items())
        if used + extra <= budget:
            targets.update(upgraded)
            used += extra
    return targets


def quantize(values, kind: GGMLQuantizationType):
    """Quantize a float32 array (rows last) with the `gguf` package's numpy writer."""
    from gguf import quants

    return quants.quantize(values, kind)
