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


def tiny_model(arch: str, seed: int = 0, layers: int = 6, vocab: int | None = None) -> torch.nn.Module:
    """A random model (6 layers unless asked; `vocab` tokens, 97 unless asked) in eval mode, float32."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.num_hidden_layers = layers
    if vocab is not None:
        config.vocab_size = vocab
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


class NumberTokenizer:
    """Text of space-separated token ids ("12 7 33") to those ids; optional BOS; enough of the HF interface.

    Lets tests build contexts that share exact token prefixes and continuations of known tokens.
    """

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None, split_special_tokens=False):
        ids = [int(word) if word.isdigit() else 1 + ord(word[0]) % 90 for word in text.split()]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def text_of(ids) -> str:
    return "".join(f" {i}" for i in ids)
