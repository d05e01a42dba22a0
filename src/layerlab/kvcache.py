"""Quantized KV caches: per-token 8-bit and 4-bit storage, and transformers' own quantized backends.

Cache types (`settings.CACHE_TYPES`, chosen with `settings.CacheSettings`):
- `full`: transformers' `DynamicCache` at the model's dtype (the reference).
- `int8`, `int4`: layerlab's own cache layers. Every new token's key and value vectors are quantized
  per token and per head over the head dimension, asymmetrically (`x ~ code * scale + min`, codes
  in 0..255 or 0..15, two 4-bit codes packed per byte, `scale` and `min` in float16), so a token's
  codes never change once written and the cache only appends. `update` returns the whole history
  dequantized *including the new tokens*, so a forward over a whole text attends over exactly what
  token-by-token decoding attends over (no full-precision residual window as in KIVI: a pessimistic
  choice that makes perplexity measurable in one pass). Sliding-window layers (Gemma 3) keep their
  last `window - 1` tokens as transformers' `DynamicSlidingWindowLayer` does; every layer type works.
- `fp8`: transformers' `QuantizedCache(backend="fp8")`: float8 e4m3 with one scale per tensor, frozen
  at the first update. Like all of transformers' quantized caches it refuses models with non-full
  attention layers (Gemma 3), and the first chunk it sees attends in full precision.
- `quanto-int4`, `quanto-int2`, `hqq-int8`, `hqq-int4`: transformers' group-wise backends, which need
  the `optimum-quanto` / `hqq` packages (not layerlab dependencies); same full-attention restriction.

The cost is honest: every decoding step dequantizes the whole history of every layer (no attention
kernel here reads codes directly), which is work proportional to the context, next to attention.

`kv_cache(model, settings)` makes every forward of the model use the chosen type: a fresh
`DynamicCache` (what `generate()` and the model itself create) gets the type's layers before the
first layer runs, and a forward without a cache gets a fresh one, so perplexity measured inside the
block attends over quantized keys and values. It composes with KV-sharing plans (their consumer
slots stay empty) in either order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import (
    Cache,
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    QuantizedCache,
    get_layer_types_and_kwargs,
)

from .arch import arch_of, get_path
from .errors import LayerlabError
from .evaluate.perplexity import PerplexityResult, bos_id, chunked_window_nll, encode_text, make_windows
from .runtime import EmptySlot, cache_argument
from .settings import CacheSettings

SCALE_DTYPE = torch.float16


# ------------------------------------------------------------------------------------------ per-token codes
def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector asymmetric codes over the last dimension: (codes uint8, scale, min), scale and min in float16."""
    levels = 2 ** bits - 1
    low = x.amin(-1, keepdim=True).to(SCALE_DTYPE)
    scale = ((x.amax(-1, keepdim=True) - low.float()) / levels).to(SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant vector: any scale works
    codes = ((x.float() - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
    return (codes.to(dtype) * scale.to(dtype)).add_(low.to(dtype))


class PerTokenQuantizedLayer(DynamicLayer):
    """A full-attention cache layer storing per-token `bits`-bit codes of keys and values (see the module docstring)."""

    is_croppable = True

    def __init__(self, bits: int = 8, **kwargs) -> None:
        super().__init__()
        self.bits = bits
        self.stored: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None  # (keys, values) parts

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = (quantize(key_states, self.bits), quantize(value_states, self.bits))
        every = new if self.stored is None else tuple(
            tuple(torch.cat([old, part], dim=-2) for old, part in zip(olds, parts, strict=True))
            for olds, parts in zip(self.stored, new, strict=True))
        self.stored = self._kept(every)
        return tuple(dequantize(*parts, self.bits, self.dtype) for parts in every)

    def _kept(self, every):
        return every

    def get_seq_length(self) -> int:
        return 0 if self.stored is None else self.stored[0][0].shape[-2]

    def reset(self) -> None:
        self.stored = None
        super().reset()

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.stored is not None:
            self.stored = tuple(tuple(function(part) for part in parts) for parts in self.stored)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class PerTokenQuantizedSlidingLayer(PerTokenQuantizedLayer):
    """The sliding-window variant: keeps the codes of the last `sliding_window - 1` tokens."""

    is_sliding = True
    is_croppable = False

    def __init__(self, bits: int = 8, sliding_window: int = 4096, **kwargs) -> None:
        super().__init__(bits)
        self.sliding_window = sliding_window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        return super().update(key_states, value_states)

    def _kept(self, every):
        """The last window - 1 tokens, copied so that a long prefill's codes are freed."""
        keep = self.sliding_window - 1
        return tuple(tuple(part[..., -keep:, :].clone() if part.shape[-2] > keep else part for part in parts)
                     for parts in every)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return DynamicSlidingWindowLayer.get_mask_sizes(self, query_length)

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


# ------------------------------------------------------------------------------------------ cache types
def layer_types(config) -> tuple[str, ...]:
    """The attention type of each layer, as transformers' caches see them."""
    return tuple(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])


def new_cache(settings: CacheSettings, config) -> Cache:
    """An empty cache of this type for a model with this config (a plan's config while one is applied)."""
    kind = settings.type
    if kind.backend:
        return QuantizedCache(kind.backend, config, nbits=kind.nbits)
    cache = DynamicCache(config=config)
    if kind.bits:
        _quantize_layers(cache, kind.bits)
    return cache


def _quantize_layers(cache: Cache, bits: int) -> None:
    """Give an empty DynamicCache per-token quantized layers of the same kinds (dummy slots stay dummy)."""
    def convert(layer):
        if isinstance(layer, DynamicSlidingWindowLayer):
            return PerTokenQuantizedSlidingLayer(bits, layer.sliding_window)
        return PerTokenQuantizedLayer(bits) if type(layer) is DynamicLayer else layer

    cache.layers = [convert(layer) for layer in cache.layers]
    if cache.layer_class_to_replicate is not None:
        cache.layer_class_to_replicate = functools.partial(PerTokenQuantizedLayer, bits)


def _fresh_dynamic(cache: Cache) -> bool:
    """A DynamicCache nothing has been written to, whose layers are transformers' plain ones."""
    return type(cache) is DynamicCache and all(isinstance(layer, DummyLayer) or (
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and not layer.is_initialized)
        for layer in cache.layers)


def _use_cache_type(module: nn.Module, args: tuple, kwargs: dict, *, settings: CacheSettings, config) -> tuple:
    name = cache_argument(module, kwargs)
    cache = kwargs.get(name)
    if settings.kind == "full":
        return args, kwargs
    if cache is None:
        kwargs[name] = new_cache(settings, config)
    elif _fresh_dynamic(cache):
        dummies = [i for i, layer in enumerate(cache.layers) if isinstance(layer, DummyLayer)]
        cache.layers = new_cache(settings, config).layers
        cache.layer_class_to_replicate = None
        for i in dummies:
            cache.layers[i] = EmptySlot(cache)
    return args, kwargs


@contextmanager
def kv_cache(model: nn.Module, settings: CacheSettings) -> Iterator[None]:
    """Run every forward of `model` inside the block on a cache of this type (see the module docstring)."""
    config = model.config.get_text_config(decoder=True)
    settings.check(layer_types(config), config.model_type)
    owner = get_path(model, arch_of(model).layers.rpartition(".")[0])
    hook = functools.partial(_use_cache_type, settings=settings, config=config)
    handle = owner.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ measuring
@torch.inference_mode()
def chunked_perplexity(model, tokenizer, text: str, ctx: int = 2048, chunk: int = 256, max_windows: int | None = None,
                       progress: bool = True) -> PerplexityResult:
    """Perplexity over non-overlapping windows, each fed in chunks of `chunk` tokens on one cache.

    Later chunks attend over what the cache stored of earlier ones, so the cache type's storage
    (transformers' backends included, whose first chunk stays in full precision) shapes the score as
    in decoding. With a full cache it equals `evaluate.perplexity.perplexity` (same windows, BOS rule).
    """
    windows = make_windows(encode_text(tokenizer, text), ctx, None, bos_id(tokenizer), False)[:max_windows]
    if not windows:
        raise LayerlabError(f"the text is shorter than one window of {ctx} tokens")
    total, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        nll, n = chunked_window_nll(model, window, chunk)
        total, count = total + nll, count + n
    return PerplexityResult(math.exp(total / count), total / count, count, len(windows))
