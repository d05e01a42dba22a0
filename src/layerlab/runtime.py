"""Running a Hugging Face model with a layer plan, reversibly and without copying weights.

How it works (see `apply_plan`):
- The model's list of decoder layers is swapped for a list with one *step module* per plan step. A
  step module is a shallow copy of its source layer: it shares every parameter, but has its own
  attention module copy whose `layer_idx` is the step's position, so every executed step, repeats
  included, writes its own KV-cache slot.
- While the plan is applied the config describes the executed steps: `num_hidden_layers` is the
  number of steps and per-layer lists (such as Gemma 3's `layer_types`) follow the source layers.
  The model's own loop, masks, rotary embeddings and cache construction therefore see the plan.
- A skipped half (attention or MLP) is replaced, together with the norms that belong only to it,
  by a module that adds nothing, so the residual stream passes through unchanged. Cache slots of
  steps without attention become `DummyLayer`s, which transformers' cache and mask code skip.
- KV sharing (`kv:` clause): consumer steps attend over their source step's keys and values through
  a per-forward side channel and their cache slots are `DummyLayer`s too (see `kv.py`).
- KV merges (`kvmerge:` clause): a pre-hook gives the two steps of each merged pair cache slots that
  store one merged cache between them (see `kvmerge.py`).
Restoring puts the original list and config values back.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DummyLayer, DynamicCache

from .arch import Arch, arch_of, decoder_layers, get_path, per_layer_values, set_path
from .errors import PlanError
from .kv import KVChannel, check_kv, consumer_steps, wire
from .kvmerge import register_merge_hook
from .plan import Plan, Step

_APPLIED = "_layerlab_applied_plan"
_BASE_KV = "_layerlab_shared_kv"  # the always-applied plan of a model exported with KV sharing


class SkippedAttention(nn.Module):
    """Stands in for an attention module whose output is not added to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for an MLP whose output is not added to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class AppliedPlan:
    """A plan applied to a model; `restore()` (or leaving the `with` block) undoes it."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model = model
        self._base = _step_aside(model)  # a model that always shares KV: its own map joins this plan's
        self.plan = plan if self._base is None else with_base_kv(plan, self._base.plan.kv)
        self._arch = arch_of(model)
        self._original_layers = decoder_layers(model)
        self._config = model.config.get_text_config(decoder=True)
        self._saved_config: dict[str, Any] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        try:
            self._apply()
        except BaseException:
            self._bring_back_base()
            raise

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the model back exactly as it was (idempotent)."""
        if getattr(self.model, _APPLIED, None) is not self:
            return
        set_path(self.model, self._arch.layers, self._original_layers)
        for name, value in self._saved_config.items():
            setattr(self._config, name, value)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.kv_channel.entries.clear()
        delattr(self.model, _APPLIED)
        self._bring_back_base()

    def _bring_back_base(self) -> None:
        if self._base is not None:
            self._base.reapply()

    def reapply(self) -> AppliedPlan:
        """Install the same step modules again after `restore()`: toggling a plan rebuilds nothing."""
        if getattr(self.model, _APPLIED, None) is not self:
            if self._base is not None and getattr(self.model, _APPLIED, None) is self._base:
                self._base.restore()
            self._check_free()
            self._install()
        return self

    def _check_free(self) -> None:
        if getattr(self.model, _APPLIED, None) is not None:
            raise PlanError("a plan is already applied to this model; restore it before applying another")
        if getattr(self.model, "_layerlab_remote_kv", False):
            raise PlanError("this model shares keys and values through its remote code, which layer plans cannot "
                            "rewire; load it with layerlab.load(DIR) without trust_remote_code")

    def _apply(self) -> None:
        plan, layers = self.plan, self._original_layers
        self._check_free()
        if plan.num_layers != len(layers):
            raise PlanError(f"the plan was written for {plan.num_layers} layers, but the model has {len(layers)}")
        check_kv(self.model, plan)  # sharing and merged pairs
        self._steps = nn.ModuleList(_step_module(layers[s.layer], self._arch, i, s) for i, s in enumerate(plan.steps))
        self.kv_channel = KVChannel()
        if plan.kv:
            wire(self._steps, self._arch, plan.kv_source_steps, self.kv_channel)
        self._install()

    def _install(self) -> None:
        self._patch_config(self.plan)
        set_path(self.model, self._arch.layers, self._steps)
        skipped = sorted({i for i, s in enumerate(self.plan.steps) if not s.attention} | set(consumer_steps(self.plan)))
        if skipped:
            self._hooks.append(register_cache_hook(self.model, self._arch, self._config, skipped, len(self.plan.steps)))
        if self.plan.merge:
            self._hooks.append(register_merge_hook(self.model, self._arch, self._config, self.plan))
        setattr(self.model, _APPLIED, self)

    def _patch_config(self, plan: Plan) -> None:
        """Make the config describe the executed steps; remember the originals."""
        updates: dict[str, Any] = {"num_hidden_layers": len(plan.steps)}
        updates |= per_layer_values(self._config, self._arch, plan.layers, plan.num_layers)
        for name, value in updates.items():
            self._saved_config[name] = getattr(self._config, name)
            setattr(self._config, name, value)


def apply_plan(model: nn.Module, plan: Plan) -> AppliedPlan:
    """Apply `plan` to `model` now; use as a context manager or call `.restore()` later."""
    return AppliedPlan(model, plan)


def source_slot_cache(cache: Cache, plan: Plan) -> Cache:
    """A view of `cache` for running `plan`: step i's slot IS the slot of its source layer in `cache`.

    A plan applied with this view reads and extends the cache of the untouched model, so a draft plan
    can continue from the full model's keys and values (self-speculative decoding). Layers the plan
    skips get no entries; positions and masks follow the view's own (consistent) lengths.
    """
    if len(set(plan.layers)) < len(plan.steps):
        raise PlanError(f"plan {plan} repeats a layer; sharing the full model's cache needs each layer at most once")
    if plan.kv:
        raise PlanError("a draft plan cannot share KV (kv:): its consumers would leave the full model's slots behind")
    if len(cache.layers) != plan.num_layers:
        raise PlanError(f"the cache has {len(cache.layers)} layer slots, but the plan is for {plan.num_layers} layers")
    view = copy.copy(cache)
    view.layers = [cache.layers[layer] for layer in plan.layers]
    view.layer_class_to_replicate = None
    return view


def share_kv(model: nn.Module, pairs: list[tuple[int, int]]) -> AppliedPlan:
    """Make a model always share keys and values between these (consumer, source) layers.

    For an exported KV plan (`kv_sources` in its config): the identity plan with this map is applied
    and stays applied. A later plan runs with the map joined to its own (pairs whose consumer the plan
    does not run are left out), and restoring that plan brings the shared model back.
    """
    applied = apply_plan(model, Plan.identity(len(decoder_layers(model))).with_kv(pairs))
    setattr(model, _BASE_KV, applied)
    return applied


def with_base_kv(plan: Plan, base: tuple[tuple[int, int], ...]) -> Plan:
    """`plan` with a model's own KV map joined to its own (the model's pairs for layers it runs)."""
    own = dict(plan.kv)
    run = set(plan.layers)
    for consumer, source in base:
        if own.get(consumer, source) != source:
            raise PlanError(f"layer {consumer} already reads layer {source}'s keys and values in this model "
                            f"(its kv_sources); drop {consumer}<-{own[consumer]} from the plan")
        if consumer in run:
            own[consumer] = source
    return plan.with_kv(own.items())


def _step_aside(model: nn.Module) -> AppliedPlan | None:
    """Restore a model's always-on KV plan while another plan runs; it comes back when that one is restored."""
    base = getattr(model, _BASE_KV, None)
    if base is None or getattr(model, _APPLIED, None) is not base:
        return None
    base.restore()
    return base


def current_plan(model: nn.Module) -> Plan | None:
    """The plan applied to `model`, if any."""
    applied = getattr(model, _APPLIED, None)
    return applied.plan if applied is not None else None


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy that shares parameters and buffers but has its own child table and hook tables."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for name, value in vars(module).items():
        if "hook" in name and isinstance(value, OrderedDict):
            setattr(clone, name, OrderedDict(value))
    if "_hf_hook" in vars(module):  # accelerate's dispatch hook is bound to the original module
        clone._old_forward = types.MethodType(type(module).forward, clone)
        clone.forward = functools.update_wrapper(functools.partial(module.forward.func, clone), clone._old_forward)
    return clone


def _step_module(layer: nn.Module, arch: Arch, index: int, step: Step) -> nn.Module:
    """The module that runs one plan step: its own cache slot, skipped halves replaced."""
    clone = _shallow_copy(layer)
    if hasattr(clone, "layer_idx"):
        clone.layer_idx = index
    if step.attention:
        attention = _shallow_copy(clone._modules[arch.attention])
        attention.layer_idx = index
        clone._modules[arch.attention] = attention
    skip_halves(clone, arch, attention=not step.attention, mlp=not step.mlp)
    return clone


def skip_halves(layer: nn.Module, arch: Arch, attention: bool, mlp: bool) -> None:
    """Replace a layer's attention and/or MLP, with the norms that belong only to it, by no-ops."""
    if attention:
        layer._modules[arch.attention] = SkippedAttention()
        for norm in arch.attention_norms:
            layer._modules[norm] = nn.Identity()
    if mlp:
        layer._modules[arch.mlp] = SkippedMLP()
        for norm in arch.mlp_norms:
            layer._modules[norm] = nn.Identity()


def register_cache_hook(model: nn.Module, arch: Arch, config: Any, skipped: list[int], size: int):
    """Before each forward, give the listed attention-less steps an empty cache slot."""
    owner = get_path(model, arch.layers.rpartition(".")[0])
    hook = functools.partial(_prepare_cache, config=config, skipped=skipped, size=size)
    return owner.register_forward_pre_hook(hook, with_kwargs=True)


def drop_sublayers(model: nn.Module, drop_attn: list[int], drop_mlp: list[int]) -> None:
    """Remove attention / MLP halves for good (a model exported with LLM-Drop lists)."""
    arch, layers = arch_of(model), decoder_layers(model)
    if not set(range(len(layers))) - set(drop_attn):
        raise PlanError("drop_attn_list removes every attention sublayer; keep at least one")
    for i, layer in enumerate(layers):
        skip_halves(layer, arch, attention=i in drop_attn, mlp=i in drop_mlp)
    if drop_attn:
        register_cache_hook(model, arch, model.config.get_text_config(decoder=True), sorted(drop_attn), len(layers))


def _prepare_cache(
    module: nn.Module, args: tuple, kwargs: dict, *, config: Any, skipped: list[int], size: int
) -> tuple[tuple, dict]:
    """Give steps without attention an empty cache slot that cache and mask code skip."""
    cache = forward_cache(module, kwargs, config, size)
    if cache is not None:
        for i in skipped:
            if not isinstance(cache.layers[i], DummyLayer):
                cache.layers[i] = EmptySlot(cache)
    return args, kwargs


def forward_cache(module: nn.Module, kwargs: dict, config: Any, size: int) -> Cache | None:
    """The cache this forward will fill (made now, into `kwargs`, if the model would make one itself), with a
    slot for each of the plan's `size` steps so hooks can swap in their own slots; None without a cache."""
    name = cache_argument(module, kwargs)
    cache = kwargs.get(name)
    use_cache = kwargs.get("use_cache")
    if cache is None and (use_cache if use_cache is not None else getattr(config, "use_cache", False)):
        cache = kwargs[name] = DynamicCache(config=config)
    cache = getattr(cache, "self_attention_cache", cache)
    if not isinstance(cache, Cache):
        return None
    if cache.layer_class_to_replicate is not None:
        while len(cache.layers) < size:
            cache.layers.append(cache.layer_class_to_replicate())
    return cache


class EmptySlot(DummyLayer):
    """An empty cache slot that still answers how many tokens were seen.

    transformers asks slot 0 for the past length; when step 0 runs no attention (or reads another
    layer's keys and values) its slot stores nothing, so it answers for the first slot that stores.
    """

    def __init__(self, cache: Cache):
        super().__init__()
        self._cache = cache

    def get_seq_length(self) -> int:
        stored = (layer for layer in self._cache.layers if not isinstance(layer, DummyLayer))
        return next((layer.get_seq_length() for layer in stored), 0)


def cache_argument(module: nn.Module, kwargs: dict) -> str:
    """The cache keyword of a forward call: `cache` since transformers 5.24, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        if name in kwargs:
            return name
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
