"""Tiny random-weight models built from configs, one per supported architecture (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, sliding_window_pattern=3,
                                       query_pre_attn_scalar=8),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=32, n_layer=6, n_head=4, n_positions=1024),
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str, seed: int = 0, layers: int = 6) -> torch.nn.Module:
    """A random model (6 layers unless asked) in eval mode, float32, default attention."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()
