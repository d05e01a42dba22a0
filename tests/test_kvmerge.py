"""MiniCache-style merged pairs (`kvmerge:`): the plan language, the runtime against a hand reference, the bytes."""

import math

import pytest
import torch
from reference import manual_chunked_logits, slerp_restore
from tiny import tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention

from layerlab import Plan, PlanError, apply_plan
from layerlab.kv import cache_bytes
from layerlab.kvcache import CacheSettings, kv_cache
from layerlab.kvmerge import MergedFirstLayer, MergedSecondLayer, merge, restore
from layerlab.plan import DEFAULT_MERGE_ANGLE


def ids(batch=2, length=9, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ plan language
@pytest.mark.parametrize("text", ["kvmerge:2+3", "kvmerge:1+2@45.5,4+5", "skip:0; kv:5<-4; kvmerge:2+3@30",
                                  "kv:4<-2; kvmerge:2+3", "0,2,1,3-5; kvmerge:3+4"])
def test_kvmerge_plans_round_trip_through_text_and_json(text):
    plan = Plan.parse(text, 6)
    assert plan.merge and Plan.parse(plan.to_text(), 6) == plan and Plan.from_dict(plan.to_dict(), 6) == plan
    assert Plan.from_dict({"plan": text}, 6) == plan
    assert plan.without_kv().with_merge(plan.merge).with_kv(plan.kv) == plan
    assert Plan.parse("kvmerge:2+3", 6).merge == ((2, 3, DEFAULT_MERGE_ANGLE),)


@pytest.mark.parametrize("text, message", [
    ("kvmerge:2+4", "must be adjacent"),
    ("kvmerge:1+2,2+3", "layer 2 is in another kvmerge pair"),
    ("skip:3; kvmerge:2+3", "layer 3 must run exactly once, but the plan runs it 0 times"),
    ("0-5,2; kvmerge:2+3", "layer 2 must run exactly once, but the plan runs it 2 times"),
    ("attn-skip:2; kvmerge:2+3", "layer 2 runs without attention"),
    ("kv:3<-1; kvmerge:2+3", "layer 3 reads another layer's keys and values"),
    ("0,1,3,2,4,5; kvmerge:2+3", "layer 2 must run before layer 3"),
    ("kvmerge:2+3@181", "0 to 180"),
    ("kvmerge:2-3", "bad kvmerge item"),
    ("kvmerge:5+6", "names layer 6, but the model has 6 layers"),
])
def test_bad_kvmerge_clauses_are_one_line_errors(text, message):
    with pytest.raises(PlanError, match=message) as error:
        Plan.parse(text, 6)
    assert "\n" not in str(error.value)


def test_forms_without_kv_sharing_refuse_merges_and_bad_json_is_named():
    plan = Plan.parse("kvmerge:2+3", 6)
    with pytest.raises(PlanError, match="cannot express KV sharing"):
        plan.to_llama_cpp_flags()
    with pytest.raises(PlanError, match="must be a list of items"):
        Plan.from_dict({"steps": [0, 1, 2, 3], "kv_merge": {"2": 3}}, 6)


def test_the_merge_is_minicache_slerp_with_outliers_kept():
    first, second = torch.randn(2, 3, 40, 8, dtype=torch.float64).unbind(0)
    parts = merge(first, second, 75.0)
    expected = slerp_restore(first, second, 75.0)
    assert 0 < len(parts[2]) < first.shape[:-1].numel()  # some token-heads merge, some stay apart
    for which in (0, 1):
        assert torch.allclose(restore(*parts, which), expected[which], atol=1e-12)


# ------------------------------------------------------------------------------------------ runtime
@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"  # the hand reference is eager attention
    return model


PLANS = ["kvmerge:2+3", "kvmerge:1+2@80,4+5", "skip:0; kv:5<-4; kvmerge:2+3", "kv:4<-2; kvmerge:2+3@100"]


@torch.no_grad()
@pytest.mark.parametrize("text", PLANS)
def test_prefill_and_token_by_token_decoding_equal_the_hand_reference(llama, text):
    plan, x = Plan.parse(text, 6), ids()
    decoded = manual_chunked_logits(llama, x, plan, [3] + [1] * 6)
    assert (decoded - manual_chunked_logits(llama, x, plan.without_kv().with_kv(plan.kv), [9])).abs().max() > 1e-3
    with apply_plan(llama, plan):
        prefill = llama(x).logits  # one batched forward: its own tokens are exact
        cache = DynamicCache(config=llama.config)
        steps = [llama(x[:, :3], cache=cache, use_cache=True).logits]
        steps += [llama(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(3, 9)]
        chunked = DynamicCache(config=llama.config)
        halves = [llama(x[:, :5], cache=chunked, use_cache=True).logits, llama(x[:, 5:], cache=chunked).logits]
    assert (prefill - manual_chunked_logits(llama, x, plan, [9])).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1) - decoded).abs().max() <= 1e-5
    assert (torch.cat(halves, dim=1) - manual_chunked_logits(llama, x, plan, [5, 4])).abs().max() <= 1e-5


@torch.no_grad()
def test_generate_decodes_over_the_merged_cache(llama):
    plan, prompt = Plan.parse("kvmerge:1+2,3+4", 6), ids(batch=1, length=5)
    llama.generation_config.eos_token_id = None
    with apply_plan(llama, plan):
        tokens = llama.generate(prompt, max_new_tokens=8, do_sample=False)
    reference = manual_chunked_logits(llama, tokens[:, :-1], plan, [5] + [1] * 7)
    assert torch.equal(reference[:, 4:].argmax(-1), tokens[:, 5:])


@torch.no_grad()
def test_the_cache_stores_one_direction_and_two_magnitudes(llama):
    plan, x = Plan.parse("kvmerge:2+3,4+5", 6), ids(length=7)
    with apply_plan(llama, plan.without_kv()):
        full = DynamicCache(config=llama.config)
        llama(x, cache=full, use_cache=True)
    with apply_plan(llama, plan):
        merged = DynamicCache(config=llama.config)
        llama(x, cache=merged, use_cache=True)
    assert isinstance(merged.layers[2], MergedFirstLayer) and isinstance(merged.layers[3], MergedSecondLayer)
    assert merged.layers[2].pending is None and merged.get_seq_length() == 7
    batch, heads, tokens, dim = full.layers[0].keys.shape
    per_slot = batch * heads * tokens * dim * 4 * 2  # keys and values, float32
    assert cache_bytes(full) == 6 * per_slot
    apart = 0  # token-heads whose two directions are more than 90 degrees apart: layer A+1's vector is kept
    for a, b in ((2, 3), (4, 5)):
        for tensor in ("keys", "values"):
            first, second = getattr(full.layers[a], tensor), getattr(full.layers[b], tensor)
            cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)
            apart += int((cosine < math.cos(math.radians(DEFAULT_MERGE_ANGLE))).sum())
    assert 0 < apart < 2 * 2 * batch * heads * tokens
    shared = 2 * 2 * batch * heads * tokens * (dim + 2) * 4  # 2 pairs x (keys, values): direction and 2 norms
    assert cache_bytes(merged) == 2 * per_slot + shared + apart * (dim + 3) * 4  # + vector and int32 index


@torch.no_grad()
def test_merges_combine_with_an_int8_cache_for_the_other_layers(llama):
    x = ids()
    with apply_plan(llama, Plan.parse("kvmerge:2+3", 6)), kv_cache(llama, CacheSettings("int8")):
        cache = DynamicCache(config=llama.config)
        llama(x[:, :4], cache=cache, use_cache=True)
        logits = llama(x[:, 4:], cache=cache).logits
    assert [type(layer).__name__ for layer in cache.layers][1:5] == [
        "PerTokenQuantizedLayer", "MergedFirstLayer", "MergedSecondLayer", "PerTokenQuantizedLayer"]
    assert torch.isfinite(logits).all()


def test_restoring_a_merge_plan_gives_the_model_back(llama):
    x = ids()
    before = llama(x).logits
    with apply_plan(llama, Plan.parse("kvmerge:2+3", 6)):
        cache = DynamicCache(config=llama.config)
        llama(x[:, :4], cache=cache, use_cache=True)
        assert (llama(x[:, 4:], cache=cache).logits - before[:, 4:]).abs().max() > 1e-4
    assert torch.equal(llama(x).logits, before)


# ------------------------------------------------------------------------------------------ bad input
def test_mismatched_head_shapes_and_sliding_layers_are_refused():
    model = tiny_model("llama")
    other = model.config.__class__(**{**model.config.to_dict(), "num_key_value_heads": 4})
    model.model.layers[3].self_attn = LlamaAttention(other, 3)
    with pytest.raises(PlanError, match="kvmerge pair 2\\+3: the layers' attention shapes differ"):
        apply_plan(model, Plan.parse("kvmerge:2+3", 6))
    gemma = tiny_model("gemma3")  # layers 2 and 5 are global, the others sliding
    for text in ("kvmerge:1+2", "kvmerge:3+4"):
        with pytest.raises(PlanError, match="only two full-attention layers merge"):
            apply_plan(gemma, Plan.parse(text, 6))


def test_exports_refuse_merges_before_any_work(tmp_path):
    from layerlab.export import prepare_export
    from layerlab.export.hf import planned_config
    from layerlab.settings import ExportSettings, ModelSpec

    plan = Plan.parse("kvmerge:20+21", 30)
    settings = ExportSettings(model=ModelSpec("smollm2-135m"), plan="kvmerge:20+21", out=str(tmp_path / "out"))
    with pytest.raises(PlanError, match="an export cannot carry KV merges"):
        prepare_export(settings, plan)
    with pytest.raises(PlanError, match="cannot carry KV merges"):
        planned_config(tiny_model("llama"), Plan.parse("kvmerge:2+3", 6))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@torch.no_grad()
def test_a_merge_plan_generates_on_smollm2_and_its_cache_is_smaller(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    plan = Plan.parse("kvmerge:20+21,22+23", 30)
    caches = []
    for applied in (plan.without_kv(), plan):
        with apply_plan(model, applied):
            caches.append(DynamicCache(config=model.config))
            model(prompt, cache=caches[-1], use_cache=True)
    with apply_plan(model, plan):
        tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert cache_bytes(caches[1]) < cache_bytes(caches[0]) and tokens.shape[1] == prompt.shape[1] + 6
    assert isinstance(caches[1].layers[20], MergedFirstLayer) and caches[1].get_seq_length() == prompt.shape[1]
