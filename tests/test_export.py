"""Exports: Hugging Face folders and pruned GGUF files give the plan's logits; outputs are written safely."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

import layerlab
from layerlab import Plan, apply_plan
from layerlab.errors import OutputError
from layerlab.export.gguf import prune_gguf
from layerlab.export.hf import export_hf
from layerlab.io import OutputExistsError, atomic_write_text
from layerlab.models import EMBEDDED


class NoTokenizer:
    def save_pretrained(self, folder):
        pass


def ids():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("text", ["skip:1-2", "0-3,2-5"])
def test_hf_export_loads_with_plain_transformers_and_gives_the_plans_logits(arch, text, tmp_path):
    model, plan = tiny_model(arch), Plan.parse(text, 6)
    export_hf(model, NoTokenizer(), plan, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.get_text_config(decoder=True).num_hidden_layers == len(plan.steps)
    with apply_plan(model, plan):
        expected = model(ids()).logits
    assert (exported(ids()).logits - expected).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_sublayer_export_loads_both_ways_and_gives_the_plans_logits(arch, tmp_path):
    model, plan = tiny_model(arch), Plan.parse("0-5,2; attn-skip:0,4; mlp-skip:2", 6)
    export_hf(model, NoTokenizer(), plan, tmp_path / "out", remote_code=True)
    config = (tmp_path / "out" / "config.json").read_text()
    assert '"drop_attn_list"' in config and '"auto_map"' in config
    with apply_plan(model, plan):
        expected = model(ids()).logits
        expected_tokens = model.generate(ids()[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(remote).__name__.startswith("LayerlabDrop")
    assert (remote(ids()).logits - expected).abs().max() <= 1e-4
    assert torch.equal(remote.generate(ids()[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8),
                       expected_tokens)
    # the dropped weights are not in the file
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert not any(".0.self_attn." in n or ".0.attn." in n for n in names)


@torch.no_grad()
def test_layerlab_load_honours_drop_lists(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama")
    model.config.vocab_size = 97
    plan = Plan.parse("attn-skip:0,3; mlp-skip:5", 6)
    export_hf(model, smollm2_tokenizer, plan, tmp_path / "out")
    loaded, _ = layerlab.load(str(tmp_path / "out"))
    with apply_plan(model, plan):
        assert (loaded(ids()).logits - model(ids()).logits).abs().max() <= 1e-4


def test_outputs_are_never_clobbered(tmp_path):
    model, plan = tiny_model("llama"), Plan.parse("skip:1", 6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an empty folder; choose another path or pass --force"):
        export_hf(model, NoTokenizer(), plan, out)
    with pytest.raises(OutputError, match="not written by layerlab, so --force will not replace it"):
        export_hf(model, NoTokenizer(), plan, out, force=True)  # --force never deletes the user's own folder
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_hf(model, NoTokenizer(), plan, out)  # an empty folder is fine
    export_hf(model, NoTokenizer(), Plan.parse("skip:1-2", 6), out, force=True)  # and layerlab's own is replaced
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging leftovers


def test_outputs_get_the_permissions_of_plainly_created_ones(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    export_hf(tiny_model("llama"), NoTokenizer(), Plan.parse("skip:1", 6), tmp_path / "out")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = lambda name: (tmp_path / name).stat().st_mode  # noqa: E731
    assert mode("out") == mode("plain") and mode("atomic.txt") == mode("plain.txt")
    assert (tmp_path / "out" / "config.json").stat().st_mode == mode("plain.txt")


@pytest.mark.slow
@torch.no_grad()
def test_pruned_gguf_gives_the_plans_logits_and_leaves_the_source_alone(smollm2, tmp_path):
    model, tokenizer = smollm2
    source = EMBEDDED["smollm2-135m"].locate()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    plan = Plan.parse("0-13,14-19x2,20-23,28-29", 30)
    out = prune_gguf(source, plan, tmp_path / "pruned.gguf")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    pruned, _ = layerlab.load(str(out))
    assert pruned.config.num_hidden_layers == len(plan.steps)
    x = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with apply_plan(model, plan):
        expected = model(x).logits
    assert (pruned(x).logits - expected).abs().max() <= 1e-4
    with pytest.raises(OutputExistsError):
        prune_gguf(source, plan, out)


@pytest.mark.slow
@torch.no_grad()
def test_export_command_writes_a_model_card_and_the_plans_model(smollm2, tmp_path):
    out = tmp_path / "smol"
    result = subprocess.run([sys.executable, "-m", "layerlab.cli", "export", "-m", "smollm2-135m", "-p", "0-23,20x2",
                             "-f", "hf", "-o", str(out), "--eval-windows", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert "plan: `0-23,20x2`" in card and "| decoder layers | 30 | 26 |" in card and "perplexity" in card
    assert "peak memory:" in result.stdout and "peak memory: unknown" not in result.stdout
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tokenizer = smollm2
    x = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with apply_plan(model, Plan.parse("0-23,20x2", 30)):
        expected = model(x).logits
    assert (exported(x).logits - expected).abs().max() <= 1e-4


def test_mergekit_commands_round_trip(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "layerlab.cli", "plan", *args], capture_output=True, text=True)

    yaml_text = run("to-mergekit", "0-13,14-19x2,20-29", "--layers", "30", "--model-name", "m").stdout
    (tmp_path / "merge.yaml").write_text(yaml_text)
    assert run("from-mergekit", str(tmp_path / "merge.yaml"), "--layers", "30").stdout.strip() == "0-19,14-29"


def test_requantizing_by_slabs_gives_the_whole_tensors_bytes():
    """The writer quantizes a source tensor into another type a few rows at a time (one slab in float32):
    the bytes are those of quantizing the whole tensor at once, for a matrix and a vector."""
    from gguf import GGMLQuantizationType, GGUFReader

    from layerlab.export.gguf import dequantized, requantized
    from layerlab.export.quant import quantize

    reader = GGUFReader(EMBEDDED["smollm2-135m"].locate())
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_norm.weight"):
        tensor = tensors[name]
        for kind in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16):
            whole = quantize(dequantized(tensor), kind)
            slabbed = requantized(tensor, kind, slab_bytes=7 * 4 * tensor.shape[0])  # 7 rows, the last slab short
            assert slabbed.shape == whole.shape and slabbed.dtype == whole.dtype
            assert np.array_equal(slabbed, whole)
