"""Multiple-choice accuracy (HellaSwag-style), computed as lm-evaluation-harness computes it.

Each ending is scored as the summed log-probability of `" " + ending` after the query, tokenized as
lm-eval's `_encode_pair` does (context and context+continuation encoded, the continuation being the
tail of the whole encoding). `acc` picks the ending with the highest sum; `acc_norm` divides each sum
by the ending's length in characters first (`len(choice)` in lm-eval; equal to the byte length for
ASCII text). Two ways to run, with the same numbers:
- `batch_size=None` (default, best on CPU): the context runs once per item and its KV cache serves
  all endings, which run together as one batch -- no token is computed twice.
- `batch_size=B` (best on accelerators, where one call costs about as much as a few): whole
  context+ending sequences of many items run B at a time, right-padded (causal attention never
  looks at the padding), longest first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..corpora import Choice
from ..errors import DataError
from .perplexity import bos_id


@dataclass(frozen=True)
class ItemScore:
    loglikelihoods: tuple[float, ...]
    prediction: int  # argmax of the log-likelihoods
    prediction_norm: int  # argmax of the log-likelihoods per character
    label: int


@dataclass(frozen=True)
class ChoiceResult:
    acc: float
    acc_norm: float
    items: int
    scores: list[ItemScore] = field(repr=False)

    def to_dict(self, with_items: bool = False) -> dict:
        data = asdict(self)
        if not with_items:
            del data["scores"]
        return data


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; the continuation is the tail."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _argmax(values: list[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.inference_mode()
def score_item(model, tokenizer, item: Choice, add_special_tokens: bool) -> ItemScore:
    """Log-likelihood of each ending: one context pass, then all endings in one batch on its cache."""
    pairs = [encode_pair(tokenizer, item.query, " " + ending, add_special_tokens) for ending in item.endings]
    context = torch.tensor([pairs[0][0]], device=model.device)
    out = model(context, use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(pairs))
    longest = max(len(cont) for _, cont in pairs)
    endings = torch.zeros(len(pairs), longest, dtype=torch.long, device=model.device)  # right padding is
    for row, (_, cont) in enumerate(pairs):  # never attended to: attention is causal
        endings[row, : len(cont)] = torch.tensor(cont)
    logprobs = F.log_softmax(model(endings, past_key_values=cache, use_cache=True).logits.float(), dim=-1)
    sums = []
    for row, (_, cont) in enumerate(pairs):
        total = first[cont[0]] + logprobs[row, torch.arange(len(cont) - 1), cont[1:]].sum()
        sums.append(float(total))
    return _item_score(item, sums)


def _item_score(item: Choice, sums: list[float]) -> ItemScore:
    norm = [s / len(ending) for s, ending in zip(sums, item.endings, strict=True)]
    return ItemScore(tuple(sums), _argmax(sums), _argmax(norm), item.label)


@torch.inference_mode()
def score_batched(model, tokenizer, items: list[Choice], batch_size: int, add_special_tokens: bool,
                  progress: bool = True) -> list[ItemScore]:
    """Every (context, ending) sequence scored whole, `batch_size` sequences per forward pass."""
    requests = [(i, j, *encode_pair(tokenizer, item.query, " " + ending, add_special_tokens))
                for i, item in enumerate(items) for j, ending in enumerate(item.endings)]
    requests.sort(key=lambda r: -(len(r[2]) + len(r[3])))
    sums = [[0.0] * len(item.endings) for item in items]
    for start in tqdm(range(0, len(requests), batch_size), desc="multiple choice", unit="batch",
                      disable=not progress, leave=False):
        batch = requests[start:start + batch_size]
        width = len(batch[0][2]) + len(batch[0][3])
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=model.device)
        mask = torch.zeros_like(ids)
        for row, (_, _, context, cont) in enumerate(batch):
            ids[row, : len(context) + len(cont)] = torch.tensor(context + cont)
            mask[row, : len(context) + len(cont)] = 1
        logprobs = F.log_softmax(model(ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
        for row, (i, j, context, cont) in enumerate(batch):
            positions = torch.arange(len(context) - 1, len(context) + len(cont) - 1, device=model.device)
            sums[i][j] = float(logprobs[row, positions, torch.tensor(cont, device=model.device)].sum())
    return [_item_score(item, item_sums) for item, item_sums in zip(items, sums, strict=True)]


def multiple_choice(model, tokenizer, items: list[Choice], batch_size: int | None = None,
                    progress: bool = True) -> ChoiceResult:
    """acc and acc_norm over `items` under `model` as it is now (apply a plan around the call)."""
    if not items:
        raise DataError("no multiple-choice items to score")
    add_special = bos_id(tokenizer) is not None
    if batch_size:
        scores = score_batched(model, tokenizer, items, batch_size, add_special, progress)
    else:
        scores = [score_item(model, tokenizer, item, add_special)
                  for item in tqdm(items, desc="multiple choice", unit="item", disable=not progress, leave=False)]
    acc = sum(s.prediction == s.label for s in scores) / len(scores)
    acc_norm = sum(s.prediction_norm == s.label for s in scores) / len(scores)
    return ChoiceResult(acc, acc_norm, len(scores), scores)
