"""Perplexity of a text in fixed windows, batched.

Windows:
- non-overlapping (default): the token stream is cut into full windows of `ctx` tokens (a shorter
  tail is dropped, as llama.cpp does); every token after the first of a window is scored, or only
  the second half of each window with `llama_cpp=True` (what llama.cpp's `perplexity` tool scores).
- sliding (`stride=S`): windows of up to `ctx` tokens start every S tokens and only tokens that no
  earlier window scored are scored, so each token is predicted with up to `ctx - S` tokens of context
  (the method of the Hugging Face perplexity guide).

Tokens: special-token strings inside the text (WikiText's `<unk>`) are tokenized as plain text, as
llama.cpp does. BOS: when the tokenizer adds a BOS token, the text is tokenized with it, and in non-overlapping
windows the first token of every window is replaced by BOS (as llama.cpp does), so each window
starts like a document. Sliding windows keep the text's own tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError, SettingsError
from . import stats


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    windows: int
    window_nll: tuple[float, ...] = field(default=(), repr=False)  # summed NLL of each window
    window_tokens: tuple[int, ...] = field(default=(), repr=False)  # scored tokens of each window

    def interval(self, confidence: float = stats.CONFIDENCE) -> stats.Estimate:
        """Perplexity with its interval over windows (`evaluate/stats.py`)."""
        return stats.perplexity(self.window_nll, self.window_tokens, confidence)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_window"] = {"nll": list(data.pop("window_nll")), "tokens": list(data.pop("window_tokens"))}
        return data


@dataclass(frozen=True)
class Window:
    ids: list[int]
    score_from: int  # first position whose token is scored (predicted from the position before)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of raw text. Strings that look like special tokens (WikiText's `<unk>`) stay plain
    text, as in llama.cpp's tokenizer, instead of becoming the special token."""
    return tokenizer(text, split_special_tokens=True)["input_ids"]


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text by default."""
    ids = tokenizer("a")["input_ids"]
    return ids[0] if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else None


def make_windows(tokens: list[int], ctx: int, stride: int | None, bos: int | None, llama_cpp: bool) -> list[Window]:
    """Cut `tokens` into scored windows (see the module docstring)."""
    if ctx < 2:
        raise SettingsError("ctx must be at least 2 tokens")
    if stride is None:
        first = ctx // 2 + 1 if llama_cpp else 1
        windows = []
        for start in range(0, len(tokens) - ctx + 1, ctx):
            ids = tokens[start:start + ctx]
            windows.append(Window(ids if bos is None else [bos] + ids[1:], first))
        return windows
    if not 0 < stride <= ctx:
        raise SettingsError("stride must be between 1 and ctx")
    windows, scored_until = [], 1  # position 0 has no prediction
    for begin in range(0, len(tokens), stride):
        end = min(begin + ctx, len(tokens))
        if end > scored_until:
            windows.append(Window(tokens[begin:end], scored_until - begin))
            scored_until = end
        if end == len(tokens):
            break
    return windows


@torch.inference_mode()
def calibration_windows(tokenizer, text: str, ctx: int, windows: int) -> list[Window]:
    """The first `windows` non-overlapping windows of `ctx` tokens of a calibration text."""
    chunks = make_windows(encode_text(tokenizer, text), ctx, None, bos_id(tokenizer), False)[:windows]
    if not chunks:
        raise DataError(f"the calibration text is shorter than one window of {ctx} tokens; lower --ctx")
    return chunks


def scored_tokens(windows: list[Window]) -> int:
    """How many tokens the windows score (each window scores from its `score_from` position on)."""
    return sum(len(w.ids) - w.score_from for w in windows)


@torch.inference_mode()
def window_nll(model, windows: list[Window], embeds: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and token count over windows of equal length, in one forward pass.

    `embeds`, when given, replaces the token embeddings as the stream entering the first layer
    (the plan search starts candidates from a recorded stream this way).
    """
    nll, counts = per_window_nll(model, windows, embeds)
    return float(nll.sum()), int(counts.sum())


@torch.inference_mode()
def per_window_nll(model, windows: list[Window],
                   embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's summed NLL (float64) and scored-token count, windows of equal length in one forward pass."""
    first = min(w.score_from for w in windows)
    length = len(windows[0].ids)
    ids = None if embeds is not None else torch.tensor([w.ids for w in windows], device=model.device)
    logits = model(input_ids=ids, inputs_embeds=embeds, use_cache=False, logits_to_keep=length - first + 1).logits
    return logits_nll_per_window(logits[:, :-1], windows, first)


@torch.inference_mode()
def chunked_window_nll(model, window: Window, chunk: int) -> tuple[float, int]:
    """Summed NLL and token count of one window fed in chunks of `chunk` tokens on one cache, as in decoding.

    Later chunks attend over what the cache gives back for earlier ones, so caches that store less than
    the keys and values (quantized, merged) shape the score; a plain cache gives `window_nll`'s.
    """
    from transformers import DynamicCache

    from ..runtime import cache_argument

    ids = torch.tensor([window.ids], device=model.device)
    cache = {cache_argument(model, {}): DynamicCache(config=model.config)}  # hooks (plans, cache types) fill it
    logits = torch.cat([model(ids[:, start:start + chunk], use_cache=True, **cache).logits
                        for start in range(0, ids.shape[1], chunk)], dim=1)
    return logits_nll(logits[:, :-1], [window], 1)


def logits_nll(logits: torch.Tensor, windows: list[Window], first: int) -> tuple[float, int]:
    """Summed NLL and token count, from logits at positions `first - 1 .. length - 2` of each window."""
    nll, counts = logits_nll_per_window(logits, windows, first)
    return float(nll.sum()), int(counts.sum())


def logits_nll_per_window(logits: torch.Tensor, windows: list[Window], first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits_nll` window by window: summed NLL (float64) and scored-token count of each."""
    ids = torch.tensor([w.ids for w in windows], device=logits.device)
    targets = ids[:, first:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    keep = torch.arange(first, ids.shape[1], device=ids.device)[None, :] >= torch.tensor(
        [w.score_from for w in windows], device=ids.device
    )[:, None]
    return (nll.double() * keep).sum(dim=1).cpu(), keep.sum(dim=1).cpu()


def perplexity(
    model,
    tokenizer,
    text: str,
    ctx: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    llama_cpp: bool = False,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `text` under `model` as it is now (apply a plan around the call)."""
    tokens = encode_text(tokenizer, text)
    windows = make_windows(tokens, ctx, stride, bos_id(tokenizer), llama_cpp)[:max_windows]
    if not windows:
        raise DataError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}; use a longer text "
                        "or a smaller --ctx")
    nll: list[float] = []
    counts: list[int] = []
    batches = _batches(windows, batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        batch_nll, batch_counts = per_window_nll(model, batch)
        nll += batch_nll.tolist()
        counts += batch_counts.tolist()
    total, count = math.fsum(nll), sum(counts)
    return PerplexityResult(math.exp(total / count), total / count, count, len(windows), tuple(nll), tuple(counts))


def _batches(windows: list[Window], size: int) -> list[list[Window]]:
    """Consecutive batches of windows of equal length."""
    batches: list[list[Window]] = []
    for window in windows:
        if batches and len(batches[-1]) < size and len(batches[-1][0].ids) == len(window.ids):
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches
