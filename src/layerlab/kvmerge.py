"""MiniCache-style merged KV cache of two adjacent layers: the `kvmerge:` clause of a plan.

For a merged pair (layer A and A+1, Liu et al. 2024, "MiniCache") the cache keeps, per token and
key/value head, for keys and for values separately:
- one shared *direction*: the SLERP at t = 0.5 of the two layers' unit vectors, which is their
  normalized sum (slerp(p, q, 1/2) = (p + q) / (2 cos(theta/2)) and |p + q| = 2 cos(theta/2));
- each layer's *magnitude* (two numbers);
- for tokens whose two directions are more than the pair's angle apart (MiniCache's retained
  outliers) the direction is layer A's own and layer A+1's exact vector is kept beside it, with its
  (batch, head, position) index.
Each layer's vector comes back as its magnitude times the shared direction (outliers: exactly).
A merged token-head of head size D stores D + 2 numbers instead of 2 D: about half for the pair.

When it happens: layer A's new keys and values wait (`pending`) until layer A+1's arrive in the same
forward; then both are merged and stored. A forward attends over the restored (merged) keys and
values of earlier tokens and over its own new tokens exactly, for both layers: the first layer cannot
do otherwise (its partner's keys for the new tokens do not exist yet), and treating both layers
alike keeps the rule simple. So a prompt's prefill is exact, as in MiniCache, and decoding token by
token attends over merged history; a perplexity fed in chunks of N tokens sees each chunk's own
tokens exactly (`evaluate.perplexity.chunked_window_nll`), and a one-forward score (the usual
perplexity, multiple choice) does not see the merge at all.

Every step restores the whole history of the pair (work proportional to the context, like the
quantized caches' dequantization). Sliding-window layers are not merged (refused by the plan check).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .arch import Arch, get_path
from .plan import Plan, merge_steps


# ------------------------------------------------------------------------------------------ the merge
def merge(first: torch.Tensor, second: torch.Tensor, max_angle: float) -> tuple[torch.Tensor, ...]:
    """(direction, magnitudes, outlier index, outlier vectors) of two layers' [batch, heads, tokens, dim] states."""
    norms = (first.norm(dim=-1, keepdim=True), second.norm(dim=-1, keepdim=True))
    units = [x / n.clamp_min(torch.finfo(x.dtype).tiny) for x, n in zip((first, second), norms, strict=True)]
    apart = (units[0] * units[1]).sum(-1) < math.cos(math.radians(max_angle))
    shared = nn.functional.normalize(units[0] + units[1], dim=-1)
    direction = torch.where(apart[..., None], units[0], shared)
    return direction, torch.cat(norms, dim=-1), apart.nonzero().to(torch.int32), second[apart]


def restore(direction: torch.Tensor, magnitudes: torch.Tensor, index: torch.Tensor, vectors: torch.Tensor,
            which: int) -> torch.Tensor:
    """Layer `which` (0: A, 1: A+1) of a merged pair: magnitude x direction, A+1's outliers exactly."""
    out = direction * magnitudes[..., which:which + 1]
    if which and len(index):
        out[tuple(index.long().unbind(1))] = vectors
    return out


# ------------------------------------------------------------------------------------------ cache layers
class MergedSecondLayer(DynamicLayer):
    """The cache slot of layer A+1: holds the pair's merged keys and values (`stored`)."""

    is_croppable = False

    def __init__(self, max_angle: float) -> None:
        super().__init__()
        self.max_angle = max_angle
        self.stored: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None  # keys, values
        self.length = 0
        self.first: MergedFirstLayer | None = None  # the partner slot, set by `merged_slots`

    def restored(self, which: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.stored is None:
            return None
        return tuple(restore(*parts, which) for parts in self.stored)

    def add(self, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Merge the new tokens of both layers and append them."""
        new = tuple(merge(a, b, self.max_angle) for a, b in zip(first, second, strict=True))
        if self.stored is not None:
            new = tuple(self._append(old, part) for old, part in zip(self.stored, new, strict=True))
        self.stored = new
        self.length += first[0].shape[-2]

    def _append(self, old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        index = new[2] + torch.tensor([0, 0, self.length], dtype=new[2].dtype, device=new[2].device)
        return (torch.cat([old[0], new[0]], dim=-2), torch.cat([old[1], new[1]], dim=-2),
                torch.cat([old[2], index]), torch.cat([old[3], new[3]]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Merge layer A's pending tokens with these and store them; return A+1's restored past and its new tokens."""
        if self.first.pending is None:
            raise RuntimeError("layer A+1 of a merged pair ran before layer A in this forward")
        past = self.restored(1)
        self.add(self.first.pending, (key_states, value_states))
        self.first.pending = None
        return _with_past(past, (key_states, value_states))

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.stored, self.length = None, 0
        super().reset()


class MergedFirstLayer(DynamicLayer):
    """The cache slot of layer A: keeps its new tokens until layer A+1's arrive (then both go to `partner`)."""

    is_croppable = False

    def __init__(self, partner: MergedSecondLayer) -> None:
        super().__init__()
        self.partner = partner
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.is_initialized = self.partner.is_initialized = True
        self.pending = (key_states, value_states)
        return _with_past(self.partner.restored(0), self.pending)

    def get_seq_length(self) -> int:
        return self.partner.length + (0 if self.pending is None else self.pending[0].shape[-2])

    def reset(self) -> None:
        self.pending = None
        super().reset()


def _with_past(past: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor]):
    if past is None:
        return new
    return tuple(torch.cat([old, part], dim=-2) for old, part in zip(past, new, strict=True))


def merged_slots(max_angle: float) -> tuple[MergedFirstLayer, MergedSecondLayer]:
    """A fresh pair of cache slots for one merged pair."""
    second = MergedSecondLayer(max_angle)
    second.first = first = MergedFirstLayer(second)
    return first, second


# ------------------------------------------------------------------------------------------ wiring
def _prepare_merged(module: nn.Module, args: tuple, kwargs: dict, *, config: Any,
                    pairs: list[tuple[int, int, float]], size: int) -> tuple[tuple, dict]:
    """Before each forward: a cache if the model will make one, with merged slots for the pairs' steps."""
    from .runtime import forward_cache

    cache = forward_cache(module, kwargs, config, size)
    if cache is not None:
        for first, second, angle in pairs:
            if not isinstance(cache.layers[first], MergedFirstLayer):
                cache.layers[first], cache.layers[second] = merged_slots(angle)
    return args, kwargs


def register_merge_hook(model: nn.Module, arch: Arch, config: Any, plan: Plan):
    """Give every cache a forward of `model` uses (the plan applied) merged slots for the plan's pairs."""
    owner = get_path(model, arch.layers.rpartition(".")[0])
    hook = functools.partial(_prepare_merged, config=config, pairs=merge_steps(plan), size=len(plan.steps))
    return owner.register_forward_pre_hook(hook, with_kwargs=True)
