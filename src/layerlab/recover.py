"""Recovering what pruning costs: one entry point over the registry of recovery methods.

`recover(model, tokenizer, plan, settings)` returns the pruned model, recovered, as a plain materialized
model (it exports like any other) with a JSON-ready record of what was done and the calibration loss
before and after. `model` itself is left as it was. Methods (`settings.RECOVERIES`; their settings are
`settings.RecoverSettings`, checked before any model loads):
- `none`: the pruned model as it is;
- `patch`: a training-free linear map per removed block, folded into the weights (`patch.py`);
- `lora`: LoRA fine-tuning on language-model loss (`heal.py`);
- `kd`: LoRA trained to match the full model's next-token distributions (`distill.py`);
- `patch+kd`: the patch, then distillation on top of it;
- `auto`: the patch when it lowers the calibration loss, else none (the main job's default: it costs
  a minute, not an hour, and is chosen on calibration text only, never on evaluation data).
LoRA and distillation train on windows of `data` (a mix of texts by default); the patch and every
before/after loss use the calibration windows of `patch.calibration` (`patch.tokens` tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .calibration import mixed_windows
from .distill import check_distillable, distill
from .errors import LayerlabError
from .heal import heal_windows
from .patch import calibration_loss, check_patchable, patch
from .plan import Plan
from .runtime import apply_plan
from .settings import RecoverSettings


@dataclass
class Recovery:
    """The recovered model (a materialized copy of the plan) and what was done."""

    model: nn.Module
    plan: Plan
    method: str  # the method that produced `model` (`auto` resolved to `patch` or `none`)
    record: dict  # JSON-ready: settings, fits, losses, calibration loss before / after, reason

    def summary(self) -> dict:
        return {"plan": self.plan.to_text(), "method": self.method, **self.record}


def check_recoverable(model: nn.Module, plan: Plan, settings: RecoverSettings) -> None:
    """The method's one-line errors, before any work."""
    method = settings.method
    if "patch" in method:
        check_patchable(model, plan, settings.patch.form)
    if "kd" in method:
        check_distillable(model, plan, settings.distill)


def recover(model: nn.Module, tokenizer, plan: Plan, settings: RecoverSettings | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            provenance: dict | None = None) -> Recovery:
    """Recover `plan` on `model` by `settings.method`; `checkpoint_dir`/`resume` apply to the training methods,
    whose checkpoints also record `provenance` (the model's fingerprint)."""
    from .export.hf import materialize

    settings = settings or RecoverSettings()
    method = settings.method
    check_recoverable(model, plan, settings)
    if method == "none":
        return Recovery(materialize(model, plan), plan, method, {})
    if method == "auto":
        return _auto(model, tokenizer, plan, settings, progress)
    calibration = mixed_windows(tokenizer, settings.patch.calibration, settings.patch.ctx, settings.patch.tokens)
    if method == "patch":
        fitted = patch(model, tokenizer, plan, settings.patch, progress, windows=calibration)
        return Recovery(fitted.model, plan, method, {"patch": fitted.summary()}
                        | _losses(fitted.loss_before, fitted.loss_after))
    training = torch.tensor([w.ids for w in mixed_windows(tokenizer, settings.data, settings.training.ctx, None)])
    fitted = patch(model, tokenizer, plan, settings.patch, progress, materialize=False, windows=calibration) \
        if method == "patch+kd" else None
    if method == "lora":
        result = heal_windows(model, training, plan, settings.training, checkpoint_dir, resume, progress=progress,
                              provenance=provenance)
    else:
        result = distill(model, training, plan, replace(settings.distill, training=settings.training),
                         fitted.patches if fitted else None, checkpoint_dir, resume, progress=progress,
                         provenance=provenance)
    if fitted is not None:
        before = fitted.loss_before
    else:
        with apply_plan(model, plan):
            before = calibration_loss(model, calibration)
    after = calibration_loss(result.model.eval(), calibration)
    record = ({"patch": fitted.summary()} if fitted else {}) | {"training": result.summary()}
    return Recovery(result.model, plan, method, record | _losses(before, after))


def _losses(before: float, after: float) -> dict:
    return {"calibration_loss_before": before, "calibration_loss_after": after,
            "calibration_perplexity_before": math.exp(before), "calibration_perplexity_after": math.exp(after)}


def _auto(model: nn.Module, tokenizer, plan: Plan, settings: RecoverSettings, progress: bool) -> Recovery:
    """The patch if it lowers the calibration loss, else the plain pruned model; the record says why."""
    from .export.hf import materialize

    try:
        check_patchable(model, plan, settings.patch.form)
    except LayerlabError as exc:
        return Recovery(materialize(model, plan), plan, "none", {"reason": f"no patch: {exc}"})
    fitted = patch(model, tokenizer, plan, settings.patch, progress)
    losses = _losses(fitted.loss_before, fitted.loss_after)
    change = (f"calibration perplexity {losses['calibration_perplexity_before']:.2f} -> "
              f"{losses['calibration_perplexity_after']:.2f} on {fitted.tokens} tokens")
    if fitted.improved:
        return Recovery(fitted.model, plan, "patch", {"patch": fitted.summary(), "reason": f"patched: {change}"}
                        | losses)
    return Recovery(materialize(model, plan), plan, "none", {"patch": fitted.summary(), "reason":
                    f"not patched: the patch did not lower the calibration loss ({change})"} | losses)


def save_recovered(recovery: Recovery, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Write the recovered model as a plain Hugging Face folder with `recovery.json` (atomically)."""
    from .export.hf import save_folder

    def extra(folder: Path) -> None:
        (folder / "recovery.json").write_text(json.dumps(recovery.summary(), indent=2, default=str), encoding="utf-8")

    return save_folder(recovery.model, tokenizer, out, force, extra=extra)

