"""The runtime on the two real embedded models (SmolLM2-135M, Gemma-3-270M)."""

import pytest
import torch
from reference import greedy_without_cache, physical_copy

from layerlab import Plan, apply_plan

pytestmark = pytest.mark.slow


def encode(tokenizer, text="The quick brown fox jumps over the lazy dog because"):
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@torch.no_grad()
def test_identity_plan_gives_the_models_own_logits(name, request):
    model, tokenizer = request.getfixturevalue(name)
    x = encode(tokenizer)
    reference = model(x).logits
    with apply_plan(model, Plan.identity(model.config.num_hidden_layers)):
        planned = model(x).logits
    assert (planned - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name, text", [("smollm2", "skip:24-26"), ("gemma3", "skip:3-5,12")])
@torch.no_grad()
def test_skip_plan_equals_a_truncated_copy(name, text, request):
    model, tokenizer = request.getfixturevalue(name)
    plan = Plan.parse(text, model.config.num_hidden_layers)
    x = encode(tokenizer)
    reference = physical_copy(model, list(plan.layers))(x).logits
    with apply_plan(model, plan):
        planned = model(x).logits
    assert (planned - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("name, text", [("smollm2", "0-13,14-19x2,20-29"), ("gemma3", "0-8,5-8x2,9-17")])
@torch.no_grad()
def test_repeat_plan_decodes_the_same_with_and_without_cache(name, text, request):
    model, tokenizer = request.getfixturevalue(name)
    prompt = encode(tokenizer, "Once upon a time")
    with apply_plan(model, Plan.parse(text, model.config.num_hidden_layers)):
        cached = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        recomputed = greedy_without_cache(model, prompt, 32)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_self_speculation_style_sublayer_plan_decodes_consistently(smollm2):
    model, tokenizer = smollm2
    prompt = encode(tokenizer, "Once upon a time")
    plan = Plan.parse("attn-skip:3,5,6,8,10,12; mlp-skip:6,9,10,14", 30)
    with apply_plan(model, plan):
        cached = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        recomputed = greedy_without_cache(model, prompt, 32)
    assert torch.equal(cached, recomputed)


def test_special_token_strings_in_text_stay_text(gemma3):
    """WikiText writes `<unk>`; llama.cpp tokenizes it as text, so must perplexity (else Gemma's ppl triples)."""
    from layerlab.evaluate.perplexity import encode_text

    _, tokenizer = gemma3
    assert tokenizer.unk_token_id in tokenizer("a <unk> b")["input_ids"]
    assert tokenizer.unk_token_id not in encode_text(tokenizer, "a <unk> b")
