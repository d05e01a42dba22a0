"""Healing: the loss goes down, merging keeps the adapters' logits, resuming is bit-identical, outputs load."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from test_evaluate import TEXT, CharTokenizer
from tiny import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from layerlab import LayerlabError, Plan
from layerlab.cli import cli
from layerlab.errors import ResumeError
from layerlab.evaluate.perplexity import perplexity
from layerlab.export.hf import materialize
from layerlab.heal import HealError, HealSettings, checkpoint_folder, heal, save_healed

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN = "skip:2-3"
FAST = HealSettings(steps=8, lr=1e-2, ctx=64, batch_size=2, warmup=2, checkpoint_every=3)


class SavedCharTokenizer(CharTokenizer):
    def save_pretrained(self, folder):
        pass


def ids():
    return torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """One healing run of a tiny Llama without layers 2-3, written to a folder."""
    model, plan = tiny_model("llama"), Plan.parse(PLAN, 6)
    result = heal(model, CharTokenizer(), TEXT, plan, FAST, progress=False)
    out = save_healed(result, SavedCharTokenizer(), tmp_path_factory.mktemp("heal") / "out")
    return model, plan, result, out


def test_healing_lowers_the_loss_on_the_healing_text_and_leaves_the_source_alone(healed):
    model, plan, result, _ = healed
    pruned = materialize(model, plan)
    before = perplexity(pruned, CharTokenizer(), TEXT, ctx=64, progress=False)
    after = perplexity(result.model, CharTokenizer(), TEXT, ctx=64, progress=False)
    assert after.nll < before.nll - 0.1, (before, after)
    assert len(result.losses) == FAST.steps
    assert result.model.config.num_hidden_layers == 4
    for name, value in tiny_model("llama").state_dict().items():  # the source model was not trained
        assert torch.equal(model.state_dict()[name], value), name


@torch.no_grad()
def test_merged_model_gives_the_adapters_logits_and_loads_with_plain_transformers(healed):
    model, plan, result, out = healed
    with_adapter = PeftModel.from_pretrained(materialize(model, plan), out / "adapter").eval()
    merged = result.model(ids()).logits
    assert (with_adapter(ids()).logits - merged).abs().max() <= 1e-5
    assert (materialize(model, plan)(ids()).logits - merged).abs().max() > 1e-2  # the adapters did change it
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(loaded(ids()).logits, merged)
    summary = json.loads((out / "healing.json").read_text())
    assert summary["plan"] == PLAN and summary["losses"] == result.losses
    assert "lora" not in (out / "config.json").read_text().lower()


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    model, plan = tiny_model("llama"), Plan.parse(PLAN, 6)
    straight = heal(model, CharTokenizer(), TEXT, plan, FAST, checkpoint_dir=tmp_path / "a", progress=False)

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(model, CharTokenizer(), TEXT, plan, FAST, checkpoint_dir=tmp_path / "b", callback=interrupt,
             progress=False)
    steps = []
    resumed = heal(model, CharTokenizer(), TEXT, plan, FAST, checkpoint_dir=tmp_path / "b", resume=True,
                   callback=lambda step, loss: steps.append(step), progress=False)
    assert steps == [4, 5, 6, 7, 8]  # continued after the checkpoint of step 3
    assert resumed.losses == straight.losses
    expected = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with pytest.raises(ResumeError, match="lr=0.01, but this run has lr=0.02"):
        heal(model, CharTokenizer(), TEXT, plan, HealSettings(**{**FAST.__dict__, "lr": 2e-2}),
             checkpoint_dir=tmp_path / "b", resume=True, progress=False)


def test_unknown_target_modules_are_refused():
    with pytest.raises(HealError, match="nope are not in the decoder layers; choose from .*q_proj"):
        heal(tiny_model("llama"), CharTokenizer(), TEXT, settings=HealSettings(target_modules=("nope",)))


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_default_targets_fit_every_architecture_row(arch):
    model = tiny_model(arch)
    result = heal(model, CharTokenizer(), TEXT, Plan.parse(PLAN, 6),
                  HealSettings(steps=1, ctx=32, batch_size=1), progress=False)
    assert result.adapter_state and all("lora_" in name for name in result.adapter_state)


def test_heal_command_writes_the_model_and_refuses_the_evaluation_text(tmp_path, smollm2_tokenizer):
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.vocab_size = len(smollm2_tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "healing.txt").write_text(TEXT)
    out = tmp_path / "healed"
    args = ["heal", "--model", str(tmp_path / "model"), "--plan", PLAN, "--data", str(tmp_path / "healing.txt"),
            "--steps", "3", "--ctx", "32", "--batch-size", "2", "--checkpoint-every", "2", "--eval-windows", "1",
            "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    for row in ("original", "pruned", "healed"):
        assert row in result.output
    assert "peak memory:" in result.output and "peak memory: unknown" not in result.output
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert len(json.loads((out / "healing.json").read_text())["losses"]) == 3
    assert not checkpoint_folder(out).exists()  # removed once the output is written
    refused = CliRunner().invoke(cli, [*args, "--force", "--data", "wikitext2-test"])
    assert isinstance(refused.exception, LayerlabError) and "is the evaluation text" in str(refused.exception)
