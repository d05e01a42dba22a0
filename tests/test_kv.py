"""KV-source plans: the plan language, the runtime against a hand-computed reference, the cache's bytes."""

import pytest
import torch
from reference import greedy_without_cache, manual_kv_logits
from tiny import ARCHS, tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer
from transformers.models.llama.modeling_llama import LlamaAttention

from layerlab import Plan, PlanError, apply_plan
from layerlab.kv import cache_bytes


def ids(batch=2, length=10, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ plan language
def test_kv_clause_resolves_to_the_most_recent_earlier_source_step():
    plan = Plan.parse("0-5,2-3; kv:3<-2", 6)  # layer 3 runs twice, after each run of layer 2
    assert plan.kv == ((3, 2),)
    assert plan.kv_source_steps == (None, None, None, 2, None, None, None, 6)
    ranged = Plan.parse("kv:3-5<-2", 6)
    assert ranged.kv == ((3, 2), (4, 2), (5, 2)) and ranged.kv_source_steps[3:] == (2, 2, 2)


@pytest.mark.parametrize("text", ["kv:3<-2", "skip:1; kv:3<-2,5<-4", "0-5,2-3; kv:3<-2", "attn-skip:1; kv:3-4<-2",
                                  "5,0-4; kv:3<-5", "0-5,2.attn,3.mlp; mlp-skip:0; kv:2<-0"])
def test_kv_plans_round_trip_through_text_and_json(text):
    plan = Plan.parse(text, 6)
    assert plan.kv
    assert Plan.parse(plan.to_text(), 6) == plan
    assert Plan.from_dict(plan.to_dict(), 6) == plan
    assert Plan.from_dict({"plan": text}, 6) == plan
    assert Plan.from_dict({"num_layers": 6, "steps": list(plan.layers), "kv_sources": [[c, s] for c, s in plan.kv]},
                          6).kv == plan.kv
    assert plan.without_kv().with_kv(plan.kv) == plan and plan != plan.without_kv()


@pytest.mark.parametrize("text, message", [
    ("skip:2; kv:3<-2", r"layer 2 does not run before step 2 \(layer 3\)"),
    ("kv:2<-3", "layer 3 does not run before step 2"),
    ("attn-skip:2; kv:3<-2", "runs layer 2 without attention"),
    ("attn-skip:3; kv:3<-2", "runs layer 3 without attention"),
    ("kv:3<-2,4<-3", "write 4<-2 instead of a chain"),
    ("kv:3<-3", "its own keys"),
    ("kv:3<-6", "names layer 6, but the model has 6 layers"),
    ("kv:3<-1,3<-2", "several kv sources"),
    ("kv:3<2", "bad kv item"),
    ("skip:3; kv:3<-2", "does not run layer 3"),
])
def test_bad_kv_clauses_are_one_line_errors(text, message):
    with pytest.raises(PlanError, match=message) as error:
        Plan.parse(text, 6)
    assert "\n" not in str(error.value)


def test_forms_without_kv_sharing_refuse_kv_plans():
    plan = Plan.parse("kv:3<-2", 6)
    for convert in (plan.to_llm_drop, plan.to_llama_cpp_flags, lambda: plan.to_mergekit("m")):
        with pytest.raises(PlanError, match="cannot express KV sharing"):
            convert()
    with pytest.raises(PlanError, match="must map consumer layers"):
        Plan.from_dict({"steps": [0, 1, 2], "kv_sources": {"2": "one"}}, 6)


# ------------------------------------------------------------------------------------------ runtime
LLAMA_PLANS = ["kv:3<-1", "kv:2-5<-1", "0-5,2-3; kv:3<-2", "skip:1; attn-skip:4; kv:3<-2,5<-0", "0-5,2.attn; kv:2<-0"]
GEMMA_PLANS = ["kv:5<-2,4<-3", "kv:1<-0,4<-0", "0-5,3-5; kv:5<-2,4<-3"]  # sliding 0,1,3,4; global 2,5
CASES = [("llama", t) for t in LLAMA_PLANS] + [("gemma3", t) for t in GEMMA_PLANS]


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ("llama", "gemma3"):
        out[arch] = tiny_model(arch)
        out[arch].config._attn_implementation = "eager"  # the hand reference is eager attention
    return out


@torch.no_grad()
@pytest.mark.parametrize("arch, text", CASES)
def test_kv_plans_equal_a_hand_computed_reference(models, arch, text):
    model, plan, x = models[arch], Plan.parse(text, 6), ids()
    reference = manual_kv_logits(model, x, plan)
    assert (reference - manual_kv_logits(model, x, plan.without_kv())).abs().max() > 1e-2  # sharing changes it
    with apply_plan(model, plan) as applied:
        with_cache = model(x).logits  # a batched prefill, with a cache built by the model
        without_cache = model(x, use_cache=False).logits
        assert not applied.kv_channel.entries  # the last reader of each source dropped its reference
    assert (with_cache - reference).abs().max() <= 1e-5
    assert (without_cache - reference).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("arch, text", CASES)
def test_token_by_token_decoding_equals_the_reference(models, arch, text):
    """Every position's logits when fed one token at a time on a cache (longer than Gemma's window of 4)."""
    model, plan, x = models[arch], Plan.parse(text, 6), ids(batch=2, length=9)
    reference = manual_kv_logits(model, x, plan)
    with apply_plan(model, plan):
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :3], cache=cache, use_cache=True).logits]  # a short prefill, then one token at a time
        steps += [model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(3, 9)]
    assert (torch.cat(steps, dim=1) - reference).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_sharing_matches_recomputation_on_every_architecture(arch):
    model = tiny_model(arch)
    plan = Plan.parse("0-5,3; kv:3<-2", 6) if arch != "gemma3" else Plan.parse("kv:4<-3,5<-2", 6)
    prompt = ids(batch=1)
    model.generation_config.eos_token_id = None  # greedy_without_cache never stops either
    with apply_plan(model, plan):
        cached = model.generate(prompt, max_new_tokens=16, do_sample=False)
        recomputed = greedy_without_cache(model, prompt, 16)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
@pytest.mark.parametrize("arch, text, sharing", [("llama", "kv:2-5<-1", 4), ("llama", "0-5,2-3; kv:3<-2", 2),
                                                 ("gemma3", "kv:5<-2", 1)])
def test_the_cache_stores_one_copy(models, arch, text, sharing):
    model, plan, x = models[arch], Plan.parse(text, 6), ids(length=3)  # shorter than Gemma's window
    with apply_plan(model, plan.without_kv()):
        full = DynamicCache(config=model.config)
        model(x, cache=full, use_cache=True)
    with apply_plan(model, plan):
        shared = DynamicCache(config=model.config)
        model(x, cache=shared, use_cache=True)
    steps = len(plan.steps)
    consumers = [i for i, s in enumerate(plan.kv_source_steps) if s is not None]
    assert len(consumers) == sharing
    assert all(isinstance(shared.layers[i], DummyLayer) for i in consumers)
    per_slot = cache_bytes(full) // steps  # every slot holds the same shape here
    assert cache_bytes(full) == steps * per_slot == steps * 2 * x.numel() * 2 * 8 * 4  # 2 kv heads of 8, fp32
    assert cache_bytes(shared) == (steps - sharing) * per_slot


def test_restoring_a_kv_plan_gives_the_model_back(models):
    model, x = models["llama"], ids()
    before = model(x).logits
    with apply_plan(model, Plan.parse("kv:2-5<-1", 6)):
        assert (model(x).logits - before).abs().max() > 1e-3
    assert torch.equal(model(x).logits, before)


# ------------------------------------------------------------------------------------------ bad input
def test_mismatched_head_shapes_are_refused():
    model = tiny_model("llama")
    other = model.config.__class__(**{**model.config.to_dict(), "num_key_value_heads": 4})
    model.model.layers[3].self_attn = LlamaAttention(other, 3)
    with pytest.raises(PlanError, match="attention shapes differ"):
        apply_plan(model, Plan.parse("kv:3<-2", 6))
    apply_plan(model, Plan.parse("kv:4<-2", 6)).restore()


def test_gemma3_sliding_and_global_layers_cannot_share():
    model = tiny_model("gemma3")
    with pytest.raises(PlanError, match="layer 2 is full_attention but layer 1 is sliding_attention"):
        apply_plan(model, Plan.parse("kv:2<-1", 6))


# ------------------------------------------------------------------------------------------ export
@torch.no_grad()
@pytest.mark.parametrize("arch, text", [("llama", "0-5,2-3; attn-skip:4; kv:3<-2,5<-1"), ("gemma3", "kv:5<-2,4<-3")])
def test_a_kv_export_shares_when_loaded_by_layerlab_or_its_remote_code(arch, text, tmp_path, smollm2_tokenizer):
    import json

    from transformers import AutoModelForCausalLM

    import layerlab
    from layerlab.export.hf import export_hf

    model, plan, x = tiny_model(arch), Plan.parse(text, 6), ids()
    model.generation_config.eos_token_id = None
    export_hf(model, smollm2_tokenizer, plan, tmp_path / "out", remote_code=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["kv_sources"] == {str(j): s for j, s in enumerate(plan.kv_source_steps) if s is not None}
    with apply_plan(model, plan):
        expected = model(x).logits
        tokens = model.generate(x[:1], max_new_tokens=8, do_sample=False)
    loaded, _ = layerlab.load(str(tmp_path / "out"))
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for shared in (loaded, remote):
        shared.generation_config.eos_token_id = None
        assert (shared(x).logits - expected).abs().max() <= 1e-4
        assert torch.equal(shared.generate(x[:1], max_new_tokens=8, do_sample=False), tokens)
        cache = DynamicCache(config=shared.config)
        shared(x, cache=cache, use_cache=True)
        assert sum(isinstance(layer, DummyLayer) for layer in cache.layers) >= len(plan.kv)
    assert (plain(x).logits - expected).abs().max() > 1e-3  # plain transformers ignores kv_sources
    # plans apply on top of a layerlab-loaded KV export: its own map joins theirs, and comes back after
    with apply_plan(loaded, Plan.identity(len(plan.steps))) as applied:
        assert applied.plan.kv and (loaded(x).logits - expected).abs().max() <= 1e-4
    assert (loaded(x).logits - expected).abs().max() <= 1e-4
    with pytest.raises(PlanError, match="remote code"):
        apply_plan(remote, Plan.identity(len(plan.steps)))


def test_a_gguf_export_of_a_kv_plan_is_refused_before_any_work(tmp_path):
    from layerlab.export import prepare_export
    from layerlab.export.gguf import prune_gguf
    from layerlab.models import EMBEDDED
    from layerlab.settings import ExportSettings, ModelSpec

    plan = Plan.parse("kv:19<-18", 30)
    with pytest.raises(PlanError, match="llama.cpp has no way to make a layer read another layer's keys"):
        prune_gguf(EMBEDDED["smollm2-135m"].locate(), plan, tmp_path / "out.gguf")
    settings = ExportSettings(model=ModelSpec("smollm2-135m"), plan="kv:19<-18", out=str(tmp_path / "out.gguf"))
    with pytest.raises(PlanError, match="cannot carry KV sharing"):
        prepare_export(settings, plan)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
@pytest.mark.parametrize("name, text", [("smollm2", "skip:24-25; kv:7<-0,10-11<-9"),
                                        ("gemma3", "kv:4<-3,11<-5")])  # Gemma 3: 5, 11, 17 are global
@torch.no_grad()
def test_kv_plans_on_the_real_models_decode_as_they_recompute_and_search_runs(name, text, request, tmp_path):
    from layerlab.kv_search import KVSearchSettings, search_kv
    from layerlab.kvcache import CacheSettings, kv_cache

    model, tokenizer = request.getfixturevalue(name)
    plan = Plan.parse(text, model.config.num_hidden_layers)
    prompt = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    with apply_plan(model, plan):
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert torch.equal(cached[:, :prompt.shape[1] + 6], greedy_without_cache(model, prompt, 6))
        with kv_cache(model, CacheSettings("int8")):
            assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] == prompt.shape[1] + 4
    text = "It was a bright cold day in April, and the clocks were striking thirteen. " * 20
    state = search_kv(model, tokenizer, text, KVSearchSettings(budget=0.2, tolerance=0.5, order="similar", ctx=64,
                                                               windows=1),
                      state_path=tmp_path / "kv.json", max_tries=2, progress=False)
    assert len(state.trace) == 3 and all("accepted" in entry for entry in state.trace[1:])
