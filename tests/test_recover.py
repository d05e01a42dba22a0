"""Distillation and the recovery entry point: the KD loss by hand, teacher and student of the first step, one
copy of the weights left as it was, resuming bit-identically, the registry and its errors."""

import json
import math
from dataclasses import replace

import pytest
import torch
from test_evaluate import TEXT, CharTokenizer
from test_heal import SavedCharTokenizer
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from layerlab import Plan, apply_plan
from layerlab.corpora import DataError
from layerlab.distill import DistillError, distill, kd_loss
from layerlab.errors import ResumeError, SettingsError
from layerlab.export.hf import materialize
from layerlab.heal import batch_order, training_windows
from layerlab.patch import PatchError, insert_maps, patch
from layerlab.recover import recover, save_recovered
from layerlab.settings import RECOVERIES, DistillSettings, HealSettings, PatchSettings, RecoverSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN = "skip:2-3"
TRAINING = HealSettings(steps=6, lr=1e-3, ctx=32, batch_size=2, warmup=2, dropout=0.0, checkpoint_every=2)
KD = DistillSettings(training=TRAINING, temperature=2.0)


def windows():
    return training_windows(CharTokenizer(), TEXT, TRAINING.ctx)


def test_kd_loss_is_the_tempered_kl_divergence_by_hand():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=generator), torch.randn(2, 3, 7, generator=generator)
    total = 0.0
    for s_row, t_row in zip(student.reshape(-1, 7).tolist(), teacher.reshape(-1, 7).tolist(), strict=True):
        p = [math.exp(v / 2) for v in t_row]
        q = [math.exp(v / 2) for v in s_row]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        total += sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(4 * total / 6, rel=1e-5)
    assert float(kd_loss(teacher, teacher, 1.0)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("with_patch", [False, True])
def test_first_step_distils_the_full_model_into_the_pruned_plan_and_the_source_is_left_alone(text_file, with_patch):
    model, plan = tiny_model("llama"), Plan.parse(PLAN, 6)
    patches = patch(model, CharTokenizer(), plan, PatchSettings(calibration=(text_file,), tokens=64 * 3, ctx=64),
                    progress=False, materialize=False).patches if with_patch else None
    first = windows()[batch_order(len(windows()), TRAINING.steps, TRAINING.batch_size, TRAINING.seed)[0]]
    trained = {}

    def at_the_end(step, loss):  # the student as trained: the plan at run time, adapters on (dropout is off)
        if step == TRAINING.steps:
            with torch.no_grad(), apply_plan(model, plan):
                if patches:
                    insert_maps(model, plan, patches)
                trained["logits"] = model(first).logits

    result = distill(model, windows(), plan, KD, patches=patches, callback=at_the_end, progress=False)
    student = materialize(model, plan)  # at the first step LoRA's B is zero: the student is the (patched) plan
    if patches:
        insert_maps(student, plan, patches)
    with torch.no_grad():
        expected = kd_loss(student(first).logits, model(first).logits, KD.temperature)
        merged = result.model(first).logits
        every = windows()
        teacher = model(every).logits
        before, after = (float(kd_loss(m(every).logits, teacher, KD.temperature)) for m in (student, result.model))
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-4)
    assert after < before  # on all the training windows
    torch.testing.assert_close(merged, trained["logits"], rtol=1e-4, atol=1e-5)  # merged and folded correctly
    assert (merged - student(first).logits).abs().max() > 1e-3
    fresh = tiny_model("llama")
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert not any("lora" in name for name, _ in model.named_modules())
    assert result.model.config.num_hidden_layers == 4


def test_hidden_state_term_adds_the_relative_stream_error_at_the_kept_boundary():
    model, plan = tiny_model("gemma3"), Plan.parse("skip:2-3,5", 6)
    plain = distill(model, windows(), plan, replace(KD, training=replace(TRAINING, steps=1)), progress=False)
    both = distill(model, windows(), plan, replace(KD, training=replace(TRAINING, steps=1), hidden_weight=1.0),
                   progress=False)
    assert both.losses[0] > plain.losses[0]


def test_resumed_distillation_ends_with_the_same_weights(tmp_path):
    model, plan = tiny_model("llama"), Plan.parse(PLAN, 6)
    straight = distill(model, windows(), plan, KD, checkpoint_dir=tmp_path / "a", progress=False)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(model, windows(), plan, KD, checkpoint_dir=tmp_path / "b", callback=interrupt, progress=False)
    assert not any("lora" in name for name, _ in model.named_modules())  # the adapters came out anyway
    resumed = distill(model, windows(), plan, KD, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.losses == straight.losses
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, straight.model.state_dict()[name]), name
    with pytest.raises(ResumeError, match="temperature=2.0, but this run has temperature=3.0"):
        distill(model, windows(), plan, replace(KD, temperature=3.0), checkpoint_dir=tmp_path / "b", resume=True,
                progress=False)


@pytest.mark.parametrize("settings, plan, error, message", [
    (replace(KD, teacher="skip:1"), PLAN, SettingsError, "teacher must be the full model"),
    (KD, "all", DistillError, "removes nothing"),
    (replace(KD, hidden_weight=1.0), "attn-skip:2", DistillError, "set hidden_weight to 0"),
])
def test_distillation_errors_come_before_any_work(settings, plan, error, message):
    with pytest.raises(error, match=message):
        distill(tiny_model("llama"), windows(), Plan.parse(plan, 6), settings, progress=False)
    with pytest.raises(SettingsError, match="temperature must be positive"):
        DistillSettings(temperature=0)


def test_registry_names_the_methods_and_refuses_others():
    assert set(RECOVERIES) == {"none", "patch", "lora", "kd", "patch+kd", "auto"}
    with pytest.raises(SettingsError, match="unknown recovery 'magic'; choose from none, patch"):
        RecoverSettings(method="magic")


def recover_settings(method: str, text_file: str) -> RecoverSettings:
    return RecoverSettings(method=method, patch=PatchSettings(calibration=(text_file,), tokens=64 * 3, ctx=64),
                           training=replace(TRAINING, steps=2), data=(text_file,))


@pytest.mark.parametrize("method", ["none", "patch", "lora", "kd", "patch+kd"])
def test_recover_returns_a_plain_pruned_model_and_a_record(text_file, tmp_path, method):
    model, plan = tiny_model("llama"), Plan.parse(PLAN, 6)
    recovery = recover(model, CharTokenizer(), plan, recover_settings(method, text_file), progress=False)
    assert recovery.method == method and recovery.model.config.num_hidden_layers == 4
    if method == "none":
        with torch.no_grad():
            torch.testing.assert_close(recovery.model(windows()[:1]).logits,
                                       materialize(model, plan)(windows()[:1]).logits)
    else:
        assert recovery.record["calibration_loss_after"] < recovery.record["calibration_loss_before"] + 0.5
        assert ("patch" in recovery.record) == ("patch" in method)
        assert ("training" in recovery.record) == (method != "patch")
    out = save_recovered(recovery, SavedCharTokenizer(), tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(loaded(windows()[:1]).logits, recovery.model(windows()[:1]).logits)
    assert json.loads((out / "recovery.json").read_text())["method"] == method


def test_auto_patches_only_when_the_calibration_loss_falls_and_says_why(text_file):
    model = tiny_model("llama")
    chosen = recover(model, CharTokenizer(), Plan.parse(PLAN, 6), recover_settings("auto", text_file), progress=False)
    record = chosen.record
    if record["calibration_loss_after"] < record["calibration_loss_before"]:
        assert chosen.method == "patch" and record["reason"].startswith("patched: calibration perplexity")
    else:
        assert chosen.method == "none" and record["reason"].startswith("not patched")
    halves = recover(model, CharTokenizer(), Plan.parse("attn-skip:2", 6), recover_settings("auto", text_file),
                     progress=False)
    assert halves.method == "none" and "no patch: a linear patch replaces whole removed layers" in halves.record[
        "reason"]


def test_recover_refuses_a_patch_it_cannot_express_before_any_work(text_file):
    with pytest.raises(PatchError, match="drops only a half"):
        recover(tiny_model("llama"), CharTokenizer(), Plan.parse("mlp-skip:2", 6),
                recover_settings("patch+kd", text_file), progress=False)
    with pytest.raises(DataError, match="training text: .*neither a file nor a bundled name"):
        RecoverSettings(method="kd", data=("no-such-text",)).check()


def test_heal_command_with_the_patch_writes_a_plain_recovered_model(tiny_folder, text_file, tmp_path):
    from layerlab.cli import main

    out = tmp_path / "patched"
    code = main(["heal", "-m", str(tiny_folder), "-p", "skip:2-3", "--method", "patch", "--calibration", text_file,
                 "--calib-tokens", "256", "--eval-windows", "0", "--out", str(out)])
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    record = json.loads((out / "recovery.json").read_text())
    assert record["method"] == "patch" and record["patch"]["blocks"][0]["kept"] == 1
