"""The edge contract: every bad input is one line on stderr, exit code 2, no traceback, checked before any
model loads, and every file that existed before is byte-identical afterwards (nothing a user had is lost)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerlab.cli import main
from layerlab.io import manifest, own_folder, update_file, write_manifest
from layerlab.models import EMBEDDED

SMOLLM2_GGUF = EMBEDDED["smollm2-135m"].locate


@dataclass
class Case:
    name: str
    argv: str  # {tmp}: the case's folder, {tiny}: a tiny model folder inside it, {gguf}: the smollm2 GGUF
    needle: str  # a piece of the one-line message
    setup: Callable[[Path], None] | None = None  # creates the files the case needs
    patches: tuple[tuple[str, object], ...] = ()  # (attribute path, value) set for the case
    hidden: tuple[str, ...] = ()  # modules that cannot be imported during the case (an extra not installed)


# ------------------------------------------------------------------------------------------ setups
def user_folder(tmp: Path) -> None:
    """A folder of the user's own, which layerlab never wrote."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my notes")


def layerlab_run(tmp: Path) -> None:
    """A run folder layerlab wrote (manifest, and the files it lists)."""
    folder = own_folder(tmp / "run", "prune", run={})
    update_file(folder / "search.json", json.dumps({"producer": "layerlab"}))


def layerlab_run_with_user_file(tmp: Path) -> None:
    layerlab_run(tmp)
    (tmp / "run" / "thesis.tex").write_text("mine")


def plan_file(name: str, content: str | bytes):
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def text_file(name: str, content: str):
    return plan_file(name, content)


def gguf_prefix(length: int):
    def setup(tmp: Path) -> None:
        with open(SMOLLM2_GGUF(), "rb") as handle:
            (tmp / "bad.gguf").write_bytes(handle.read(length))
    return setup


def config_only(model_type: str, **extra):
    def setup(tmp: Path) -> None:
        (tmp / "m").mkdir()
        (tmp / "m" / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2,
                                                          **extra}))
    return setup


def with_weights(setup_config):
    def setup(tmp: Path) -> None:
        setup_config(tmp)
        (tmp / "m" / "model.safetensors").write_bytes(b"\0" * 16)
    return setup


def search_state(content: str):
    return plan_file("state.json", content)


def prune_run_with(settings_args: list[str]):
    """A real run record, as a prune with these options would have written it (no model needed)."""
    def setup(tmp: Path) -> None:
        from dataclasses import replace

        from layerlab.prune import _record
        from layerlab.settings import QUICK_EVAL, ModelSpec, PruneSettings

        info = ModelSpec(str(tmp / "tiny")).inspect()
        windows = int(settings_args[1])
        record = _record(info, PruneSettings(evaluation=replace(QUICK_EVAL, ppl_windows=windows)))
        folder = own_folder(tmp / "run", "prune", run=record)
        update_file(folder / "search.json", json.dumps({"producer": "layerlab"}))
    return setup


def mergekit(body: str):
    return plan_file("merge.yaml", body)


WITHOUT_LLAMA_CPP = (("layerlab.quant.LLAMA_CPP_MODULE", "no_such_llama_cpp"),)  # as if the extra were missing
MERGEKIT_HEAD = "merge_method: passthrough\nslices:\n  - sources:\n      - model: M\n"

CASES = [
    # data loss: --force replaces only what layerlab wrote, only after every check, never an input
    Case("force-on-a-user-folder", "prune -m {tiny} --force --out {tmp}/mine", "not written by layerlab", user_folder),
    Case("prune-into-a-user-folder", "prune -m {tiny} --out {tmp}/mine", "not written by layerlab", user_folder),
    Case("window-longer-than-the-model-allows", "score -m {tiny} --ctx 4096", "positions the model was built for"),
    Case("model-neither-local-nor-reachable", "eval -m nobody/no-such-model", "cannot be reached"),
    Case("force-with-a-bad-budget", "prune -m {tiny} --force --drop 150% --out {tmp}/run", "between 0 and 1",
         layerlab_run),
    Case("force-with-a-missing-calibration", "prune -m {tiny} --force --calibration {tmp}/nope.txt --out {tmp}/run",
         "nope.txt", layerlab_run),
    Case("force-on-a-folder-holding-user-files", "prune -m {tiny} --force --out {tmp}/run", "thesis.tex",
         layerlab_run_with_user_file),
    Case("prune-into-the-input-model", "prune -m {tiny} --force --out {tiny}", "is the input"),
    Case("prune-into-the-input-models-parent", "prune -m {tiny} --force --out {tmp}", "holds the input"),
    Case("export-over-the-input", "export -m {tiny} -p skip:1 --force --out {tiny}", "is the input"),
    Case("export-over-the-inputs-parent", "export -m {tiny} -p skip:1 --force --out {tmp}", "holds the input"),
    Case("export-inside-the-input", "export -m {tiny} -p skip:1 --out {tiny}/smaller", "inside the input folder"),
    Case("export-gguf-over-the-gguf", "export -m {tmp}/copy.gguf -p skip:1 -f gguf --force --out {tmp}/copy.gguf",
         "is the input", lambda tmp: shutil.copy(SMOLLM2_GGUF(), tmp / "copy.gguf")),
    Case("eval-force-over-a-user-file", "eval -m {tiny} --force --out {tmp}/mine.json", "not written by layerlab",
         text_file("mine.json", '{"mine": 1}')),
    Case("eval-out-is-the-plan-file", "eval -m {tiny} -p {tmp}/plan.json --force --out {tmp}/plan.json",
         "is the input", plan_file("plan.json", '{"plan": "skip:1"}')),
    Case("search-state-exists-without-resume", "search -m {tiny} --remove 1 --state {tmp}/state.json",
         "--force", search_state('{"producer": "layerlab"}')),
    Case("heal-out-is-the-healing-text", "heal -m {tiny} --data {tmp}/t.txt --out {tmp}/t.txt --force",
         "is a file", text_file("t.txt", "some text " * 100)),
    Case("heal-out-holds-the-healing-text", "heal -m {tiny} --data {tmp}/d/t.txt --out {tmp}/d --force",
         "holds the input", lambda tmp: (tmp / "d").mkdir() or (tmp / "d" / "t.txt").write_text("some text " * 99)),
    # silently wrong before: now refused
    Case("plan-file-string-false", "generate -m {tiny} -p {tmp}/p.json", "write true or false",
         plan_file("p.json", '{"steps": [{"layer": 0, "attention": "false"}, 1]}')),
    Case("plan-file-string-off", "generate -m {tiny} -p {tmp}/p.json", "write true or false",
         plan_file("p.json", '{"steps": [{"layer": 0, "mlp": "off"}, 1]}')),
    Case("plan-file-misspelt-key", "generate -m {tiny} -p {tmp}/p.json", "unknown key 'atention'",
         plan_file("p.json", '{"steps": [{"layer": 0, "atention": false}]}')),
    Case("plan-file-unknown-top-key", "generate -m {tiny} -p {tmp}/p.json", "unknown key 'stepz'",
         plan_file("p.json", '{"steps": [0, 1], "stepz": 1}')),
    Case("plan-file-number-as-bool", "generate -m {tiny} -p {tmp}/p.json", "write true or false",
         plan_file("p.json", '{"steps": [{"layer": 0, "attention": 0}]}')),
    Case("llama-cpp-flags-too-many", "generate -m {tiny} -p {tmp}/f.json", "7 entries",
         plan_file("f.json", '{"llama_cpp_skip_flags": [0, 0, 0, 0, 0, 0, 3]}')),
    Case("llama-cpp-flags-too-few", "generate -m {tiny} -p {tmp}/f.json", "5 entries",
         plan_file("f.json", '{"llama_cpp_skip_flags": [0, 0, 0, 0, 3]}')),
    Case("llm-drop-bool-index", "generate -m {tiny} -p {tmp}/d.json", "not an integer",
         plan_file("d.json", '{"drop_attn_list": [true]}')),
    Case("resume-prune-with-other-eval-windows", "prune -m {tiny} --resume --ppl-windows 3 --out {tmp}/run",
         "evaluation.ppl_windows", prune_run_with(["--ppl-windows", "8"])),
    Case("resume-search-with-another-text", "search -m {tiny} --remove 2 --ctx 32 --windows 1 --text {tmp}/b.txt "
         "--state {tmp}/state.json --resume", "another calibration text"),
    Case("corrupt-search-state", "search -m {tiny} --remove 1 --state {tmp}/state.json --resume",
         "not a search state", search_state('{"plan": 3, "trace": "x"')),
    # security
    Case("remote-code-folder", "generate -m {tmp}/m", "--trust-remote-code",
         with_weights(config_only("evil", auto_map={"AutoConfig": "x.Y"}))),
    # tracebacks before: one line now
    Case("huge-repeat", "generate -m {tiny} -p 0x1000000000", "bad plan token"),
    Case("large-repeat", "generate -m {tiny} -p 0x99999", "longer than 16 x"),
    Case("huge-layer-number", "plan show " + "7" * 120_000 + " --layers 30", "at most 100,000 characters"),
    Case("long-layer-number", "plan show " + "7" * 5000 + " --layers 30", "bad plan token"),
    Case("mergekit-string-range", "plan from-mergekit {tmp}/merge.yaml --layers 6", "two integers",
         mergekit(MERGEKIT_HEAD + "        layer_range: '0-3'\n")),
    Case("mergekit-missing-range", "plan from-mergekit {tmp}/merge.yaml --layers 6", "two integers",
         mergekit(MERGEKIT_HEAD)),
    Case("mergekit-reversed-range", "plan from-mergekit {tmp}/merge.yaml --layers 6", "reversed",
         mergekit(MERGEKIT_HEAD + "        layer_range: [4, 2]\n")),
    Case("mergekit-not-yaml", "plan from-mergekit {tmp}/merge.yaml --layers 6", "not valid YAML",
         mergekit("slices: [\n")),
    Case("binary-plan-file", "plan show {tmp}/p.json --layers 6", "not UTF-8",
         plan_file("p.json", bytes(range(256)))),
    Case("plan-file-is-a-folder", "plan show {tmp}/p.yaml --layers 6", "is not a file",
         lambda tmp: (tmp / "p.yaml").mkdir()),
    Case("empty-gguf", "generate -m {tmp}/bad.gguf", "not a readable GGUF", gguf_prefix(0)),
    Case("truncated-gguf", "generate -m {tmp}/bad.gguf", "not a readable GGUF", gguf_prefix(5000)),
    Case("corrupt-gguf", "generate -m {tmp}/bad.gguf", "not a readable GGUF",
         plan_file("bad.gguf", os.urandom(4096))),
    Case("model-type-typo", "generate -m {tmp}/m", "'lama'", with_weights(config_only("lama"))),
    Case("unsupported-architecture", "generate -m {tmp}/m", "not supported", with_weights(config_only("bert"))),
    Case("config-without-weights", "generate -m {tmp}/m", "no weights", config_only("llama")),
    Case("cuda-on-a-cpu-torch", "generate -m {tiny} --device cuda", "no CUDA device"),
    Case("bad-device", "generate -m {tiny} --device gpu0", "unknown device"),
    Case("empty-task-file", "eval -m {tiny} --tasks hellaswag --task-data {tmp}", "holds no rows",
         text_file("hellaswag_val.jsonl", "")),
    Case("task-label-out-of-range", "eval -m {tiny} --tasks hellaswag --task-data {tmp}", "hellaswag_val.jsonl:1",
         text_file("hellaswag_val.jsonl", '{"query": "q", "endings": ["a", "b"], "label": 5}\n')),
    Case("task-data-not-a-folder", "eval -m {tiny} --tasks arc_easy --task-data {tmp}/none", "does not exist"),
    Case("ppl-text-shorter-than-a-window", "eval -m {tiny} --tasks ppl --ppl-text {tmp}/s.txt --out {tmp}/r.json",
         "fewer than one window", text_file("s.txt", "Too short.")),
    Case("eval-unknown-task", "eval -m {tiny} --tasks bogus", "unknown task 'bogus'"),
    Case("eval-out-under-a-file", "eval -m {tiny} --out {tmp}/f.txt/r.json", "is a file",
         text_file("f.txt", "x")),
    Case("generate-empty-prompt", "generate -m {tiny} --prompt ''", "prompt is empty"),
    Case("speculate-empty-prompt", "speculate -m {tiny} -d skip:1 --prompt ''", "prompt is empty"),
    Case("speculate-blank-prompt", "speculate -m {tiny} -d skip:1 --prompt '   '", "prompt is empty"),
    Case("missing-model", "generate -m {tmp}/nothing", "not a Hugging Face folder"),
    Case("negative-windows", "score -m {tiny} --windows 0", "at least 1"),
    Case("drop-not-a-share", "prune -m {tiny} --drop lots --out {tmp}/o", "not a share"),
    Case("two-budgets", "prune -m {tiny} --drop 20% --layers 2 --out {tmp}/o", "at most one"),
    Case("too-many-layers", "prune -m {tiny} --layers 6 --out {tmp}/o", "ask for 1 to 5"),
    Case("search-without-a-budget", "search -m {tiny}", "exactly one of"),
    Case("heal-on-the-eval-text", "heal -m {tiny} --data wikitext2-test --out {tmp}/h", "evaluation text"),
    Case("heal-resume-and-force", "heal -m {tiny} --resume --force --out {tmp}/h", "give one"),
    Case("unknown-dtype", "generate -m {tiny} --dtype float8", "float8"),
    Case("nan-temperature", "speculate -m {tiny} -d skip:1 --prompt hi --sample --temperature nan", "temperature"),
    Case("huge-seed", "generate -m {tiny} --seed 99999999999999999999999", "seed"),
    Case("infinite-target-speedup", "search -m {tiny} --target-speedup inf", "larger than 1"),
    Case("keep-zero", "prune -m {tiny} --keep 0 --out {tmp}/o", "--keep"),
    # shipping: quant types and formats
    Case("export-unknown-quant", "export -m {tiny} -p skip:1 --quant Q7_0 --out {tmp}/o", "unknown quantization type"),
    Case("prune-unknown-quant", "prune -m {tiny} --quant q4 --out {tmp}/o", "unknown quantization type 'q4'"),
    Case("export-quantized-folder", "export -m {tiny} -p skip:1 -f hf --quant Q4_0 --out {tmp}/o",
         "folder holds float weights"),
    Case("prune-mixture-into-a-folder", "prune -m {tiny} -f hf --quant Q8_0/Q4_0@Q5_0 --out {tmp}/o",
         "folder holds float weights"),
    Case("mixed-precision-without-budget", "export -m {tiny} -p skip:1 --quant Q8_0/Q4_0 --out {tmp}/o",
         "needs a byte budget"),
    Case("export-k-quant-without-the-extra", "export -m smollm2-135m -p skip:1 --quant Q4_K_M --out {tmp}/o.gguf",
         "'llamacpp' extra", patches=WITHOUT_LLAMA_CPP),
    Case("prune-k-quant-without-the-extra", "prune -m smollm2-135m --quant Q6_K --out {tmp}/o",
         "pip install 'layerlab[llamacpp]'", patches=WITHOUT_LLAMA_CPP),
    Case("export-gguf-without-its-suffix", "export -m smollm2-135m -p skip:1 --out {tmp}/smaller", "use "),
    Case("export-gguf-from-a-folder", "export -m {tiny} -p skip:1 -f gguf --out {tmp}/o.gguf", "not a .gguf file"),
    Case("prune-gguf-from-a-folder", "prune -m {tiny} -f gguf --out {tmp}/o", "not a .gguf file"),
    Case("export-sublayer-plan-into-gguf", "export -m smollm2-135m -p attn-skip:3 --out {tmp}/o.gguf",
         "whole layers only"),
    Case("prune-sublayer-search-into-gguf", "prune -m smollm2-135m --granularity attn --out {tmp}/o",
         "whole layers only"),
    # KV sharing and KV caches: refused from the plan and the config, before the model loads
    Case("kv-source-runs-later", "generate -m {tiny} -p 'kv:1<-3'", "comes later"),
    Case("kv-source-skipped", "generate -m {tiny} -p 'skip:1; kv:2<-1'", "skipped"),
    Case("kv-chain", "generate -m {tiny} -p 'kv:2<-1,1<-0'", "instead of a chain"),
    Case("kv-sources-file-not-a-map", "generate -m {tiny} -p {tmp}/p.json", "must map consumer layers",
         plan_file("p.json", '{"plan": "all", "kv_sources": {"2": "one"}}')),
    Case("kv-sliding-reads-global", "generate -m {tmp}/m -p 'kv:1<-0'", "same attention type",
         with_weights(config_only("gemma3_text", layer_types=["full_attention", "sliding_attention"]))),
    Case("kv-cache-the-model-cannot-take", "eval -m {tmp}/m --tasks ppl --kv-cache fp8 --out {tmp}/r.json",
         "all use full attention",
         with_weights(config_only("gemma3_text", layer_types=["full_attention", "sliding_attention"]))),
    Case("kv-cache-with-a-result-store", "eval -m {tiny} --tasks ppl --kv-cache int8 --store {tmp}/s",
         "--store keeps results without the KV cache type"),
    Case("kv-search-with-a-layer-budget", "search -m {tiny} --kv --remove 2", "--kv takes its budget as --fraction"),
    Case("kv-search-budget-not-a-share", "search -m {tiny} --kv --fraction 1.5", "between 0 and 1"),
    Case("kv-search-negative-tolerance", "search -m {tiny} --kv --tolerance -1", "tolerance"),
    Case("kv-search-from-a-kv-plan", "search -m {tiny} --kv --start 'kv:2<-1'", "without a kv: clause"),
    Case("start-without-kv", "search -m {tiny} --remove 1 --start skip:1", "add --kv"),
    Case("kv-plan-to-gguf", "export -m {tmp}/copy.gguf -p 'kv:2<-1' -f gguf --out {tmp}/o.gguf",
         "cannot carry KV sharing", lambda tmp: shutil.copy(SMOLLM2_GGUF(), tmp / "copy.gguf")),
    Case("calibration-shorter-than-a-window", "prune -m {tiny} --layers 1 --calibration {tmp}/s.txt --out {tmp}/o",
         "fewer than one window", text_file("s.txt", "Far too short to calibrate on.")),
    # parallel search on Ray: refused before Ray starts or the model loads
    Case("workers-zero", "search -m {tiny} --remove 1 --workers 0", "--workers must be at least 1"),
    Case("ray-address-unreachable", "search -m {tiny} --remove 1 --workers 2 --ray-address 127.0.0.1:9",
         "nothing answers there"),
    Case("ray-address-not-an-address", "search -m {tiny} --remove 1 --workers 2 --ray-address 'a b'",
         "is not HOST:PORT"),
    Case("ray-not-installed", "search -m {tiny} --remove 1 --workers 2", "pip install 'layerlab[ray]'",
         hidden=("ray",)),
    Case("eval-ray-not-installed", "eval -m {tiny} --workers 2", "pip install 'layerlab[ray]'", hidden=("ray",)),
    Case("workers-with-a-one-shot-method", "search -m {tiny} --remove 1 --method bi --workers 2", "drop --workers"),
    Case("streamed-greedy", "search -m {tiny} --remove 1 --streamed", "--streamed"),
    Case("streamed-with-ppl-delta", "score -m {tiny} --streamed --ppl-delta", "drop --streamed or --ppl-delta"),
    # recovery: a patch over a removal it cannot express, short calibration text, a teacher that is not the full model
    Case("heal-patch-over-a-half", "heal -m {tiny} -p attn-skip:1 --method patch --out {tmp}/h", "drops only a half"),
    Case("heal-patch-over-layer-0", "heal -m {tiny} -p skip:0 --method patch --out {tmp}/h", "removes layer 0"),
    Case("heal-patch-over-a-reorder", "heal -m {tiny} -p 0,2,1,3,4,5 --method patch+kd --out {tmp}/h",
         "repeats or reorders"),
    Case("prune-patch-on-halves", "prune -m {tiny} --heal patch --granularity sublayer --out {tmp}/o",
         "patches whole removed layers"),
    Case("heal-kd-teacher-not-full", "heal -m {tiny} -p skip:1 --method kd --teacher skip:2 --out {tmp}/h",
         "teacher must be the full model"),
    Case("heal-calibration-budget-too-small", "heal -m {tiny} -p skip:1 --method patch --calib-tokens 100 "
         "--out {tmp}/h", "raise it to at least 768"),
    Case("heal-calibration-text-too-short", "heal -m {tiny} -p skip:1 --method patch --calibration {tmp}/s.txt "
         "--calib-tokens 512 --out {tmp}/h", "fewer than one window", text_file("s.txt", "Far too short.")),
    Case("heal-patch-on-the-eval-text", "heal -m {tiny} -p skip:1 --method patch --calibration wikitext2-test "
         "--out {tmp}/h", "evaluation text"),
]
TINY: list[Path] = []


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`, with the sha256 of each file (folders as 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def tiny_source(tiny_folder):
    TINY[:] = [tiny_folder]


def run_case(case: Case, tmp: Path, monkeypatch, capfd) -> tuple[int, list[str], dict]:
    """Set the case up, snapshot the folder, run the command in-process: (exit code, stderr lines, snapshot)."""
    import shlex

    if not (tmp / "tiny").exists():
        shutil.copytree(TINY[0], tmp / "tiny")
    if case.setup:
        case.setup(tmp)
    monkeypatch.setattr("layerlab.models.load", _no_model_load)  # every case is refused before the model loads
    for target, value in case.patches:
        monkeypatch.setattr(target, value)
    for module in case.hidden:
        monkeypatch.setitem(sys.modules, module, None)  # find_spec answers None, import fails
    argv = shlex.split(case.argv.replace("{tmp}", str(tmp)).replace("{tiny}", str(tmp / "tiny")))
    before = snapshot(tmp)
    capfd.readouterr()
    code = main(argv)
    return code, capfd.readouterr().err.strip().splitlines(), before


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model loaded before the bad input was refused")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, tmp_path, monkeypatch, capfd):
    if case.name == "resume-search-with-another-text":
        _started_search(tmp_path, capfd)
    code, lines, before = run_case(case, tmp_path, monkeypatch, capfd)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.needle in lines[0], lines
    assert "Traceback" not in lines[0]
    assert snapshot(tmp_path) == before, "a file changed, appeared or vanished"


def _started_search(tmp: Path, capfd) -> None:
    """A search state written on one text, to be resumed with another."""
    shutil.copytree(TINY[0], tmp / "tiny")
    from layerlab.corpora import read_text

    for name, start in (("a.txt", 0), ("b.txt", 20_000)):
        (tmp / name).write_text(read_text("wikitext2-valid")[start:start + 20_000])
    code = main(["search", "-m", str(tmp / "tiny"), "--remove", "2", "--ctx", "32", "--windows", "1", "--text",
                 str(tmp / "a.txt"), "--state", str(tmp / "state.json")])
    assert code == 0
    state = json.loads((tmp / "state.json").read_text())
    state["trace"] = state["trace"][:1]  # as if interrupted after the first round
    update_file(tmp / "state.json", json.dumps(state))
    capfd.readouterr()


# ------------------------------------------------------------------------------------------ what does work
def test_force_replaces_a_layerlab_folder_only_after_the_new_one_is_complete(tmp_path, tiny_folder):
    out = tmp_path / "export"
    assert main(["export", "-m", str(tiny_folder), "-p", "skip:1", "--eval-windows", "0", "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(["export", "-m", str(tiny_folder), "-p", "skip:1-2", "--eval-windows", "0", "--out", str(out),
                 "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_written_files_get_the_usual_permissions(tmp_path, tiny_folder):
    old = os.umask(0o022)
    try:
        assert main(["export", "-m", str(tiny_folder), "-p", "skip:1", "--eval-windows", "0", "--out",
                     str(tmp_path / "e")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "e").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o755


def test_a_folder_asking_for_remote_code_of_a_known_type_loads_without_running_it(tmp_path, tiny_folder):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                    "from transformers import LlamaForCausalLM as Evil\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "layerlab.cli", "generate", "-m", str(folder), "-n", "2"],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


def test_an_unexpected_error_is_one_line_with_exit_1_and_debug_shows_the_traceback(monkeypatch, capfd, tiny_folder):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("layerlab.jobs.generate", broken)
    assert main(["generate", "-m", str(tiny_folder)]) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unexpected RuntimeError: boom second line" in lines[0] and "--debug" in lines[0]
    assert main(["generate", "-m", str(tiny_folder), "--debug"]) == 1
    assert "Traceback" in capfd.readouterr().err


def test_help_does_not_import_torch():
    code = "import sys; from layerlab.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().endswith("False"), result.stdout[-500:]


@pytest.mark.slow
def test_plan_error_through_lm_eval_is_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "layerlab", "--model_args",
         "model=smollm2-135m,plan=skip:99", "--tasks", "hellaswag", "--limit", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: plan token 'skip:99'") or \
        "names layer 99" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_during_prune_leaves_no_staging_folder_and_the_run_resumes(tmp_path, tiny_folder):
    """SIGTERM arrives while the export is being written (deterministically: the save sends it to itself)."""
    out = tmp_path / "run"
    script = f"""
import os, signal, sys
import transformers
original = transformers.PreTrainedModel.save_pretrained
def save_then_terminate(self, *args, **kwargs):
    original(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
transformers.PreTrainedModel.save_pretrained = save_then_terminate
from layerlab.cli import main
sys.exit(main(["prune", "-m", {str(tiny_folder)!r}, "--layers", "1", "--ctx", "32", "--windows", "1",
               "--ppl-windows", "1", "--rows", "2", "--out", {str(out)!r}]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "terminated"
    leftovers = [p.name for p in out.rglob("*") if ".layerlab-" in p.name]
    assert not leftovers and not (out / "model").exists()
    assert (out / "eval.json").is_file(), "finished steps are kept for --resume"


def test_a_run_that_fails_before_finishing_a_step_leaves_no_folder(tmp_path, tiny_folder, monkeypatch, capfd):
    def failing(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("layerlab.prune.similarity", failing)
    out = tmp_path / "run"
    assert main(["prune", "-m", str(tiny_folder), "--layers", "1", "--ctx", "32", "--out", str(out)]) == 1
    assert "disk on fire" in capfd.readouterr().err
    assert not out.exists()


def test_a_written_manifest_is_what_force_trusts(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    write_manifest(folder, manifest("export", names=["a"]))
    (folder / "a").write_text("1")
    from layerlab.io import check_output

    check_output(folder, folder=True, force=True)  # layerlab's, nothing else in it: may be replaced
