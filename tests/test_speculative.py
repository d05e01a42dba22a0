"""Self-speculative decoding on tiny random models, checked against plain decoding of the full model."""

import pytest
import torch
from reference import greedy_without_cache
from tiny import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from layerlab import Plan, apply_plan
from layerlab.arch import decoder_layers
from layerlab.speculative import (
    SpeculativeSettings,
    expected_tokens,
    predicted_speedup,
    required_acceptance,
    speculative_generate,
)

PROMPTS = [torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 6, 11)]
FIXED = SpeculativeSettings(max_draft=4, min_confidence=0, min_ratio=0)  # always 4 drafts: most rejections
NEW = 16
CHI2_9DOF_999 = 27.88  # 0.999 quantile of chi-square with 9 degrees of freedom


@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3", "gemma3", "gpt2"])
def model_and_references(request):
    model = tiny_model(request.param)
    return model, [greedy_without_cache(model, prompt, NEW) for prompt in PROMPTS]


@pytest.mark.parametrize("text", ["skip:2-3", "attn-skip:1,4; mlp-skip:2,5", "mlp-skip:0-5", "5"])
def test_greedy_output_is_the_full_models_greedy_output(model_and_references, text):
    model, references = model_and_references
    for prompt, reference in zip(PROMPTS, references, strict=True):
        result = speculative_generate(model, prompt, Plan.parse(text, 6), NEW, FIXED)
        assert torch.equal(result.ids, reference)


def test_a_plan_that_accepts_almost_nothing_still_gives_the_full_output():
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(100)  # layer 0 dominates: skipping it changes every token
    result = speculative_generate(model, PROMPTS[2], Plan.parse("skip:0", 6), 32, FIXED)
    assert result.stats.acceptance_rate < 0.05
    assert torch.equal(result.ids, greedy_without_cache(model, PROMPTS[2], 32))


def test_the_full_plan_as_draft_is_always_accepted():
    model = tiny_model("qwen2")
    stats = speculative_generate(model, PROMPTS[1], Plan.identity(6), 21, FIXED).stats
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_verification == 5.0  # 4 drafts and the full model's next token


@pytest.mark.parametrize("confidence, ratio, low, high", [(1.01, 0, 0, 1), (0, 1.05, 1.2, 5), (0, 0, 5, 6)])
def test_drafting_stops_when_the_draft_is_unsure(confidence, ratio, low, high):
    """An impossible confidence drafts one token per cycle, a top-1/top-2 ratio some, no threshold max_draft."""
    model = tiny_model("llama")
    settings = SpeculativeSettings(max_draft=6, min_confidence=confidence, min_ratio=ratio)
    result = speculative_generate(model, PROMPTS[1], Plan.parse("skip:4", 6), 30, settings)
    stats = result.stats
    assert torch.equal(result.ids, greedy_without_cache(model, PROMPTS[1], 30))
    assert low <= stats.draft_steps_per_verification <= high
    assert stats.new_tokens - 1 == stats.accepted + stats.verifications  # each verification adds accepted + 1
    assert stats.draft_steps == stats.proposed and stats.draft_seconds > 0 and stats.verify_seconds > 0


def test_speedup_formulas():
    assert expected_tokens(0.5, 3) == pytest.approx(1.875)  # 1 + a + a^2 + a^3
    assert expected_tokens(1.0, 3) == 4
    assert predicted_speedup(2.0, 3, 0.2) == pytest.approx(2.0 / 1.6)
    assert required_acceptance(1, 0.5) == pytest.approx(0.5)  # (1 + a) / 1.5 = 1
    a = required_acceptance(4, 0.3)
    assert predicted_speedup(expected_tokens(a, 4), 4, 0.3) == pytest.approx(1.0)
    assert required_acceptance(4, 1.0) is None  # a draft as slow as the model cannot win


def test_accepted_tokens_are_never_recomputed():
    """The full model sees the prompt once, then each position once, except positions of rejected drafts."""
    model = tiny_model("llama")
    seen: list[tuple[int, int]] = []  # (first position, tokens) of each full forward
    layer = decoder_layers(model)[3]  # the draft skips layer 3: only full forwards reach it
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((int(kwargs["position_ids"][0, 0]), args[0].shape[1])),
        with_kwargs=True)
    try:
        stats = speculative_generate(model, PROMPTS[2], Plan.parse("skip:3", 6), 24, FIXED).stats
    finally:
        handle.remove()
    assert seen[0] == (0, 11)
    assert sum(n for _, n in seen) == 11 + stats.verifications + stats.proposed
    for (start, length), (following, _) in zip(seen[1:], seen[2:], strict=False):
        assert start < following <= start + length  # only the rejected tail is processed again
    assert 0 < stats.accepted < stats.proposed


def small_vocabulary_model():
    """8 tokens, sharp distributions, and a layer whose skip changes them a lot (acceptance about 0.6)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        model.model.layers[1].mlp.down_proj.weight.mul_(40)
    return model


@torch.no_grad()
def pit_chi2(model, ids: torch.Tensor, start: int) -> float:
    """Chi-square of the randomized probability integral transforms of the tokens after `start`.

    If every token is drawn from the full model's distribution given the tokens before it, the
    transforms are independent and uniform on [0, 1] (Brockwell 2007); 10 bins, 9 degrees of freedom.
    """
    probs = torch.softmax(model(ids).logits[0, start - 1:-1].double(), dim=-1)
    tokens = ids[0, start:, None]
    own = probs.gather(-1, tokens)[:, 0]
    noise = torch.rand(len(own), generator=torch.Generator().manual_seed(0), dtype=torch.double)
    transforms = probs.cumsum(-1).gather(-1, tokens)[:, 0] - own + noise * own
    counts = torch.histc(transforms, bins=10, min=0, max=1)
    expected = len(own) / 10
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_follows_the_full_models_distribution():
    model, prompt, plan = small_vocabulary_model(), torch.tensor([[1, 2, 3]]), Plan.parse("skip:1", 4)
    settings = SpeculativeSettings(max_draft=3, min_confidence=0, min_ratio=0, sample=True, seed=1)
    result = speculative_generate(model, prompt, plan, 1200, settings)
    assert 0.3 < result.stats.acceptance_rate < 0.9  # both acceptances and rejections were exercised
    assert pit_chi2(model, result.ids, 3) < CHI2_9DOF_999
    # control: the draft's own samples fail the same test, so it can tell the two distributions apart
    with torch.no_grad(), apply_plan(model, plan):
        torch.manual_seed(0)
        drafted = model.generate(prompt, do_sample=True, max_new_tokens=1200, min_new_tokens=1200, top_k=0)
    assert pit_chi2(model, drafted, 3) > 3 * CHI2_9DOF_999


def test_draft_plan_search_ranks_by_predicted_speedup_and_explains_a_loss():
    from test_evaluate import TEXT, CharTokenizer

    from layerlab.draft_search import search_draft_plan

    model = tiny_model("llama")
    found = search_draft_plan(model, CharTokenizer(), ["The game", "In 1990 the"], TEXT, max_new_tokens=8,
                              settings=FIXED, ctx=64, windows=2, shares=(0.35, 0.65))
    kinds = {c.kind for c in found.ranking}
    assert kinds == {"layers", "sublayers"}
    speedups = [c.predicted_speedup for c in found.ranking]
    assert speedups == sorted(speedups, reverse=True)
    best = found.best.stats
    assert best.proposed > 0 and best.plain_seconds_per_token == found.plain_seconds_per_token
    assert found.wins == (speedups[0] > 1)
    assert ("beats plain decoding" if found.wins else "no win") in found.summary()


def test_speculate_command_prints_the_plain_greedy_text_and_the_statistics(tiny_folder):
    import subprocess
    import sys

    import layerlab

    model, tokenizer = layerlab.load(str(tiny_folder))
    ids = tokenizer("The cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    result = subprocess.run([sys.executable, "-m", "layerlab.cli", "speculate", "--model", str(tiny_folder),
                             "--draft-plan", "skip:2-3", "--prompt", "The cat", "-n", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected.strip() in result.stdout and "acceptance" in result.stdout
    assert "peak memory:" in result.stdout and "peak memory: unknown" not in result.stdout
