"""Multiple-choice accuracy (HellaSwag, ARC, PIQA, BoolQ, OpenBookQA, MMLU, WinoGrande), as lm-eval scores it.

Each choice is one log-likelihood request (`evaluate/loglikelihood.py`): `" " + ending` after the query
for ordinary items, the same continuation after each context for WinoGrande's partial scoring. `acc`
picks the choice with the highest log-likelihood; `acc_norm` divides each by the choice's length in
characters first (`len(choice)` in lm-eval 0.4.13: the ending, or for WinoGrande the context). Ties go
to the first choice (numpy's argmax).

`batch_size=None` (default, best on CPU) shares every context's computation between its choices and
batches items that have one sequence each; `batch_size=B` runs whole context+choice sequences B at a
time, as lm-eval does (best on accelerators). Both give the same numbers (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..corpora import Choice, PartialChoice
from ..errors import DataError
from .loglikelihood import CPU_BATCH, loglikelihoods


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


def argmax(values: list[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def item_score(item: Choice | PartialChoice, sums: list[float]) -> ItemScore:
    norm = [s / length for s, length in zip(sums, item.lengths(), strict=True)]
    return ItemScore(tuple(sums), argmax(sums), argmax(norm), item.label)


def score_items(model, tokenizer, items: list[Choice | PartialChoice], batch_size: int | None = None,
                progress: bool = True, desc: str = "multiple choice") -> list[ItemScore]:
    """Every item's log-likelihoods and predictions, all requests run together."""
    requests = [request for item in items for request in item.requests()]
    results = loglikelihoods(model, tokenizer, requests, batch_size=batch_size or CPU_BATCH,
                             share_contexts=batch_size is None, progress=progress, desc=desc)
    scores, start = [], 0
    for item in items:
        count = len(item.requests())
        scores.append(item_score(item, [r.logprob for r in results[start:start + count]]))
        start += count
    return scores


def multiple_choice(model, tokenizer, items: list[Choice | PartialChoice], batch_size: int | None = None,
                    progress: bool = True) -> ChoiceResult:
    """acc and acc_norm over `items` under `model` as it is now (apply a plan around the call)."""
    if not items:
        raise DataError("no multiple-choice items to score")
    scores = score_items(model, tokenizer, items, batch_size, progress)
    acc = sum(s.prediction == s.label for s in scores) / len(scores)
    acc_norm = sum(s.prediction_norm == s.label for s in scores) / len(scores)
    return ChoiceResult(acc, acc_norm, len(scores), scores)
