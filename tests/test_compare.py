"""Several plans on several tasks in one call: paired deltas, an average, tables, and resumable results."""

import json
from dataclasses import replace

import pytest
from tiny import tiny_model

from layerlab import Plan
from layerlab.errors import LayerlabError
from layerlab.evaluate import compare
from layerlab.evaluate.compare import evaluate_plans, model_fingerprint
from layerlab.evaluate.table import summary_table, task_table
from layerlab.settings import EvalSettings

SETTINGS = EvalSettings(tasks="ppl,arc_easy,winogrande,lambada_openai,mmlu,samples,speed", rows=4, ctx=64,
                        ppl_windows=3, max_new_tokens=3, speed_prompt_tokens=16, speed_decode_tokens=2,
                        speed_rounds=1, speed_max_rounds=1)
PLANS = [Plan.identity(6), Plan.parse("skip:1-3", 6)]


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return tiny_model("llama", vocab=len(smollm2_tokenizer)), smollm2_tokenizer


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return store, evaluate_plans(*model, PLANS, SETTINGS, store=store, progress=False)


def test_rows_carry_values_intervals_and_paired_deltas(first_run):
    _, results = first_run
    base, pruned = results["rows"]
    assert [base["plan"], pruned["plan"]] == ["all", "skip:1-3"] and pruned["steps"] == 3
    for row in (base, pruned):
        assert set(row["tasks"]) == {"arc_easy", "winogrande", "lambada_openai", "mmlu"}
        low, high = row["ppl"]["interval"]
        assert low < row["ppl"]["perplexity"] < high
        assert row["average"]["tasks"] == ["arc_easy", "winogrande", "lambada_openai", "mmlu"]
        assert row["samples"][0]["prompt"] == "Once upon a time" and row["speed"]["parameter_bytes"] > 0
    arc = pruned["tasks"]["arc_easy"]
    expected = (sum(arc["per_item"]["acc_norm"]) - sum(base["tasks"]["arc_easy"]["per_item"]["acc_norm"])) / 4
    assert arc["delta"]["acc_norm"]["value"] == pytest.approx(expected)
    assert set(pruned["tasks"]["lambada_openai"]["delta"]) == {"perplexity", "acc"}
    assert "delta" in pruned["ppl"] and "delta" in pruned["average"] and "delta" not in base["ppl"]
    assert pruned["average"]["value"] == pytest.approx(
        sum(t["value"] for t in pruned["tasks"].values()) / 4)
    assert pruned["speed"]["decode_speedup"]["rounds"] == 1 and base["speed"]["decode_speedup"]["median"] == 1
    assert json.loads(json.dumps(results, allow_nan=False)) == results  # plain data, as in report.json


def test_tables_show_intervals_and_mark_differences_inside_the_noise(first_run):
    _, results = first_run
    summary = summary_table(results)
    assert summary[0][:4] == ["plan", "steps", "ppl", "Δppl"] and "average" in summary[0] and "decode ×" in summary[0]
    assert "±" in summary[1][2] and summary[1][3] == "-" and "%" in summary[2][3]
    average = summary[2][summary[0].index("Δaverage")]
    assert "[" in average and (average.endswith("n.s.") != (results["rows"][1]["average"]["delta"]["significant"]))
    tasks = task_table(results)
    assert tasks[0][-1] == "verdict" and len({len(row) for row in tasks}) == 1
    verdicts = [row[-1] for row in tasks[1:] if row[0] == "skip:1-3" and row[1] == "arc_easy"]
    assert verdicts and all(v in ("n.s.", "better", "worse") for v in verdicts)
    assert any(row[1] == "mmlu/stem" for row in tasks) and any(row[1] == "average" for row in tasks)


def test_a_second_run_reuses_every_stored_result(model, first_run, monkeypatch):
    store, results = first_run
    assert len(list(store.glob("*.json"))) == 2 * 6  # plans x tasks other than speed
    for name in ("run_task", "perplexity", "generate"):
        monkeypatch.setattr(compare, name, lambda *a, **k: pytest.fail("recomputed a stored result"))
    again = evaluate_plans(*model, PLANS, replace(SETTINGS, tasks=SETTINGS.tasks[:-1]), store=store, progress=False)
    assert len(again["resumed"]["reused"]) == 12 and not again["resumed"]["recomputed"]
    assert again["rows"][1]["tasks"] == results["rows"][1]["tasks"]


def test_changed_settings_recompute_only_what_they_change_and_say_so(model, tmp_path):
    store = tmp_path / "store"
    settings = replace(SETTINGS, tasks=("ppl", "boolq"))
    evaluate_plans(*model, PLANS[:1], settings, store=store, progress=False)
    again = evaluate_plans(*model, PLANS[:1], replace(settings, rows=5), store=store, progress=False)
    assert again["resumed"]["reused"] == ["ppl of all"]
    assert again["resumed"]["recomputed"] == ["boolq of all (rows 4 -> 5)"]
    assert again["rows"][0]["tasks"]["boolq"]["n"] == 5
    other = tiny_model("llama", seed=1, vocab=len(model[1]))  # another model: nothing is reused
    third = evaluate_plans(other, model[1], PLANS[:1], replace(settings, rows=5), store=store, progress=False)
    assert not third["resumed"]["reused"] and all("model" in line for line in third["resumed"]["recomputed"])
    stored = json.loads(next(store.glob("boolq-*.json")).read_text())
    assert stored["key"]["model"] == model_fingerprint(other, model[1]) != model_fingerprint(*model)


def test_settings_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(LayerlabError, match="rows must be a number of at least 1"):
        EvalSettings(rows=0)
    with pytest.raises(LayerlabError, match="neither a file nor a bundled name"):
        EvalSettings(tasks="ppl", ppl_text=str(tmp_path / "missing.txt")).check()
    assert EvalSettings(tasks="suite", rows=3).check()["mmlu"].key()["rows"] == 3


def test_a_plan_list_splits_only_between_plans():
    from layerlab.cli import _plan_list

    assert _plan_list(("all,skip:20-23,0-9", "0-9,12-29", "a.json,attn-skip:3,5; mlp-skip:6")) == (
        "all", "skip:20-23,0-9", "0-9,12-29", "a.json", "attn-skip:3,5; mlp-skip:6")


def test_an_unknown_task_fails_before_torch_loads():
    import subprocess
    import sys

    code = "import sys; from layerlab.cli import main; print(main(['eval', '-t', 'bogus']), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"] and "unknown task 'bogus'" in result.stderr
