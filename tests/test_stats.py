"""Intervals and paired differences against scipy and hand computations; speed figures over noisy rounds."""

import math
import random
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from layerlab.errors import LayerlabError
from layerlab.evaluate import stats
from layerlab.evaluate.speed import Ratio, Rounds, compare_speed, interleaved


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (50, 200), (199, 200), (200, 200), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    expected = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert stats.wilson(k, n) == pytest.approx((expected.low, expected.high), abs=1e-12)
    estimate = stats.accuracy([1] * k + [0] * (n - k))
    assert estimate.value == k / n and (estimate.low, estimate.high) == pytest.approx(stats.wilson(k, n))


def mcnemar_by_hand(gained: int, lost: int) -> float:
    """Exact two-sided McNemar: twice the binomial(m, 1/2) tail at the smaller count, at most 1."""
    m = gained + lost
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(gained, lost) + 1)) / 2 ** m)


def agresti_min_by_hand(gained: int, lost: int, n: int) -> tuple[float, float]:
    """Agresti & Min (2005), matched pairs: add 1/2 to all four cells, then the Wald interval of p12 - p21."""
    n2 = n + 2
    p_gain, p_lose = (gained + 0.5) / n2, (lost + 0.5) / n2
    d = p_gain - p_lose
    se = math.sqrt((p_gain + p_lose - d * d) / n2)
    return d - 1.959963984540054 * se, d + 1.959963984540054 * se


@pytest.mark.parametrize("seed", range(8))
def test_paired_accuracy_is_agresti_min_with_exact_mcnemar(seed):
    rng = random.Random(seed)
    n = rng.choice([20, 50, 200, 1000])
    base = [rng.random() < 0.5 for _ in range(n)]
    flip = rng.choice([0.02, 0.1, 0.3])
    lean = rng.choice([0.3, 0.5, 0.8])  # share of flips that make a wrong item right
    other = [(not b if rng.random() < flip and (rng.random() < lean) != b else b) for b in base]
    diff = stats.paired_accuracy(base, other)
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    assert diff.value == pytest.approx((sum(other) - sum(base)) / n)
    assert diff.p == pytest.approx(mcnemar_by_hand(gained, lost))
    assert (diff.low, diff.high) == pytest.approx(agresti_min_by_hand(gained, lost, n))
    assert diff.significant == (diff.p < 0.05 and (diff.low > 0 or diff.high < 0))


def test_perplexity_interval_is_a_t_interval_of_the_mean_nll_over_equal_windows():
    rng = np.random.default_rng(0)
    tokens = [511] * 8
    nll = list(rng.normal(3.2, 0.3, 8) * 511)
    per_token = [v / 511 for v in nll]
    mean, sd = statistics.mean(per_token), statistics.stdev(per_token)
    half = scipy_stats.t.ppf(0.975, 7) * sd / math.sqrt(8)
    estimate = stats.perplexity(nll, tokens)
    assert estimate.value == pytest.approx(math.exp(sum(nll) / sum(tokens)))
    assert (estimate.low, estimate.high) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert stats.perplexity([100.0], [50]).low is None  # one window: no interval


def test_perplexity_interval_of_unequal_windows_is_the_ratio_estimator():
    nll, tokens = [300.0, 120.0, 80.0, 260.0], [100, 40, 30, 70]
    ratio = sum(nll) / sum(tokens)
    residuals = [v - ratio * t for v, t in zip(nll, tokens, strict=True)]
    se = math.sqrt(sum(r * r for r in residuals) / 3 / 4) / statistics.mean(tokens)
    half = scipy_stats.t.ppf(0.975, 3) * se
    estimate = stats.perplexity(nll, tokens)
    assert (estimate.low, estimate.high) == pytest.approx((math.exp(ratio - half), math.exp(ratio + half)))


def test_paired_perplexity_is_a_t_interval_of_the_per_window_differences():
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.3, 12) * 255
    worse = base + rng.normal(0.2, 0.05, 12) * 255  # clearly worse on every window
    same = base + rng.normal(0.0, 0.2, 12) * 255
    tokens = [255] * 12
    diff = stats.paired_perplexity(list(base), list(worse), tokens)
    d = (worse - base) / 255
    half = scipy_stats.t.ppf(0.975, 11) * d.std(ddof=1) / math.sqrt(12)
    assert diff.value == pytest.approx(100 * (math.exp(d.mean()) - 1))
    assert (diff.low, diff.high) == pytest.approx((100 * (math.exp(d.mean() - half) - 1),
                                                   100 * (math.exp(d.mean() + half) - 1)))
    assert diff.significant and diff.p == pytest.approx(scipy_stats.ttest_1samp(d, 0).pvalue)
    noisy = stats.paired_perplexity(list(base), list(same), tokens)
    assert noisy.significant == (noisy.p < 0.05) == (noisy.low > 0 or noisy.high < 0)


def test_average_interval_is_a_stratified_bootstrap_close_to_the_normal_approximation():
    rng = np.random.default_rng(2)
    tasks = [rng.random(n) < p for n, p in [(400, 0.3), (300, 0.6), (500, 0.8)]]
    estimate = stats.average(tasks, resamples=4000)
    means = [t.mean() for t in tasks]
    se = math.sqrt(sum(m * (1 - m) / len(t) for m, t in zip(means, tasks, strict=True))) / 3
    assert estimate.value == pytest.approx(statistics.mean(means))
    assert estimate.low == pytest.approx(estimate.value - 1.96 * se, abs=0.15 * se + 1e-3)
    assert estimate.high == pytest.approx(estimate.value + 1.96 * se, abs=0.15 * se + 1e-3)
    assert stats.average(tasks, resamples=4000) == estimate  # seeded


def test_paired_average_resamples_the_same_items_on_both_sides():
    rng = np.random.default_rng(3)
    base = [rng.random(300) < 0.5, rng.random(200) < 0.7]
    same = stats.paired_average(base, base)
    assert (same.value, same.low, same.high, same.significant) == (0, 0, 0, False)
    worse = [np.where(rng.random(len(b)) < 0.3, False, b) for b in base]  # loses 30 % of the right answers
    diff = stats.paired_average(base, worse)
    expected = statistics.mean(w.mean() - b.mean() for b, w in zip(base, worse, strict=True))
    assert diff.value == pytest.approx(expected) and diff.high < 0 and diff.significant and diff.p < 0.01
    # paired: the interval of the difference is narrower than the two averages' intervals side by side
    assert diff.high - diff.low < (stats.average(base).high - stats.average(base).low)


def test_speed_ratio_summary_marks_disagreeing_rounds_unreliable():
    steady = Ratio.of([1.20, 1.22, 1.21, 1.19], max_spread=0.1)
    assert steady.median == pytest.approx(1.205) and steady.reliable and steady.text().startswith("1.21 (")
    noisy = Ratio.of([0.5, 1.6, 1.1, 0.9], max_spread=0.1)
    assert not noisy.reliable and noisy.text().startswith("unreliable (")
    assert not Ratio.of([1.2], 0.1).reliable and Ratio.of([1.2], 0.1).text() == "1.20? (1 round)"
    with pytest.raises(LayerlabError, match="at most the maximum"):
        Rounds(rounds=5, max_rounds=3)


def fake_timer(values):
    """A measure returning the next of `values` (seconds) each call: deterministic 'timings'."""
    it = iter(values)
    return lambda: next(it)


def test_compare_speed_adds_rounds_while_ratios_disagree_and_stops_at_the_limit():
    # base always 1 s; 'fast' always 0.5 s: agrees after the minimum rounds (round 0 is a discarded warm-up)
    samples, ratios = compare_speed({"base": fake_timer([1.0] * 20), "fast": fake_timer([0.5] * 20)}, "base",
                                    Rounds(rounds=3, max_rounds=8))
    assert len(samples["base"]) == 3 and ratios["time"]["fast"].median == 2.0 and ratios["time"]["fast"].reliable
    # 'noisy' alternates 0.4 s / 1.0 s: the rounds never agree, so all 8 rounds run and the figure is unreliable
    samples, ratios = compare_speed({"base": fake_timer([1.0] * 20), "noisy": fake_timer([0.4, 1.0] * 10)}, "base",
                                    Rounds(rounds=3, max_rounds=8))
    assert len(samples["noisy"]) == 8 and not ratios["time"]["noisy"].reliable
    assert ratios["time"]["base"].median == 1.0


def test_interleaved_rotates_the_order_and_keeps_its_old_form():
    calls = []
    samples = interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, rounds=2)
    assert calls == ["a", "b", "b", "a", "a", "b"] and samples == {"a": [1, 1], "b": [2, 2]}
