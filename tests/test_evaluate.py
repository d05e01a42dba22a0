"""Perplexity, multiple choice and speed against straightforward reference computations."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from layerlab import Plan, apply_plan
from layerlab.corpora import Choice, DataError, read_choices, read_text
from layerlab.evaluate.loglikelihood import encode_pair
from layerlab.evaluate.multiple_choice import multiple_choice
from layerlab.evaluate.perplexity import perplexity
from layerlab.evaluate.speed import measure_plans, parameter_bytes


class CharTokenizer:
    """Characters to ids below the tiny vocabulary; optional BOS; enough of the HF interface."""

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None, split_special_tokens=False):
        ids = [1 + ord(c) % 90 for c in text]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


TEXT = read_text("wikitext2-test")[:3000]


@torch.no_grad()
def reference_chunks(model, tokens, ctx, bos, first):
    """Perplexity window by window, one sequence at a time, log-softmax by hand."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - ctx + 1, ctx):
        window = list(tokens[start:start + ctx])
        if bos is not None:
            window[0] = bos
        logprobs = F.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)
        for j in range(first, ctx):
            nll -= float(logprobs[j - 1, window[j]])
            count += 1
    return math.exp(nll / count), count


@torch.no_grad()
def reference_sliding(model, tokens, ctx, stride):
    """The Hugging Face perplexity guide's loop, using the model's own loss on masked labels."""
    ids = torch.tensor([tokens])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + ctx, len(tokens))
        target_len = end - prev_end
        labels = ids[:, begin:end].clone()
        labels[:, :-target_len] = -100
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(model(ids[:, begin:end], labels=labels).loss) * valid
        count += valid
        prev_end = end
        if end == len(tokens):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("bos", [None, 95])
@pytest.mark.parametrize("llama_cpp", [False, True])
def test_chunked_perplexity_matches_a_window_by_window_reference(bos, llama_cpp):
    model, tokenizer = tiny_model("llama"), CharTokenizer(bos)
    result = perplexity(model, tokenizer, TEXT, ctx=64, batch_size=3, llama_cpp=llama_cpp, progress=False)
    expected, count = reference_chunks(model, tokenizer(TEXT)["input_ids"], 64, bos, 33 if llama_cpp else 1)
    assert result.tokens == count and result.windows == len(tokenizer(TEXT)["input_ids"]) // 64
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_sliding_perplexity_matches_the_hugging_face_guide():
    model, tokenizer = tiny_model("gemma3"), CharTokenizer()
    text = TEXT[:700]
    result = perplexity(model, tokenizer, text, ctx=64, stride=16, batch_size=4, progress=False)
    expected, count = reference_sliding(model, tokenizer(text)["input_ids"], 64, 16)
    assert result.tokens == count == len(text) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_follows_the_applied_plan():
    model, tokenizer = tiny_model("qwen2"), CharTokenizer()
    full = perplexity(model, tokenizer, TEXT, ctx=64, progress=False)
    with apply_plan(model, Plan.parse("skip:1-4", 6)):
        pruned = perplexity(model, tokenizer, TEXT, ctx=64, progress=False)
    assert pruned.perplexity != full.perplexity


@torch.no_grad()
def reference_choice_loglikelihoods(model, tokenizer, item):
    """Each ending scored by running context + ending as one sequence (what lm-eval's HF model does)."""
    sums = []
    for ending in item.endings:
        context, continuation = encode_pair(tokenizer, item.query, " " + ending, add_special_tokens=False)
        ids = torch.tensor([context + continuation])
        logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
        sums.append(sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(continuation)))
    return sums


@pytest.mark.parametrize("batch_size", [None, 5])  # shared context cache / padded batches of whole sequences
@pytest.mark.parametrize("arch, text", [("llama", "all"), ("gemma3", "0-3,2-5; attn-skip:1"), ("gpt2", "skip:2")])
def test_multiple_choice_matches_full_sequences_one_at_a_time(arch, text, batch_size):
    model, tokenizer = tiny_model(arch), CharTokenizer()
    items = read_choices("hellaswag-2k", limit=6) + [Choice("Trailing space ", ("a", "bb b"), 1)]
    with apply_plan(model, Plan.parse(text, 6)):
        result = multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=False)
        for item, score in zip(items, result.scores, strict=True):
            expected = reference_choice_loglikelihoods(model, tokenizer, item)
            assert score.loglikelihoods == pytest.approx(expected, abs=1e-4)
            assert score.prediction == max(range(len(expected)), key=lambda i: (expected[i], -i))
            norm = [s / len(e) for s, e in zip(expected, item.endings, strict=True)]
            assert score.prediction_norm == max(range(len(norm)), key=lambda i: (norm[i], -i))
    assert result.acc == sum(s.prediction == s.label for s in result.scores) / len(items)


def test_encode_pair_moves_trailing_spaces_like_lm_eval():
    tokenizer = CharTokenizer()
    context, continuation = encode_pair(tokenizer, "ab  ", "c", add_special_tokens=False)
    assert context == tokenizer("ab")["input_ids"] and continuation == tokenizer("  c")["input_ids"]


def test_speed_reports_every_plan_and_parameter_bytes():
    model, tokenizer = tiny_model("llama"), CharTokenizer()
    plans = [Plan.identity(6), Plan.parse("skip:0-2", 6)]
    results = measure_plans(model, tokenizer, plans, TEXT, prompt_tokens=32, decode_tokens=4, rounds=2)
    assert all(r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 for r in results)
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert results[0].parameter_bytes == parameter_bytes(model)
    assert results[0].parameter_bytes - results[1].parameter_bytes == 3 * layer


def test_bad_data_sources(tmp_path):
    with pytest.raises(DataError, match="neither a file nor a bundled name"):
        read_text("no-such-corpus")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "endings": ["a", "b"], "label": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: label 3 is not an index"):
        read_choices(str(bad))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_a_peak_memory_block_inside_another_does_not_hide_the_outer_peak():
    """An inner block resets the process's peak RSS; the outer block still reports what came before."""
    import numpy as np

    from layerlab.evaluate.speed import PeakMemory

    cpu = torch.device("cpu")
    with PeakMemory(cpu) as outer:
        with PeakMemory(cpu) as before:
            pass
        big = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del big
        with PeakMemory(cpu) as inner:
            pass
    assert inner.peak_mb < before.peak_mb + 150  # the big array came and went before the inner block
    assert outer.peak_mb >= before.peak_mb + 250
