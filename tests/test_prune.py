"""The main job on a tiny model: search, evaluation, export and report; resume; the report in a browser."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerlab
from layerlab import Plan
from layerlab.errors import SettingsError
from layerlab.export.hf import materialize
from layerlab.prune import QUICK_EVAL, PruneSettings, prune
from layerlab.recover import recover
from layerlab.settings import HealSettings, RecoverSettings

SETTINGS = PruneSettings(layers=2, calib_ctx=64, calib_windows=2,
                         evaluation=replace(QUICK_EVAL, tasks="ppl,hellaswag,samples,speed", ppl_windows=2, rows=4,
                                            max_new_tokens=4, speed_rounds=1,
                                            speed_max_rounds=1, speed_prompt_tokens=16, speed_decode_tokens=4))


@pytest.fixture(scope="module")
def job(tiny_folder, tmp_path_factory):
    model, tokenizer = layerlab.load(str(tiny_folder))
    out = tmp_path_factory.mktemp("job") / "out"
    return model, tokenizer, out, prune(model, tokenizer, str(tiny_folder), out, SETTINGS, progress=False)


def test_prune_writes_the_chosen_plan_its_evaluation_the_model_and_the_report(job):
    model, tokenizer, out, data = job
    plan = Plan.parse(data["plan"], 6)
    assert len(plan.steps) == 4 and len(data["removed"]) == 2
    rows = data["evaluation"]["rows"]
    assert rows[0]["plan"] == "all" and rows[1]["plan"] == data["plan"]
    assert {r["plan"] for r in rows} >= {data["best_one_shot"]["plan"], data["greedy_plan"]}
    assert data["best_one_shot"]["perplexity"] == min(c["perplexity"] for c in data["one_shot"])
    greedy_ppl = data["search"]["trace"][-1]["perplexity"]
    expected = "greedy" if greedy_ppl <= data["best_one_shot"]["perplexity"] else data["best_one_shot"]["method"]
    assert data["chosen_by"] == expected
    assert json.loads((out / "report.json").read_text())["plan"] == data["plan"]
    assert data["peak_memory_mb"] > 0  # the model loaded and the job's work on it
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    recovery = data["recovery"]  # the default: the linear patch when it lowers the calibration loss
    patched = recovery["calibration_loss_after"] < recovery["calibration_loss_before"]
    assert recovery["method"] == ("patch" if patched else "none") and recovery["reason"]
    assert (data["healed"] is not None) == patched
    expected = {"model": materialize(model, plan)}  # the plain plan, and the recovered model beside it
    if patched:
        expected["model-healed"] = recover(model, tokenizer, plan, replace(SETTINGS.recovery, method="patch"),
                                           progress=False).model
    assert sorted(Path(r["path"]).name for r in data["shipped"]) == sorted(expected)
    for name, reference in expected.items():
        exported = AutoModelForCausalLM.from_pretrained(out / name).eval()
        with torch.no_grad():
            assert (exported(ids).logits - reference(ids).logits).abs().max() <= 1e-4
    html = (out / "report.html").read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 6
    assert html.count("<table>") == 5  # eval: summary, tasks; shipped files
    assert f"Peak memory: {data['peak_memory_mb']:.0f} MB" in html


def test_a_resumed_job_reuses_every_finished_step(job):
    model, tokenizer, out, data = job
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("search.json", "eval.json")}
    again = prune(model, tokenizer, data["model"], out, SETTINGS, resume=True, progress=False)
    assert again["plan"] == data["plan"] and again["evaluation"] == data["evaluation"]
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in stamps}


def test_cli_refuses_a_second_run_into_the_same_folder_and_bad_shares(job, tiny_folder):
    out = job[2]
    for args, needle in ([["--out", str(out)], "--resume"], [["--drop", "150%", "--out", str(out) + "x"], "between"]):
        result = subprocess.run([sys.executable, "-m", "layerlab.cli", "prune", "--model", str(tiny_folder), *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def ensure_chromium() -> None:
    """Install Debian's Chromium and its driver when missing and allowed; skip with the reason otherwise."""
    pytest.importorskip("selenium", reason="selenium is not installed (make test installs it)")
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    installed = subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                               capture_output=True, text=True) if shutil.which("apt-get") else None
    if installed is None or installed.returncode != 0:
        pytest.skip("headless Chromium is missing and could not be installed: apt-get install chromium "
                    "chromium-driver (as root)")


def test_report_opens_in_headless_chromium_with_every_image_loaded(job, tmp_path):
    from layerlab.analysis.browser import inspect_report

    ensure_chromium()
    seen = inspect_report(job[2] / "report.html", tmp_path / "report.png")
    assert len(seen["images"]) == 6 and all(seen["images"])
    assert seen["table_rows"] >= 3 + 2 + 2  # evaluation rows, greedy rounds, one-shot candidates
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_with_distillation_adds_a_healed_row_and_exports_the_healed_model(tiny_folder, tmp_path):
    model, tokenizer = layerlab.load(str(tiny_folder))
    settings = replace(SETTINGS, recovery=RecoverSettings(method="kd",
                                                          training=HealSettings(steps=2, ctx=32, batch_size=2)))
    data = prune(model, tokenizer, str(tiny_folder), tmp_path / "out", settings, progress=False)
    healed = data["healed"]
    assert healed["plan"] == data["plan"] + " + kd" and len(healed["losses"]) == 2
    assert "delta" in healed["ppl"] and "acc_norm" in healed["tasks"]["hellaswag"]["delta"]
    assert data["recovery"]["method"] == "kd" and len(data["recovery"]["training"]["losses"]) == 2
    exported = tmp_path / "out" / "model-healed"
    assert AutoModelForCausalLM.from_pretrained(exported).config.num_hidden_layers == 4
    assert json.loads((tmp_path / "out" / "healed" / "recovery.json").read_text())["method"] == "kd"
    assert "+ kd" in (tmp_path / "out" / "report.html").read_text()


def test_prune_refuses_an_unknown_recovery_and_a_patch_over_halves():
    with pytest.raises(SettingsError, match="unknown recovery 'magic'"):
        PruneSettings(recovery=RecoverSettings(method="magic"))
    with pytest.raises(SettingsError, match="--heal patch patches whole removed layers"):
        PruneSettings(granularity="sublayer", recovery=RecoverSettings(method="patch"))
