"""Fidelity to lm-evaluation-harness, and the `layerlab` model type inside lm-eval."""

import subprocess
import sys
from pathlib import Path

import pytest

from layerlab import Plan, apply_plan
from layerlab.corpora import read_choices, resolve
from layerlab.evaluate.lm_eval_adapter import write_choice_task
from layerlab.evaluate.multiple_choice import multiple_choice

pytestmark = pytest.mark.slow
ROWS = 8


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_choice_task(resolve("hellaswag-2k"), tmp_path_factory.mktemp("task"))


def lm_eval_loglikelihoods(model, task_dir: Path, **model_args) -> tuple[dict, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, tasks=["layerlab_choice"], task_manager=TaskManager(include_path=str(task_dir)),
                          limit=ROWS, log_samples=True, **model_args)
    samples = sorted(out["samples"]["layerlab_choice"], key=lambda s: s["doc_id"])
    return out["results"]["layerlab_choice"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def assert_same_scores(ours, metrics, lls):
    assert ours.acc == pytest.approx(metrics["acc,none"]) and ours.acc_norm == pytest.approx(metrics["acc_norm,none"])
    for expected, score in zip(lls, ours.scores, strict=True):
        assert score.loglikelihoods == pytest.approx(expected, abs=1e-3)


def test_multiple_choice_equals_lm_eval_hf_on_the_same_rows(smollm2, task_dir):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = smollm2
    ours = multiple_choice(model, tokenizer, read_choices("hellaswag-2k", ROWS), progress=False)
    metrics, lls = lm_eval_loglikelihoods(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), task_dir)
    assert_same_scores(ours, metrics, lls)


def test_layerlab_model_type_runs_the_plan_inside_lm_eval(smollm2, task_dir):
    model, tokenizer = smollm2
    plan = Plan.parse("skip:24-26; attn-skip:5", 30)
    with apply_plan(model, plan):
        ours = multiple_choice(model, tokenizer, read_choices("hellaswag-2k", ROWS), progress=False)
    metrics, lls = lm_eval_loglikelihoods("layerlab", task_dir, model_args=f"model=smollm2-135m,plan={plan}")
    assert_same_scores(ours, metrics, lls)


@pytest.mark.parametrize("command", [["-m", "lm_eval"], ["-m", "layerlab.cli", "lm-eval"]])
def test_lm_eval_command_lines_know_the_layerlab_model(task_dir, command):
    result = subprocess.run(
        [sys.executable, *command, "run", "--model", "layerlab", "--model_args", "model=smollm2-135m,plan=skip:24-26",
         "--tasks", "layerlab_choice", "--include_path", str(task_dir), "--limit", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layerlab_choice" in result.stdout and "acc_norm" in result.stdout


@pytest.mark.parametrize("name", ["arc_easy", "winogrande", "lambada_openai", "boolq", "mmlu"])
def test_every_task_kind_equals_lm_eval_hf_per_item(smollm2, tmp_path, name):
    """Multiple choice (acc_norm), WinoGrande's partial scoring, LAMBADA, single-token answers, on the same rows."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from layerlab.evaluate.lm_eval_adapter import write_task_rows
    from layerlab.evaluate.tasks import load_task, run_task, summarize

    model, tokenizer = smollm2
    data = load_task(name, rows=ROWS)
    local = write_task_rows(data, tmp_path)
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=[local],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][local], key=lambda s: s["doc_id"])
    ours = run_task(model, tokenizer, data, progress=False)
    for metric in data.task.metrics:
        if metric != "perplexity":
            assert list(ours.per_item[metric]) == [float(s[metric]) for s in samples]
        assert out["results"][local][f"{metric},none"] == pytest.approx(summarize(ours)["metrics"][metric]["value"],
                                                                         rel=1e-4)
    for lls, sample in zip(ours.loglikelihoods, samples, strict=True):
        assert lls == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=1e-3)
