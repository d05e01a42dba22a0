"""Architecture knowledge as data: one row per Hugging Face `model_type`.

A row says where the decoder layers live, which submodules form the attention and MLP halves of a
layer (including the norms that belong to each half), and which config fields hold one entry per
layer. Adding an architecture means adding a row, not code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    """Where the parts of a decoder stack live, relative to the causal-LM module."""

    layers: str  # dotted path of the nn.ModuleList of decoder layers
    attention: str  # attention submodule of a layer
    attention_norms: tuple[str, ...]  # norms applied only on the attention branch
    mlp: str  # MLP submodule of a layer
    mlp_norms: tuple[str, ...]  # norms applied only on the MLP branch
    final_norm: str = "model.norm"  # norm between the last layer and the LM head
    per_layer_config: tuple[str, ...] = ("layer_types",)  # config lists indexed by layer
    embeds_are_stream: bool = True  # `inputs_embeds` enter the first layer unchanged (no position embeddings)
    # linear layers inside a decoder layer that LoRA healing adapts by default: all of attention and MLP
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    mlp_output: str = "mlp.down_proj"  # the MLP's last projection in a layer: a linear patch folds into it
    mlp_output_norm: str | None = None  # a norm between the MLP and the residual add (Gemma 3), or none
    norm_weight_offset: float = 0.0  # the norms scale by offset + weight (Gemma: 1 + weight)
    # key / value projections of the attention, which a step reading another layer's KV does not need to run
    # (empty when they are fused with the query projection: then they run and their output is discarded)
    kv_projections: tuple[str, ...] = ("k_proj", "v_proj")


_LLAMA_LIKE = Arch(
    layers="model.layers",
    attention="self_attn",
    attention_norms=("input_layernorm",),
    mlp="mlp",
    mlp_norms=("post_attention_layernorm",),
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": replace(_LLAMA_LIKE, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused
                    kv_projections=()),
    "gemma3_text": Arch(
        layers="model.layers",
        attention="self_attn",
        attention_norms=("input_layernorm", "post_attention_layernorm"),
        mlp="mlp",
        mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
        mlp_output_norm="post_feedforward_layernorm",
        norm_weight_offset=1.0,
    ),
    "gpt2": Arch(
        layers="transformer.h",
        attention="attn",
        attention_norms=("ln_1",),
        mlp="mlp",
        mlp_norms=("ln_2",),
        final_norm="transformer.ln_f",
        embeds_are_stream=False,  # learned position embeddings are added to inputs_embeds
        lora_targets=("c_attn", "c_proj", "c_fc"),  # Conv1D layers; c_proj is in both attention and MLP
        mlp_output="mlp.c_proj",
        kv_projections=(),  # c_attn projects queries, keys and values at once
    ),
}


def per_layer_values(config, arch: Arch, layers: tuple[int, ...], num_layers: int) -> dict[str, list]:
    """The config's per-layer lists (such as `layer_types`) re-indexed to follow `layers`."""
    out = {}
    for name in arch.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            out[name] = type(values)(values[i] for i in layers)
    return out


def unsupported(model_type: str | None) -> UnsupportedArchitectureError:
    """The error for an architecture without a row, naming what to add."""
    known = ", ".join(sorted(ARCHITECTURES))
    return UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported (known: {known}); "
        "add a row naming its layers, attention, MLP and norms to layerlab/arch.py"
    )


def arch_of(model: nn.Module) -> Arch:
    """The row for `model`, or a clear error naming the missing architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise unsupported(model_type)
    return ARCHITECTURES[model_type]


def get_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path such as `model.layers`."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the module at a dotted attribute path."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    return get_path(model, arch_of(model).layers)


def num_layers(model: nn.Module) -> int:
    """How many decoder layers the model physically holds."""
    return len(decoder_layers(model))
