"""Attention maps of every executed plan step, and their 2-D Fourier spectra.

Attention maps: the softmax probabilities A[h, q, k] of each head h of each step, for one prompt
(as in Clark et al. 2019, "What Does BERT Look At?", and Vig 2019, "A Multiscale Visualization of
Attention in the Transformer Model"). They are read with forward hooks on each executed step's
attention module while the model runs its *eager* attention, which returns the probabilities as the
second output (fused kernels such as SDPA never materialise them). The modeling code is not forked:
the implementation is switched for the pass and switched back. Because the plan's step modules each
hold their own attention copy, a repeated layer gives one map per repetition.

Spectra: the centred 2-D discrete Fourier transform of each map, shown as log(1 + |F|). A map that
varies slowly over query and key positions (broad or uniform attention) keeps its energy near the
zero frequency; sharp, position-locked patterns (attending to the previous token, a diagonal, a
single sink column) spread energy to high frequencies. `high_frequency_share` condenses this into
one number per map, in the spirit of the frequency analyses of attention in Wang et al. 2022,
"Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis" (self-attention acts
as a low-pass filter as depth grows), so plans can be compared step by step in one chart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import arch_of, decoder_layers
from ..plan import Plan
from ..runtime import SkippedAttention, apply_plan


@dataclass
class AttentionMaps:
    """Attention probabilities per executed step: `maps[i]` is (heads, T, T) or None (no attention)."""

    plan: Plan
    tokens: list[str]  # one label per prompt token
    names: list[str]  # one per step, e.g. "step 7 · layer 5"
    maps: list[torch.Tensor | None]


def step_names(plan: Plan) -> list[str]:
    """A distinct label per step (repetitions of a layer differ by step), with the half that runs."""
    halves = {"full": "", "attn": " (attn only)", "mlp": " (MLP only)"}
    return [f"step {i} · layer {s.layer}{halves[s.kind]}" for i, s in enumerate(plan.steps)]


def encode(tokenizer, prompt: str, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """Token ids of `prompt` (1, T) on `device`, and a readable label per token."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    return ids, [tokenizer.decode([int(i)]) for i in ids[0]]


def default_plan(model, plan: Plan | None) -> Plan:
    """`plan`, or the identity plan over the model's layers."""
    return plan or Plan.identity(len(decoder_layers(model)))


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run the model with eager attention inside the block (it returns the probabilities), then switch back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.inference_mode()
def attention_maps(model, tokenizer, prompt: str, plan: Plan | None = None) -> AttentionMaps:
    """The attention probabilities of every head of every executed step of `plan` for `prompt`."""
    plan = default_plan(model, plan)
    ids, tokens = encode(tokenizer, prompt, model.device)
    maps: list[torch.Tensor | None] = [None] * len(plan.steps)

    def keep(index: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            maps[index] = output[1][0].float().cpu()
        return hook

    with eager_attention(model), apply_plan(model, plan):
        attention = arch_of(model).attention
        handles = [step._modules[attention].register_forward_hook(keep(i))
                   for i, step in enumerate(decoder_layers(model))
                   if not isinstance(step._modules[attention], SkippedAttention)]
        try:
            model(ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return AttentionMaps(plan=plan, tokens=tokens, names=step_names(plan), maps=maps)


def _frequencies(n: int) -> torch.Tensor:
    """Centred frequencies of an n-point DFT as a fraction of the Nyquist frequency, in [-1, 1)."""
    return torch.fft.fftshift(torch.fft.fftfreq(n, dtype=torch.float64)) * 2


def _centred_fft(attention: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(attention.double()), dim=(-2, -1))


def fourier_spectrum(attention: torch.Tensor) -> torch.Tensor:
    """log(1 + |F|) of the 2-D DFT over the last two axes, zero frequency moved to the centre (fftshift).

    Works on one (T, T) map or a stack (..., T, T); the +1 keeps exact zeros finite for display.
    """
    return torch.log1p(_centred_fft(attention).abs())


def high_frequency_share(attention: torch.Tensor, radius: float = 0.25) -> torch.Tensor:
    """Share of spectral energy outside a centred low-frequency disc, per map (over the last two axes).

    Energy is |F(u, v)|^2 (Parseval: it sums to T^2 times the sum of squares of the map). Frequencies
    are measured as a fraction of the Nyquist frequency on each axis, so the disc
    sqrt(u^2 + v^2) <= radius means the same thing for every prompt length. Nothing is excluded: the
    zero frequency (the map's mean) counts as low. A constant map gives 0; a +-1 checkerboard, whose
    energy sits at the Nyquist corner, gives 1.
    """
    energy = _centred_fft(attention).abs() ** 2
    rows, cols = _frequencies(attention.shape[-2]), _frequencies(attention.shape[-1])
    low = rows[:, None] ** 2 + cols[None, :] ** 2 <= radius ** 2
    total = energy.sum(dim=(-2, -1))
    return 1 - (energy * low).sum(dim=(-2, -1)) / total


def spectrum_summary(result: AttentionMaps, radius: float = 0.25) -> list[float | None]:
    """Per step, the high-frequency share averaged over heads (None for steps without attention)."""
    return [None if m is None else float(high_frequency_share(m, radius).mean()) for m in result.maps]
