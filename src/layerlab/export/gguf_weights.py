"""Where a Hugging Face model's weights live in a GGUF file, and how their values differ there.

Names come from the `gguf` package's tensor-name map (the one llama.cpp's converter uses). Values
differ in ways that are architecture knowledge, kept as one row per GGUF architecture:
- llama (SmolLM2, Llama, Mistral): `attn_q` / `attn_k` rows are permuted into llama.cpp's rotary
  layout (`permute` in llama.cpp's convert_hf_to_gguf.py); transformers' GGUF loader undoes it
  (`_reverse_permute_weights` in modeling_gguf_pytorch_utils.py);
- gemma3: RMSNorm weights are stored plus one (Gemma3RMSNorm scales by 1 + w; the converter adds
  1, transformers' loader subtracts it).
An architecture without a row can still be pruned and re-quantized from its own tensors; only
writing weights that changed in memory needs the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

from ..errors import LayerlabError


@dataclass(frozen=True)
class GgufArch:
    """How Hugging Face weight values map onto one GGUF architecture's tensors."""

    permute_qk: bool = False  # attn_q / attn_k rows in llama.cpp's rotary order
    norm_offset: float = 0.0  # added to every `*norm.weight`


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch(permute_qk=True),
    "gemma3": GgufArch(norm_offset=1.0),
    "qwen2": GgufArch(),
    "qwen3": GgufArch(),
}


def gguf_arch(name: str) -> GgufArch:
    """The row for a GGUF architecture, or a one-line error for one whose weights layerlab cannot write."""
    if name not in GGUF_ARCHS:
        raise LayerlabError(f"writing changed weights into a {name!r} GGUF is not supported (supported: "
                            f"{', '.join(GGUF_ARCHS)}); export to --format hf, or add a row to export/gguf_weights.py")
    return GGUF_ARCHS[name]


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row order: within each head, the two rotary halves become interleaved pairs."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def to_gguf(values: np.ndarray, name: str, arch: GgufArch, config) -> np.ndarray:
    """A Hugging Face weight's values as the GGUF tensor `name` stores them (float32)."""
    values = np.asarray(values, dtype=np.float32)
    if arch.permute_qk and ".attn_q." in name:
        values = permute(values, config.num_attention_heads)
    elif arch.permute_qk and ".attn_k." in name:
        values = permute(values, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch.norm_offset and name.endswith("norm.weight"):
        values = values + np.float32(arch.norm_offset)
    return values


def parameter_names(model, arch_name: str) -> dict[str, str]:
    """GGUF tensor name -> parameter name, in the model's own layer numbering (tied weights once)."""
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch_name), None)
    if arch is None:
        raise LayerlabError(f"the gguf package does not know the architecture {arch_name!r}; upgrade gguf")
    text = model.config.get_text_config(decoder=True)
    names = get_tensor_name_map(arch, text.num_hidden_layers)
    found, missing = {}, []
    for param_name, _ in model.named_parameters():  # shared (tied) parameters are listed once
        base, _, suffix = param_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            missing.append(param_name)
        else:
            found[f"{mapped}.{suffix}"] = param_name
    if missing:
        raise LayerlabError(f"no GGUF tensor for the weight(s) {', '.join(missing[:3])} of a {arch_name!r} model")
    return found


def model_source_name(out_name: str, layers: Sequence[int]) -> str:
    """The tensor name in the model's numbering for output tensor `out_name` (block j holds `layers[j]`)."""
    if not out_name.startswith("blk."):
        return out_name
    _, index, rest = out_name.split(".", 2)
    return f"blk.{layers[int(index)]}.{rest}"


class ModelWeights:
    """A model's weights under an output file's tensor names, in GGUF layout, computed one tensor at a time.

    Output block j holds model layer `layers[j]`: the plan's layers for a model of the source's
    shape, `range(n)` for a model whose layers already are the plan's steps (a healed model).
    """

    def __init__(self, model, arch_name: str, layers: Sequence[int]) -> None:
        self.arch = gguf_arch(arch_name)
        self.config = model.config.get_text_config(decoder=True)
        self.dtype = next(model.parameters()).dtype
        self.layers = tuple(layers)
        self._params = dict(model.named_parameters())
        self._names = parameter_names(model, arch_name)

    @torch.no_grad()
    def values(self, out_name: str) -> np.ndarray | None:
        """The float32 values the model holds for output tensor `out_name`, or None if it has no such weight."""
        param = self._names.get(model_source_name(out_name, self.layers))
        if param is None:
            return None
        return to_gguf(self._params[param].detach().float().cpu().numpy(), out_name, self.arch, self.config)


def differs(new: np.ndarray, reference: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether `new` holds other values than `reference`, beyond the rounding of loading it into `dtype`.

    Loading a GGUF into a model rounds through `dtype` and, for Gemma's norms, through a subtraction
    and an addition of one; a real edit (healing, a patch) moves weights by far more than that.
    """
    if new.shape != reference.shape:
        return True
    ulp = float(torch.finfo(dtype).eps)
    return not np.all(np.abs(new - reference) <= 4 * ulp * np.maximum(1.0, np.abs(reference)))
