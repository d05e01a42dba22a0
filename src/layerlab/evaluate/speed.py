"""Speed and memory of plans, measured side by side.

Prefill tokens/s (one forward over a prompt) and decode tokens/s (greedy, one token per forward on
the KV cache) are timed for every variant in interleaved rounds whose order rotates, after one
warm-up round, and the median over rounds is kept: machine noise then hits all variants alike.
Parameter bytes count what a plan touches (unique tensors of the executed layers, embeddings and
head; tied weights once). Peak memory is the CUDA allocator's peak on GPUs and the process's peak
resident set (VmHWM, reset before measuring) on CPU, so it includes weights a plan skips but holds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..plan import Plan
from ..runtime import apply_plan


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    parameter_bytes: int
    peak_memory_mb: float | None

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


def interleaved(measures: dict[str, Callable[[], tuple[float, ...]]], rounds: int) -> dict[str, list[tuple]]:
    """Each measure once per round, the order rotating; round 0 warms up and is discarded."""
    names = list(measures)
    samples: dict[str, list[tuple]] = {name: [] for name in names}
    for index in range(rounds + 1):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            value = measures[name]()
            if index:
                samples[name].append(value)
    return samples


def parameter_bytes(model) -> int:
    """Bytes of the unique parameters the model (with its current plan) runs."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_mb = int(line.split()[1]) / 1024


def measure_plans(model, tokenizer, plans: list[Plan], prompt: str, prompt_tokens: int = 128,
                  decode_tokens: int = 32, rounds: int = 5) -> list[SpeedResult]:
    """Prefill and decode speed, parameter bytes and peak memory of each plan, side by side."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, :prompt_tokens].to(model.device)

    def runner(plan: Plan) -> Callable[[], tuple]:
        def run() -> tuple:
            with apply_plan(model, plan), PeakMemory(model.device) as peak:
                seconds = prefill_decode_seconds(model, ids, decode_tokens)
            return (*seconds, peak.peak_mb)
        return run

    samples = interleaved({str(i): runner(plan) for i, plan in enumerate(plans)}, rounds)
    results = []
    for i, plan in enumerate(plans):
        prefill = statistics.median(s[0] for s in samples[str(i)])
        decode = statistics.median(s[1] for s in samples[str(i)])
        peaks = [s[2] for s in samples[str(i)] if s[2] is not None]
        with apply_plan(model, plan):
            size = parameter_bytes(model)
        results.append(SpeedResult(ids.shape[1] / prefill, decode_tokens / decode, size, max(peaks, default=None)))
    return results
