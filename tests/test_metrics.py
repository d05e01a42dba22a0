"""Hook-based importance metrics against cosines computed by hand from the hidden states."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import manual_states
from test_evaluate import TEXT, CharTokenizer
from tiny import tiny_model

from layerlab import Plan
from layerlab.metrics.similarity import similarity


def mean_cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@pytest.mark.parametrize("arch, text", [("llama", "all"), ("gemma3", "0-3,2-5; attn-skip:1; mlp-skip:4")])
def test_metrics_equal_cosines_of_hand_computed_states(arch, text):
    model, tokenizer = tiny_model(arch), CharTokenizer()
    model.config._attn_implementation = "eager"
    plan = Plan.parse(text, 6)
    result = similarity(model, tokenizer, TEXT, plan=plan, ctx=64, windows=1, progress=False)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]])
    states, final = manual_states(model, ids, plan)
    for i, (step, (h_in, h_mid, h_out)) in enumerate(zip(plan.steps, states, strict=True)):
        assert result.block_influence[i] == pytest.approx(1 - mean_cos(h_in, h_out), abs=1e-5)
        if step.attention:
            assert result.attention_importance[i] == pytest.approx(1 - mean_cos(h_in, h_mid), abs=1e-5)
        else:
            assert result.attention_importance[i] is None
        if step.mlp:
            assert result.mlp_importance[i] == pytest.approx(1 - mean_cos(h_mid, h_out), abs=1e-5)
        else:
            assert result.mlp_importance[i] is None
    xs = [s[0] for s in states] + [final]
    for start in range(len(plan.steps)):
        for n in range(1, len(plan.steps) - start + 1):
            cos = F.cosine_similarity(xs[start].double(), xs[start + n].double(), dim=-1).clamp(-1, 1)
            expected = float((torch.arccos(cos) / math.pi).mean())
            assert result.angular[start][n - 1] == pytest.approx(expected, abs=1e-5)
        assert result.angular[start][len(plan.steps) - start:] == [None] * start


def test_angular_distance_on_last_tokens_and_block_influence_is_the_one_layer_angle_family():
    model, tokenizer = tiny_model("llama"), CharTokenizer()
    result = similarity(model, tokenizer, TEXT, ctx=64, windows=3, tokens="last", progress=False)
    assert result.tokens == 3 * 64
    assert all(0 <= a <= 1 for row in result.angular for a in row if a is not None)
    assert all(0 <= b <= 2 for b in result.block_influence)


@pytest.mark.slow
def test_score_command_writes_table_json_and_charts_with_perplexity_deltas(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "score"
    result = subprocess.run([sys.executable, "-m", "layerlab.cli", "score", "--model", "smollm2-135m", "--ctx", "64",
                             "--windows", "1", "--ppl-delta", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Block Influence" in result.stdout and "Δppl attn" in result.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["perplexity_delta"]["units"]) == 3 * 30
    assert len(scores["block_influence"]) == 30 and len(scores["angular_distance"]) == 30
    for name in ("importance.png", "angular.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_perplexity_deltas_equal_the_perplexity_of_each_plan_with_one_unit_skipped(arch):
    from layerlab.evaluate.perplexity import perplexity
    from layerlab.metrics.perplexity_delta import perplexity_deltas
    from layerlab.runtime import apply_plan

    model, tokenizer = tiny_model(arch), CharTokenizer()
    on_top = "skip:2"  # deltas on top of an existing plan

    def reference(text):
        with apply_plan(model, Plan.parse(text, 6)):
            return perplexity(model, tokenizer, TEXT, ctx=64, max_windows=2, progress=False).perplexity

    deltas = perplexity_deltas(model, tokenizer, TEXT, Plan.parse(on_top, 6), ctx=64, windows=2, progress=False)
    base = reference(on_top)
    assert deltas.perplexity == pytest.approx(base, rel=1e-5)
    assert len(deltas.units) == 3 * 5
    for layer in (0, 1, 3, 4, 5):
        for half, text in [("layer", f"skip:2,{layer}"), ("attn", f"skip:2; attn-skip:{layer}"),
                           ("mlp", f"skip:2; mlp-skip:{layer}")]:
            unit = next(u for u in deltas.units if u.layer == layer and u.half == half)
            assert unit.perplexity == pytest.approx(reference(text), rel=1e-5)
            assert unit.delta == pytest.approx(unit.perplexity - base, rel=1e-4, abs=1e-6)
