"""The KV-sharing search on a tiny model: budget, tolerance, orders, prefix reuse against full passes, resume."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerlab import LayerlabError, Plan, apply_plan
from layerlab.evaluate.perplexity import calibration_windows, scored_tokens, window_nll
from layerlab.kv_search import KVSearchSettings, accepted_pairs, merged, search_kv

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be. ") * 8


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder).eval(), AutoTokenizer.from_pretrained(tiny_folder)


@torch.inference_mode()
def calibration_perplexity(model, tokenizer, plan, settings):
    windows = calibration_windows(tokenizer, TEXT, settings.ctx, settings.windows)
    with apply_plan(model, plan):
        loss = sum(window_nll(model, [w])[0] for w in windows)
    return math.exp(loss / scored_tokens(windows))


def test_merged_maps_have_no_chains():
    assert merged(((3, 1),), 4, 3) == ((3, 1), (4, 1))  # the source reads layer 1: read layer 1
    assert merged(((4, 3),), 3, 1) == ((3, 1), (4, 1))  # layer 4 read the new consumer: it moves along


@pytest.mark.parametrize("order", ["dissimilar", "similar"])
def test_search_accepts_pairs_within_the_tolerance_and_budget(tiny, order):
    model, tokenizer = tiny
    settings = KVSearchSettings(budget=0.5, tolerance=0.02, order=order, ctx=32, windows=2)
    state = search_kv(model, tokenizer, TEXT, settings, progress=False)
    plan = Plan.from_dict(state.plan, 6)
    start = calibration_perplexity(model, tokenizer, Plan.identity(6), settings)
    assert len(plan.kv) <= 3  # half of 6 layers
    assert state.trace[0]["start_perplexity"] == pytest.approx(start, rel=1e-6)
    for entry in state.trace[1:]:  # every evaluated pair: the prefix-reusing loss equals a full pass
        if "kv" in entry and entry["perplexity"] is not None:
            full = calibration_perplexity(model, tokenizer, Plan.parse(entry["kv"], 6), settings)
            assert entry["perplexity"] == pytest.approx(full, rel=1e-5)
            assert entry["accepted"] == (full <= start * 1.02 + 1e-9)
    assert calibration_perplexity(model, tokenizer, plan, settings) <= start * 1.02 + 1e-9
    distances = state.trace[0]["distances"]
    ranked = [distances[key] for key in state.ranking]
    assert ranked == sorted(ranked, reverse=order == "dissimilar") and len(ranked) == 15  # 6 * 5 / 2 pairs


def test_the_loss_order_scores_each_pair_alone_and_tries_the_best_first(tiny):
    model, tokenizer = tiny
    settings = KVSearchSettings(budget=0.5, tolerance=0.02, order="loss", ctx=32, windows=2)
    state = search_kv(model, tokenizer, TEXT, settings, progress=False)
    alone = state.trace[0]["alone_perplexity"]
    start = state.trace[0]["start_perplexity"]
    assert len(alone) == 15
    for key, value in alone.items():  # scored alone, from the recorded prefix: equal to a full pass
        full = calibration_perplexity(model, tokenizer, Plan.parse(f"kv:{key}", 6), settings)
        assert value == pytest.approx(full, rel=1e-5) if value is not None else full > start * 1.02
    assert state.ranking == sorted((k for k in alone if alone[k] is not None), key=alone.get)
    assert [e["pair"] for e in state.trace[1:]] == state.ranking[:len(state.trace) - 1]


def test_a_loose_tolerance_fills_the_budget_and_a_resumed_search_ends_the_same(tiny, tmp_path):
    model, tokenizer = tiny
    settings = KVSearchSettings(budget=0.5, tolerance=10.0, ctx=32, windows=2)
    whole = search_kv(model, tokenizer, TEXT, settings, progress=False)
    assert len(Plan.from_dict(whole.plan, 6).kv) == 3 and len(accepted_pairs(whole)) >= 2
    path = tmp_path / "kv.json"
    search_kv(model, tokenizer, TEXT, settings, state_path=path, max_tries=1, progress=False)
    assert len(json.loads(path.read_text())["trace"]) == 2
    resumed = search_kv(model, tokenizer, TEXT, settings, state_path=path, resume=True, progress=False)
    assert resumed.plan == whole.plan and resumed.ranking == whole.ranking
    with pytest.raises(LayerlabError, match="written with budget=0.5, but this run has budget=0.3"):
        search_kv(model, tokenizer, TEXT, KVSearchSettings(budget=0.3, ctx=32, windows=2), state_path=path,
                  resume=True, progress=False)


def test_bad_settings_are_refused_before_work():
    for kwargs, message in [({"budget": 1.0}, "between 0 and 1"), ({"order": "random"}, "unknown pair order"),
                            ({"tolerance": -0.1}, "at least 0")]:
        with pytest.raises(LayerlabError, match=message):
            KVSearchSettings(**kwargs)


def test_search_kv_and_eval_kv_cache_from_the_command_line(tiny_folder, tmp_path, capfd):
    """`search --kv` finds the map the library finds; `eval --kv-cache int8` runs every plan on that cache."""
    from layerlab.cli import main

    (tmp_path / "t.txt").write_text(TEXT * 4)
    args = ["-m", str(tiny_folder), "--ctx", "32", "--windows", "2", "--text", str(tmp_path / "t.txt")]
    assert main(["search", *args, "--kv", "--fraction", "0.5", "--tolerance", "10", "--order", "similar",
                 "--state", str(tmp_path / "s.json")]) == 0
    state = json.loads((tmp_path / "s.json").read_text())
    plan = Plan.from_dict(state["plan"], 6)
    assert len(plan.kv) == 3 and f"plan: {plan.to_text()}" in capfd.readouterr().out
    results = []
    for cache in ("full", "int8"):
        out = tmp_path / f"{cache}.json"
        assert main(["eval", "-m", str(tiny_folder), "-p", plan.to_text(), "--tasks", "ppl", "--ctx", "32",
                     "--ppl-text", str(tmp_path / "t.txt"), "--ppl-windows", "1", "--kv-cache", cache,
                     "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert [r["kv_cache"] for r in results] == ["full", "int8"]
    ppl = [[row["ppl"]["perplexity"] for row in r["rows"]] for r in results]
    assert ppl[0] != ppl[1] and all(abs(a / b - 1) < 0.05 for a, b in zip(*ppl, strict=True))  # int8 is close


@torch.inference_mode()
def chunked_perplexity_by_hand(model, tokenizer, plan, settings):
    """Each calibration window fed `settings.chunk` tokens at a time on one cache; NLL summed from the logits."""
    from transformers import DynamicCache

    windows = calibration_windows(tokenizer, TEXT, settings.ctx, settings.windows)
    total = 0.0
    with apply_plan(model, plan):
        for window in windows:
            ids, cache = torch.tensor([window.ids]), DynamicCache(config=model.config)
            logits = torch.cat([model(ids[:, i:i + settings.chunk], cache=cache, use_cache=True).logits
                                for i in range(0, ids.shape[1], settings.chunk)], dim=1)
            logp = torch.log_softmax(logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            total -= float(logp[torch.arange(len(targets)), targets][window.score_from - 1:].sum())
    return math.exp(total / scored_tokens(windows))


def test_kv_merge_tries_adjacent_deep_pairs_by_their_measured_saving(tiny, tmp_path):
    from transformers import DynamicCache

    model, tokenizer = tiny
    settings = KVSearchSettings(budget=0.5, tolerance=10.0, order="similar", ctx=32, windows=2, merge=True,
                                merge_angle=80.0, chunk=8)
    path = tmp_path / "kv.json"
    state = search_kv(model, tokenizer, TEXT, settings, state_path=path, max_tries=0, progress=False)
    shares = state.trace[0]["merge_shares"]
    assert set(shares) == {"3+4", "4+5"}  # from the middle layer down
    windows = calibration_windows(tokenizer, TEXT, settings.ctx, settings.windows)
    for key, share in shares.items():  # the share of token-heads within 80 degrees, from a plain cache
        a, b = (int(x) for x in key.split("+"))
        cosines = []
        for window in windows:
            cache = DynamicCache(config=model.config)
            model(torch.tensor([window.ids]), cache=cache, use_cache=True)
            cosines += [torch.nn.functional.cosine_similarity(getattr(cache.layers[a], t), getattr(cache.layers[b], t),
                                                              dim=-1).flatten() for t in ("keys", "values")]
        assert share == pytest.approx(float((torch.cat(cosines) >= math.cos(math.radians(80))).float().mean()))
    merges = sorted((k for k in shares if shares[k] > 0), key=lambda k: -shares[k])
    assert state.ranking[-len(merges):] == merges and len(state.ranking) == 15 + len(merges)
    saved = json.loads(path.read_text())  # as if every sharing pair had been refused: the merges come next
    saved["ranking"] = merges
    path.write_text(json.dumps(saved))
    state = search_kv(model, tokenizer, TEXT, settings, state_path=path, resume=True, progress=False)
    start = state.trace[0]["start_perplexity"]
    tried = [entry for entry in state.trace[1:] if "kv" in entry]
    assert tried and Plan.from_dict(state.plan, 6).merge
    for entry in tried:  # the chunked calibration loss of the whole plan
        plan = Plan.parse(entry["kv"], 6)
        assert plan.merge[-1][2] == 80.0
        assert entry["perplexity"] == pytest.approx(chunked_perplexity_by_hand(model, tokenizer, plan, settings),
                                                    rel=1e-5)
        assert entry["accepted"] == (entry["perplexity"] <= start * 11)
    assert sum(shares[f"{a}+{b}"] for a, b, _ in Plan.from_dict(state.plan, 6).merge) <= 3


def test_kv_merge_settings_are_checked():
    with pytest.raises(LayerlabError, match="add --kv-merge"):
        KVSearchSettings(merge_angle=45.0)
    with pytest.raises(LayerlabError, match="0 to 180"):
        KVSearchSettings(merge=True, merge_angle=200.0)
    from layerlab.cli import main

    assert main(["search", "-m", "smollm2-135m", "--kv-merge"]) == 2  # refused before any model loads
