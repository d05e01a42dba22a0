"""Shipping what you prune: GGUF exports in the source's quantization, re-quantized changed tensors, the
Q/K permutation, quant types and mixed precision, the source's dtype for folders, errors before any work,
and measuring the written file as loaded back from disk."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize
from tiny_gguf import tiny_hf, write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerlab
from layerlab import Plan, PlanError, apply_plan
from layerlab.errors import MissingExtraError, SettingsError
from layerlab.evaluate.artifact import ArtifactSettings, load_file, measure_export
from layerlab.export import prepare_export, write_export
from layerlab.export.gguf import gguf_layer_types
from layerlab.export.gguf_weights import permute
from layerlab.export.quant import Target, anchored, choose_types, closest, roundtrip, tensor_bytes
from layerlab.io import OutputExistsError
from layerlab.quant import Quant, llama_cpp_available
from layerlab.settings import ExportSettings, ModelSpec

IDS = torch.tensor([[5, 70, 33, 120, 256, 9, 200, 41, 18, 77, 3, 250]])
LAYERS = 12
PLAN = "skip:0-5"  # a whole group of six: Gemma 3's global layers keep their llama.cpp positions


def shipping(source, out, **kwargs) -> ExportSettings:
    return ExportSettings(model=ModelSpec(str(source)), out=str(out), **kwargs)


def export_gguf(source, plan_text, out, quant="source", model=None, layers=LAYERS, **kwargs):
    plan = Plan.parse(plan_text, layers)
    return write_export(prepare_export(shipping(source, out, quant=quant), plan), plan, model, **kwargs)


def tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    """(arch, HF model, its F32 GGUF, a Q8_0 GGUF of it written by layerlab's export)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_hf(request.param, layers=LAYERS)
    f32 = write_tiny_gguf(model, request.param, folder / "f32.gguf")
    q8 = export_gguf(f32, "all", folder / "q8.gguf", quant="Q8_0", changed=()).path
    return request.param, model, f32, q8


@torch.no_grad()
def test_hf_to_gguf_to_hf_gives_the_same_logits(tiny):
    arch, model, f32, _ = tiny
    back, _ = load_file(f32)
    assert (back(IDS).logits - model(IDS).logits).abs().max() <= 1e-5
    for name, value in model.state_dict().items():  # exact, up to Gemma's norm +1/-1 rounding
        assert torch.allclose(back.state_dict()[name], value, rtol=0, atol=1e-6), name


def test_the_permutation_is_the_one_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    undo = LlamaTensorProcessor()._reverse_permute_weights
    assert np.array_equal(undo(permute(weights, 8), 8, 8), weights)
    assert np.array_equal(undo(permute(weights, 2), 8, 2), weights)  # keys: as many heads as KV heads
    # within a head, rows 0..d/2-1 (first rotary half) and d/2..d-1 (second half) become interleaved pairs
    head = permute(np.arange(16, dtype=np.float32)[:, None], 1)[:, 0]
    assert head.tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


@torch.no_grad()
def test_a_pruned_gguf_copies_untouched_tensors_bit_for_bit_and_gives_the_plans_logits(tiny, tmp_path):
    arch, _, _, q8 = tiny
    model, _ = load_file(q8)
    result = export_gguf(q8, PLAN, tmp_path / "pruned.gguf", model=model)  # compares: nothing changed
    assert {t.action for t in result.tensors} == {"copied"}
    source, out = tensors(q8), tensors(result.path)
    renumber = {f"blk.{new}.": f"blk.{new + 6}." for new in range(6)}
    for name, tensor in out.items():
        original = source[next((name.replace(n, o, 1) for n, o in renumber.items() if name.startswith(n)), name)]
        assert tensor.tensor_type == original.tensor_type and bytes(tensor.data) == bytes(original.data), name
    assert result.bytes == result.path.stat().st_size and result.ratio <= result.ideal_ratio + 0.01
    pruned, _ = load_file(result.path)
    with apply_plan(model, Plan.parse(PLAN, LAYERS)):
        assert (pruned(IDS).logits - model(IDS).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_changed_weights_are_found_and_quantized_back_to_the_source_type(tiny, tmp_path):
    arch, _, _, q8 = tiny
    model, _ = load_file(q8)
    edited = model.model.layers[9].mlp.down_proj.weight
    edited.add_(torch.randn_like(edited) * 0.01)
    model.model.layers[9].post_attention_layernorm.weight.add_(0.05)
    model.model.layers[2].mlp.up_proj.weight.add_(0.05)  # dropped by the plan: not written
    result = export_gguf(q8, PLAN, tmp_path / "edited.gguf", model=model)
    norm = "blk.3.ffn_norm.weight" if arch == "llama" else "blk.3.post_attention_norm.weight"
    changed = {t.name: t for t in result.tensors if t.action != "copied"}
    assert set(changed) == {"blk.3.ffn_down.weight", norm}  # layer 9 is the output's block 3
    assert changed["blk.3.ffn_down.weight"].type == "Q8_0" and changed[norm].type == "F32"
    written = tensors(result.path)["blk.3.ffn_down.weight"]
    from gguf.quants import quantize

    expected = quantize(edited.numpy().astype(np.float32), T.Q8_0)
    assert bytes(written.data) == expected.tobytes()  # exactly the re-quantized edited weight
    offset = 1.0 if arch == "gemma3" else 0.0
    assert np.allclose(dequantize(tensors(result.path)[norm].data, T.F32),
                       model.model.layers[9].post_attention_layernorm.weight.numpy() + offset, atol=1e-6)


def test_an_explicit_set_of_changed_tensors_skips_the_comparison(tiny, tmp_path):
    _, _, _, q8 = tiny
    model, _ = load_file(q8)
    result = export_gguf(q8, "all", tmp_path / "f32.gguf", quant="F32", model=model,
                         changed={"blk.0.attn_q.weight"})
    actions = {t.name: (t.action, t.type) for t in result.tensors}
    assert actions["blk.0.attn_q.weight"] == ("rewritten", "F32")
    assert actions["blk.0.attn_k.weight"] == ("requantized", "F32") and actions["blk.0.attn_norm.weight"][0] == "copied"


@torch.no_grad()
def test_requantizing_to_another_type_keeps_the_values_close(tiny, tmp_path):
    _, _, f32, q8 = tiny
    result = export_gguf(f32, "all", tmp_path / "q4.gguf", quant="Q4_0", changed=())
    types = {t.name: t.type for t in result.tensors}
    assert all(types[n] == ("F32" if "norm" in n else "Q4_0") for n in types)
    assert result.bytes < 0.45 * f32.stat().st_size
    q8_model, _ = load_file(q8)
    q4_model, _ = load_file(result.path)
    f32_model, _ = load_file(f32)
    err = {name: (m(IDS).logits - f32_model(IDS).logits).abs().max().item() for name, m in
           (("q8", q8_model), ("q4", q4_model))}
    assert 0 < err["q8"] < err["q4"] < 1.0


def test_a_small_edit_does_not_decide_the_rounding_ties_of_another_type():
    """Weights sitting on Q4_0 rounding ties plus an edit far below one step: rounded as they are,
    every tie follows the edit's sign (the edit amplified to half a step); anchored, the ties round as
    for the unedited weights, and weights off the ties still take the edit as it is."""
    rng = np.random.default_rng(0)
    step = 0.01
    levels = rng.integers(-7, 7, size=(64, 32)).astype(np.float32)
    levels[:, 0] = -8  # the block's largest magnitude fixes Q4_0's step at `step`
    old = (levels * step).astype(np.float32)
    old[:, 1::2] += np.float32(step / 2)  # every other weight exactly on a tie
    edit = np.float32(1e-4) * np.sign(rng.standard_normal(old.shape)).astype(np.float32)
    edit[:, 0] = 0
    new = old + edit
    plain, direct = roundtrip(old, T.Q4_0), roundtrip(new, T.Q4_0)
    fixed = roundtrip(anchored(new, old, T.Q4_0), T.Q4_0)
    assert np.abs(direct - plain).max() == pytest.approx(step, rel=1e-3)  # the problem: ties flipped by the edit
    np.testing.assert_array_equal(fixed, plain)  # no tie flipped: the edit is below half a step everywhere
    np.testing.assert_array_equal(anchored(new, old, T.Q4_0)[:, 2::2], new[:, 2::2])  # off the ties: as it is
    np.testing.assert_array_equal(anchored(new, old, T.F32), new)  # nothing to anchor in F32


def test_closest_type_by_bits_per_weight():
    numpy_types = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0)
    assert closest(T.Q4_K, (8, 256), numpy_types) == T.Q4_0  # 4.5 bits each
    assert closest(T.Q6_K, (8, 256), numpy_types) == T.Q5_1  # 6.56: 6.0 is nearer than 8.5
    assert closest(T.Q4_0, (8, 48), numpy_types) == T.F16  # 48 values per row fit no 32-blocks
    assert closest(T.Q8_0, (8, 64), numpy_types) == T.Q8_0


def test_mixed_precision_upgrades_embeddings_then_the_most_sensitive_layers_within_the_budget():
    shape = (64, 256)
    names = ["token_embd.weight", "output_norm.weight"] + [f"blk.{j}.{w}.weight" for j in range(4)
                                                           for w in ("attn_q", "ffn_down", "attn_norm")]
    spec = {n: ((256,) if "norm" in n else shape, T.F32) for n in names}
    quant = Quant.parse("Q8_0/Q4_0@Q5_1")
    targets = choose_types(quant, spec, importance={"blk.0": 0.1, "blk.1": 0.9, "blk.2": 0.5, "blk.3": 0.2})
    kinds = {n: t.type for n, t in targets.items()}
    # per 64x256 tensor (8 blocks a row): Q4_0 64*8*18 = 9216 bytes, Q5_1 64*8*24 = 12288, Q8_0 64*8*34 = 17408;
    # budget: 9 tensors at Q5_1 = 110592; all at Q4_0 = 82944, and each upgraded tensor adds 8192:
    # the embeddings (1 tensor) and blk.1 (2) fit (107520), blk.2 would not (123904)
    assert kinds["token_embd.weight"] == kinds["blk.1.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == T.Q8_0
    assert {kinds[f"blk.{j}.attn_q.weight"] for j in (0, 2, 3)} == {T.Q4_0}
    assert kinds["blk.1.attn_norm.weight"] == T.F32 and kinds["output_norm.weight"] == T.F32
    used = sum(tensor_bytes(kinds[n], spec[n][0]) for n in names if "norm" not in n)
    assert used == 82944 + 3 * 8192 <= 9 * tensor_bytes(T.Q5_1, shape)


def test_source_quant_keeps_each_type_and_says_when_it_cannot(monkeypatch):
    monkeypatch.setattr("layerlab.quant.LLAMA_CPP_MODULE", "no_such_llama_cpp")
    spec = {"blk.0.attn_q.weight": ((8, 256), T.Q4_K), "blk.0.ffn_down.weight": ((8, 256), T.Q6_K)}
    targets = choose_types(Quant.parse("source"), spec, changed={"blk.0.attn_q.weight"})
    assert targets["blk.0.attn_q.weight"].type == T.Q4_0 and "closest Q4_0" in targets["blk.0.attn_q.weight"].note
    assert "layerlab[llamacpp]" in targets["blk.0.attn_q.weight"].note
    assert targets["blk.0.ffn_down.weight"] == Target(T.Q6_K)  # unchanged: copied as it is


def test_bad_settings_are_one_line_errors(monkeypatch):
    with pytest.raises(SettingsError, match="unknown quantization type 'Q7_0'.*choose from source"):
        ExportSettings(quant="Q7_0")
    with pytest.raises(SettingsError, match="folder holds float weights: --quant Q4_0 needs --format gguf"):
        ExportSettings(format="hf", quant="Q4_0")
    with pytest.raises(SettingsError, match="unknown export format 'onnx'"):
        ExportSettings(format="onnx")
    with pytest.raises(SettingsError, match="HIGH must have more bits"):
        ExportSettings(quant="Q4_0/Q8_0@Q5_0")
    with pytest.raises(SettingsError, match="needs a byte budget"):
        ExportSettings(quant="Q8_0/Q4_0")
    monkeypatch.setattr("layerlab.quant.LLAMA_CPP_MODULE", "no_such_llama_cpp")
    with pytest.raises(MissingExtraError, match=r"Q4_K_M \(written by llama.cpp's quantizer\).*'layerlab\[llamacpp\]'"):
        ExportSettings(quant="Q4_K_M")
    assert Quant.parse("bf16").type.name == "BF16" and ExportSettings(format="hf", quant="bf16").quant == "bf16"


def test_bad_exports_fail_before_any_work_and_write_nothing(tiny, tmp_path, tiny_folder):
    _, _, f32, _ = tiny
    with pytest.raises(PlanError, match="whole layers only"):
        prepare_export(shipping(f32, tmp_path / "a.gguf"), Plan.parse("attn-skip:2", LAYERS))
    with pytest.raises(PlanError, match="written for 5 layers"):
        prepare_export(shipping(f32, tmp_path / "a.gguf"), Plan.parse("skip:2", 5))
    with pytest.raises(SettingsError, match="GGUF output reuses a GGUF source's tokenizer"):
        prepare_export(shipping(tiny_folder, tmp_path / "b", format="gguf"), Plan.parse("skip:2", 6))
    (tmp_path / "c.gguf").write_text("mine")
    with pytest.raises(OutputExistsError):
        prepare_export(shipping(f32, tmp_path / "c.gguf"), Plan.parse(PLAN, LAYERS))
    assert (tmp_path / "c.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


@torch.no_grad()
def test_a_folder_export_keeps_the_sources_dtype_and_loads_in_plain_transformers(tmp_path, tiny_folder):
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.bfloat16).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(source)
    model, tokenizer = layerlab.load(str(source))  # float32 in memory
    plan = Plan.parse("skip:2", 6)
    target = prepare_export(shipping(source, tmp_path / "out"), plan)
    result = write_export(target, plan, model, tokenizer)
    assert result.format == "hf" and result.dtype == "torch.bfloat16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").eval()
    assert exported.dtype == torch.bfloat16 and exported.config.num_hidden_layers == 5
    with apply_plan(model, plan):
        expected = model(IDS).logits
    assert (exported.float()(IDS).logits - expected).abs().max() <= 1e-4  # bf16 values, upcast: the same model
    assert result.ratio < 1 and result.parameters[1] < result.parameters[0]
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < 2 * result.parameters[1] + 50_000  # 2 bytes each


@torch.no_grad()
def test_the_exported_gguf_loads_in_layerlab_and_is_measured_from_disk(tiny, tmp_path, monkeypatch):
    arch, _, f32, _ = tiny
    monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_file(f32)
    result = export_gguf(f32, PLAN, tmp_path / "pruned.gguf", changed=())
    loaded, _ = layerlab.load(str(result.path))
    with apply_plan(model, Plan.parse(PLAN, LAYERS)):
        expected = model(IDS).logits
    assert (loaded(IDS).logits - expected).abs().max() <= 1e-5
    settings = ArtifactSettings(ctx=32, windows=2, llama_cpp=False)
    measured = measure_export(result, str(f32), settings, tokenizer=tokenizer)
    from layerlab.corpora import read_text
    from layerlab.evaluate.perplexity import perplexity

    with apply_plan(model, Plan.parse(PLAN, LAYERS)):
        in_memory = perplexity(model, tokenizer, read_text("wikitext2-test"), ctx=32, max_windows=2, progress=False)
    assert measured["export"]["perplexity"]["perplexity"] == pytest.approx(in_memory.perplexity, rel=1e-5)
    assert measured["export"]["bytes"] == result.bytes and measured["ratios"]["bytes"] == result.ratio


def llama_cpp_logits(path) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(IDS[0].tolist())
    logits = np.asarray(llm.scores[:IDS.shape[1]]).copy()
    llm.close()
    return logits


def test_the_exported_gguf_runs_in_llama_cpp(tiny, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'layerlab[llamacpp]')")
    arch, model, f32, _ = tiny
    result = export_gguf(f32, PLAN, tmp_path / "pruned.gguf", changed=())
    with torch.no_grad(), apply_plan(model, Plan.parse(PLAN, LAYERS)):
        expected = model(IDS).logits[0].numpy()
    assert np.abs(llama_cpp_logits(result.path) - expected).max() <= 1e-3


def k_quant_source(tmp_path):
    """A tiny Llama (rows of 256: whole K-quant blocks) written at llama.cpp's Q4_K_M mixture."""
    model = tiny_hf("llama", layers=LAYERS, hidden=256)
    f32 = write_tiny_gguf(model, "llama", tmp_path / "f32-256.gguf")
    return model, f32, export_gguf(f32, "all", tmp_path / "q4km.gguf", quant="Q4_K_M", changed=())


@torch.no_grad()
def test_k_quants_are_written_by_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'layerlab[llamacpp]')")
    model, f32, mixture = k_quant_source(tmp_path)
    kinds = {t.name: t.type for t in mixture.tensors}
    assert {kinds[n] for n in kinds if "norm" in n} == {"F32"}
    assert {"Q4_K", "Q6_K"} <= set(kinds.values())  # llama.cpp's mixture: some tensors get more bits
    assert all(t.action == "requantized" for t in mixture.tensors if t.type != "F32")
    with apply_plan(model, Plan.parse(PLAN, LAYERS)):
        expected = model(IDS).logits
    error = {}
    for quant in ("Q8_0", "Q6_K", "Q4_0"):  # 8.5, 6.56 and 4.5 bits per weight
        written = export_gguf(f32, PLAN, tmp_path / f"{quant}.gguf", quant=quant, changed=())
        assert {t.type for t in written.tensors if "norm" not in t.name} == {quant}
        error[quant] = (load_file(written.path)[0](IDS).logits - expected).abs().mean().item()
    assert error["Q8_0"] < error["Q6_K"] < error["Q4_0"]


@torch.no_grad()
def test_changed_tensors_go_back_to_their_k_quant_and_the_rest_is_copied(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'layerlab[llamacpp]')")
    _, _, source = k_quant_source(tmp_path)
    model, _ = load_file(source.path)
    model.model.layers[8].self_attn.o_proj.weight.mul_(1.1)
    result = export_gguf(source.path, PLAN, tmp_path / "edited.gguf", model=model)
    changed = [t for t in result.tensors if t.action != "copied"]
    assert [(t.name, t.action) for t in changed] == [("blk.2.attn_output.weight", "rewritten")]
    before = tensors(source.path)
    assert changed[0].type == before["blk.8.attn_output.weight"].tensor_type.name  # its source K type
    for name, tensor in tensors(result.path).items():
        if name != "blk.2.attn_output.weight":
            original = before[name.replace(f"blk.{name.split('.')[1]}.", f"blk.{int(name.split('.')[1]) + 6}.")
                              if name.startswith("blk.") else name]
            assert bytes(tensor.data) == bytes(original.data), name


@torch.no_grad()
def test_a_plan_that_moves_gemma3_global_layers_records_the_pattern_per_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / "cache"))
    model = tiny_hf("gemma3", layers=LAYERS)
    f32 = write_tiny_gguf(model, "gemma3", tmp_path / "f32.gguf")
    plan = Plan.parse("skip:2,7", LAYERS)  # global layers 5 and 11 move to steps 4 and 9
    aligned = export_gguf(f32, PLAN, tmp_path / "aligned.gguf", changed=())
    moved = export_gguf(f32, plan.to_text(), tmp_path / "moved.gguf", changed=())
    assert gguf_layer_types(aligned.path) is None  # every reader derives the right pattern from the index
    types = gguf_layer_types(moved.path)
    assert [j for j, kind in enumerate(types) if kind == "full_attention"] == [4, 9]
    with apply_plan(model, plan):
        expected = model(IDS).logits
    for loaded in (layerlab.load(str(moved.path))[0], load_file(moved.path)[0]):
        assert loaded.config.layer_types == types
        assert (loaded(IDS).logits - expected).abs().max() <= 1e-5
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="moved.gguf")  # the index-derived pattern
    assert (plain(IDS).logits - expected).abs().max() > 1e-3  # differs: the check above can tell
    if llama_cpp_available():  # llama.cpp reads the per-layer array
        assert np.abs(llama_cpp_logits(moved.path) - expected[0].numpy()).max() <= 1e-3


def test_the_main_job_ships_a_gguf_source_as_gguf_with_healed_tensors_requantized(tmp_path, monkeypatch):
    from dataclasses import replace

    from layerlab.prune import QUICK_EVAL, PruneSettings, prune
    from layerlab.settings import HealSettings, RecoverSettings

    monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / "cache"))
    f32 = write_tiny_gguf(tiny_hf("llama", layers=6), "llama", tmp_path / "f32.gguf")
    q8 = export_gguf(f32, "all", tmp_path / "q8.gguf", quant="Q8_0", changed=(), layers=6).path
    model, tokenizer = layerlab.load(str(q8))
    settings = PruneSettings(layers=2, calib_ctx=32, calib_windows=2,
                             recovery=RecoverSettings(method="lora", training=HealSettings(steps=2, ctx=32,
                                                                                           batch_size=2)),
                             evaluation=replace(QUICK_EVAL, tasks="ppl,hellaswag,samples,speed", ctx=32, ppl_windows=2,
                                                rows=4, max_new_tokens=4,
                                                speed_rounds=1, speed_max_rounds=1, speed_prompt_tokens=16,
                                                speed_decode_tokens=4))
    data = prune(model, tokenizer, str(q8), tmp_path / "out", settings, progress=False)
    shipped = {r["name"]: r for r in data["shipped"]}
    assert data["exported"] == str(tmp_path / "out" / "model.gguf")
    plain, healed = shipped["model"], shipped["model-healed"]
    assert plain["format"] == "gguf" and plain["tensors"] == [] and plain["ratio"] <= plain["ideal_ratio"] + 0.01
    rewritten = {t["name"]: t for t in healed["tensors"]}
    assert rewritten and all(t["action"] == "rewritten" and t["type"] == "Q8_0" for t in rewritten.values())
    assert all(name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                              "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")) for name in rewritten)
    chosen = next(r for r in data["evaluation"]["rows"] if r["plan"] == data["plan"])
    assert chosen["file"]["perplexity"] == pytest.approx(chosen["ppl"]["perplexity"], rel=1e-4)  # nothing changed
    assert data["healed"]["file"]["perplexity"] == pytest.approx(data["healed"]["ppl"]["perplexity"], rel=0.02)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["shipped"][0]["bytes"] == (tmp_path / "out" / "model.gguf").stat().st_size
    assert "bytes on disk" in (tmp_path / "out" / "model.md").read_text()


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name, plan_text", [("smollm2-135m", "skip:3,12-15,25"), ("gemma3-270m", "skip:2,9")])
def test_real_models_written_from_their_hf_weights_at_f32_give_the_plans_logits(name, plan_text, tmp_path, request):
    """HF -> GGUF -> HF on the real models: every tensor rewritten from the loaded (float) model, through the
    Q/K permutation (SmolLM2) or the norm offset (Gemma 3), loads back with the plan's logits."""
    from layerlab.export.gguf import GgufSource
    from layerlab.models import resolve_source

    model, tokenizer = request.getfixturevalue(name.split("-")[0])
    plan = Plan.parse(plan_text, model.config.num_hidden_layers)
    target = prepare_export(shipping(name, tmp_path / "f32.gguf", quant="F32"), plan)
    every = [n for n, _ in GgufSource.open(resolve_source(name)).planned(plan)]
    result = write_export(target, plan, model, changed=every)
    assert {t.action for t in result.tensors} == {"rewritten"}
    back, _ = load_file(result.path, tokenizer)
    x = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with apply_plan(model, plan):
        expected = model(x).logits
    assert (back(x).logits - expected).abs().max() <= 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_the_embedded_smollm2_pruned_at_its_own_q4_1(smollm2, tmp_path):
    from layerlab.models import EMBEDDED

    model, tokenizer = smollm2
    plan = Plan.parse("skip:3,12-15,25", 30)
    target = prepare_export(shipping("smollm2-135m", tmp_path / "model.gguf"), plan)
    result = write_export(target, plan, model)  # compares every kept tensor with the source: none changed
    assert {t.action for t in result.tensors} == {"copied"}
    assert result.ratio <= result.ideal_ratio + 0.01
    source = tensors(EMBEDDED["smollm2-135m"].locate())
    for name, tensor in tensors(result.path).items():
        if name.startswith("blk.0.") or not name.startswith("blk."):
            assert bytes(tensor.data) == bytes(source[name].data)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()  # plain transformers
    x = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with apply_plan(model, plan):
        assert (back(x).logits - model(x).logits).abs().max() <= 1e-4


def test_a_write_that_fails_halfway_leaves_nothing_and_unknown_architectures_are_named(tiny, tmp_path, monkeypatch):
    from layerlab.errors import LayerlabError
    from layerlab.export.gguf_weights import gguf_arch

    _, _, f32, _ = tiny
    calls = []

    def failing(values, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        from gguf.quants import quantize

        return quantize(values, kind)

    monkeypatch.setattr("layerlab.export.gguf.quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(f32, PLAN, tmp_path / "half.gguf", quant="Q8_0", changed=())
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder
    with pytest.raises(LayerlabError, match="writing changed weights into a 'phi3' GGUF is not supported"):
        gguf_arch("phi3")
