"""One-shot pruning of a model larger than memory: scores read one layer at a time, the GGUF's tensors copied.

On a tiny GGUF, `prune --method bi --streamed` must choose the plan of the in-memory one-shot prune and
write the same file byte for byte, which is also the file `search --method bi` + `export` give."""

from __future__ import annotations

import json

import pytest
from tiny_gguf import tiny_hf, write_tiny_gguf

from layerlab import jobs
from layerlab.cli import main
from layerlab.errors import SettingsError
from layerlab.settings import ExportSettings, ModelSpec, PruneSettings, RecoverSettings, SearchSettings

ARGS = ["--layers", "2", "--method", "bi", "--ctx", "32", "--windows", "2"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return write_tiny_gguf(tiny_hf("llama", layers=6), "llama", tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_streamed_prune_is_the_in_memory_prune_byte_for_byte(gguf, tmp_path, monkeypatch, one_thread):
    assert main(["prune", "-m", str(gguf), *ARGS, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as patch:  # the streamed run never loads the whole model
        patch.setattr(ModelSpec, "load", lambda self: pytest.fail("the streamed prune loaded the whole model"))
        assert main(["prune", "-m", str(gguf), *ARGS, "--streamed", "--out", str(tmp_path / "streamed")]) == 0
    whole, streamed = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("whole", "streamed"))
    assert streamed["streamed"] and not whole["streamed"]
    assert streamed["plan"] == whole["plan"] and len(streamed["plan"].split(",")) >= 1
    written = (tmp_path / "streamed" / "model.gguf").read_bytes()
    assert written == (tmp_path / "whole" / "model.gguf").read_bytes()
    assert streamed["shipped"][0]["tensors"] == []  # every tensor copied, none rewritten
    # the existing in-memory path: the one-shot search's plan, exported
    spec = ModelSpec(str(gguf))
    found = jobs.search(SearchSettings(spec, remove=2, method="bi", ctx=32, windows=2))
    assert found.plan.to_text() == streamed["plan"]
    jobs.export(ExportSettings(spec, found.plan.to_text(), out=str(tmp_path / "exported.gguf"), eval_windows=0))
    assert (tmp_path / "exported.gguf").read_bytes() == written


def test_one_shot_prune_refuses_what_needs_the_whole_model():
    with pytest.raises(SettingsError, match="--method bi"):
        PruneSettings(streamed=True)
    with pytest.raises(SettingsError, match="drop --heal lora"):
        PruneSettings(method="bi", recovery=RecoverSettings(method="lora"))
    assert PruneSettings(method="bi").heal == "auto"  # the default: nothing to recover on this path
    with pytest.raises(SettingsError, match="--drop or --layers"):
        PruneSettings(method="cosine", target_speedup=1.2, recovery=RecoverSettings(method="none"))
    with pytest.raises(SettingsError, match="--granularity layer"):
        PruneSettings(method="angular", granularity="attn", recovery=RecoverSettings(method="none"))
