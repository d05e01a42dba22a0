"""Speed and memory of plans, measured side by side, with the spread that tells signal from noise.

Prefill tokens/s (one forward over a prompt) and decode tokens/s (greedy, one token per forward on
the KV cache) are timed for every variant in interleaved rounds whose order rotates, after one
warm-up round. A speed-up is computed *per round* (baseline seconds / variant seconds, both timed in
that round, so a slow moment hits both) and summarised by the median and the interquartile range of
the per-round values. When the rounds disagree (IQR / median above `max_spread`, as on a busy
machine) more rounds are run, up to `max_rounds`; a figure whose rounds still disagree is marked
`reliable: False` and printed as unreliable instead of as a ratio (`Ratio.text`).
`compare_speed` does this for any set of timed callables (benchmarks use it too).
Parameter bytes count what a plan touches (unique tensors of the executed layers, embeddings and
head; tied weights once). Peak memory is the CUDA allocator's peak on GPUs and the process's peak
resident set (VmHWM, reset before measuring) on CPU, so it includes weights a plan skips but holds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from ..errors import LayerlabError
from ..plan import Plan
from ..runtime import apply_plan


@dataclass(frozen=True)
class Rounds:
    """How many interleaved rounds to time, and how well they must agree."""

    rounds: int = 3  # rounds measured at least (after one discarded warm-up round)
    max_rounds: int = 9  # rounds at most, added one by one while the per-round ratios disagree
    max_spread: float = 0.10  # agreement: interquartile range of the per-round ratios / their median
    warmup: bool = True  # time one more round first and discard it (off when measures warm up by themselves)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.max_rounds < self.rounds:
            raise LayerlabError(f"speed rounds must be at least 1 and at most the maximum ({self.rounds}, "
                                f"{self.max_rounds}); raise the maximum")
        if not 0 < self.max_spread < 1:
            raise LayerlabError(f"the speed spread threshold {self.max_spread} must be between 0 and 1 (e.g. 0.1)")


@dataclass(frozen=True)
class Ratio:
    """A speed-up summarised over rounds: median, interquartile range, extremes, and whether to trust it."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    rounds: int
    reliable: bool  # at least two rounds, and IQR / median within the threshold

    @classmethod
    def of(cls, values: Sequence[float], max_spread: float) -> Ratio:
        q1, median, q3 = (float(q) for q in np.quantile(values, [0.25, 0.5, 0.75]))
        reliable = len(values) >= 2 and (q3 - q1) <= max_spread * median
        return cls(median, q1, q3, float(min(values)), float(max(values)), len(values), reliable)

    def text(self) -> str:
        """`1.22 (1.19-1.25)`, or `unreliable (0.91-1.60)` when the rounds disagree (IQR in brackets)."""
        spread = f"({self.q1:.2f}-{self.q3:.2f})"
        if self.reliable:
            return f"{self.median:.2f} {spread}"
        return f"unreliable {spread}" if self.rounds > 1 else f"{self.median:.2f}? (1 round)"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    parameter_bytes: int
    peak_memory_mb: float | None
    prefill_speedup: Ratio  # against the first plan, per round
    decode_speedup: Ratio

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_decode_seconds(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """Seconds for the prompt's forward pass, and for `decode_tokens` greedy steps after it."""
    cache = DynamicCache(config=model.config)
    _sync(model.device)
    start = time.perf_counter()
    token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync(model.device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync(model.device)
    return prefill, time.perf_counter() - start


def interleaved(measures: dict[str, Callable[[], Any]], rounds: int, until: Callable[[dict], bool] | None = None,
                max_rounds: int | None = None, warmup: bool = True) -> dict[str, list]:
    """Each measure once per round, the order rotating; round 0 warms up and is discarded (unless not `warmup`).

    After `rounds` rounds, more are added while `until(samples)` is false, up to `max_rounds`.
    """
    names = list(measures)
    samples: dict[str, list] = {name: [] for name in names}
    index = 0 if warmup else 1
    while index <= rounds or (until is not None and index <= (max_rounds or rounds) and not until(samples)):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            value = measures[name]()
            if index:
                samples[name].append(value)
        index += 1
    return samples


def per_round_speedups(samples: dict[str, list], baseline: str, seconds: Callable[[Any], float]) -> dict[str, list]:
    """For each measure, baseline seconds / its seconds, round by round."""
    return {name: [seconds(b) / seconds(v) for b, v in zip(samples[baseline], values, strict=True)]
            for name, values in samples.items()}


def compare_speed(measures: dict[str, Callable[[], Any]], baseline: str, settings: Rounds,
                  timings: dict[str, Callable[[Any], float]] | None = None) -> tuple[dict[str, list], dict]:
    """Time `measures` in interleaved rounds until every speed-up agrees over rounds (or `max_rounds`).

    A measure returns seconds, or anything from which each of `timings` (name -> seconds) reads a time.
    Returns the raw samples and `{timing: {measure: Ratio}}` against `baseline`.
    """
    timings = timings or {"time": float}

    def ratios(samples: dict[str, list]) -> dict[str, dict[str, Ratio]]:
        return {key: {name: Ratio.of(values, settings.max_spread)
                      for name, values in per_round_speedups(samples, baseline, seconds).items()}
                for key, seconds in timings.items()}

    def agree(samples: dict[str, list]) -> bool:
        return all(r.reliable for by_name in ratios(samples).values() for r in by_name.values())

    samples = interleaved(measures, settings.rounds, agree, settings.max_rounds, settings.warmup)
    return samples, ratios(samples)


def parameter_bytes(model) -> int:
    """Bytes of the unique parameters the model (with its current plan) runs."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's peak RSS on Linux.

    Both counters are process-wide and a block starts by resetting them, so a block opened inside another
    would hide from the outer one whatever peak came before it (`eval` measures each plan's speed in its
    own block inside the job's): a block folds the peak so far into every block still open before it resets.
    """

    _open: list[PeakMemory] = []  # the blocks open now, outermost first

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None
        self._before_reset: float | None = None  # the highest peak an inner block's reset cleared

    def __enter__(self) -> PeakMemory:
        seen = self._read()
        for outer in PeakMemory._open:
            outer._before_reset = _highest(outer._before_reset, seen)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        PeakMemory._open.remove(self)
        self.peak_mb = self.so_far()

    def so_far(self) -> float | None:
        """The peak since the block began, read without leaving it (a report written inside the block)."""
        return _highest(self._before_reset, self._read())

    def _read(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None


def peak_text(megabytes: float | None) -> str:
    """A peak as every command and report shows it: whole megabytes, or `unknown` where it could not be read."""
    return "unknown" if megabytes is None else f"{megabytes:.0f} MB"


def _highest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def measure_plans(model, tokenizer, plans: list[Plan], prompt: str, prompt_tokens: int = 128,
                  decode_tokens: int = 32, rounds: Rounds | int = 5) -> list[SpeedResult]:
    """Prefill and decode speed, parameter bytes and peak memory of each plan, side by side.

    Speed-ups are against the first plan; `rounds` (a `Rounds`, or a fixed number of rounds) says how
    many interleaved rounds to time.
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :prompt_tokens].to(model.device)
    settings = rounds if isinstance(rounds, Rounds) else Rounds(rounds, rounds)

    def runner(plan: Plan) -> Callable[[], tuple]:
        def run() -> tuple:
            with apply_plan(model, plan), PeakMemory(model.device) as peak:
                seconds = prefill_decode_seconds(model, ids, decode_tokens)
            return (*seconds, peak.peak_mb)
        return run

    names = [str(i) for i in range(len(plans))]
    samples, speedups = compare_speed({name: runner(plan) for name, plan in zip(names, plans, strict=True)}, "0",
                                      settings, {"prefill": lambda s: s[0], "decode": lambda s: s[1]})
    results = []
    for name, plan in zip(names, plans, strict=True):
        prefill = statistics.median(s[0] for s in samples[name])
        decode = statistics.median(s[1] for s in samples[name])
        peaks = [s[2] for s in samples[name] if s[2] is not None]
        with apply_plan(model, plan):
            size = parameter_bytes(model)
        results.append(SpeedResult(ids.shape[1] / prefill, decode_tokens / decode, size, max(peaks, default=None),
                                   speedups["prefill"][name], speedups["decode"][name]))
    return results
