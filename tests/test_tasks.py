"""Zero-shot tasks: every scoring rule against log-likelihoods computed by hand, task names and task files."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny import NumberTokenizer, text_of, tiny_model

from layerlab import Plan, apply_plan
from layerlab.corpora import Choice, Cloze, PartialChoice, read_items
from layerlab.errors import DataError, SettingsError
from layerlab.evaluate.loglikelihood import MIN_SHARED, encode_pair, loglikelihoods
from layerlab.evaluate.multiple_choice import argmax
from layerlab.evaluate.perplexity import bos_id
from layerlab.evaluate.tasks import MMLU_GROUPS, SUITE, TASKS, load_task, parse_tasks, run_task, summarize
from layerlab.settings import EvalSettings


@torch.no_grad()
def reference(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Log-likelihood and greedy flag from one plain forward pass of context + continuation, as lm-eval runs it."""
    ctx, cont = encode_pair(tokenizer, context, continuation, bos_id(tokenizer) is not None)
    logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return (sum(float(logprobs[p, t]) for p, t in zip(positions, cont, strict=True)),
            all(int(logits[p].argmax()) == t for p, t in zip(positions, cont, strict=True)))


@torch.no_grad()
def greedy_ids(model, tokenizer, ids: list[int], count: int) -> list[int]:
    start = tokenizer(text_of(ids))["input_ids"]  # with the BOS token when the tokenizer adds one
    out = []
    for _ in range(count):
        out.append(int(model(torch.tensor([start + out])).logits[0, -1].argmax()))
    return out


def engine_requests(model, tokenizer, rng: random.Random) -> list[tuple[str, str]]:
    """Requests exercising every path: a context with many continuations, shared prefixes, lone rows."""
    def ids(n):
        return [rng.randrange(3, 90) for _ in range(n)]

    shared = ids(20)  # one context, several continuations of one and of many tokens, one of them greedy
    requests = [(text_of(shared), text_of(ids(k))) for k in (1, 1, 3, 5, 2)]
    requests.append((text_of(shared), text_of(greedy_ids(model, tokenizer, shared, 3))))
    for length in (5, 27, 13, 2):  # more such contexts, of other lengths: they share forward passes (left padding)
        context = ids(length)
        requests += [(text_of(context), text_of(ids(k))) for k in (2, 4, 1, 3)]
    prefix = ids(MIN_SHARED + 4)  # neighbours sharing a prefix (MMLU's subject header)
    for tail in (5, 9, 15, 7, 1):
        context = prefix + ids(tail)
        requests.append((text_of(context), text_of(ids(rng.choice((1, 3))))))
    sentence = ids(10)  # WinoGrande: the same continuation after two contexts
    requests += [(text_of(sentence + ids(k)), text_of([7, 8, 9, 10])) for k in (2, 1)]
    for length in (3, 30, 11, 4, 17, 25):  # lone rows of many lengths, one greedy
        context = ids(length)
        requests.append((text_of(context), text_of(ids(1) if length % 2 else greedy_ids(model, tokenizer, context, 2))))
    requests.append(requests[3])  # a duplicate
    requests.append((text_of(ids(6)) + " ", text_of(ids(2))))  # a trailing space moves to the continuation
    return requests


@pytest.mark.parametrize("batch_size, share", [(8, True), (3, True), (1, True), (4, False)])
@pytest.mark.parametrize("arch, plan, bos", [("llama", "all", None), ("gemma3", "0-3,2-5; attn-skip:1", 95),
                                             ("gpt2", "skip:2", None), ("qwen3", "mlp-skip:0-2", 95)])
def test_loglikelihoods_equal_one_plain_forward_per_request(arch, plan, bos, batch_size, share):
    model, tokenizer = tiny_model(arch), NumberTokenizer(bos)
    with apply_plan(model, Plan.parse(plan, 6)):
        requests = engine_requests(model, tokenizer, random.Random(0))
        results = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, share_contexts=share,
                                 progress=False)
        expected = [reference(model, tokenizer, c, k) for c, k in requests]
    assert [r.logprob for r in results] == pytest.approx([e[0] for e in expected], abs=1e-4)
    assert [r.greedy for r in results] == [e[1] for e in expected]
    assert sum(r.greedy for r in results) >= 3  # the greedy continuations built above


def test_encode_pair_is_lm_evals_own_split(smollm2_tokenizer):
    from lm_eval.api.model import TemplateLM

    class Encoder:  # what TemplateLM._encode_pair needs from an HF model wrapper
        backend = "causal"

        def tok_encode(self, text):
            return smollm2_tokenizer(text)["input_ids"]

    for context, continuation in [("Question: Why?\nAnswer:", " Because it rains."), ("A. 0\nB. 4\nAnswer:", " B"),
                                  ("so Maria", " always got the easier cases."), ("ends in spaces  ", "x y"),
                                  ("I don't care about", " signs")]:
        assert encode_pair(smollm2_tokenizer, context, continuation, False) == TemplateLM._encode_pair(
            Encoder(), context, continuation)


@pytest.fixture(scope="module")
def real_vocab(smollm2_tokenizer):
    """A random tiny Llama over SmolLM2's tokenizer: the task rows tokenize as they do for the real model."""
    return tiny_model("llama", vocab=len(smollm2_tokenizer)), smollm2_tokenizer


@pytest.mark.parametrize("name", SUITE)
def test_each_task_is_scored_as_lm_eval_scores_it(real_vocab, name):
    model, tokenizer = real_vocab
    data = load_task(name, rows=6)
    result = run_task(model, tokenizer, data, progress=False)
    summary = summarize(result)
    for index, item in enumerate(data.items):
        expected = [reference(model, tokenizer, c, k) for c, k in item.requests()]
        lls = [e[0] for e in expected]
        assert result.loglikelihoods[index] == pytest.approx(lls, abs=1e-4)
        if isinstance(item, Cloze):  # LAMBADA: acc is the greedy match, perplexity per row
            assert result.per_item["acc"][index] == float(expected[0][1])
            continue
        ranked = sorted(lls, reverse=True)
        if ranked[0] - ranked[1] > 1e-3:  # a near tie could flip on float rounding
            assert result.per_item["acc"][index] == float(argmax(lls) == item.label)
        if "acc_norm" in result.per_item:  # divided by the ending's length in characters
            norm = [v / len(e) for v, e in zip(lls, item.endings, strict=True)]
            assert result.per_item["acc_norm"][index] == float(argmax(norm) == item.label)
    assert summary["metric"] == TASKS[name].headline and summary["n"] == 6
    assert summary["value"] == pytest.approx(sum(result.per_item[summary["metric"]]) / 6)
    if name == "lambada_openai":
        lls = [ll[0] for ll in result.loglikelihoods]
        assert summary["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / len(lls)))


def test_mmlu_groups_and_subjects_are_plain_means_over_rows(real_vocab):
    model, tokenizer = real_vocab
    data = load_task("mmlu", rows=60)  # round-robin: the first row of all 57 subjects, then 3 second rows
    assert len(data.items) == 60 and len({i.subject for i in data.items}) == 57
    summary = summarize(run_task(model, tokenizer, data, progress=False))
    acc = summary["per_item"]["acc"]
    for group, subjects in MMLU_GROUPS.items():
        rows = [a for a, item in zip(acc, data.items, strict=True) if item.subject in subjects]
        assert summary["groups"][group]["n"] == len(rows)
        assert summary["groups"][group]["value"] == pytest.approx(sum(rows) / len(rows))
    assert sum(s["n"] for s in summary["subjects"].values()) == 60
    stem = load_task("mmlu_stem")
    assert len(stem.items) == 19 * 10 and {i.subject for i in stem.items} == set(MMLU_GROUPS["stem"])
    assert len(load_task("mmlu_anatomy").items) == 10


def test_task_names_resolve_before_any_model_loads():
    assert parse_tasks("suite") == SUITE and len(TASKS) == 8 + 4 + 57
    assert parse_tasks(" ppl, mc ,hellaswag,mmlu_stem") == ("ppl", "hellaswag", "mmlu_stem")
    with pytest.raises(SettingsError, match="unknown task 'arc_eesy'; did you mean arc_easy"):
        parse_tasks("ppl,arc_eesy")
    with pytest.raises(SettingsError, match="did you mean mmlu_astronomy"):
        EvalSettings(tasks="mmlu_astronmy")
    with pytest.raises(SettingsError, match="no task given"):
        parse_tasks(" , ")
    assert "\n" not in str(pytest.raises(SettingsError, parse_tasks, "nope").value)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind, rows, message", [
    ("choice", [{"query": "q", "endings": ["a", "b"], "label": 1}, "{not json"], r":2: not a row with query"),
    ("choice", [{"query": "q", "endings": ["a", "b"], "label": 1}, {"query": "q", "label": 0}],
     r":2: not a row with query, endings, label \(missing field 'endings'\)"),
    ("choice", [{"query": "q", "endings": ["a", "b", "c"], "label": 3}], r":1: label 3 is not an index into its 3"),
    ("choice", [{"query": "", "endings": ["a", "b"], "label": 0}], r":1: .*empty or not text"),
    ("partial", [{"contexts": ["a", "b"], "continuation": " c", "label": 2}], r":1: label 2 is not an index"),
    ("partial", [{"contexts": ["a"], "continuation": " c", "label": 0}], r":1: .*at least two texts"),
    ("cloze", [{"context": "a b", "continuation": 5}], r":1: not a row with context, continuation"),
    ("cloze", ["", ""], r"holds no rows"),
])
def test_malformed_task_files_name_the_file_and_line(tmp_path, kind, rows, message):
    path = write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=message) as error:
        read_items(path, kind)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_task_folders_and_fallback_to_the_bundled_rows(tmp_path):
    write(tmp_path / "arc_easy_test.jsonl", [{"query": "Question: q?\nAnswer:", "endings": ["a", "b"], "label": 1}])
    data = load_task("arc_easy", folder=tmp_path)
    assert data.items == (Choice("Question: q?\nAnswer:", ("a", "b"), 1),)
    assert data.source.endswith("arc_easy_test.jsonl")
    fallback = load_task("piqa", rows=3, folder=tmp_path)  # the folder has no PIQA file
    assert fallback.source == "bundled:piqa_val.jsonl" and len(fallback.items) == 3
    assert load_task("hellaswag", rows=2).source == "bundled:hellaswag_val_2k.jsonl"
    assert isinstance(load_task("winogrande", rows=1).items[0], PartialChoice)
    write(tmp_path / "boolq_val.jsonl", [{"query": "q", "endings": ["no", "yes"], "label": 2}])
    with pytest.raises(DataError, match="boolq_val.jsonl:1: label 2"):
        EvalSettings(tasks="boolq", task_data=str(tmp_path)).check()
    with pytest.raises(DataError, match="does not exist"):
        load_task("boolq", folder=tmp_path / "missing")


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "winogrande", "boolq", "openbookqa", "lambada_openai", "mmlu"])
def test_bundled_rows_are_the_first_rows_of_the_full_files(name):
    from pathlib import Path

    full = Path("/work/shared/data/tasks")
    if not full.is_dir():
        pytest.skip("the full task files are not on this machine")
    bundled, complete = load_task(name), load_task(name, rows=len(load_task(name).items), folder=full)
    assert bundled.items == complete.items
