"""Plan search: prefix reuse gives the naive search's plan with fewer layer forwards; resume; one-shot."""

import math

import pytest
from test_evaluate import TEXT, CharTokenizer
from tiny import tiny_model

from layerlab import Plan
from layerlab.corpora import read_text
from layerlab.metrics.similarity import similarity
from layerlab.search import Budget, candidates, greedy, one_shot


def search(model, **kwargs):
    options = dict(budget=Budget(remove=3), ctx=64, windows=3, progress=False) | kwargs
    return greedy(model, CharTokenizer(), TEXT, **options)


# Reuse alone costs about (L + 1) / 2L of the naive forwards for whole layers; a sublayer candidate
# also reruns its own step, so two candidates share each prefix and the bound is looser.
@pytest.mark.parametrize("arch, granularity, bound", [("llama", "layer", 0.6), ("gemma3", "sublayer", 0.7)])
def test_prefix_reuse_and_early_abort_give_the_naive_plan_with_fewer_layer_forwards(arch, granularity, bound):
    model = tiny_model(arch, layers=12)
    naive = search(model, granularity=granularity, reuse=False, abort=False, windows=2, ctx=48)
    fast = search(model, granularity=granularity, windows=2, ctx=48)
    assert fast.plan == naive.plan
    assert [t["removed"] for t in fast.trace] == [t["removed"] for t in naive.trace]
    for a, b in zip(fast.trace, naive.trace, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert fast.layer_forwards <= bound * naive.layer_forwards


def test_each_round_removes_the_candidate_with_the_lowest_loss():
    model = tiny_model("llama")
    state = search(model, budget=Budget(remove=1), reuse=False, abort=False)
    from layerlab.evaluate.perplexity import make_windows
    from layerlab.search import LossEvaluator

    windows = make_windows(CharTokenizer()(TEXT)["input_ids"], 64, None, None, False)[:3]
    evaluator = LossEvaluator(model, windows, reuse=False, abort=False)
    losses = {c.key: evaluator.loss(c) for c in candidates(Plan.identity(6), "layer")}
    assert state.trace[0]["removed"] == min(losses, key=losses.get)
    assert state.trace[0]["loss"] == pytest.approx(losses[state.trace[0]["removed"]])


def test_interrupted_search_resumes_to_the_same_plan(tmp_path):
    model = tiny_model("qwen2")
    whole = search(model, budget=Budget(remove=4), keep=0.5)
    path = tmp_path / "state.json"
    first = search(model, budget=Budget(remove=4), keep=0.5, state_path=path, max_rounds=2)
    assert len(first.trace) == 2 and path.exists()
    resumed = search(model, budget=Budget(remove=4), keep=0.5, state_path=path, resume=True)
    assert resumed.plan == whole.plan and len(resumed.trace) == 4
    assert [t["removed"] for t in resumed.trace] == [t["removed"] for t in whole.trace]


def test_pruning_keeps_only_the_best_candidates():
    from layerlab.evaluate.perplexity import make_windows
    from layerlab.search import LossEvaluator

    model = tiny_model("llama")
    state = search(model, budget=Budget(remove=3), keep=0.5, max_rounds=1)  # abort on: pruning turns it off
    # every candidate's loss measured independently, without reuse or pruning
    windows = make_windows(CharTokenizer()(TEXT)["input_ids"], 64, None, None, False)[:3]
    evaluator = LossEvaluator(model, windows, reuse=False, abort=False)
    losses = {c.key: evaluator.loss(c) for c in candidates(Plan.identity(6), "layer")}
    ranked = sorted(losses, key=losses.get)
    assert state.trace[0]["removed"] == ranked[0]
    assert sorted(state.alive) == sorted(ranked[1:1 + math.ceil(0.5 * 5)])  # the best half of the other 5
    whole = search(model, budget=Budget(remove=3), keep=0.5)
    # then 1: never fewer than the removals still needed
    assert [t["candidates"] for t in whole.trace] == [6, math.ceil(0.5 * 5), 1]


def test_target_speedup_budget_stops_when_the_parameters_shrink_enough():
    from layerlab import apply_plan
    from layerlab.evaluate.speed import parameter_bytes

    model = tiny_model("llama")
    state = search(model, budget=Budget(target_speedup=1.3))
    full = parameter_bytes(model)

    def speedup(plan_text: str) -> float:
        with apply_plan(model, Plan.parse(plan_text, 6)):
            return full / parameter_bytes(model)

    speedups = [speedup(t["plan"]) for t in state.trace]
    assert speedups[-1] >= 1.3  # the target is reached
    assert all(s < 1.3 for s in speedups[:-1])  # and the search stopped at the first plan that reached it


def test_one_shot_methods():
    model, tokenizer = tiny_model("llama"), CharTokenizer()
    sim = similarity(model, tokenizer, TEXT, ctx=64, windows=2, progress=False)
    by_bi = one_shot(sim, "bi", 2)
    lowest = sorted(range(6), key=lambda i: sim.block_influence[i])[:2]
    assert sorted(set(range(6)) - set(by_bi.layers)) == sorted(lowest)
    by_angle = one_shot(sim, "angular", 2)
    start = min(range(5), key=lambda i: sim.angular[i][1])
    assert list(by_angle.layers) == [i for i in range(6) if i not in (start, start + 1)]
    attn = one_shot(sim, "cosine", 2, "attn")
    assert sum(not s.attention for s in attn.steps) == 2 and len(attn.steps) == 6


def test_search_command_killed_after_its_second_round_resumes_to_the_same_plan(tmp_path, smollm2_tokenizer):
    import json
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text(read_text("wikitext2-valid")[:20_000])
    command = [sys.executable, "-m", "layerlab.cli", "search", "--model", str(folder), "--remove", "5", "--ctx", "128",
               "--windows", "4", "--text", str(text)]

    def found_plan(stdout):
        return next(line for line in stdout.splitlines() if line.startswith("plan:"))

    whole = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    state = tmp_path / "state.json"
    # killed (SIGKILL: no cleanup at all) right after the second round's state is saved: deterministic, no polling
    killer = (
        "import os, signal, sys\n"
        "import layerlab.search as search\n"
        "save = search.SearchState.save\n"
        "def save_then_die(self, path):\n"
        "    save(self, path)\n"
        "    if len(self.trace) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "search.SearchState.save = save_then_die\n"
        "from layerlab.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, *command[3:], "--state", str(state)], capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(json.loads(state.read_text())["trace"]) == 2
    resumed = subprocess.run([*command, "--state", str(state), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert found_plan(resumed.stdout) == found_plan(whole.stdout)
    assert len(json.loads(state.read_text())["trace"]) == 5
