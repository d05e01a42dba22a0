"""Materializing a whole-layer plan as a standalone Hugging Face model.

Dropped layers are gone and repeated layers become copies (mergekit passthrough semantics); the
config's `num_hidden_layers` and per-layer lists follow the plan, so the result is an ordinary
model that plain transformers can save and load.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from ..arch import arch_of
from ..errors import PlanError
from ..plan import Plan


def planned_config(model, plan: Plan):
    """A copy of the model's config describing the plan's layers."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    for name in arch_of(model).per_layer_config:
        values = getattr(text, name, None)
        if isinstance(values, (list, tuple)) and len(values) == plan.num_layers:
            setattr(text, name, type(values)(values[i] for i in plan.layers))
    text.num_hidden_layers = len(plan.steps)
    return config


@torch.no_grad()
def materialize(model, plan: Plan):
    """A new model in eval mode whose decoder layers are copies of the plan's layers, in order."""
    if not plan.whole_layers:
        raise PlanError("materializing attention-only or MLP-only steps is not supported yet; use whole layers")
    prefix = arch_of(model).layers + "."
    source = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith(prefix)}
    for new_index, layer in enumerate(plan.layers):
        old = f"{prefix}{layer}."
        state.update({f"{prefix}{new_index}.{k[len(old):]}": v.clone() for k, v in source.items() if k.startswith(old)})
    new = AutoModelForCausalLM.from_config(planned_config(model, plan), dtype=model.dtype)
    new.load_state_dict(state, strict=True)
    return new.to(model.device).eval()
