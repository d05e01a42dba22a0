"""Importance of every step and sublayer from ONE forward pass over calibration text.

The residual stream (`streams.py`) of every executed step of the plan (the identity plan by default)
is read entering the step `h_in` (`resid_pre`), between its attention and MLP halves `h_mid`
(`resid_mid`) and leaving it `h_out` (`resid_post`), and reduced window by window to sums of cosines:

- Block Influence (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", eq. 1): BI_i = 1 - E_t[cos(h_in_t, h_out_t)] over tokens t.
- Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
  eq. 7): d(x^l, x^{l+n}) = arccos(cos(x^l, x^{l+n})) / pi, averaged over tokens, for every start l
  and block size n, where x^l is the stream entering step l (x^L is the last step's output). The
  paper reads the last token of each sequence; `tokens="last"` does that, `"all"` uses every token.
- Sublayer cosine (LLM-Drop, He et al. 2024, "What Matters in Transformers? Not All Attention is
  Needed", eq. 2): importance = 1 - E_t[cos(X, Y)] between a module's input and its output after the
  residual add: attention (h_in -> h_mid) and MLP (h_mid -> h_out).
Higher means more important (more change) for every metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import SettingsError
from ..evaluate.perplexity import calibration_windows
from ..plan import Plan
from ..streams import STREAMS, Recorder, place, record, stream_pass


@dataclass
class Similarity:
    """Per-step scores of one plan (index = step), and the angular-distance matrix."""

    plan: Plan
    block_influence: list[float]
    attention_importance: list[float | None]  # None where the step runs no attention
    mlp_importance: list[float | None]  # None where the step runs no MLP
    angular: list[list[float | None]]  # angular[l][n-1]: block of n steps starting at step l
    tokens: int

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_text(), "layers": list(self.plan.layers), "tokens": self.tokens,
                "block_influence": self.block_influence, "attention_importance": self.attention_importance,
                "mlp_importance": self.mlp_importance, "angular_distance": self.angular}

    @classmethod
    def from_dict(cls, data: dict, num_layers: int) -> Similarity:
        """`to_dict`'s data back (scores computed elsewhere, e.g. on a worker: `parallel.similarity`)."""
        return cls(Plan.parse(data["plan"], num_layers), data["block_influence"], data["attention_importance"],
                   data["mlp_importance"], data["angular_distance"], data["tokens"])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def _pairwise_cosine(states: torch.Tensor) -> torch.Tensor:
    """cos(x^i_t, x^j_t) for every pair of streams i, j and token t: (S, T, d) -> (S, S, T)."""
    unit = F.normalize(states.double(), dim=-1)
    return torch.einsum("itd,jtd->ijt", unit, unit).clamp(-1, 1)


@torch.inference_mode()
def similarity(model, tokenizer, text: str, plan: Plan | None = None, ctx: int = 512, windows: int = 8,
               tokens: str = "all", progress: bool = True) -> Similarity:
    """All hook-based metrics for `plan`'s steps from one pass over `windows` windows of `text`."""
    if tokens not in ("all", "last"):
        raise SettingsError("tokens must be 'all' or 'last'")
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    plan = plan or Plan.identity(n_layers)
    chunks = calibration_windows(tokenizer, text, ctx, windows)
    steps = len(plan.steps)
    zeros = partial(torch.zeros, dtype=torch.float64, device=model.device)
    sums = {"bi": zeros(steps), "attn": zeros(steps), "mlp": zeros(steps), "angular": zeros(steps + 1, steps + 1)}
    count = 0

    def accumulate(recorder: Recorder) -> None:
        nonlocal count
        count += _accumulate(sums, recorder, plan, tokens)

    places = [place(kind, i) for kind in ("resid_pre", "resid_mid", "resid_post") for i in range(steps)]
    stream_pass(model, [torch.tensor([c.ids]) for c in chunks], plan, places, accumulate, progress, "similarity")
    return _finish(sums, count, plan, count_last=len(chunks) if tokens == "last" else None)


def _accumulate(sums: dict, recorder: Recorder, plan: Plan, tokens: str) -> int:
    """Add one window's per-token cosines; return how many tokens it contributed."""
    states = recorder.streams()
    for i, step in enumerate(plan.steps):
        h_in, mid, h_out = (recorder[place(kind, i)][0] for kind in ("resid_pre", "resid_mid", "resid_post"))
        sums["bi"][i] += _cosine(h_in, h_out).sum()
        if step.attention:
            sums["attn"][i] += _cosine(h_in, mid).sum()
        if step.mlp:
            sums["mlp"][i] += _cosine(mid, h_out).sum()
    cos = _pairwise_cosine(states[:, -1:] if tokens == "last" else states)
    sums["angular"] += torch.arccos(cos).sum(-1) / math.pi
    return states.shape[1]


def _finish(sums: dict, count: int, plan: Plan, count_last: int | None) -> Similarity:
    steps = len(plan.steps)
    angular_count = count_last or count
    angular = [[float(sums["angular"][start, start + n]) / angular_count if start + n <= steps else None
                for n in range(1, steps + 1)] for start in range(steps)]
    return Similarity(
        plan=plan,
        block_influence=[1 - float(v) / count for v in sums["bi"]],
        attention_importance=[1 - float(sums["attn"][i]) / count if s.attention else None
                              for i, s in enumerate(plan.steps)],
        mlp_importance=[1 - float(sums["mlp"][i]) / count if s.mlp else None for i, s in enumerate(plan.steps)],
        angular=angular,
        tokens=count,
    )


@torch.inference_mode()
def hidden_cosine(model, tokenizer, text: str, plan: Plan | None = None) -> torch.Tensor:
    """Layer-by-layer similarity of the residual stream for one text: (steps + 1, steps + 1), float64.

    Entry (i, j) is the mean over tokens of cos(x^i_t, x^j_t), where x^0 is the stream entering step 0
    and x^L the output of the last step: the cosine form of the matrix behind Gromov et al.'s angular
    distance (their fig. 1), on every token of `text` in one sequence.
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    return _pairwise_cosine(record(model, ids, plan, STREAMS).streams()).mean(-1).cpu()


@torch.inference_mode()
def similarity_streamed(source, tokenizer, text: str, plan: Plan | None = None, ctx: int = 512, windows: int = 8,
                        tokens: str = "all", dtype: torch.dtype = torch.float32, device: str = "cpu",
                        progress: bool = True) -> Similarity:
    """The metrics of `similarity`, from a model read one decoder layer at a time (`layerwise.py`).

    `source` is a model source (a .gguf file, an embedded name, a safetensors folder) or an open
    `LayerSource`. Memory holds one decoder layer and the windows' streams; the streams entering earlier
    steps, which the angular distance pairs with every later one, wait in a temporary file.
    """
    from ..layerwise import LayerSource, StreamArchive, stream_steps

    if tokens not in ("all", "last"):
        raise SettingsError("tokens must be 'all' or 'last'")
    layers = source if isinstance(source, LayerSource) else LayerSource.open(source)
    plan = plan or Plan.identity(layers.num_layers)
    chunks = calibration_windows(tokenizer, text, ctx, windows)
    steps = len(plan.steps)
    zeros = partial(torch.zeros, dtype=torch.float64)
    sums = {"bi": zeros(steps), "attn": zeros(steps), "mlp": zeros(steps), "angular": zeros(steps + 1, steps + 1)}
    count = 0
    with StreamArchive() as past:
        for s in stream_steps(layers, [c.ids for c in chunks], plan, dtype, device, progress):
            for h_in, mid, h_out in zip(s.before, s.middle, s.after, strict=True):
                h_in, mid, h_out = h_in[0], mid[0], h_out[0]
                sums["bi"][s.index] += _cosine(h_in, h_out).sum().cpu()
                if s.step.attention:
                    sums["attn"][s.index] += _cosine(h_in, mid).sum().cpu()
                if s.step.mlp:
                    sums["mlp"][s.index] += _cosine(mid, h_out).sum().cpu()
                count += h_in.shape[0] if s.index == 0 else 0
            _angular_to_earlier(sums["angular"], past, s.index, s.before, tokens)
            if s.index == steps - 1:
                _angular_to_earlier(sums["angular"], past, steps, s.after, tokens)
    return _finish(sums, count, plan, count_last=len(chunks) if tokens == "last" else None)


def _angular_to_earlier(angular: torch.Tensor, past, index: int, streams: list[torch.Tensor], tokens: str) -> None:
    """Add the angular distances between stream x^index of every window and each earlier x^j; park x^index."""
    for window, stream in enumerate(streams):
        stream = stream[0, -1:] if tokens == "last" else stream[0]
        unit = F.normalize(stream.double(), dim=-1)
        for j in range(index):
            cos = (F.normalize(past.get((j, window)).to(unit.device).double(), dim=-1) * unit).sum(-1).clamp(-1, 1)
            distance = float(torch.arccos(cos).sum() / math.pi)
            angular[j, index] += distance
            angular[index, j] += distance
        past.add((index, window), stream)
