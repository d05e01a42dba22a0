"""The plan runtime on tiny random models of every supported architecture."""

import pytest
import torch
from reference import greedy_without_cache, manual_logits, physical_copy
from tiny import ARCHS, tiny_model
from torch import nn

from layerlab import Plan, PlanError, UnsupportedArchitectureError, apply_plan, current_plan
from layerlab.arch import decoder_layers


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


@torch.no_grad()
def test_identity_plan_gives_the_models_own_logits(model):
    x = ids()
    reference = model(x).logits
    with apply_plan(model, Plan.identity(6)):
        planned = model(x).logits
    assert (planned - reference).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("text", ["skip:2-3", "0-3,2-5", "5,0,4x2"])
def test_whole_layer_plans_equal_a_physical_copy(model, text):
    plan = Plan.parse(text, 6)
    x = ids()
    reference = physical_copy(model, list(plan.layers))(x).logits
    with apply_plan(model, plan):
        planned = model(x).logits
    assert (planned - reference).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("text", ["0-3,2-5", "1x3,4-5", "attn-skip:0,3; mlp-skip:2,5", "0-5,2.attn,2.mlp,1.attn"])
def test_cached_greedy_decoding_matches_recomputation(model, text):
    prompt = ids(batch=1)
    with apply_plan(model, Plan.parse(text, 6)):
        cached = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        recomputed = greedy_without_cache(model, prompt, 32)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_reusing_layer_modules_naively_breaks_the_cache():
    """Control: repeats that share one cache slot diverge, so the test above can fail."""
    model = tiny_model("llama")
    prompt = ids(batch=1)
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in Plan.parse("0-3,2-5", 6).layers])
    model.config.num_hidden_layers = 8
    cached = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert not torch.equal(cached, greedy_without_cache(model, prompt, 32))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "text", ["attn-skip:1,4", "mlp-skip:0,5", "attn-skip:2; mlp-skip:3; 0-5,3x2", "0-5,2.attn,5.mlp"]
)
def test_sublayer_skips_equal_a_hand_computed_reference(arch, text):
    model = tiny_model(arch)
    model.config._attn_implementation = "eager"  # the hand reference passes explicit masks
    plan = Plan.parse(text, 6)
    x = ids(batch=1, length=10)
    with apply_plan(model, plan):
        planned = model(x).logits
    assert (planned - manual_logits(model, x, plan)).abs().max() <= 1e-5


def test_repeated_steps_share_parameters_and_get_their_own_cache_slot():
    model = tiny_model("gemma3")
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    dropped = sum(size(decoder_layers(model)[i]) for i in (1, 3, 4))
    before = size(model)
    with apply_plan(model, Plan.parse("2,2,5,0", 6)) as applied:
        steps = decoder_layers(model)
        assert steps[0].self_attn.q_proj.weight is steps[1].self_attn.q_proj.weight
        assert [s.self_attn.layer_idx for s in steps] == [0, 1, 2, 3]
        # per-layer attention types follow the source layer
        assert model.config.layer_types == ["full_attention", "full_attention", "full_attention", "sliding_attention"]
        assert model.config.num_hidden_layers == 4
        assert size(model) == before - dropped  # no weight is copied; only executed layers are visible
        assert current_plan(model) == applied.plan
    assert model.config.num_hidden_layers == 6 and current_plan(model) is None
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == list(range(6))


@torch.no_grad()
def test_plain_call_and_restore():
    model = tiny_model("qwen2")
    x = ids()
    reference = model(x).logits
    applied = apply_plan(model, Plan.parse("skip:1", 6))
    assert not torch.equal(model(x).logits, reference)
    with pytest.raises(PlanError, match="already applied"):
        apply_plan(model, Plan.identity(6))
    applied.restore()
    applied.restore()  # idempotent
    assert torch.equal(model(x).logits, reference)


def test_plan_must_fit_the_model():
    model = tiny_model("llama")
    with pytest.raises(PlanError, match="written for 8 layers, but the model has 6"):
        apply_plan(model, Plan.identity(8))
    with pytest.raises(PlanError, match="no attention sublayer"):
        apply_plan(model, Plan.parse("attn-skip:0-5", 6))


def test_unsupported_architecture_is_named():
    class Odd(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported.*layerlab/arch.py"):
        apply_plan(Odd(), Plan.identity(2))


@torch.no_grad()
def test_accelerate_dispatch_hooks_follow_the_step_copies():
    """With device_map sharding accelerate wraps each layer's forward; copies must call their own."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = tiny_model("llama")
    for layer in decoder_layers(model):
        add_hook_to_module(layer, Count())
    prompt = ids(batch=1)
    with apply_plan(model, Plan.parse("0-3,2-5", 6)):
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert torch.equal(cached, greedy_without_cache(model, prompt, 8))
    assert Count.calls > 0
