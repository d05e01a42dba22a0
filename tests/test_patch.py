"""Linear patches: the fit against numpy's least squares on independently computed activations, the fold
against an explicit map module, the forms, and the errors before any work."""

import numpy as np
import pytest
import torch
from reference import manual_states
from test_evaluate import TEXT, CharTokenizer
from tiny import tiny_model

from layerlab import Plan
from layerlab.calibration import CalibrationError, mixed_windows
from layerlab.errors import SettingsError
from layerlab.export.hf import materialize
from layerlab.hadamard import hadamard
from layerlab.patch import (
    Block,
    BlockPatch,
    PatchError,
    blocks,
    check_patchable,
    fit,
    fold,
    insert_maps,
    patch,
)
from layerlab.settings import PatchSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def ids(length=40):
    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(3))


def test_blocks_are_the_removed_runs_with_the_kept_layers_around_them():
    assert blocks(Plan.parse("skip:2-3,5", 6)) == [Block(2, 3, 1, 4), Block(5, 5, 4, None)]


def test_least_squares_map_equals_numpy_lstsq_on_hand_computed_activations(text_file):
    model, plan = tiny_model("llama"), Plan.parse("skip:2-3", 6)
    model.config._attn_implementation = "eager"
    windows = mixed_windows(CharTokenizer(), (text_file,), 64, 64 * 6)
    settings = PatchSettings(calibration=(text_file,), tokens=64 * 6, ctx=64, ridge=0.0)
    [fitted] = fit(model, windows, check_patchable(model, plan), "full", settings, progress=False)
    xs, rs = [], []
    for window in windows:  # X: layer 1's MLP output; R: the stream entering layer 4 minus layer 1's resid_mid
        states, _ = manual_states(model, torch.tensor([window.ids]), Plan.identity(6))
        layer = model.model.layers[1]
        with torch.no_grad():
            xs.append(layer.mlp(layer.post_attention_layernorm(states[1][1]))[0].double().numpy())
        rs.append((states[4][0] - states[1][1])[0].double().numpy())
    x, r = np.concatenate(xs), np.concatenate(rs)
    expected = np.linalg.lstsq(x, r, rcond=None)[0]
    np.testing.assert_allclose(fitted.matrix.numpy(), expected, rtol=1e-3, atol=1e-4)
    unpatched = ((x - r) ** 2).sum() / (r ** 2).sum()
    assert fitted.error_before == pytest.approx(unpatched, rel=1e-4)
    assert fitted.error_after == pytest.approx(((x @ expected - r) ** 2).sum() / (r ** 2).sum(), rel=1e-3)


@pytest.mark.parametrize("arch, form", [("llama", "full"), ("llama", "hadamard"), ("gpt2", "full"),
                                        ("gemma3", "rotation"), ("gemma3", "diagonal")])
def test_the_folded_model_equals_the_pruned_model_with_an_explicit_map_module(arch, form):
    model, plan = tiny_model(arch), Plan.parse("skip:2-3,5", 6)
    generator = torch.Generator().manual_seed(1)
    patches = []
    for block in blocks(plan):
        if form in ("rotation", "diagonal"):  # what folds through Gemma's post-MLP norm: Q diag(s)
            q = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))[0]
            matrix = (q if form == "rotation" else torch.eye(32, dtype=torch.float64)) @ torch.diag(
                torch.rand(32, generator=generator, dtype=torch.float64) + 0.5)
        else:
            matrix = torch.eye(32, dtype=torch.float64) + 0.3 * torch.randn(32, 32, generator=generator,
                                                                            dtype=torch.float64)
        norm = model.model.layers[block.kept].post_feedforward_layernorm if arch == "gemma3" else None
        scale = None if norm is None else norm.weight.detach().double() + 1
        patches.append(BlockPatch(block, matrix, scale, 0.0, 0.0))
    explicit = materialize(model, plan)
    insert_maps(explicit, plan, patches)
    folded = materialize(model, plan)
    fold(folded, plan, patches)
    with torch.no_grad():
        reference, out = explicit(ids()).logits, folded(ids()).logits
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
        assert (out - materialize(model, plan)(ids()).logits).abs().max() > 1e-3  # the maps do something
    assert not any(type(m).__name__ == "BranchMap" for m in folded.modules())


def test_a_map_that_is_not_a_rotation_times_a_scale_is_not_folded_through_a_norm():
    model, plan = tiny_model("gemma3"), Plan.parse("skip:2-3", 6)
    [block] = blocks(plan)
    sheared = torch.eye(32, dtype=torch.float64) + torch.triu(torch.ones(32, 32, dtype=torch.float64), 1)
    with pytest.raises(PatchError, match="not a rotation times a scale"):
        fold(materialize(model, plan), plan, [BlockPatch(block, sheared, torch.ones(32), 0.0, 0.0)])


@pytest.mark.parametrize("arch, form, objective", [("llama", "auto", "lstsq"), ("llama", "diagonal", "lstsq"),
                                                   ("llama", "hadamard", "lstsq"), ("llama", "full", "cosine"),
                                                   ("gemma3", "auto", "lstsq"), ("gemma3", "rotation", "cosine")])
def test_patch_fits_lowers_the_stream_error_and_leaves_the_source_alone(text_file, arch, form, objective):
    model, plan = tiny_model(arch), Plan.parse("skip:2-3,5", 6)
    settings = PatchSettings(calibration=(text_file,), tokens=64 * 6, ctx=64, form=form, objective=objective,
                             steps=30, lr=1e-3)
    result = patch(model, CharTokenizer(), plan, settings, progress=False)
    assert result.form == ({"llama": "full", "gemma3": "rotation"}[arch] if form == "auto" else form)
    assert result.tokens == 6 * 64 and result.model.config.num_hidden_layers == 3
    for p in result.patches:
        assert p.error_after < p.error_before
        if objective == "cosine":
            assert p.cosine_after > p.cosine_before
    for name, value in tiny_model(arch).state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert result.summary()["perplexity_after"] == pytest.approx(np.exp(result.loss_after))


def test_the_hadamard_form_is_a_scale_in_the_hadamard_basis(text_file):
    model, plan = tiny_model("llama"), Plan.parse("skip:2-3", 6)
    settings = PatchSettings(calibration=(text_file,), tokens=64 * 3, ctx=64, form="hadamard")
    [fitted] = fit(model, mixed_windows(CharTokenizer(), (text_file,), 64, 64 * 3), blocks(plan), "hadamard",
                   settings, progress=False)
    h = hadamard(32)
    inner = h.T @ fitted.matrix @ h
    torch.testing.assert_close(inner, torch.diag(inner.diagonal()), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch, text, form, message", [
    ("llama", "attn-skip:3", "auto", "drops only a half of layer"),
    ("llama", "0-3,2-5", "auto", "repeats or reorders"),
    ("llama", "skip:0-1", "auto", "removes layer 0"),
    ("llama", "all", "auto", "removes no layer"),
    ("gemma3", "skip:2-3", "full", "cannot be folded through post_feedforward_layernorm"),
    ("gemma3", "skip:2-3", "hadamard", "only a rotation times a per-channel scale"),
])
def test_plans_and_forms_a_patch_cannot_express_are_refused_before_any_work(arch, text, form, message):
    with pytest.raises(PatchError, match=message):
        check_patchable(tiny_model(arch), Plan.parse(text, 6), form)


def test_bad_settings_and_short_calibration_text_are_refused(text_file):
    with pytest.raises(SettingsError, match="unknown patch form"):
        PatchSettings(form="cubic")
    with pytest.raises(SettingsError, match="objective"):
        PatchSettings(objective="mae")
    with pytest.raises(SettingsError, match="raise it to at least 768"):
        PatchSettings(tokens=512)
    with pytest.raises(CalibrationError, match="fewer than the 100 windows of 64"):
        mixed_windows(CharTokenizer(), (text_file,), 64, 6400)
    with pytest.raises(CalibrationError, match="raise it to at least 128"):
        mixed_windows(CharTokenizer(), (text_file, text_file), 64, 100)


def test_mixed_windows_interleave_the_texts_and_split_the_budget(text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT[::-1])
    windows = mixed_windows(CharTokenizer(), (text_file, str(other)), 32, 32 * 4)
    tokens = CharTokenizer()(TEXT)["input_ids"]
    assert [w.ids for w in windows[0::2]] == [tokens[:32], tokens[32:64]]
    assert windows[1].ids == CharTokenizer()(TEXT[::-1])["input_ids"][:32]
