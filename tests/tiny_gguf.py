"""Tiny GGUF files written from tiny random Hugging Face models (no downloads, a second to build).

The hyperparameters come from the model's config, the tokenizer is a minimal byte-level BPE
vocabulary (the 256 GPT-2 byte tokens, one merge, one special token: enough for llama.cpp and
transformers, and quick to parse; SmolLM2's 49k-token vocabulary takes ~10 s to read per open), and
every tensor comes from the model through layerlab's own HF -> GGUF value mapping
(`export/gguf_weights.py`), as F32: loading the file back must give the model's exact weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from layerlab.export.gguf_weights import ModelWeights, parameter_names


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (`bytes_to_unicode`), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


TOKENS = [*byte_tokens(), "\u0120t", "<|endoftext|>"]  # "Ġt" = " t", from the one merge
VOCAB = len(TOKENS)
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, rms_norm_eps=1e-5)


def tiny_hf(arch: str, layers: int = 6, seed: int = 0, hidden: int = 64):
    """A random float32 model whose config is what a GGUF of it reads back as (so logits can be compared).

    `hidden=256` makes every row a whole number of K-quant blocks (256 values)."""
    torch.manual_seed(seed)
    sizes = SIZES | {"hidden_size": hidden, "intermediate_size": 2 * hidden}
    if arch == "llama":
        config = LlamaConfig(**sizes, num_hidden_layers=layers, rope_theta=10000.0, tie_word_embeddings=True)
    else:  # gemma3: one rope base for every layer and the default 5 sliding : 1 global pattern, as transformers reads
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        config = Gemma3TextConfig(**sizes, num_hidden_layers=layers, head_dim=hidden // 4, sliding_window=4,
                                  query_pre_attn_scalar=hidden // 4,  # llama.cpp scales by 1/sqrt(head_dim)
                                  rope_parameters={"full_attention": rope, "sliding_attention": dict(rope)})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init value, so a missing +1 or permutation shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def hparams(config, arch: str) -> dict[str, object]:
    """The `<arch>.*` metadata llama.cpp and transformers read for these architectures."""
    values = {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
              "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
              "attention.head_count": config.num_attention_heads,
              "attention.head_count_kv": config.num_key_value_heads,
              "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
              "rope.freq_base": float(config.rope_parameters["rope_theta"] if arch == "llama" else
                                      config.rope_parameters["full_attention"]["rope_theta"])}
    if arch == "llama":
        values |= {"rope.dimension_count": config.hidden_size // config.num_attention_heads, "vocab_size": VOCAB}
    else:
        values |= {"attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
                   "attention.sliding_window": config.sliding_window}
    return values


def write_tiny_gguf(model, arch: str, path: Path) -> Path:
    """Write `model` as a GGUF of GGUF architecture `arch` ("llama" or "gemma3"), every tensor F32."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(int(LlamaFileType.ALL_F32))
    config = model.config.get_text_config(decoder=True)
    for key, value in hparams(config, arch).items():
        kind = GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.UINT32
        writer.add_key_value(f"{arch}.{key}", value, kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (VOCAB - 1) + [3])  # normal, and one control token
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)
    writer.add_add_bos_token(False)
    weights = ModelWeights(model, arch, range(config.num_hidden_layers))
    for name in parameter_names(model, arch):
        writer.add_tensor(name, np.ascontiguousarray(weights.values(name)), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
