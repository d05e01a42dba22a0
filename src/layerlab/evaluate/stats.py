"""Uncertainty of evaluation numbers: 95 % intervals, and differences paired on the same items.

- Accuracy of one task: Wilson score interval (binomial; good at small n and near 0 or 1).
- Perplexity over windows (or LAMBADA's per-row perplexity): perplexity is exp(mean NLL per token),
  a ratio of sums over windows; its interval is a Student-t interval of that ratio over the windows
  (ratio estimator, delta method), mapped through exp. Windows are treated as independent draws.
- Accuracy difference against the baseline on the same items: the Agresti-Min interval (a Wald interval
  of the paired difference after adding 1/2 to each cell of the 2x2 table: good coverage at small n,
  and not degenerate when the two never disagree) and the exact McNemar test (two-sided binomial test
  on the items where exactly one of the two is right). Significant only when both say so.
- Perplexity difference: the per-window NLL differences (same windows, same tokens), t interval of
  their ratio estimator, reported as a percentage change of perplexity.
- Average over tasks (each task's headline accuracy, tasks weighted equally): percentile bootstrap
  over items within tasks (stratified, seeded); its difference against the baseline resamples the
  same items for both (paired).
A difference is `significant` when its interval excludes 0 (and, for accuracy, McNemar's p < 0.05).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float | None  # None where there is no interval (fewer than two windows or items)
    high: float | None
    method: str

    def to_dict(self) -> dict:
        return {"value": self.value, "interval": [self.low, self.high], "method": self.method}


@dataclass(frozen=True)
class Difference:
    value: float  # plan - baseline (accuracy), or the percentage change of perplexity
    low: float | None
    high: float | None
    significant: bool
    p: float | None
    method: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["interval"] = [data.pop("low"), data.pop("high")]
        return data


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Share of items right (0/1 per item), with its Wilson interval."""
    n, right = len(correct), int(round(sum(correct)))
    return Estimate(right / n, *wilson(right, n, confidence), "wilson")


def _ratio_t(numerators: Sequence[float], denominators: Sequence[float],
             confidence: float) -> tuple[float, float | None, float | None, float | None]:
    """sum(num) / sum(den), its t interval over the pairs (ratio estimator), and its standard error."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    ratio = float(num.sum() / den.sum())
    n = len(num)
    if n < 2:
        return ratio, None, None, None
    residual = num - ratio * den
    se = float(math.sqrt((residual ** 2).sum() / (n - 1) / n) / den.mean())
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return ratio, ratio - half, ratio + half, se


def perplexity(nll: Sequence[float], tokens: Sequence[int], confidence: float = CONFIDENCE) -> Estimate:
    """exp(total NLL / total tokens) over windows (or rows), with the exp of a t interval over them."""
    mean, low, high, _ = _ratio_t(nll, tokens, confidence)
    return Estimate(math.exp(mean), _exp(low), _exp(high), "t interval over windows of the NLL per token")


def paired_perplexity(base_nll: Sequence[float], nll: Sequence[float], tokens: Sequence[int],
                      confidence: float = CONFIDENCE) -> Difference:
    """Percentage change of perplexity against the baseline on the same windows, with a paired t interval."""
    diff = np.asarray(nll, dtype=float) - np.asarray(base_nll, dtype=float)
    mean, low, high, se = _ratio_t(diff, tokens, confidence)
    pct = 100 * (math.exp(mean) - 1)
    if low is None:
        return Difference(pct, None, None, False, None, "paired t interval over windows")
    p = 1.0 if se == 0 else float(2 * scipy_stats.t.sf(abs(mean) / se, len(diff) - 1))
    return Difference(pct, 100 * (math.exp(low) - 1), 100 * (math.exp(high) - 1), low > 0 or high < 0, p,
                      "paired t interval over windows")


def paired_accuracy(base: Sequence[float], other: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Accuracy difference on the same items: Agresti-Min interval, exact McNemar p; significant if both agree."""
    if len(base) != len(other):
        raise ValueError("paired differences need the same items on both sides")
    n = len(base)
    gained = sum(1 for a, b in zip(base, other, strict=True) if b > a)  # right only under `other`
    lost = sum(1 for a, b in zip(base, other, strict=True) if a > b)
    # Agresti & Min (2005): add 1/2 to each of the four cells of the paired table, then a Wald interval
    up, down, total = gained + 0.5, lost + 0.5, n + 2
    centre = (up - down) / total
    half = float(scipy_stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt((up + down) - (up - down) ** 2 / total) / total
    low, high = max(-1.0, centre - half), min(1.0, centre + half)
    p = float(scipy_stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return Difference((gained - lost) / n, low, high, p < 1 - confidence and (low > 0 or high < 0), p,
                      "Agresti-Min interval, exact McNemar test")


def _resampled_means(tasks: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Average of the task means for each stratified bootstrap resample (items drawn within each task)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for values in tasks:
        for start in range(0, resamples, 100):  # chunks keep memory small on big tasks
            count = min(100, resamples - start)
            picks = rng.integers(0, len(values), size=(count, len(values)))
            total[start:start + count] += values[picks].mean(axis=1)
    return total / len(tasks)


def average(tasks: Sequence[Sequence[float]], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
            seed: int = 0) -> Estimate:
    """Mean over tasks of each task's mean, with a stratified percentile bootstrap interval."""
    arrays = [np.asarray(t, dtype=float) for t in tasks]
    value = float(np.mean([a.mean() for a in arrays]))
    draws = _resampled_means(arrays, resamples, seed)
    low, high = np.quantile(draws, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Estimate(value, float(low), float(high), "stratified bootstrap over items")


def paired_average(base: Sequence[Sequence[float]], other: Sequence[Sequence[float]],
                   confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Difference:
    """Difference of the task averages on the same items, with a paired stratified bootstrap interval."""
    diffs = []
    for a, b in zip(base, other, strict=True):
        if len(a) != len(b):
            raise ValueError("paired differences need the same items on both sides")
        diffs.append(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))
    value = float(np.mean([d.mean() for d in diffs]))
    draws = _resampled_means(diffs, resamples, seed)
    low, high = (float(q) for q in np.quantile(draws, [0.5 - confidence / 2, 0.5 + confidence / 2]))
    share = float(np.mean(draws <= 0)) if value > 0 else float(np.mean(draws >= 0))
    p = min(1.0, 2 * share)  # two-sided bootstrap p: twice the share of resamples on the other side of 0
    return Difference(value, low, high, low > 0 or high < 0, p, "paired stratified bootstrap over items")


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(value)
