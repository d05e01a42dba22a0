"""Model loading and the command line: outputs, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest
import torch
from tiny import tiny_model

import layerlab
from layerlab import ModelLoadError


def run(*args):
    return subprocess.run([sys.executable, "-m", "layerlab.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_plan_show_table_and_forms():
    result = run("plan", "show", "skip:24-26; attn-skip:3", "--layers", "30")
    assert result.returncode == 0
    assert "27 steps over 30 layers; dropped: 24,25,26" in result.stdout
    mergekit = run("plan", "show", "0-13,14-19x2,20-29", "--layers", "30", "--format", "mergekit")
    assert "layer_range:" in mergekit.stdout and "passthrough" in mergekit.stdout
    flags = run("plan", "show", "attn-skip:1", "--layers", "3", "--format", "llama-cpp")
    assert flags.stdout.strip() == '{"llama_cpp_skip_flags": [0, 1, 0]}'


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    assert_one_line_error(run("plan", "show", "0-23,27-31", "--layers", "30"), "'27-31' names layer 31")
    assert_one_line_error(run("plan", "show", "0-3", "--layers", "30", "--model", "x"), "exactly one of")
    assert_one_line_error(run("generate", "--model", str(tmp_path / "missing.gguf")), "does not exist")
    assert_one_line_error(run("generate", "--model", str(tmp_path)), "has no config.json")
    assert_one_line_error(run("plan", "show", str(tmp_path / "p.json"), "--layers", "4"), "does not exist")


def test_help_everywhere():
    for args in ([], ["generate"], ["plan"], ["plan", "show"], ["models"]):
        result = run(*args, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_models_lists_the_embedded_models():
    result = run("models")
    assert "smollm2-135m" in result.stdout and "gemma3-270m" in result.stdout


def test_load_a_local_folder(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = layerlab.load(str(tmp_path))
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tokenizer("hi")["input_ids"] == smollm2_tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("source, needle", [
    ("nowhere/at/all", "not a Hugging Face folder, a .gguf file or an embedded model"),
    ("missing.gguf", "does not exist"),
])
def test_bad_model_sources(source, needle):
    with pytest.raises(ModelLoadError, match=needle):
        layerlab.load(source)


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        layerlab.load("smollm2-135m", dtype="float8")


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_on_a_cpu_that_multiplies_it_in_hardware(monkeypatch, amx, expected):
    from layerlab.models import parse_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert parse_dtype("auto", "cpu") == expected
    assert parse_dtype("auto", "mps") == torch.float32  # never bf16 off CUDA and AMX CPUs
    assert parse_dtype("float32", "cpu") == torch.float32  # the default never changes with the hardware


@pytest.mark.slow
def test_generate_prints_plans_side_by_side():
    result = run("generate", "--model", "smollm2-135m", "--plan", "skip:24-26", "--plan", "0-13,14-19x2,20-29",
                 "-n", "8")
    assert result.returncode == 0, result.stderr
    for plan in ("all", "skip:24-26", "0-19,14-29"):
        assert plan in result.stdout
    assert result.stdout.count("Once upon a time") == 3


@pytest.mark.slow
def test_eval_prints_a_table_with_deltas_and_writes_json(tmp_path):
    import json

    out = tmp_path / "results.json"
    args = ["eval", "--model", "smollm2-135m", "--plan", "skip:24-26", "--ctx", "128", "--ppl-windows", "2",
            "--tasks", "ppl,hellaswag,samples,speed", "--rows", "3", "--speed-rounds", "1", "--speed-max-rounds", "1",
            "-n", "4", "--out", str(out)]
    result = run(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    for header in ("Δppl", "acc_norm", "decode ×", "sample"):
        assert header in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["plan"] for r in rows] == ["all", "skip:24-26"]
    assert rows[1]["ppl"]["windows"] == 2 and rows[1]["tasks"]["hellaswag"]["n"] == 3
    assert rows[1]["ppl"]["delta"]["value"] == pytest.approx(
        100 * (rows[1]["ppl"]["perplexity"] / rows[0]["ppl"]["perplexity"] - 1), rel=1e-6)
    before = out.read_text()
    assert_one_line_error(run(*args), "already exists; choose another path or pass --force")
    assert out.read_text() == before
