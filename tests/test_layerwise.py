"""Streamed scoring (one decoder layer in memory at a time) gives the whole model's scores."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerlab.cli import main
from layerlab.corpora import read_text
from layerlab.metrics.similarity import similarity, similarity_streamed
from layerlab.plan import Plan


def _close(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list):
            _close(x, y)
        else:
            assert (x is None) == (y is None) and (x is None or y == pytest.approx(x, rel=1e-4, abs=1e-6)), (x, y)


@pytest.mark.parametrize("plan_text", ["all", "0-1,1,3-5; mlp-skip:4"])
def test_streamed_scores_are_the_whole_models(tiny_folder, plan_text):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder))
    text = read_text("wikitext2-valid")
    plan = Plan.parse(plan_text, 6)
    whole = similarity(model, tokenizer, text, plan=plan, ctx=32, windows=2, progress=False)
    streamed = similarity_streamed(str(tiny_folder), tokenizer, text, plan=plan, ctx=32, windows=2, progress=False)
    assert streamed.tokens == whole.tokens
    for field in ("block_influence", "attention_importance", "mlp_importance", "angular"):
        _close(getattr(whole, field), getattr(streamed, field))


def test_score_streamed_from_the_command_line(tiny_folder, tmp_path):
    args = ["score", "-m", str(tiny_folder), "--ctx", "32", "--windows", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--streamed", "--out", str(tmp_path / "streamed")]) == 0
    whole, streamed = (json.loads((tmp_path / n / "scores.json").read_text()) for n in ("whole", "streamed"))
    assert streamed["streamed"] and not whole["streamed"] and streamed["peak_memory_mb"] > 0
    _close(whole["block_influence"], streamed["block_influence"])
