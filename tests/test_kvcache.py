"""Quantized KV caches: the per-token codes, the cache layers in a model (alone and with KV sharing), bad input."""

import functools

import pytest
import torch
from reference import manual_kv_logits
from tiny import tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer

from layerlab import LayerlabError, Plan, apply_plan
from layerlab.kv import cache_bytes
from layerlab.kvcache import (
    CacheSettings,
    PerTokenQuantizedLayer,
    PerTokenQuantizedSlidingLayer,
    chunked_perplexity,
    dequantize,
    kv_cache,
    layer_types,
    quantize,
)
from layerlab.runtime import EmptySlot


def ids(batch=2, length=10, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_codes_follow_the_min_scale_formula(bits):
    x = torch.randn(2, 3, 5, 8) * torch.linspace(0.1, 10, 8)  # channels of very different ranges
    codes, scale, low = quantize(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (8 if bits == 8 else 4)
    assert scale.shape == low.shape == (2, 3, 5, 1) and scale.dtype == low.dtype == torch.float16
    # reference: one vector at a time, written out
    for vector, s, m, packed in zip(x.reshape(-1, 8), scale.reshape(-1), low.reshape(-1), codes.reshape(30, -1),
                                    strict=True):
        assert m == vector.min().half() and s == ((vector.max() - m.float()) / (2 ** bits - 1)).half()
        expected = [min(max(round(((v - m.float()) / s.float()).item()), 0), 2 ** bits - 1) for v in vector]
        unpacked = packed.tolist() if bits == 8 else [n for b in packed.tolist() for n in (b & 15, b >> 4)]
        assert unpacked == expected
    restored = dequantize(codes, scale, low, bits, torch.float32)
    assert ((restored - x).abs() <= scale.float() * 0.5 + 1e-3 * x.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("make", [lambda: PerTokenQuantizedLayer(8), lambda: PerTokenQuantizedLayer(4),
                                  lambda: PerTokenQuantizedSlidingLayer(8, sliding_window=4)])
def test_a_cache_layer_returns_the_same_history_however_it_is_fed(make):
    keys, values = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    expected = make().update(keys, values)
    layer = make()
    got = layer.update(keys[:, :, :3], values[:, :, :3])
    for t in range(3, 7):
        got = layer.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    if layer.is_sliding:  # the last step sees window - 1 stored tokens and the new one
        expected = tuple(e[:, :, -4:] for e in expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    stored = 3 if layer.is_sliding else 7
    per_token = (8 if layer.bits == 8 else 4) + 2 + 2  # codes, float16 scale and min, per head
    assert layer.get_seq_length() == 7
    assert cache_bytes(DynamicCache(ddp_cache_data=None)) == 0
    holder = DynamicCache()
    holder.layers = [layer]
    assert cache_bytes(holder) == 2 * 2 * 2 * stored * per_token  # k and v, batch, heads, tokens


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ("llama", "gemma3"):
        out[arch] = tiny_model(arch)
        out[arch].config._attn_implementation = "eager"
    return out


def fake_quantized(tensor, bits):
    return dequantize(*quantize(tensor, bits), bits, tensor.dtype)


@torch.no_grad()
@pytest.mark.parametrize("arch, text", [("llama", "all"), ("llama", "kv:2-5<-1"), ("llama", "0-5,2-3; kv:3<-2"),
                                        ("gemma3", "all"), ("gemma3", "kv:5<-2,4<-3")])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_caches_equal_the_reference_in_prefill_and_decode(models, arch, text, bits):
    model, plan, x = models[arch], Plan.parse(text, 6), ids(length=9)
    reference = manual_kv_logits(model, x, plan, stored=functools.partial(fake_quantized, bits=bits))
    assert (reference - manual_kv_logits(model, x, plan)).abs().max() > 1e-4  # quantization shows
    settings = CacheSettings(f"int{bits}")
    with apply_plan(model, plan), kv_cache(model, settings):
        without_cache = model(x, use_cache=False).logits  # a fresh quantized cache is injected
        cache = DynamicCache(config=model.config)
        decoded = [model(x[:, :4], past_key_values=cache).logits]
        decoded += [model(x[:, t:t + 1], past_key_values=cache).logits for t in range(4, 9)]
    kinds = {type(layer) for layer in cache.layers}
    assert kinds <= {PerTokenQuantizedLayer, PerTokenQuantizedSlidingLayer, DummyLayer, EmptySlot}
    assert (without_cache - reference).abs().max() <= 1e-4
    assert (torch.cat(decoded, dim=1) - reference).abs().max() <= 1e-4


@torch.no_grad()
def test_sharing_and_int8_together_store_a_measured_fraction(models):
    model, x = models["llama"], ids(length=5)
    sizes = {}
    for text, kind in [("all", "full"), ("kv:3-5<-2", "full"), ("all", "int8"), ("kv:3-5<-2", "int8")]:
        with apply_plan(model, Plan.parse(text, 6)), kv_cache(model, CacheSettings(kind)):
            cache = DynamicCache(config=model.config)
            model(x, past_key_values=cache)
        sizes[text, kind] = cache_bytes(cache)
    full = sizes["all", "full"]
    assert full == 6 * 2 * x.numel() * 2 * 8 * 4  # slots, k and v, tokens, kv heads, head dim, fp32
    assert sizes["kv:3-5<-2", "full"] == full // 2
    assert sizes["all", "int8"] == 6 * 2 * x.numel() * 2 * (8 + 4)
    assert sizes["kv:3-5<-2", "int8"] == sizes["all", "int8"] // 2


@torch.no_grad()
def test_transformers_fp8_cache_runs_on_llama_and_is_refused_for_gemma3(models):
    model, x = models["llama"], ids(length=6)
    with kv_cache(model, CacheSettings("fp8")):
        cache = DynamicCache(config=model.config)
        model(x[:, :3], past_key_values=cache)
        model(x[:, 3:], past_key_values=cache)
    assert type(cache.layers[0]).__name__ == "Fp8QuantizedLayer" and cache.get_seq_length() == 6
    with pytest.raises(LayerlabError, match="takes only models whose layers all use full attention") as error:
        with kv_cache(models["gemma3"], CacheSettings("fp8")):
            pass
    assert "\n" not in str(error.value)


def test_bad_cache_types_are_one_line_errors(models):
    with pytest.raises(LayerlabError, match="unknown KV cache type 'int3'"):
        CacheSettings("int3")
    for kind, package in [("quanto-int4", "optimum-quanto"), ("hqq-int4", "hqq")]:
        import importlib.util

        if importlib.util.find_spec(package.split("-")[-1]) is None:
            with pytest.raises(LayerlabError, match=f"needs the {package} package"):
                CacheSettings(kind).check(layer_types(models["llama"].config), "llama")


@torch.no_grad()
def test_chunked_perplexity_with_a_full_cache_equals_plain_perplexity(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerlab.evaluate.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune " * 12
    plain = perplexity(model, tokenizer, text, ctx=64, progress=False)
    chunked = chunked_perplexity(model, tokenizer, text, ctx=64, chunk=24, progress=False)
    assert chunked.windows == plain.windows and chunked.tokens == plain.tokens
    assert abs(chunked.nll - plain.nll) < 1e-5
