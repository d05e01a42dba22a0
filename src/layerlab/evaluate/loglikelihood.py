"""Log-likelihoods of continuations after contexts, as lm-evaluation-harness computes them, with no token run twice.

Every zero-shot task reduces to requests `(context, continuation)`: the summed log-probability of the
continuation's tokens after the context, and whether each of them is the greedy (argmax) choice.
Tokens are split as lm-eval 0.4.13 splits them (`encode_pair`): the context is encoded alone, the
continuation is the tail of the encoding of context + continuation, trailing context spaces move to
the continuation.

How the model is run (`share_contexts=True`, the default):
- Requests with the same context form a *unit*. The model must run each sequence
  `context + continuation[:-1]` (the last continuation token is only predicted, never fed); a
  one-token continuation needs no sequence of its own, only the logits after the context, so an MMLU
  or BoolQ item is one sequence however many answers it has.
- Units with several sequences (HellaSwag, ARC, PIQA, OpenBookQA: one per ending) run `batch_size`
  contexts per forward pass, left-padded so that they end together (pads masked, positions counted
  from each context's first real token), then all their endings in one more pass on that KV cache:
  two passes for `batch_size` items, and no context token runs twice.
- Units of one sequence each (MMLU, BoolQ, LAMBADA, WinoGrande's contexts) run `batch_size` whole
  sequences per pass, right-padded: sorted by their tokens, neighbours that share a prefix of at least
  `MIN_SHARED` tokens (MMLU's per-subject header, WinoGrande's sentence before the blank, a BoolQ
  passage asked twice) run that prefix once first; the rest are sorted by length so padding stays small.
- The LM head runs only on the positions whose predictions are scored (`logits_to_keep`).
Right padding is never attended to (attention is causal); left padding is masked. On a CPU the cost of
a forward pass of a small model is dominated by reading its weights, so fewer, fuller passes win.

`share_contexts=False` runs every request as one whole sequence, `batch_size` of them per forward pass,
longest first (what lm-eval does; best on accelerators with large batches). Both ways agree with a
plain forward pass of context + continuation to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .perplexity import bos_id

MIN_SHARED = 8  # tokens a prefix must have for neighbouring one-sequence units to share it
CPU_BATCH = 8  # sequences per forward pass when contexts are shared (batching pays ~1.4x on a CPU)


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float  # summed log-probability of the continuation's tokens, in nats
    greedy: bool  # every continuation token is the argmax of its prediction


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; the continuation is the tail."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return context_ids, whole[len(context_ids):]


@dataclass
class _Unit:
    """The requests sharing one context, and the sequences the model must run for them."""

    context: tuple[int, ...]
    requests: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (request index, continuation)

    def sequences(self) -> list[tuple[int, ...]]:
        """`context + continuation[:-1]` for each distinct multi-token continuation, or the context alone."""
        tails = list(dict.fromkeys(cont[:-1] for _, cont in self.requests if len(cont) > 1))
        return [self.context + tail for tail in tails] or [self.context]


@dataclass(frozen=True)
class _Row:
    unit: _Unit
    tokens: tuple[int, ...]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _blocks(units: list[_Unit], batch_size: int, share: bool) -> tuple[list[list[_Unit]], list[list[_Row]]]:
    """Forward-pass groups (see the module docstring): units with several sequences, `batch_size` per group,
    and the rows of one-sequence units, clustered by shared prefixes, else by length."""
    multi, single = [], []
    for unit in sorted(units, key=lambda u: u.context):
        sequences = unit.sequences()
        if share and len(sequences) > 1:
            multi.append(unit)
        else:
            single += [_Row(unit, s) for s in sequences]
    multi.sort(key=lambda u: -max(len(c) for _, c in u.requests))  # endings of similar length together: the
    # continuation pass is the wider one (padded to its longest ending), so this keeps padding smallest
    clusters, pool = [], []
    for row in single:  # sorted by tokens: rows sharing a prefix are neighbours
        if share and clusters and _common_prefix(clusters[-1][0].tokens, row.tokens) >= MIN_SHARED:
            clusters[-1].append(row)
        else:
            clusters.append([row])
    rows = []
    for cluster in clusters:
        if len(cluster) == 1:
            pool += cluster
        else:
            rows += _by_length(cluster, batch_size)
    return _chunks(multi, batch_size), rows + _by_length(pool, batch_size)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _by_length(rows: list[_Row], batch_size: int) -> list[list[_Row]]:
    return _chunks(sorted(rows, key=lambda r: -len(r.tokens)), batch_size)


def _score(logits: torch.Tensor, cont: tuple[int, ...]) -> Loglikelihood:
    """The continuation's log-likelihood and greedy flag from the logits that predict each of its tokens."""
    logits = logits.float()
    target = torch.tensor(cont, device=logits.device)
    logprobs = F.log_softmax(logits, dim=-1)
    return Loglikelihood(float(logprobs[torch.arange(len(cont)), target].sum()),
                         bool((logits.argmax(-1) == target).all()))


@torch.inference_mode()
def _run_contexts(model, units: list[_Unit], results: list) -> None:
    """Several contexts in one left-padded pass, then all their continuations in one pass on that cache.

    Left padding lines the contexts up at the end, so the logits after each context are in the last
    column; pads are masked out and positions count real tokens only, so nothing changes any number.
    """
    lengths = torch.tensor([len(u.context) for u in units], device=model.device)
    width = int(lengths.max())
    ids = torch.zeros(len(units), width, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for i, unit in enumerate(units):
        ids[i, width - len(unit.context):] = torch.tensor(unit.context)
        mask[i, width - len(unit.context):] = 1
    out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                logits_to_keep=1)
    last = out.logits[:, -1]
    rows = [(i, tail) for i, unit in enumerate(units) for tail in dict.fromkeys(
        cont[:-1] for _, cont in unit.requests if len(cont) > 1)]
    index = torch.tensor([i for i, _ in rows], device=model.device)
    cache = out.past_key_values
    cache.batch_select_indices(index)
    tail_width = max(len(tail) for _, tail in rows)
    tails = torch.zeros(len(rows), tail_width, dtype=torch.long, device=model.device)
    for r, (_, tail) in enumerate(rows):
        tails[r, : len(tail)] = torch.tensor(tail)
    tail_mask = torch.cat([mask[index], torch.ones_like(tails)], dim=1)
    positions = lengths[index][:, None] + torch.arange(tail_width, device=model.device)[None, :]
    logits = model(tails, attention_mask=tail_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True).logits
    row_of = {row: r for r, row in enumerate(rows)}
    for i, unit in enumerate(units):
        for request, cont in unit.requests:
            predictions = last[i:i + 1]  # the prediction of the first continuation token, then the tail's
            if len(cont) > 1:
                predictions = torch.cat([predictions, logits[row_of[i, cont[:-1]], : len(cont) - 1]])
            results[request] = _score(predictions, cont)


@torch.inference_mode()
def _run_rows(model, rows: list[_Row], share: bool, results: list) -> None:
    """One shared prefix (when there is one), then every row's rest as one right-padded batch."""
    starts = [len(row.unit.context) - 1 for row in rows]  # the first position whose prediction is scored
    prefix = min(starts)
    if share:
        for row in rows[1:]:
            prefix = min(prefix, _common_prefix(rows[0].tokens, row.tokens))
    else:
        prefix = 0
    cache = None
    if prefix:
        ids = torch.tensor([rows[0].tokens[:prefix]], device=model.device)
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        if len(rows) > 1:
            cache.batch_repeat_interleave(len(rows))
    width = max(len(row.tokens) for row in rows) - prefix
    first = min(starts) - prefix
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
    for i, row in enumerate(rows):
        ids[i, : len(row.tokens) - prefix] = torch.tensor(row.tokens[prefix:])
    logits = model(ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=width - first).logits
    for i, row in enumerate(rows):
        for index, cont in row.unit.requests:
            if len(cont) > 1 and row.tokens[len(row.unit.context):] != cont[:-1]:
                continue  # scored on the row that holds this continuation
            begin = len(row.unit.context) - 1 - prefix - first
            results[index] = _score(logits[i, begin:begin + len(cont)], cont)


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = CPU_BATCH,
                   share_contexts: bool = True, progress: bool = True,
                   desc: str = "loglikelihood") -> list[Loglikelihood]:
    """Each `(context, continuation)` request's log-likelihood under `model` as it is now (apply a plan around).

    `batch_size`: sequences per forward pass. `share_contexts=False`: whole sequences only, as lm-eval runs them.
    """
    add_special = bos_id(tokenizer) is not None
    units: dict[tuple[int, ...], _Unit] = {}
    for index, (context, continuation) in enumerate(requests):
        context_ids, cont_ids = encode_pair(tokenizer, context, continuation, add_special)
        if not context_ids or not cont_ids:
            raise ValueError(f"request {index} has an empty context or continuation after tokenization")
        key = tuple(context_ids) if share_contexts else (index, *context_ids)
        unit = units.setdefault(key, _Unit(tuple(context_ids)))
        unit.requests.append((index, tuple(cont_ids)))
    results: list[Loglikelihood | None] = [None] * len(requests)
    context_blocks, row_blocks = _blocks(list(units.values()), batch_size, share_contexts)
    total = sum(len(b) for b in context_blocks) + sum(len(b) for b in row_blocks)
    with tqdm(total=total, desc=desc, unit="ctx", disable=not progress, leave=False) as bar:
        for units_ in context_blocks:
            _run_contexts(model, units_, results)
            bar.update(len(units_))
        for rows in row_blocks:
            _run_rows(model, rows, share_contexts, results)
            bar.update(len(rows))
    return results
