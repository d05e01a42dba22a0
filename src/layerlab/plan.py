"""Layer plans: which decoder layers run, in which order, and which half of each.

A `Plan` is an ordered tuple of `Step(layer, attention, mlp)` for a model with `num_layers` layers.
It is parsed from, and printed back to, several forms (each round-trips through `Plan`):

- text: clauses separated by `;`, for example
    `all`                      every layer once (the untouched model)
    `0-23,27-31`               these layers in this order (`N`, `N-M`, descending `M-N`, stride `N-M/S`)
    `0-13,14-19x2,20-29`       `x K` repeats a layer or a range K times
    `skip:24-26`               every layer except these
    `attn-skip:3,5,6`          run only the MLP half of these layers
    `mlp-skip:6,9`             run only the attention half of these layers
    `0-9,3.attn,10-29`         `.attn` / `.mlp` after an item keeps only that half for those steps
    `kv:19<-18,21-23<-20`      KV sharing: layer 19 attends over layer 18's keys and values (see below)
  Clauses combine: `skip:24-26; attn-skip:3,5,6; mlp-skip:6,9`.
- KV sources (`kv:` clause, `Plan.kv`): a consumer layer computes only its queries and attends over the
  keys and values of a source layer, writing no cache of its own. The map is by layer; each step of a
  consumer layer reads the most recent earlier step of its source layer (with repeats, a later copy
  of 19 reads the later copy of 18). The source must run earlier with its attention, a consumer must
  run attention in every step, and a source cannot itself be a consumer (write `20<-18`, not a chain).
  JSON and YAML carry it as `"kv_sources": {"19": 18}` next to any structured form.
- JSON: `{"num_layers": 30, "steps": [{"layer": 0, "attention": true, "mlp": true}, ...]}`.
- LLM-Drop: `{"drop_attn_list": [...], "drop_mlp_list": [...]}` (layers keep their order).
- llama.cpp-style per-layer skip flags, one integer per layer: bit 1 skips attention, bit 2 skips
  the MLP (3 drops the layer), as in llama.cpp's layer-skipping demo (PR #3565).
- mergekit passthrough YAML: `slices: [{sources: [{model: M, layer_range: [a, b]}]}, ...]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import PlanError

_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?:/(\d+))?)?(?:x(\d+))?(?:\.(attn|mlp))?$")
_CLAUSE_SPLIT = re.compile(r";|\s+(?=[a-z-]+:)")
_KEYWORDS = ("skip", "attn-skip", "mlp-skip", "kv")
_ITEM_HELP = "expected N, N-M, N-M/S, an optional xK repeat and an optional .attn or .mlp"


@dataclass(frozen=True)
class Step:
    """One executed step: a source layer, and which of its halves run."""

    layer: int
    attention: bool = True
    mlp: bool = True

    @property
    def kind(self) -> str:
        """`full`, `attn` (attention only) or `mlp` (MLP only)."""
        if self.attention and self.mlp:
            return "full"
        return "attn" if self.attention else "mlp"


@dataclass(frozen=True)
class Plan:
    """An ordered list of steps over a model with `num_layers` decoder layers."""

    steps: tuple[Step, ...]
    num_layers: int
    kv: tuple[tuple[int, int], ...] = ()  # (consumer layer, source layer) pairs, sorted; see the module docstring

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise PlanError(f"a plan needs a model with at least one layer, got num_layers={self.num_layers}")
        if not self.steps:
            raise PlanError("the plan is empty: keep at least one layer (for example 'all' or '0-3')")
        for i, step in enumerate(self.steps):
            if not 0 <= step.layer < self.num_layers:
                raise PlanError(
                    f"step {i} uses layer {step.layer}, but the model has {self.num_layers} layers "
                    f"(0-{self.num_layers - 1})"
                )
            if not (step.attention or step.mlp):
                raise PlanError(f"step {i} (layer {step.layer}) runs neither attention nor MLP; drop the step")
        object.__setattr__(self, "kv", _checked_kv(self.kv, self.steps, self.num_layers))

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def identity(cls, num_layers: int) -> Plan:
        """Every layer once, in order: the untouched model."""
        return cls(tuple(Step(i) for i in range(num_layers)), num_layers)

    @classmethod
    def parse(cls, text: str, num_layers: int) -> Plan:
        """Parse the text form (see the module docstring)."""
        return _parse_text(text, num_layers)

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_layers: int) -> Plan:
        """Build from a JSON / YAML mapping in any of the structured forms, recognised by its keys."""
        if not isinstance(data, dict):
            raise PlanError("a plan file must hold a mapping (JSON object or YAML mapping)")
        if "kv_sources" in data:
            rest = {key: value for key, value in data.items() if key != "kv_sources"}
            return cls.from_dict(rest, num_layers).with_kv(parse_kv_sources(data["kv_sources"]))
        if "steps" in data:
            return _from_json(data, num_layers)
        if "drop_attn_list" in data or "drop_mlp_list" in data:
            return cls.from_llm_drop(data.get("drop_attn_list", []), data.get("drop_mlp_list", []), num_layers)
        if "llama_cpp_skip_flags" in data:
            return cls.from_llama_cpp_flags(data["llama_cpp_skip_flags"])
        if "slices" in data:
            return cls.from_mergekit(data, num_layers)
        if "plan" in data:
            return cls.parse(str(data["plan"]), num_layers)
        raise PlanError(
            "unknown plan mapping: expected a 'steps', 'drop_attn_list'/'drop_mlp_list', "
            "'llama_cpp_skip_flags', 'slices' or 'plan' key"
        )

    @classmethod
    def load(cls, source: str, num_layers: int) -> Plan:
        """A plan from text, or from a .json / .yaml / .yml file holding a structured form."""
        path = Path(source)
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            if not path.is_file():
                raise PlanError(f"plan file {source!r} does not exist")
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise PlanError(f"plan file {source!r} is not valid JSON/YAML: {str(exc).splitlines()[0]}") from None
            return cls.from_dict(data, num_layers)
        return cls.parse(source, num_layers)

    @classmethod
    def from_llm_drop(cls, drop_attn_list: Iterable[int], drop_mlp_list: Iterable[int], num_layers: int) -> Plan:
        """LLM-Drop's lists: layers in order, without the attention / MLP of the listed layers."""
        attn, mlp = _check_indices(drop_attn_list, num_layers, "drop_attn_list"), _check_indices(
            drop_mlp_list, num_layers, "drop_mlp_list"
        )
        steps = [Step(i, i not in attn, i not in mlp) for i in range(num_layers)]
        return cls(tuple(s for s in steps if s.attention or s.mlp), num_layers)

    @classmethod
    def from_llama_cpp_flags(cls, flags: Iterable[int]) -> Plan:
        """One integer per layer: 0 runs it, 1 skips attention, 2 skips the MLP, 3 drops the layer."""
        flags = list(flags)
        for i, flag in enumerate(flags):
            if flag not in (0, 1, 2, 3):
                raise PlanError(f"llama.cpp skip flag {flag!r} for layer {i} must be 0, 1, 2 or 3")
        steps = [Step(i, not flag & 1, not flag & 2) for i, flag in enumerate(flags)]
        return cls(tuple(s for s in steps if s.attention or s.mlp), len(flags))

    @classmethod
    def from_mergekit(cls, config: dict[str, Any] | str, num_layers: int) -> Plan:
        """A mergekit passthrough config (mapping or YAML text) whose slices all use one model."""
        if isinstance(config, str):
            config = yaml.safe_load(config)
        method = config.get("merge_method", "passthrough")
        if method != "passthrough":
            raise PlanError(f"mergekit merge_method {method!r} is not a layer plan; only 'passthrough' is")
        steps: list[Step] = []
        models = set()
        for i, piece in enumerate(config.get("slices") or []):
            sources = piece.get("sources") or []
            if len(sources) != 1:
                raise PlanError(f"mergekit slice {i} has {len(sources)} sources; passthrough needs exactly one")
            models.add(sources[0].get("model"))
            start, end = sources[0]["layer_range"]
            if not 0 <= start < end <= num_layers:
                raise PlanError(
                    f"mergekit slice {i} layer_range [{start}, {end}] is outside 0..{num_layers} (end is exclusive)"
                )
            steps.extend(Step(layer) for layer in range(start, end))
        if len(models) > 1:
            raise PlanError(f"mergekit slices use several models {sorted(map(str, models))}; a plan uses one")
        return cls(tuple(steps), num_layers)

    # ----------------------------------------------------------------------------------- printers
    def to_text(self) -> str:
        """The shortest clause form that parses back to this plan."""
        return _format_text(self) + _format_kv(self.kv)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        data = {
            "num_layers": self.num_layers,
            "steps": [{"layer": s.layer, "attention": s.attention, "mlp": s.mlp} for s in self.steps],
        }
        return data | ({"kv_sources": {str(c): s for c, s in self.kv}} if self.kv else {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_llm_drop(self) -> dict[str, list[int]]:
        """LLM-Drop's lists; only for plans that keep layer order without repeats."""
        flags = self._per_layer_flags("LLM-Drop lists")
        return {
            "drop_attn_list": [i for i, f in enumerate(flags) if f & 1],
            "drop_mlp_list": [i for i, f in enumerate(flags) if f & 2],
        }

    def to_llama_cpp_flags(self) -> list[int]:
        """One skip flag per layer (bit 1 attention, bit 2 MLP); only for in-order plans without repeats."""
        return self._per_layer_flags("llama.cpp skip flags")

    def to_mergekit(self, model: str, dtype: str = "float32") -> dict[str, Any]:
        """A mergekit passthrough config; only for plans of whole layers."""
        self._refuse_kv("mergekit passthrough slices")
        if not self.whole_layers:
            raise PlanError(
                "mergekit passthrough slices cannot express attention-only or MLP-only steps; "
                "use the LLM-Drop lists or JSON form instead"
            )
        slices = []
        for start, end in _runs([s.layer for s in self.steps]):
            slices.append({"sources": [{"model": model, "layer_range": [start, end + 1]}]})
        return {"slices": slices, "merge_method": "passthrough", "dtype": dtype}

    # ----------------------------------------------------------------------------------- queries
    @property
    def is_identity(self) -> bool:
        return self == Plan.identity(self.num_layers)

    @property
    def whole_layers(self) -> bool:
        """True when every step runs both halves of its layer."""
        return all(s.attention and s.mlp for s in self.steps)

    @property
    def layers(self) -> tuple[int, ...]:
        """The source layer of each step."""
        return tuple(s.layer for s in self.steps)

    # ----------------------------------------------------------------------------------- KV sources
    def with_kv(self, pairs: Iterable[tuple[int, int]]) -> Plan:
        """The same steps with this KV-source map (consumer layer, source layer) instead of the current one."""
        return Plan(self.steps, self.num_layers, tuple(pairs))

    def without_kv(self) -> Plan:
        return Plan(self.steps, self.num_layers)

    @property
    def kv_source_steps(self) -> tuple[int | None, ...]:
        """Per step, the index of the step whose keys and values it attends over (None: its own)."""
        return _kv_source_steps(self.kv, self.steps)

    def _refuse_kv(self, form: str) -> None:
        if self.kv:
            raise PlanError(f"{form} cannot express KV sharing ({_format_kv(self.kv)[2:]}); use the text or JSON form")

    def __str__(self) -> str:
        return self.to_text()

    def _per_layer_flags(self, form: str) -> list[int]:
        self._refuse_kv(form)
        layers = self.layers
        if list(layers) != sorted(set(layers)):
            raise PlanError(f"{form} cannot express repeated or reordered layers; use the text or JSON form")
        flags = [3] * self.num_layers
        for s in self.steps:
            flags[s.layer] = (0 if s.attention else 1) | (0 if s.mlp else 2)
        return flags


# --------------------------------------------------------------------------------------- parsing
def _parse_text(text: str, num_layers: int) -> Plan:
    clauses = [c.strip() for c in _CLAUSE_SPLIT.split(text.strip()) if c.strip()]
    if not clauses:
        raise PlanError("the plan text is empty: write for example 'all', '0-23,27-31' or 'skip:24-26'")
    sequence: list[Step] | None = None
    removed: set[int] = set()
    no_attn: set[int] = set()
    no_mlp: set[int] = set()
    kv: list[tuple[int, int]] = []
    for clause in clauses:
        keyword, colon, body = clause.partition(":")
        if colon:
            if keyword not in _KEYWORDS:
                raise PlanError(
                    f"unknown plan clause {keyword + ':'!r} in {text!r}; known: skip:, attn-skip:, mlp-skip:, kv:"
                )
            if keyword == "kv":
                kv += _parse_kv(body, num_layers, text)
                continue
            layers = {s.layer for s in _parse_sequence(body, num_layers, text, allow_suffix=False)}
            {"skip": removed, "attn-skip": no_attn, "mlp-skip": no_mlp}[keyword].update(layers)
        elif sequence is not None:
            raise PlanError(f"plan {text!r} has two layer sequences; join them with ',' into one")
        else:
            sequence = _parse_sequence(clause, num_layers, text, allow_suffix=True)
    if sequence is None:
        sequence = list(Plan.identity(num_layers).steps)
    steps = [
        Step(s.layer, s.attention and s.layer not in no_attn, s.mlp and s.layer not in no_mlp)
        for s in sequence
        if s.layer not in removed
    ]
    steps = [s for s in steps if s.attention or s.mlp]
    if not steps:
        raise PlanError(f"plan {text!r} leaves no layer to run; keep at least one")
    return Plan(tuple(steps), num_layers, tuple(kv))


def _parse_sequence(body: str, num_layers: int, text: str, allow_suffix: bool) -> list[Step]:
    if body.strip() in ("all", "full"):
        return list(Plan.identity(num_layers).steps)
    steps: list[Step] = []
    for token in (t.strip() for t in body.split(",")):
        match = _ITEM.match(token)
        if not match or (match.group(5) and not allow_suffix):
            raise PlanError(f"bad plan token {token!r} in {text!r}: {_ITEM_HELP}")
        start, end, stride, repeat, half = match.groups()
        start = int(start)
        end = start if end is None else int(end)
        for layer in (start, end):
            if layer >= num_layers:
                raise PlanError(
                    f"plan token {token!r} names layer {layer}, but the model has {num_layers} layers "
                    f"(0-{num_layers - 1})"
                )
        stride = int(stride or 1)
        repeat = int(repeat or 1)
        if stride < 1 or repeat < 1:
            raise PlanError(f"bad plan token {token!r} in {text!r}: stride and repeat count must be at least 1")
        direction = 1 if end >= start else -1
        block = list(range(start, end + direction, direction * stride))
        steps.extend(Step(layer, half != "mlp", half != "attn") for layer in block * repeat)
    return steps


def _check_indices(values: Iterable[int], num_layers: int, name: str) -> set[int]:
    indices = set()
    for value in values:
        if not isinstance(value, int) or not 0 <= value < num_layers:
            raise PlanError(f"{name} entry {value!r} is not a layer index in 0-{num_layers - 1}")
        indices.add(value)
    return indices


def _from_json(data: dict[str, Any], num_layers: int) -> Plan:
    declared = data.get("num_layers", num_layers)
    if declared != num_layers:
        raise PlanError(f"the plan was written for {declared} layers, but the model has {num_layers}")
    steps = []
    for i, raw in enumerate(data["steps"]):
        if isinstance(raw, int):
            steps.append(Step(raw))
        elif isinstance(raw, dict) and isinstance(raw.get("layer"), int):
            steps.append(Step(raw["layer"], bool(raw.get("attention", True)), bool(raw.get("mlp", True))))
        else:
            raise PlanError(
                f"plan step {i} {raw!r} must be a layer index or {{'layer': N, 'attention': .., 'mlp': ..}}"
            )
    return Plan(tuple(steps), num_layers)


# --------------------------------------------------------------------------------------- printing
def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Maximal ascending-by-one runs, as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _format_list(layers: Iterable[int]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in _runs(sorted(set(layers))))


def _format_text(plan: Plan) -> str:
    if plan.is_identity:
        return "all"
    kinds_by_layer: dict[int, set[str]] = {}
    for s in plan.steps:
        kinds_by_layer.setdefault(s.layer, set()).add(s.kind)
    uniform = all(len(k) == 1 for k in kinds_by_layer.values())
    clauses = []
    layers = list(plan.layers)
    if uniform and layers == sorted(set(layers)):
        missing = [i for i in range(plan.num_layers) if i not in kinds_by_layer]
        if missing:
            clauses.append(f"skip:{_format_list(missing)}")
    else:
        clauses.append(_format_sequence(plan.steps, with_suffix=not uniform))
    if uniform:
        for keyword, kind in (("attn-skip", "mlp"), ("mlp-skip", "attn")):
            chosen = [layer for layer, kinds in kinds_by_layer.items() if kind in kinds]
            if chosen:
                clauses.append(f"{keyword}:{_format_list(chosen)}")
    return "; ".join(clauses) if clauses else "all"


def _format_sequence(steps: tuple[Step, ...], with_suffix: bool) -> str:
    """Items `a-b` over ascending runs of one kind, with `xK` for blocks repeated back to back."""
    blocks: list[tuple[int, int, str]] = []
    for s in steps:
        kind = s.kind if with_suffix else "full"
        if blocks and blocks[-1][2] == kind and s.layer == blocks[-1][1] + 1:
            blocks[-1] = (blocks[-1][0], s.layer, kind)
        else:
            blocks.append((s.layer, s.layer, kind))
    items: list[tuple[tuple[int, int, str], int]] = []
    for block in blocks:
        if items and items[-1][0] == block:
            items[-1] = (block, items[-1][1] + 1)
        else:
            items.append((block, 1))
    out = []
    for (a, b, kind), count in items:
        item = f"{a}" if a == b else f"{a}-{b}"
        item += f"x{count}" if count > 1 else ""
        item += "" if kind == "full" else f".{kind}"
        out.append(item)
    return ",".join(out)


def unique_plans(plans: list[Plan]) -> list[Plan]:
    """`plans` without repeats, first occurrence kept (a baseline row is never shown twice)."""
    seen: list[Plan] = []
    for plan in plans:
        if plan not in seen:
            seen.append(plan)
    return seen


# --------------------------------------------------------------------------------------- KV sources
_KV_ITEM = re.compile(r"^(\d+)(?:-(\d+))?<-(\d+)$")


def _parse_kv(body: str, num_layers: int, text: str) -> list[tuple[int, int]]:
    """`kv:` clause items: `C<-S` (layer C reads layer S's keys and values) or `A-B<-S` (each of A..B reads S)."""
    pairs = []
    for token in (t.strip() for t in body.split(",")):
        match = _KV_ITEM.match(token)
        if not match:
            raise PlanError(f"bad kv item {token!r} in {text!r}: expected C<-S or A-B<-S (layer C reads layer S's KV)")
        first, last, source = int(match[1]), int(match[2] or match[1]), int(match[3])
        for layer in (first, last, source):
            if layer >= num_layers:
                raise PlanError(f"kv item {token!r} names layer {layer}, but the model has {num_layers} layers "
                                f"(0-{num_layers - 1})")
        pairs += [(consumer, source) for consumer in range(min(first, last), max(first, last) + 1)]
    return pairs


def parse_kv_sources(data: Any) -> list[tuple[int, int]]:
    """`kv_sources` of a plan file or an exported config: {consumer: source} (keys may be strings) or pairs."""
    items = data.items() if isinstance(data, dict) else data
    pairs = []
    try:
        for consumer, source in items:
            if isinstance(source, bool) or not isinstance(source, int):
                raise TypeError
            pairs.append((int(consumer), source))
    except (TypeError, ValueError):
        raise PlanError(f"kv_sources {data!r} must map consumer layers to source layers, e.g. {{\"19\": 18}}") from None
    return pairs


def _checked_kv(pairs: Iterable[tuple[int, int]], steps: tuple[Step, ...], num_layers: int) -> tuple:
    """The KV-source pairs sorted by consumer, after checking they describe a map the runtime can run."""
    pairs = tuple(sorted((int(c), int(s)) for c, s in pairs))
    consumers = [c for c, _ in pairs]
    for consumer, source in pairs:
        name = f"kv pair {consumer}<-{source}"
        for layer in (consumer, source):
            if not 0 <= layer < num_layers:
                raise PlanError(f"{name} names layer {layer}, but the model has {num_layers} layers "
                                f"(0-{num_layers - 1})")
        if consumer == source:
            raise PlanError(f"{name} makes a layer read its own keys and values; drop it")
        if consumers.count(consumer) > 1:
            raise PlanError(f"layer {consumer} has several kv sources; give each consumer layer one source")
        if source in consumers:
            raise PlanError(f"{name}: layer {source} itself reads layer {dict(pairs)[source]}'s keys and values; "
                            f"write {consumer}<-{dict(pairs)[source]} instead of a chain")
        if consumer not in {s.layer for s in steps}:
            raise PlanError(f"{name}: the plan does not run layer {consumer}; drop the pair or keep the layer")
    _kv_source_steps(pairs, steps)
    return pairs


def _kv_source_steps(pairs: tuple[tuple[int, int], ...], steps: tuple[Step, ...]) -> tuple[int | None, ...]:
    """Per step, the most recent earlier step of its source layer (None for steps that are not consumers)."""
    sources = dict(pairs)
    latest: dict[int, int] = {}  # layer -> index of its most recent step so far
    out: list[int | None] = []
    for i, step in enumerate(steps):
        source = sources.get(step.layer)
        if source is not None:
            name = f"kv pair {step.layer}<-{source}"
            if not step.attention:
                raise PlanError(f"{name}: step {i} runs layer {step.layer} without attention, so it has no queries "
                                "to attend with; drop the pair or keep its attention")
            if source not in latest:
                raise PlanError(f"{name}: layer {source} does not run before step {i} (layer {step.layer}); it is "
                                "skipped or comes later, and a source must run earlier in the plan")
            if not steps[latest[source]].attention:
                raise PlanError(f"{name}: step {latest[source]} runs layer {source} without attention, so it has no "
                                "keys and values to share; choose another source")
        out.append(latest[source] if source is not None else None)
        latest[step.layer] = i
    return tuple(out)


def _format_kv(pairs: tuple[tuple[int, int], ...]) -> str:
    """`; kv:...` with runs of consecutive consumers of one source written `A-B<-S`, or '' without KV sharing."""
    runs: list[list[int]] = []  # [first consumer, last consumer, source]
    for consumer, source in pairs:
        if runs and runs[-1][2] == source and runs[-1][1] == consumer - 1:
            runs[-1][1] = consumer
        else:
            runs.append([consumer, consumer, source])
    items = [f"{a}<-{s}" if a == b else f"{a}-{b}<-{s}" for a, b, s in runs]
    return f"; kv:{','.join(items)}" if items else ""
