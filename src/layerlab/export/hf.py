"""Exporting a plan as a standalone Hugging Face model folder.

Dropped layers are gone and repeated layers become copies (mergekit passthrough semantics); the
config's `num_hidden_layers` and per-layer lists follow the plan, so the folder loads with plain
`AutoModelForCausalLM.from_pretrained(DIR)`. Attention-only / MLP-only steps are recorded as
LLM-Drop's `drop_attn_list` / `drop_mlp_list` in the config and their weights are left out:
`layerlab.load(DIR)` honours the lists, and with `remote_code=True` a small self-contained modeling
file plus `auto_map` lets `from_pretrained(DIR, trust_remote_code=True)` do the same without layerlab.
A KV-sharing plan's map travels the same way, as `kv_sources` ({consumer: source}, in the export's own
layer numbering); plain `from_pretrained(DIR)` ignores it and runs every layer on its own keys and values.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..arch import arch_of, per_layer_values
from ..plan import Plan
from .files import staged_folder

REMOTE_CODE_FILE = "modeling_layerlab_drop.py"


def planned_config(model, plan: Plan):
    """A copy of the model's config describing the plan's layers (and its sublayer drops)."""
    plan.refuse_merge("an exported config")
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    for name, values in per_layer_values(text, arch_of(model), plan.layers, plan.num_layers).items():
        setattr(text, name, values)
    text.num_hidden_layers = len(plan.steps)
    if not plan.whole_layers:
        text.drop_attn_list = [j for j, s in enumerate(plan.steps) if not s.attention]
        text.drop_mlp_list = [j for j, s in enumerate(plan.steps) if not s.mlp]
    if plan.kv:
        text.kv_sources = {str(j): source for j, source in enumerate(plan.kv_source_steps) if source is not None}
    return config


def _planned_state(model, plan: Plan) -> dict[str, torch.Tensor]:
    """The state dict of the exported model: layers renumbered, repeats copied, dropped halves left out."""
    arch = arch_of(model)
    prefix = arch.layers + "."
    source = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith(prefix)}
    for new_index, step in enumerate(plan.steps):
        old = f"{prefix}{step.layer}."
        dropped = []
        if not step.attention:
            dropped += [arch.attention, *arch.attention_norms]
        if not step.mlp:
            dropped += [arch.mlp, *arch.mlp_norms]
        for key, value in source.items():
            if key.startswith(old) and key[len(old):].split(".")[0] not in dropped:
                state[f"{prefix}{new_index}.{key[len(old):]}"] = value.clone()
    return state


@torch.no_grad()
def materialize(model, plan: Plan):
    """A new model in eval mode whose decoder layers are copies of the plan's layers, in order."""
    from ..plan import parse_kv_sources
    from ..runtime import drop_sublayers, share_kv

    config = planned_config(model, plan)
    new = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    text = config.get_text_config(decoder=True)
    if not plan.whole_layers:
        drop_sublayers(new, text.drop_attn_list, text.drop_mlp_list)
    new.load_state_dict(_planned_state(model, plan), strict=True)
    new = new.to(model.device).eval()
    if plan.kv:
        share_kv(new, parse_kv_sources(text.kv_sources))
    return new


def export_hf(model, tokenizer, plan: Plan, out: str | Path, force: bool = False, remote_code: bool = False,
              card: Callable[[Path], str] | None = None) -> Path:
    """Write the plan as a model folder (safetensors, config, tokenizer, generation config, README).

    `card(folder)` returns the README text; it is called once the weights are in the staging folder.
    """
    return save_folder(materialize(model, plan), tokenizer, out, force, remote_code, card)


def save_folder(model, tokenizer, out: str | Path, force: bool = False, remote_code: bool = False,
                card: Callable[[Path], str] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a materialized model as a folder, atomically (shared by exports and healed models).

    `extra(folder)` adds more files to the staging folder before the card is written.
    """
    text = model.config.get_text_config(decoder=True)
    with staged_folder(out, force) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if remote_code and any(getattr(text, name, None) for name in ("drop_attn_list", "drop_mlp_list", "kv_sources")):
            _write_remote_code(staging, model)
        if extra is not None:
            extra(staging)
        if card is not None:
            (staging / "README.md").write_text(card(staging), encoding="utf-8")
    return Path(out)


def _write_remote_code(folder: Path, model) -> None:
    """A modeling file that drops the listed halves itself, and the config's `auto_map` entry for it."""
    arch = arch_of(model)
    base = type(model).__name__
    code = (Path(__file__).with_name("remote_code_template.py.txt").read_text()
            .replace("BASE_CLASS", base)
            .replace("ARCH_ROW", repr({"layers": arch.layers, "attention": arch.attention,
                                       "attention_norms": arch.attention_norms, "mlp": arch.mlp,
                                       "mlp_norms": arch.mlp_norms, "kv_projections": arch.kv_projections})))
    (folder / REMOTE_CODE_FILE).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.LayerlabDrop{base}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
