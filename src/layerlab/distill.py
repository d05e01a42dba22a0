"""Distillation healing: LoRA on the pruned model, trained to match the full model's next-token distributions.

Healing on language-model loss teaches the healing text (issue 19: 100 LoRA steps on *Frankenstein*
lowered WikiText-2 perplexity but HellaSwag fell); distillation teaches what the removed layers did.
Minitron (Muralidharan et al. 2024) prunes depth and distills from the unpruned model this way.

One copy of the weights serves both sides:
- LoRA adapters (`peft`) go on the kept layers of the model itself (`layers_to_transform`);
- teacher: the same model, no plan, adapters disabled (`disable_adapter()`), without gradients;
- student: the pruned plan applied at run time (`runtime.apply_plan`, installed and removed around each
  step with `reapply`/`restore`), adapters on, and optionally a linear patch as explicit maps on the
  step modules only (`patch.insert_maps`): the source layers, which the teacher runs, stay as they were.
Loss: T² KL(p_teacher^T || p_student^T) per token, softmax at temperature T (Hinton et al. 2015), plus
optionally `hidden_weight` x the relative squared error of the stream entering each kept layer after a
removed run (`resid_pre`, or the last output), student against teacher.

At the end the adapters are removed from the model (`unload`: its weights were never changed) and a
pruned copy gets the adapter deltas added, then the patch folded in (W <- Mᵀ (W + ΔW)). The training
loop and its resumable, bit-identical checkpoints are `heal.train_adapters`; the fingerprint also holds
the distillation settings and the patch's maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .arch import arch_of, decoder_layers
from .errors import LayerlabError
from .heal import fingerprint, lora_config, target_modules, train_adapters
from .patch import BlockPatch, blocks, fold, insert_maps
from .plan import Plan
from .runtime import apply_plan, current_plan
from .settings import DistillSettings
from .streams import Recorder, place


class DistillError(LayerlabError):
    """Distillation settings or inputs that cannot work."""


@dataclass
class DistillResult:
    model: nn.Module  # the pruned copy with the adapters merged (and the patch folded)
    plan: Plan
    settings: DistillSettings
    losses: list[float]
    seconds: float

    def summary(self) -> dict:
        from dataclasses import asdict

        return {"plan": self.plan.to_text(), "settings": asdict(self.settings), "losses": self.losses,
                "seconds": self.seconds}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² x mean over tokens of KL(softmax(teacher / T) || softmax(student / T)), logits `[..., vocab]`."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return temperature ** 2 * kl.mean()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over boundaries of |h_student - h_teacher|² / |h_teacher|²."""
    terms = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum() for s, t in zip(student, teacher,
                                                                                          strict=True)]
    return torch.stack(terms).mean()


def boundaries(plan: Plan) -> list[tuple[str, str]]:
    """(student place, teacher place) of the stream entering each kept layer after a removed run."""
    last_step, last_layer = len(plan.steps) - 1, plan.num_layers - 1
    out = []
    for block in blocks(plan):
        if block.after is None:
            out.append((place("resid_post", last_step), place("resid_post", last_layer)))
        else:
            out.append((place("resid_pre", plan.layers.index(block.after)), place("resid_pre", block.after)))
    return out


def check_distillable(model: nn.Module, plan: Plan, settings: DistillSettings) -> None:
    """One-line errors before any work."""
    if current_plan(model) is not None:
        raise DistillError("a plan is applied to the model at run time; restore it and pass the plan instead")
    settings.check(plan.num_layers)  # the teacher is the full model
    if plan.is_identity:
        raise DistillError("the plan removes nothing, so the student is the teacher; distill a pruned plan")
    if settings.hidden_weight and (not plan.whole_layers or list(plan.layers) != sorted(set(plan.layers))):
        raise DistillError("the hidden-state term compares streams at kept layers of a plan that removes whole "
                           "layers in order; set hidden_weight to 0 for this plan")


def distill(model: nn.Module, windows: torch.Tensor, plan: Plan, settings: DistillSettings | None = None,
            patches: list[BlockPatch] | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
            callback: Callable[[int, float], None] | None = None, progress: bool = True,
            provenance: dict | None = None) -> DistillResult:
    """Train LoRA on the kept layers of `plan` (over `patches`, if given) to match the full model on `windows`
    (`[windows, ctx]` token ids); return the pruned copy with everything merged. `model` ends as it was."""
    from peft import get_peft_model

    from .export.hf import materialize

    settings = settings or DistillSettings()
    check_distillable(model, plan, settings)
    training = replace(settings.training,
                       target_modules=tuple(target_modules(model, settings.training.target_modules)))
    settings = replace(settings, training=training)
    kept = sorted(set(plan.layers))
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    torch.manual_seed(training.seed)  # LoRA's initial A matrices and dropout
    peft_model = get_peft_model(model, lora_config(training, kept))
    try:
        losses, seconds = _train(peft_model, model, windows, plan, settings, patches, checkpoint_dir, resume,
                                 callback, progress, provenance or {})
        deltas = _deltas(peft_model, model)
    finally:
        peft_model.unload()  # the adapters come out; the weights were never changed
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        model.train(was_training)
    student = materialize(model, plan)
    _add_deltas(student, plan, deltas)
    if patches:
        fold(student, plan, patches)
    return DistillResult(student, plan, settings, losses, seconds)


def _train(peft_model, model: nn.Module, windows: torch.Tensor, plan: Plan, settings: DistillSettings,
           patches: list[BlockPatch] | None, checkpoint_dir, resume: bool, callback, progress: bool,
           provenance: dict):
    """The loop: teacher pass (no plan, adapters off), student pass (plan and maps on), loss."""
    applied = apply_plan(model, plan)
    if patches:
        insert_maps(model, plan, patches)
    applied.restore()
    pairs = boundaries(plan) if settings.hidden_weight else []

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), peft_model.disable_adapter(), Recorder(model, [t for _, t in pairs]) as seen:
            teacher = model(input_ids=ids, use_cache=False).logits
            teacher_streams = [seen[t] for _, t in pairs]
        with ExitStack() as stack:
            stack.callback(applied.restore)
            applied.reapply()
            recorder = stack.enter_context(Recorder(model, [s for s, _ in pairs], detach=False))
            student = model(input_ids=ids, use_cache=False).logits
            loss = kd_loss(student, teacher, settings.temperature)
            if pairs:
                loss = loss + settings.hidden_weight * hidden_loss([recorder[s] for s, _ in pairs], teacher_streams)
        return loss

    extra = {"method": "kd", "patch_sha256": _patch_digest(patches), **provenance}
    return train_adapters(peft_model, windows, settings.training, loss_of,
                          fingerprint(settings, plan, windows, **extra), checkpoint_dir, resume, callback, progress,
                          desc="distilling")


def _patch_digest(patches: list[BlockPatch] | None) -> str | None:
    """A hash of the patch's maps: a checkpoint trained over one patch does not resume over another."""
    if not patches:
        return None
    digest = hashlib.sha256()
    for p in patches:
        digest.update(p.matrix.numpy().tobytes())
    return digest.hexdigest()


def _deltas(peft_model, model: nn.Module) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module, keyed by the module's name in `model` ('model.layers.12.mlp.down_proj')."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: module.get_delta_weight("default").detach().clone()
            for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def _add_deltas(student: nn.Module, plan: Plan, deltas: dict[str, torch.Tensor]) -> None:
    """Add each layer's ΔW to the weights of the steps that run that layer in the materialized copy."""
    layers_path = arch_of(student).layers + "."
    layers = decoder_layers(student)
    for name, delta in deltas.items():
        if not delta.any():  # an adapter that never trained (a half the plan skips): B is still zero
            continue
        layer, _, inner = name[len(layers_path):].partition(".")
        for index, step in enumerate(plan.steps):  # a repeated layer's copies all get it
            if step.layer == int(layer):
                module = layers[index].get_submodule(inner)
                module.weight += delta.to(module.weight.dtype)
