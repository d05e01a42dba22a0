"""Looking inside: attention maps, their spectra, the logit lens and the hidden-state cosine, on tiny models."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_evaluate import CharTokenizer
from tiny import COMMON, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from layerlab import PlanError
from layerlab.analysis.analyze import analyze
from layerlab.analysis.attention import attention_maps, fourier_spectrum, high_frequency_share, spectrum_summary
from layerlab.analysis.lens import logit_lens
from layerlab.arch import arch_of, set_path
from layerlab.cli import cli
from layerlab.io import OutputExistsError
from layerlab.metrics.similarity import hidden_cosine
from layerlab.plan import Plan
from layerlab.runtime import apply_plan

PROMPT = "The cat sat on the mat."


class Tokenizer(CharTokenizer):
    """CharTokenizer with the `decode` the analyses use for labels."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def ids_of(prompt=PROMPT):
    return torch.tensor([Tokenizer()(prompt)["input_ids"]])


def test_attention_maps_follow_the_plan():
    model = tiny_model("llama")
    plan = Plan.parse("0-2,2,3.mlp,4-5", 6)  # layer 2 twice, layer 3 without attention
    result = attention_maps(model, Tokenizer(), PROMPT, plan)
    t = len(PROMPT)
    assert len(result.tokens) == t and len(result.maps) == len(result.names) == 7
    assert result.names[2] != result.names[3] and "layer 2" in result.names[3]
    assert result.maps[4] is None
    for m in (m for m in result.maps if m is not None):
        assert m.shape == (4, t, t)
        torch.testing.assert_close(m.sum(-1), torch.ones(4, t))
        assert torch.all(m.triu(1) == 0)  # causal: no query attends to a later key
    assert not torch.equal(result.maps[2], result.maps[3])  # the repetition reads a different stream
    assert model.config._attn_implementation == "sdpa"  # switched back after the pass


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_identity_maps_equal_the_models_own_attentions(arch):
    model = tiny_model(arch)
    result = attention_maps(model, Tokenizer(), PROMPT)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        own = model(ids_of(), output_attentions=True).attentions
    assert len(own) == len(result.maps)
    for mine, theirs in zip(result.maps, own, strict=True):
        torch.testing.assert_close(mine, theirs[0])


def test_repeated_layer_maps_equal_a_physically_rebuilt_model():
    model = tiny_model("llama")
    order = [0, 1, 2, 2, 4]
    result = attention_maps(model, Tokenizer(), PROMPT, Plan.parse(",".join(map(str, order)), 6))
    model.set_attn_implementation("eager")  # before copying: every layer holds its own copy of the config
    rebuilt = copy.deepcopy(model)
    rebuilt.model.layers = torch.nn.ModuleList(copy.deepcopy(model.model.layers[i]) for i in order)
    for i, layer in enumerate(rebuilt.model.layers):
        layer.self_attn.layer_idx = i
    rebuilt.config.num_hidden_layers = len(order)
    with torch.no_grad():
        own = rebuilt(ids_of(), output_attentions=True).attentions
    for mine, theirs in zip(result.maps, own, strict=True):
        torch.testing.assert_close(mine, theirs[0])


def test_spectrum_of_known_maps():
    n = 16
    constant = torch.full((n, n), 1 / n)
    assert float(high_frequency_share(constant)) == pytest.approx(0, abs=1e-12)
    signs = torch.arange(n)
    checkerboard = (-1.0) ** (signs[:, None] + signs[None, :])
    assert float(high_frequency_share(checkerboard)) == pytest.approx(1, abs=1e-12)
    spectrum = fourier_spectrum(checkerboard)  # all energy at the Nyquist corner (index 0 after fftshift)
    assert float(spectrum[0, 0]) == pytest.approx(np.log1p(n * n))
    assert float(spectrum.sum()) == pytest.approx(np.log1p(n * n))
    # one cosine along the keys, 2 cycles per map: energy at (0, +-2), i.e. at 0.25 of Nyquist
    wave = torch.cos(2 * torch.pi * 2 * signs / n).expand(n, n)
    assert float(high_frequency_share(wave, radius=0.3)) == pytest.approx(0, abs=1e-12)
    assert float(high_frequency_share(wave, radius=0.2)) == pytest.approx(1, abs=1e-12)
    maps = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    expected = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(maps.numpy().astype(np.float64)), axes=(-2, -1))))
    np.testing.assert_allclose(fourier_spectrum(maps).numpy(), expected, rtol=1e-10)
    assert high_frequency_share(maps).shape == (3, 2)


def test_spectrum_summary_averages_heads():
    model = tiny_model("qwen2")
    result = attention_maps(model, Tokenizer(), PROMPT, Plan.parse("attn-skip:1", 6))
    summary = spectrum_summary(result, radius=0.3)
    assert summary[1] is None and len(summary) == 6
    assert summary[0] == pytest.approx(float(high_frequency_share(result.maps[0], 0.3).mean()))
    assert all(0 < s < 1 for s in summary if s is not None)


@pytest.mark.parametrize("arch, plan", [("llama", "all"), ("gemma3", "skip:3-4"), ("gpt2", "0-2,1,5")])
def test_logit_lens_reads_each_step_through_the_head(arch, plan):
    model = tiny_model(arch)
    cap = model.config.final_logit_softcapping = 1.0 if arch == "gemma3" else None  # the lens must cap too
    plan = Plan.parse(plan, 6)
    rows = logit_lens(model, Tokenizer(), PROMPT, plan, top_k=4)
    assert len(rows) == len(plan.steps)
    with apply_plan(model, plan), torch.no_grad():
        out = model(ids_of(), output_hidden_states=True)
    for k, row in enumerate(rows):
        if k == len(rows) - 1:
            logits = out.logits[0, -1]  # the model's own prediction
        else:  # the stream entering step k + 1, through the final norm and the LM head by hand
            norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
            logits = model.get_output_embeddings()(norm(out.hidden_states[k + 1][0, -1])).detach()
            logits = torch.tanh(logits / cap) * cap if cap else logits
        top = torch.softmax(logits.double(), -1).topk(4)
        assert row.ids == top.indices.tolist()
        assert row.probs == pytest.approx(top.values.tolist(), rel=1e-5)
        assert row.tokens == [f"<{i}>" for i in row.ids]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_cosine_matches_the_models_hidden_states(arch):
    model = tiny_model(arch)
    set_path(model, arch_of(model).final_norm, torch.nn.Identity())  # the last hidden state is then raw
    matrix = hidden_cosine(model, Tokenizer(), PROMPT)
    with torch.no_grad():
        states = torch.stack(model(ids_of(), output_hidden_states=True).hidden_states)[:, 0].double()
    expected = torch.tensor([[float(F.cosine_similarity(a, b, dim=-1).mean()) for b in states] for a in states],
                            dtype=torch.float64)
    assert matrix.shape == (7, 7)
    torch.testing.assert_close(matrix, expected)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(7, dtype=torch.float64))


def test_hidden_cosine_follows_the_plan():
    model = tiny_model("llama")
    full = hidden_cosine(model, Tokenizer(), PROMPT)
    pruned = hidden_cosine(model, Tokenizer(), PROMPT, Plan.parse("skip:1-4", 6))
    assert pruned.shape == (3, 3)
    # x^0 (embeddings) and x^1 (after layer 0) are the same streams; the output (layer 5 on x^1) is not
    torch.testing.assert_close(pruned[0, 1], full[0, 1])
    assert abs(float(pruned[0, 2] - full[0, 6])) > 1e-3


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_writes_every_file(tmp_path):
    model = tiny_model("gemma3")
    plans = {"all": Plan.identity(6), "0-2,2,3.mlp": Plan.parse("0-2,2,3.mlp", 6)}
    results = analyze(model, Tokenizer(), plans, PROMPT, tmp_path / "out", max_heads=2, top_k=3)
    out = tmp_path / "out"
    assert json.loads((out / "analysis.json").read_text()) == results
    names = {"spectrum_summary.png", "analysis.json", ".layerlab.json"} | {f"{kind}_{i}.png" for i in range(2)
                                                          for kind in ("attention", "spectrum", "cosine")}
    assert {p.name for p in out.iterdir()} == names
    assert all(is_png(p) for p in out.glob("*.png"))
    second = results["plans"][1]
    assert second["steps"][4].endswith("(MLP only)") and second["high_frequency_share"][4] is None
    assert len(second["cosine"]) == 6 and len(second["logit_lens"]) == 5 and len(second["logit_lens"][0]["ids"]) == 3
    with pytest.raises(OutputExistsError, match="not an empty folder"):
        analyze(model, Tokenizer(), plans, PROMPT, out)


@pytest.fixture()
def saved_model(tmp_path, smollm2_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON | {"vocab_size": len(smollm2_tokenizer)}))
    model.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_analyze_command(tmp_path, saved_model):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", str(saved_model), "--plan", "0-3,3,4-5", "--prompt", "Once upon a time",
            "--out", str(out), "--max-heads", "2"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "logit lens of all" in result.output and "step 6 · layer 5" in result.output
    assert all(is_png(out / f"{kind}_{i}.png") for i in range(2) for kind in ("attention", "spectrum", "cosine"))
    assert is_png(out / "spectrum_summary.png")
    assert [p["plan"] for p in json.loads((out / "analysis.json").read_text())["plans"]] == ["all", "0-3,3-5"]
    again = subprocess.run([sys.executable, "-m", "layerlab.cli", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert "is not an empty folder; choose another path or pass --force" in again.stderr
    with pytest.raises(PlanError, match="names layer 9"):
        CliRunner().invoke(cli, [*args, "--force", "--plan", "0-9"], catch_exceptions=False)
