"""The plan language: seed configurations, round trips through every form, clear errors."""

import json

import pytest
import yaml

from layerlab import Plan, PlanError, Step


def layers(text, n=32):
    return list(Plan.parse(text, n).layers)


def test_seed_configurations():
    assert layers("0-23,27-31") == list(range(24)) + list(range(27, 32))
    assert layers("skip:24-26") == list(range(24)) + list(range(27, 32))
    assert layers("0-31/2") == list(range(0, 32, 2))
    assert layers("0-19,14-19x2,20-31", 32)[14:32] == list(range(14, 20)) * 3
    assert layers("0-14,15x3,16-31") == list(range(15)) + [15, 15, 15] + list(range(16, 32))
    assert layers("31-0") == list(range(31, -1, -1))
    assert layers("all") == list(range(32))


def test_sublayer_clauses_and_inline_halves():
    plan = Plan.parse("attn-skip:3,5,6; mlp-skip:6,9", 12)
    by_layer = {s.layer: (s.attention, s.mlp) for s in plan.steps}
    assert by_layer[3] == (False, True) and by_layer[9] == (True, False)
    assert 6 not in by_layer  # attention and MLP both skipped: the layer is gone
    assert len(plan.steps) == 11
    inline = Plan.parse("0-2,1.attn,2.mlp", 4)
    assert inline.steps[3:] == (Step(1, True, False), Step(2, False, True))
    # clauses may also be separated by spaces
    assert Plan.parse("skip:24-26 attn-skip:3", 32) == Plan.parse("skip:24-26;attn-skip:3", 32)


PLANS = [
    "all",
    "skip:24-26",
    "0-23,27-29",
    "0-13,14-19x2,20-29",
    "0-14,15x3,16-29",
    "29-0",
    "skip:0; attn-skip:3,5,6,8; mlp-skip:6,9,10",
    "0-9,3.attn,4.mlp,10-29",
    "0-29/2",
]


@pytest.mark.parametrize("text", PLANS)
def test_text_and_json_round_trip(text):
    plan = Plan.parse(text, 30)
    assert Plan.parse(plan.to_text(), 30) == plan
    assert Plan.from_dict(json.loads(plan.to_json()), 30) == plan


def test_canonical_text_is_readable():
    assert Plan.parse("0-23,27-29", 30).to_text() == "skip:24-26"
    assert Plan.parse("0-13,14-19,14-19,20-29", 30).to_text() == "0-19,14-29"  # runs merge
    assert Plan.parse("0-14,15,15,15,16-29", 30).to_text() == "0-15,15,15-29"
    assert Plan.parse("0-4,3-4,3-4", 6).to_text() == "0-4,3-4x2"  # back-to-back blocks repeat
    assert Plan.parse("attn-skip:3; mlp-skip:4", 6).to_text() == "attn-skip:3; mlp-skip:4"


def test_llm_drop_and_llama_cpp_forms():
    plan = Plan.from_llm_drop([3, 5], [5, 9], 12)
    assert 5 not in plan.layers and plan.to_llm_drop() == {"drop_attn_list": [3, 5], "drop_mlp_list": [5, 9]}
    flags = plan.to_llama_cpp_flags()
    assert flags[3] == 1 and flags[5] == 3 and flags[9] == 2 and flags.count(0) == 9
    assert Plan.from_llama_cpp_flags(flags) == plan
    assert Plan.from_dict({"drop_attn_list": [3, 5], "drop_mlp_list": [5, 9]}, 12) == plan
    assert Plan.from_dict({"llama_cpp_skip_flags": flags}, 12) == plan


def test_mergekit_round_trip():
    plan = Plan.parse("0-13,14-19x2,20-29", 30)
    config = plan.to_mergekit("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert config["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 20], [14, 30]]
    text = yaml.safe_dump(config)
    assert Plan.from_mergekit(text, 30) == plan
    seed = """
slices:
  - sources:
    - model: m
      layer_range: [0, 24]
  - sources:
    - model: m
      layer_range: [27, 32]
merge_method: passthrough
dtype: bfloat16
"""
    assert list(Plan.from_mergekit(seed, 32).layers) == layers("0-23,27-31")


def test_load_from_files(tmp_path):
    plan = Plan.parse("attn-skip:1; skip:4", 8)
    (tmp_path / "p.json").write_text(plan.to_json())
    (tmp_path / "drop.yaml").write_text(yaml.safe_dump(plan.to_llm_drop()))
    assert Plan.load(str(tmp_path / "p.json"), 8) == plan
    assert Plan.load(str(tmp_path / "drop.yaml"), 8) == plan


@pytest.mark.parametrize(
    "text, needle",
    [
        ("0-23,27-32", "'27-32' names layer 32, but the model has 32 layers (0-31)"),
        ("0-3-,5", "bad plan token '0-3-'"),
        ("0-5,x2", "bad plan token 'x2'"),
        ("drop:3", "unknown plan clause 'drop:'"),
        ("", "the plan text is empty"),
        ("skip:0-31", "leaves no layer to run"),
        ("0-3; 5-9", "two layer sequences"),
        ("attn-skip:3.mlp", "bad plan token '3.mlp'"),
        ("0x0", "repeat count must be at least 1"),
    ],
)
def test_bad_plans_name_the_bad_token(text, needle):
    with pytest.raises(PlanError) as info:
        Plan.parse(text, 32)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_forms_refuse_what_they_cannot_express():
    with pytest.raises(PlanError, match="repeated or reordered"):
        Plan.parse("0-5,3", 6).to_llm_drop()
    with pytest.raises(PlanError, match="attention-only or MLP-only"):
        Plan.parse("attn-skip:2", 6).to_mergekit("m")
    with pytest.raises(PlanError, match="several models"):
        Plan.from_mergekit({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                       {"sources": [{"model": "b", "layer_range": [2, 4]}]}]}, 4)
    with pytest.raises(PlanError, match="written for 10 layers"):
        Plan.from_dict({"num_layers": 10, "steps": [0, 1]}, 6)
    with pytest.raises(PlanError, match="empty"):
        Plan((), 6)
