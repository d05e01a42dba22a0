"""KV sharing between layers at run time: the `kv:` clause of a plan.

A *consumer* step computes only its queries and attends over the keys and values of an earlier
*source* step (its source in `Plan.kv_source_steps`); its cache slot stores nothing. How it works,
without forking any modeling code:

- A per-forward side channel (`KVChannel`) holds, by step index, the keys and values each source
  step's attention used: what its cache's `update` returned (the whole history, dequantized if the
  cache is quantized, the full states in a sliding-window layer during prefill), or its fresh keys
  and values in a forward without a cache. That is what Gemma 4 does with its `shared_kv_states`.
- Every attention module in transformers 5 ends its key/value path with
  `cache.update(keys, values, layer_idx)`. A source step's attention gets, as its `cache`, a recorder
  that forwards the update to the real cache (if any) and keeps the result in the channel; a
  consumer's attention gets a lender whose `update` ignores the keys and values it is given and
  returns the source's. Queries, rotary embeddings, q-norms, the attention kernel and the output
  projection stay the model's own code.
- A consumer does not project keys and values at all: its step copy gets copies of `k_proj` /
  `v_proj` (same weights, so state-dict names stay) that return a zero-stride zero tensor
  (`Arch.kv_projections`; fused projections such as Phi-3's `qkv_proj` still run and are discarded).
- The consumer's cache slot becomes a `DummyLayer` (the runtime's cache hook), so the cache holds
  one copy; the mask code skips dummy slots, and a consumer is never the first layer of its type
  because its source, of the same type, runs earlier.
- The last consumer of a source drops the channel's reference, so nothing outlives the forward.

Only the plan's step copies are rewired (never the model's own modules), so restoring the plan
undoes everything.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .arch import Arch, decoder_layers
from .errors import PlanError
from .plan import Plan
from .settings import check_kv_types


class KVChannel:
    """Keys and values that source steps used in the current forward, by (absolute) step index.

    `keep=True` keeps every entry after it is read (a search records all steps and reuses them).
    """

    def __init__(self, keep: bool = False) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keep = keep


class _Recorder:
    """Stands in for a source step's cache: updates the real cache, if any, and keeps what it returns."""

    def __init__(self, cache: Any, channel: KVChannel, key: int) -> None:
        self.cache, self.channel, self.key = cache, channel, key

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        if self.cache is not None:
            keys, values = self.cache.update(keys, values, *args, **kwargs)
        self.channel.entries[self.key] = (keys, values)
        return keys, values


class _Lender:
    """Stands in for a consumer step's cache: `update` returns the source step's keys and values."""

    def __init__(self, cache: Any, channel: KVChannel, source: int, last_reader: bool) -> None:
        self.channel, self.source, self.last_reader = channel, source, last_reader

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        entries = self.channel.entries
        if self.source not in entries:
            raise RuntimeError(f"step {self.source}'s keys and values were not recorded before a consumer read them")
        return entries[self.source] if self.channel.keep or not self.last_reader else entries.pop(self.source)


def _with_cache_stand_in(forward, make_stand_in, *args: Any, **kwargs: Any):
    """Call the attention's own forward with its `cache` (`past_key_values` before transformers 5.24) replaced."""
    name = "past_key_values" if "past_key_values" in kwargs else "cache"
    kwargs[name] = make_stand_in(kwargs.get(name))
    return forward(*args, **kwargs)


def _zero_projection(out_features: int, hidden: torch.Tensor) -> torch.Tensor:
    """What a consumer's key/value projection returns: zeros without memory (stride 0), replaced later anyway."""
    return hidden.new_zeros(()).expand(*hidden.shape[:-1], out_features)


def _skip_projections(attention: nn.Module, arch: Arch) -> None:
    for name in arch.kv_projections:
        projection = copy.copy(attention._modules[name])  # shares the weight: state-dict names are unchanged
        projection.forward = functools.partial(_zero_projection, projection.out_features)
        attention._modules[name] = projection


def wire(steps: Sequence[nn.Module], arch: Arch, sources: Sequence[int | None], channel: KVChannel,
         offset: int = 0, record: Iterable[int] = ()) -> None:
    """Make step modules share keys and values through `channel` (step modules are a plan's own copies).

    Module j is step `offset + j`; `sources[j]` is the absolute index of the step it reads, or None.
    Sources before `offset` are not run here: their entries must be in the channel before each
    forward (the search starts candidates from a recorded prefix this way). `record` lists more
    steps whose keys and values to keep in the channel.
    """
    last_reader: dict[int, int] = {}
    for j, source in enumerate(sources):
        if source is not None:
            last_reader[source] = offset + j
    producers = set(last_reader) | set(record)
    for j, (module, source) in enumerate(zip(steps, sources, strict=True)):
        index = offset + j
        attention = module._modules[arch.attention]
        if source is not None:
            _skip_projections(attention, arch)
            stand_in = functools.partial(_Lender, channel=channel, source=source,
                                         last_reader=last_reader[source] == index)
        elif index in producers and hasattr(attention, "layer_idx"):  # not a skipped attention half
            stand_in = functools.partial(_Recorder, channel=channel, key=index)
        else:
            continue
        attention.forward = functools.partial(_with_cache_stand_in, attention.forward, stand_in)


def check_kv(model: nn.Module, plan: Plan) -> None:
    """Refuse KV pairs whose layers cannot share and merged pairs (`kvmerge:`) whose layers cannot merge:
    different head shapes or attention types (Gemma 3)."""
    if not plan.kv and not plan.merge:
        return
    from .arch import arch_of

    arch = arch_of(model)
    layers = decoder_layers(model)
    check_kv_types(plan, tuple(getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ()))
    pairs = [(f"kv pair {consumer}<-{source}", consumer, source, "pair") for consumer, source in plan.kv]
    pairs += [(f"kvmerge pair {first}+{second}", first, second, "merge") for first, second, _ in plan.merge]
    for name, one, other, verb in pairs:
        shapes = [attention_shapes(layers[i]._modules[arch.attention]) for i in (one, other)]
        if shapes[0] != shapes[1]:
            raise PlanError(f"{name}: the layers' attention shapes differ ({shapes[0]} vs {shapes[1]}); "
                            f"{verb} layers whose key/value heads have the same shape")


def attention_shapes(attention: nn.Module) -> dict[str, Any]:
    """Head dimension and every parameter shape of an attention module (what sharing needs to match)."""
    shapes: dict[str, Any] = {"head_dim": getattr(attention, "head_dim", None)}
    return shapes | {name: tuple(p.shape) for name, p in attention.named_parameters()}


def consumer_steps(plan: Plan) -> list[int]:
    """Steps that read another step's keys and values (their cache slots stay empty)."""
    return [i for i, source in enumerate(plan.kv_source_steps) if source is not None]


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a cache object holds, each storage counted once (measured, not estimated)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen and storage.nbytes():
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for layer in getattr(cache, "layers", []):
        for name, value in vars(layer).items():
            if name != "_sliding_window_tensor":  # a constant, not cached tokens
                visit(value)
    return total
