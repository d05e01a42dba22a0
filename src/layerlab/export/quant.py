"""Which type each tensor of a GGUF export gets (`choose_types`), and the numpy quantizer.

The registry of what may be asked for is `layerlab.quant`; this side knows the gguf package's
enums. Quantizable means what llama.cpp quantizes: weights with two or more dimensions that are not
norms. A type whose block does not divide a tensor's rows falls back to the closest type (in bits
per weight) that does, and the per-tensor record says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import quant as registry
from ..quant import Quant

T = GGMLQuantizationType

NUMPY_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0)
LLAMA_CPP_TYPES = (T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K)


def writable_types() -> tuple[GGMLQuantizationType, ...]:
    """Tensor types this installation can write."""
    return NUMPY_TYPES + (LLAMA_CPP_TYPES if registry.llama_cpp_available() else ())


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
                  + ("" if registry.llama_cpp_available() else " (pip install 'layerlab[llamacpp]' writes K-quants)"))


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


def anchored(new: np.ndarray, old: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """The changed values `new` of a tensor that held `old`, made ready to quantize to `kind`.

    Why: a tensor already quantized in another type often sits exactly on rounding ties of `kind`'s
    grid (half of a Q4_K tensor's weights are Q4_0 ties). Rounded as they are, a small edit (a short
    LoRA healing moves weights by 0.1 % of their norm) decides every one of those ties, so the rounding
    error follows the edit's sign pattern and amplifies it ~100x: a Gemma 3 file read back at perplexity
    7000 instead of 85. So on the weights whose old value is a tie, the edit is put on top of the old
    value as `kind` rounds it (the tie goes the way it goes for the unedited tensor; the edit moves the
    weight only where it crosses a whole half step); every other weight is rounded from its new value,
    where the old value's position between two steps dithers the edit instead of amplifying it.
    """
    base = roundtrip(old, kind)
    nudge = np.float32(1e-3) * np.float32(np.abs(old - base).mean())
    if nudge == 0:  # `old` is already in `kind`: no ties to break
        return new
    tie = roundtrip(old + nudge, kind) != roundtrip(old - nudge, kind)
    return np.where(tie, base + (new - old), new).astype(np.float32)


def roundtrip(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """`values` as `kind` stores them: quantized and read back (float32, same shape)."""
    from gguf import quants

    return np.asarray(quants.dequantize(quantize(values, kind), kind), dtype=np.float32).reshape(values.shape)
