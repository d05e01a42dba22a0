"""Healing: a short LoRA fine-tune that recovers quality a model lost when layers were removed.

ShortGPT (Men et al., 2024) and Gromov et al. (2024) found that a brief LoRA / QLoRA fine-tune after
dropping layers recovers much of the lost perplexity. Here:
- a plan is first materialized into a physically smaller model (`export.hf.materialize`), so the
  adapters train on exactly the model that will be shipped;
- LoRA adapters (`peft`) go on the remaining layers' linear layers, by default all attention and
  MLP projections (`Arch.lora_targets` in `arch.py`);
- training uses fixed-length windows of the healing text, which must not be the evaluation text,
  in an order fixed by the seed (epochs of seeded permutations);
- a checkpoint (adapter weights, optimizer moments, step, RNG state, losses) is one safetensors file
  replaced atomically every `checkpoint_every` steps; a run resumed from it ends with bit-identical
  weights to an uninterrupted run;
- at the end the adapters are merged into the weights (`merge_and_unload`): a plain model, which
  `save_healed` writes as a Hugging Face folder, with the adapter on its own in `adapter/`.
The training loop (`train_adapters`: batches, schedule, checkpoints) also serves distillation
(`distill.py`), which swaps the language-model loss for the full model's distributions.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save, save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import arch_of, decoder_layers, num_layers
from .errors import LayerlabError, ResumeError
from .evaluate.perplexity import bos_id, encode_text, make_windows
from .io import check_resumable, own_folder, update_file
from .plan import Plan
from .runtime import current_plan
from .settings import HealSettings

if TYPE_CHECKING:
    from peft import LoraConfig

CHECKPOINT = "checkpoint.safetensors"
ADAPTER = "adapter"


class HealError(LayerlabError):
    """Healing settings or data that cannot work."""


@dataclass
class HealResult:
    """The merged plain model and what produced it."""

    model: nn.Module  # adapters merged into the weights, eval mode
    plan: Plan
    settings: HealSettings
    losses: list[float]  # training loss of every step, including those before a resumed checkpoint
    adapter_state: dict[str, torch.Tensor] = field(repr=False)  # peft's adapter state dict, before merging
    adapter_config: LoraConfig = field(repr=False)
    seconds: float = 0.0  # training time of this call (a resumed run counts only its own part)

    def summary(self) -> dict:
        """A JSON-ready record of the run (written as healing.json next to the model)."""
        return {"plan": self.plan.to_text(), "settings": asdict(self.settings), "losses": self.losses,
                "seconds": self.seconds}


def checkpoint_folder(out: str | Path) -> Path:
    """Where the checkpoints of a run that writes `out` live: a sibling `<out>.checkpoints`."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def target_modules(model: nn.Module, requested: tuple[str, ...] | None) -> list[str]:
    """The LoRA target names: the architecture's default, or `requested` checked against the layers."""
    names = list(requested or arch_of(model).lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, module in decoder_layers(model).named_modules()
               if not list(module.children()) and any(p.dim() == 2 for p in module.parameters(recurse=False))}
    missing = [n for n in names if n not in present]
    if missing:
        raise HealError(f"LoRA target module(s) {', '.join(missing)} are not in the decoder layers; "
                        f"choose from {', '.join(sorted(present))}")
    return names


def training_windows(tokenizer, text: str, ctx: int) -> torch.Tensor:
    """Non-overlapping windows of `ctx` tokens of `text` (BOS first, as perplexity scores them)."""
    tokens = encode_text(tokenizer, text)
    windows = make_windows(tokens, ctx, None, bos_id(tokenizer), llama_cpp=False)
    if not windows:
        raise HealError(f"the healing text has {len(tokens)} tokens, fewer than one window of {ctx}; "
                        "use a longer text or a smaller ctx")
    return torch.tensor([w.ids for w in windows])


def batch_order(windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices for every step, `[steps, batch_size]`: epochs of permutations drawn from `seed`.

    A function of its arguments only, so a resumed run sees the same batches without saving them.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = [torch.randperm(windows, generator=generator) for _ in range(math.ceil(needed / windows))]
    return torch.cat(epochs)[:needed].view(steps, batch_size)


def learning_rate(settings: HealSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of `lr`: short runs still end gently."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heal(
    model: nn.Module,
    tokenizer,
    text: str,
    plan: Plan | None = None,
    settings: HealSettings | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    provenance: dict | None = None,
) -> HealResult:
    """Fine-tune LoRA adapters on `text` for the model `plan` leaves, and return the merged model.

    With no plan (or the identity plan) `model` itself is trained and merged in place; otherwise a
    smaller copy is built and `model` is untouched. With `checkpoint_dir`, a checkpoint is written
    every `settings.checkpoint_every` steps and at the end; `resume=True` continues from it (if there
    is one), refusing a checkpoint written with other settings, plan, text or `provenance` (the model's
    fingerprint). `callback(step, loss)`
    runs after every step (and after its checkpoint). Settings default to `HealSettings()`.
    """
    windows = training_windows(tokenizer, text, (settings or HealSettings()).ctx)
    return heal_windows(model, windows, plan, settings, checkpoint_dir, resume, callback, progress, provenance)


def heal_windows(model: nn.Module, windows: torch.Tensor, plan: Plan | None = None,
                 settings: HealSettings | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 callback: Callable[[int, float], None] | None = None, progress: bool = True,
                 provenance: dict | None = None) -> HealResult:
    """`heal` on windows of token ids already cut (`[windows, ctx]`), e.g. mixed from several texts."""
    from peft import get_peft_model, get_peft_model_state_dict

    base = _base_model(model, plan)
    plan = plan or Plan.identity(num_layers(model))
    settings = settings or HealSettings()
    settings = replace(settings, target_modules=tuple(target_modules(base, settings.target_modules)))
    torch.manual_seed(settings.seed)  # LoRA's initial A matrices and dropout
    config = lora_config(settings)
    peft_model = get_peft_model(base, config)

    def lm_loss(ids: torch.Tensor) -> torch.Tensor:
        return peft_model(input_ids=ids, labels=ids, use_cache=False).loss

    record = fingerprint(settings, plan, windows, **(provenance or {}))
    losses, seconds = train_adapters(peft_model, windows, settings, lm_loss, record, checkpoint_dir, resume, callback,
                                     progress)
    adapter_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    merged = peft_model.merge_and_unload().eval()
    return HealResult(merged, plan, settings, losses, adapter_state, config, seconds)


def lora_config(settings: HealSettings, layers: list[int] | None = None) -> LoraConfig:
    """peft's LoRA config for the settings; `layers` limits the adapters to those decoder layers."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=settings.rank, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=list(settings.target_modules),
                      layers_to_transform=layers)


def train_adapters(peft_model: nn.Module, windows: torch.Tensor, settings: HealSettings,
                   loss_of: Callable[[torch.Tensor], torch.Tensor], fingerprint: dict,
                   checkpoint_dir: str | Path | None, resume: bool, callback: Callable[[int, float], None] | None,
                   progress: bool, desc: str = "healing") -> tuple[list[float], float]:
    """The training loop shared by LoRA healing and distillation: seeded batches, AdamW on the trainable
    parameters, warm-up and cosine decay, clipping, resumable checkpoints. Returns the losses and the
    seconds this call trained. `loss_of(ids)` is the loss of one batch of windows.
    """
    order = batch_order(len(windows), settings.steps, settings.batch_size, settings.seed)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    checkpoint = own_folder(checkpoint_dir, "heal-checkpoints") / CHECKPOINT if checkpoint_dir is not None else None
    losses: list[float] = []
    if resume and checkpoint is not None and checkpoint.is_file():
        losses = load_checkpoint(checkpoint, peft_model, optimizer, fingerprint)
    started = time.perf_counter()
    peft_model.train()
    bar = tqdm(range(len(losses), settings.steps), desc=desc, unit="step", disable=not progress,
               initial=len(losses), total=settings.steps)
    for step in bar:
        loss = _train_step(optimizer, trainable, loss_of, windows[order[step]].to(peft_model.device),
                           learning_rate(settings, step), settings.max_grad_norm)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if checkpoint is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            save_checkpoint(checkpoint, peft_model, optimizer, losses, fingerprint)
        if callback is not None:
            callback(done, loss)
    return losses, time.perf_counter() - started


def _base_model(model: nn.Module, plan: Plan | None) -> nn.Module:
    """The model to train: a materialized copy for a real plan, `model` itself for the identity."""
    from .export.hf import materialize

    if current_plan(model) is not None:
        raise HealError("a plan is applied to the model at run time; restore it and pass the plan to heal instead")
    if plan is not None and plan.kv:
        raise HealError("healing does not train through KV sharing; heal the plan without its kv: clause")
    if plan is None or plan.is_identity:
        return model
    return materialize(model, plan)


def _train_step(optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter],
                loss_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, lr: float,
                max_grad_norm: float) -> float:
    """One optimizer step on one batch of windows."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_of(ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fingerprint(settings, plan: Plan, windows: torch.Tensor, **extra) -> dict:
    """What a checkpoint must match to be resumed: settings (a dataclass), plan, the training windows, extras."""
    return {"settings": asdict(settings), "plan": plan.to_text(),
            "data_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), **extra}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, losses: list[float],
                    fingerprint: dict) -> None:
    """Trainable weights, AdamW moments, RNG state and losses in one safetensors file, replaced atomically."""
    tensors = {f"param.{name}": p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for index, state in optimizer.state_dict()["state"].items():
        tensors |= {f"optimizer.{index}.{key}": value for key, value in state.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if model.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(model.device)
    metadata = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "losses": json.dumps(losses)}
    update_file(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict) -> list[float]:
    """Restore what `save_checkpoint` wrote; return the losses so far (their count is the step)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        saved = json.loads(metadata["fingerprint"])
    except Exception as exc:  # safetensors raises its own error type for a torn or foreign file
        raise ResumeError(f"{path} is not a healing checkpoint layerlab can resume ({type(exc).__name__}); "
                          "start over with --force") from None
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))  # tuples become lists, as saved
    check_resumable(_flat(saved), _flat(expected), f"the checkpoint in {path.parent}")
    tensors = load_file(str(path), device=str(model.device))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param.{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"].cpu())
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), model.device)
    return json.loads(metadata["losses"])


def _flat(fingerprint: dict) -> dict:
    """Settings and provenance in one mapping, so a difference is named by its setting."""
    return fingerprint.get("settings", {}) | {k: v for k, v in fingerprint.items() if k != "settings"}


def save_healed(result: HealResult, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Write the merged model as a plain Hugging Face folder, with `adapter/` (peft's format) and healing.json.

    The adapter applies to the pruned model before healing (`PeftModel.from_pretrained(pruned, out/adapter)`).
    The folder is built in a temporary sibling and renamed into place; an existing `out` needs `force`.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    from .export.hf import save_folder

    def extra(folder: Path) -> None:
        result.adapter_config.save_pretrained(str(folder / ADAPTER))
        save_file(result.adapter_state, str(folder / ADAPTER / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / "healing.json").write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")

    return save_folder(result.model, tokenizer, out, force, extra=extra)
