"""Finding a KV-sharing map on calibration data (KVSharer-style), under a budget and a quality tolerance.

1. One pass of the start plan over the calibration windows records every attention step's keys and
   values. Their average over windows gives each step an average cache; every pair of steps that
   could share (the later one reading the earlier one: same head shapes, same attention type) gets
   the Euclidean distance between their average caches (per head and position over the head
   dimension, averaged; keys and values averaged), as in KVSharer (Yang et al. 2024).
2. Pairs are tried in `order`: `dissimilar` first is KVSharer's counter-intuitive finding (sharing
   dissimilar caches hurt least on their models); `similar` first is the intuitive order; `loss`
   measures instead of guessing: every pair is scored alone on top of the start plan (calibration
   loss, stopped at the tolerance, from the same recording) and pairs are tried best first (a pair
   that alone breaks the tolerance is not tried again). Each pair
   is accepted when the calibration perplexity of the plan with it stays within `tolerance` of the
   start plan's; a pair whose source already reads another layer's cache takes that layer as source,
   and layers reading the new consumer move to its source (KVSharer's re-map), so there are no chains.
3. It stops once `budget` (a share of the plan's attention layers) consumers are accepted, or the
   pairs run out.
4. With `merge`, MiniCache-style merges (`kvmerge:`) of adjacent layers from the middle layer down
   are tried after the sharing pairs, most saving first: a merge saves the share of the pair's
   token-heads whose two directions lie within the angle (measured on the recording), which counts
   towards the budget in layers (a slight overcount: a kept outlier costs a few numbers more than an
   unmerged pair). A merge acts only across forwards (a forward's own tokens are
   exact), so its calibration loss feeds each window in chunks of `chunk` tokens through the whole
   plan: the single-pass recording cannot be reused for it.

The greedy search's machinery is reused: calibration windows, `SearchState` (saved after every
try; `resume=True` continues and checks the settings), and prefix reuse: a candidate first differs
at its consumer step k, so it runs only steps k.. from the recorded stream entering step k, with the
recorded keys and values of the sources before k put in the KV channel. The recording is redone
after each accepted pair (the streams after it change). A candidate stops as soon as its running
loss exceeds the tolerance (a loss sum only grows).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import arch_of, decoder_layers
from .errors import LayerlabError, PlanError
from .evaluate.perplexity import calibration_windows, chunked_window_nll, scored_tokens, window_nll
from .kv import KVChannel, check_kv, wire
from .plan import DEFAULT_MERGE_ANGLE, Plan
from .runtime import apply_plan
from .search import SearchState, resumable_state
from .settings import KVSearchSettings


def kv_state_record(text: str, settings: KVSearchSettings, start: Plan, provenance: dict | None = None) -> dict:
    """What a KV search's state records about the run that produced it (compared on resume)."""
    return asdict(settings) | {"start": start.to_text(), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                               **(provenance or {})}


def consumers_allowed(plan: Plan, budget: float) -> int:
    """How many consumer layers the budget allows: a share of the layers whose attention the plan runs."""
    return math.floor(budget * len({s.layer for s in plan.steps if s.attention}) + 1e-9)


def merged(kv: tuple[tuple[int, int], ...], consumer: int, source: int) -> tuple[tuple[int, int], ...]:
    """`kv` with `consumer` reading `source`, without chains (KVSharer's re-map)."""
    sources = dict(kv)
    source = sources.get(source, source)  # the source reads another layer: read that one
    sources[consumer] = source
    return tuple(sorted((c, source if s == consumer else s) for c, s in sources.items()))


class KVRecorder:
    """Calibration losses of KV maps over one start plan, with the stream and KV of every step recorded."""

    def __init__(self, model, windows, start: Plan, reuse: bool = True) -> None:
        self.model, self.windows, self.start, self.reuse = model, windows, start, reuse
        self.arch = arch_of(model)
        self.layer_forwards = 0
        self.streams: list[list[torch.Tensor]] = []  # per window: the stream entering every step
        self.kv: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # per window: each step's keys and values

    @contextmanager
    def _running(self, plan: Plan, first: int, channel: KVChannel, record: bool):
        """Apply steps first.. of `plan` with its KV map wired to `channel` (sources before `first` prefilled)."""
        sources = plan.kv_source_steps
        with apply_plan(self.model, Plan(plan.steps[first:], plan.num_layers)):
            steps = decoder_layers(self.model)
            wire(steps, self.arch, sources[first:], channel, offset=first,
                 record=range(first, len(plan.steps)) if record else ())
            yield steps

    @torch.inference_mode()
    def record(self, plan: Plan) -> float:
        """Run `plan` once, keeping the stream entering each step and each step's keys and values; its loss."""
        self.streams, self.kv = [], []
        channel = KVChannel(keep=True)
        total = 0.0

        def keep(module, args, kwargs):
            self.streams[-1].append(args[0] if args else kwargs["hidden_states"])

        with self._running(plan, 0, channel, record=True) as steps:
            handles = [step.register_forward_pre_hook(keep, with_kwargs=True) for step in steps]
            try:
                for window in self.windows:
                    self.streams.append([])
                    channel.entries = {}
                    total += window_nll(self.model, [window])[0]
                    self.kv.append(channel.entries)
                    self.layer_forwards += len(plan.steps)
            finally:
                for handle in handles:
                    handle.remove()
        return total

    @torch.inference_mode()
    def loss(self, plan: Plan, first: int, abort_above: float = math.inf) -> float:
        """`plan`'s summed NLL, running only steps `first`.. (its steps before `first` equal the recorded plan's)."""
        first = first if self.reuse else 0
        channel = KVChannel()
        total = 0.0
        with self._running(plan, first, channel, record=False):
            for index, window in enumerate(self.windows):
                channel.entries = {k: v for k, v in self.kv[index].items() if k < first} if first else {}
                embeds = self.streams[index][first] if first else None
                total += window_nll(self.model, [window], embeds)[0]
                self.layer_forwards += len(plan.steps) - first
                if total > abort_above:
                    return math.inf
        return total

    @torch.inference_mode()
    def chunked_loss(self, plan: Plan, chunk: int, abort_above: float = math.inf) -> float:
        """`plan`'s summed NLL, every step run, each window fed in chunks of `chunk` tokens on one cache."""
        total = 0.0
        with apply_plan(self.model, plan):
            for window in self.windows:
                total += chunked_window_nll(self.model, window, chunk)[0]
                self.layer_forwards += len(plan.steps)
                if total > abort_above:
                    return math.inf
        return total

    def merge_shares(self, plan: Plan, angle: float) -> dict[str, float]:
        """Adjacent pairs from the middle layer down (MiniCache) that may merge, each with the share of its
        token-heads (keys and values, all windows) within `angle` degrees on the recording: what it saves."""
        where = {s.layer: i for i, s in enumerate(plan.steps) if s.attention}
        out = {}
        for first in range(plan.num_layers // 2, plan.num_layers - 1):
            try:
                check_kv(self.model, plan.with_merge(((first, first + 1, angle),)))
            except PlanError:
                continue  # not both run once with attention, or different shapes or attention types
            cosines = torch.cat([torch.nn.functional.cosine_similarity(
                kv[where[first]][i], kv[where[first + 1]][i], dim=-1).flatten() for kv in self.kv for i in (0, 1)])
            out[f"{first}+{first + 1}"] = float((cosines >= math.cos(math.radians(angle))).float().mean())
        return out

    def distances(self, plan: Plan) -> list[tuple[float, int, int]]:
        """(distance, consumer layer, source layer) for every pair of steps that may share (recorded plan)."""
        averages = {step: tuple(torch.stack([kv[step][i][0] for kv in self.kv]).mean(0) for i in (0, 1))
                    for step in self.kv[0]}
        out = []
        for later in sorted(averages):
            for earlier in sorted(averages):
                if earlier >= later:
                    break
                consumer, source = plan.steps[later].layer, plan.steps[earlier].layer
                try:
                    check_kv(self.model, Plan(plan.steps, plan.num_layers, ((consumer, source),)))
                except PlanError:
                    continue  # different head shapes or attention types: they cannot share
                distance = sum(torch.linalg.vector_norm(averages[later][i] - averages[earlier][i], dim=-1).mean()
                               for i in (0, 1)) / 2
                out.append((float(distance), consumer, source))
        return out


def search_kv(model, tokenizer, text: str, settings: KVSearchSettings, start: Plan | None = None,
              state_path: str | Path | None = None, resume: bool = False, max_tries: int | None = None,
              progress: bool = True, provenance: dict | None = None) -> SearchState:
    """Choose KV-sharing pairs (see the module docstring); the result's `plan` carries the map.

    `max_tries` stops this call after that many pairs were tried (a later call with `resume=True` goes on).
    The state records the settings, the calibration text's hash and `provenance` (the model's fingerprint),
    as the greedy search's does: resuming with any of them different is a one-line error.
    """
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    start = start or Plan.identity(n_layers)
    if len(set(start.layers)) < len(start.steps):
        raise PlanError("the KV search needs a start plan that runs each layer at most once (no repeats)")
    if start.kv:
        raise PlanError("the KV search starts from a plan without a kv: clause; it chooses the map itself")
    windows = calibration_windows(tokenizer, text, settings.ctx, settings.windows)
    recorded = kv_state_record(text, settings, start, provenance)
    if resume and state_path and Path(state_path).exists():
        state = resumable_state(state_path, recorded)
    else:
        state = SearchState(start.to_dict(), None, settings=recorded)
    evaluator = KVRecorder(model, windows, start, settings.reuse)
    evaluator.layer_forwards = state.layer_forwards
    tokens = scored_tokens(windows)
    start_loss = evaluator.record(start)
    limit = start_loss + tokens * math.log1p(settings.tolerance)  # perplexity ratio <= 1 + tolerance
    if not state.trace:
        state.trace = [{"start_perplexity": math.exp(start_loss / tokens),
                        "distances": {f"{c}<-{s}": d for d, c, s in evaluator.distances(start)}}]
    angle = DEFAULT_MERGE_ANGLE if settings.merge_angle is None else settings.merge_angle
    if not state.ranking:
        state.ranking = _ranking(evaluator, start, state, settings.order, limit, tokens, state_path, progress)
        if settings.merge:
            shares = state.trace[0]["merge_shares"] = evaluator.merge_shares(start, angle)
            state.ranking += sorted((key for key in shares if shares[key] > 0), key=lambda key: -shares[key])
        if state_path:
            state.save(state_path)
    shares = state.trace[0].get("merge_shares", {})
    plan = Plan.from_dict(state.plan, n_layers)
    if plan.kv:
        evaluator.record(plan)
    allowed = consumers_allowed(start, settings.budget)
    tried = len(state.trace) - 1
    bar = tqdm(total=len(state.ranking), initial=tried, desc="kv pairs", unit="pair", disable=not progress)
    for here, key in enumerate(state.ranking[tried:]):
        if kv_saved(plan, shares) >= allowed or (max_tries is not None and here >= max_tries):
            break
        entry = {"pair": key, "accepted": False}
        if "+" in key:
            candidate, why = _merge_candidate(plan, key, angle, shares, allowed)
            if candidate is None:
                entry["skipped"] = why
            else:
                loss = evaluator.chunked_loss(candidate, settings.chunk, limit)
                entry |= {"kv": candidate.to_text(), "accepted": loss <= limit,
                          "perplexity": math.exp(loss / tokens) if loss < math.inf else None}
                if entry["accepted"]:
                    plan = candidate
                    state.plan = plan.to_dict()
        elif (consumer := int(key.split("<-")[0])) not in dict(plan.kv):
            source = int(key.split("<-")[1])
            candidate = plan.with_kv(merged(plan.kv, consumer, source))
            first = next(i for i, (a, b) in enumerate(zip(candidate.kv_source_steps, plan.kv_source_steps,
                                                           strict=True)) if a != b)
            loss = evaluator.loss(candidate, first, limit)
            entry |= {"kv": candidate.to_text(), "perplexity": math.exp(loss / tokens) if loss < math.inf else None,
                      "accepted": loss <= limit}
            if entry["accepted"]:
                plan = candidate
                state.plan = plan.to_dict()
                evaluator.record(plan)
        else:
            entry["skipped"] = "already reads another layer's KV"
        tried += 1
        state.trace.append(entry | {"layer_forwards": evaluator.layer_forwards})
        state.layer_forwards = evaluator.layer_forwards
        if state_path:
            state.save(state_path)
        bar.update(1)
    bar.close()
    return state


def kv_saved(plan: Plan, shares: dict[str, float]) -> float:
    """KV memory a map saves, in layers: one per consumer, and each merge's measured share of a layer."""
    return len(plan.kv) + sum(shares.get(f"{a}+{b}", 1.0) for a, b, _ in plan.merge)


def _merge_candidate(plan: Plan, key: str, angle: float, shares: dict[str, float],
                     allowed: int) -> tuple[Plan | None, str]:
    """`plan` with the merge `key` added, or None and why it cannot be tried."""
    if kv_saved(plan, shares) + shares[key] > allowed + 1e-9:
        return None, "over the budget"
    first, second = (int(x) for x in key.split("+"))
    try:
        return plan.with_merge(plan.merge + ((first, second, angle),)), ""
    except PlanError as error:
        return None, str(error)


def _ranking(evaluator: KVRecorder, start: Plan, state: SearchState, order: str, limit: float, tokens: int,
             state_path: str | Path | None, progress: bool) -> list[str]:
    """Pair keys in the order to try them (for `loss`, scoring each pair alone; resumable pair by pair)."""
    distances = state.trace[0]["distances"]
    if order != "loss":
        return sorted(distances, key=lambda key: distances[key], reverse=order == "dissimilar")
    alone = state.trace[0].setdefault("alone_perplexity", {})
    for key in tqdm([k for k in distances if k not in alone], desc="kv pairs alone", unit="pair", disable=not progress):
        consumer, source = (int(x) for x in key.split("<-"))
        candidate = start.with_kv(((consumer, source),))
        first = next(i for i, s in enumerate(candidate.kv_source_steps) if s is not None)
        loss = evaluator.loss(candidate, first, limit)
        alone[key] = math.exp(loss / tokens) if loss < math.inf else None
        state.layer_forwards = evaluator.layer_forwards
        if state_path:
            state.save(state_path)
    return sorted((key for key in alone if alone[key] is not None), key=lambda key: alone[key])


def one_shot_kv(state: SearchState, consumers: int) -> Plan:
    """A map of `consumers` pairs taken best first by their loss alone (a `loss` search's scores), no re-check.

    For budgets the tolerance-bound search does not reach: it shows what more sharing costs. Pairs whose
    consumer already reads another layer are passed over; sources are re-mapped as in the search.
    """
    alone = state.trace[0].get("alone_perplexity")
    if alone is None:
        raise LayerlabError("a one-shot KV map needs the per-pair scores of a search with order 'loss'")
    start = Plan.from_dict(state.plan, state.plan["num_layers"]).without_kv()
    kv: tuple[tuple[int, int], ...] = ()
    for key in sorted((k for k in alone if alone[k] is not None), key=alone.get):
        consumer, source = (int(x) for x in key.split("<-"))
        if len(kv) < consumers and consumer not in dict(kv):
            kv = merged(kv, consumer, source)
    return start.with_kv(kv)


def accepted_pairs(state: SearchState) -> list[dict]:
    """The accepted pairs of a KV search, in the order they were accepted (with the perplexity after each)."""
    return [entry for entry in state.trace[1:] if entry.get("accepted")]
