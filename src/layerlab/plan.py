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
    `kvmerge:20+21,22+23@45`   MiniCache-style merged cache of adjacent layers (see below)
  Clauses combine: `skip:24-26; attn-skip:3,5,6; mlp-skip:6,9`.
- KV sources (`kv:` clause, `Plan.kv`): a consumer layer computes only its queries and attends over the
  keys and values of a source layer, writing no cache of its own. The map is by layer; each step of a
  consumer layer reads the most recent earlier step of its source layer (with repeats, a later copy
  of 19 reads the later copy of 18). The source must run earlier with its attention, a consumer must
  run attention in every step, and a source cannot itself be a consumer (write `20<-18`, not a chain).
  JSON and YAML carry it as `"kv_sources": {"19": 18}` next to any structured form.
- KV merges (`kvmerge:` clause, `Plan.merge`): adjacent layers A and A+1 keep one cache between them
  (MiniCache): per token and head, one shared direction and each layer's magnitude; tokens whose
  two directions are more than D degrees apart (`A+B@D`, default `DEFAULT_MERGE_ANGLE`) keep both
  vectors. Both layers run once each, with attention, A before A+1, neither reading another layer's
  KV; a layer is in one pair at most. JSON and YAML carry it as `"kv_merge": ["20+21", "22+23@45"]`.
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

_ITEM = re.compile(r"^(\d{1,6})(?:-(\d{1,6})(?:/(\d{1,6}))?)?(?:x(\d{1,6}))?(?:\.(attn|mlp))?$")
_CLAUSE_SPLIT = re.compile(r";|\s+(?=[a-z-]+:)")
_KEYWORDS = ("skip", "attn-skip", "mlp-skip", "kv", "kvmerge")
DEFAULT_MERGE_ANGLE = 90.0  # kvmerge: tokens whose two directions are further apart (degrees) are kept unmerged
_ITEM_HELP = "expected N, N-M, N-M/S, an optional xK repeat and an optional .attn or .mlp"
MAX_STEPS_PER_LAYER = 16  # a plan runs at most 16 x num_layers steps: repeats beyond that are a typo
MAX_PLAN_FILE_BYTES = 1 << 20
PLAN_FILE_SUFFIXES = (".json", ".yaml", ".yml")
_FORMS = {  # structured forms: the key that names each, and every key it allows
    "steps": {"num_layers", "steps"},
    "drop_attn_list": {"drop_attn_list", "drop_mlp_list", "num_layers"},
    "drop_mlp_list": {"drop_attn_list", "drop_mlp_list", "num_layers"},
    "llama_cpp_skip_flags": {"llama_cpp_skip_flags"},
    "slices": {"slices", "merge_method", "dtype", "base_model", "tokenizer_source", "tokenizer", "parameters",
               "chat_template", "out_dtype", "name"},
    "plan": {"plan", "num_layers"},
}
_STEP_KEYS = ("layer", "attention", "mlp")


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
    merge: tuple[tuple[int, int, float], ...] = ()  # (layer A, layer A+1, max angle in degrees), sorted

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise PlanError(f"a plan needs a model with at least one layer, got num_layers={self.num_layers}")
        if not self.steps:
            raise PlanError("the plan is empty: keep at least one layer (for example 'all' or '0-3')")
        if len(self.steps) > MAX_STEPS_PER_LAYER * self.num_layers:
            raise PlanError(f"the plan runs {len(self.steps)} steps, more than {MAX_STEPS_PER_LAYER} x the model's "
                            f"{self.num_layers} layers; lower the repeat counts")
        for i, step in enumerate(self.steps):
            if not 0 <= step.layer < self.num_layers:
                raise PlanError(
                    f"step {i} uses layer {step.layer}, but the model has {self.num_layers} layers "
                    f"(0-{self.num_layers - 1})"
                )
            if not (step.attention or step.mlp):
                raise PlanError(f"step {i} (layer {step.layer}) runs neither attention nor MLP; drop the step")
        if not any(step.attention for step in self.steps):
            raise PlanError("the plan runs no attention sublayer; keep attention in at least one step")
        object.__setattr__(self, "kv", _checked_kv(self.kv, self.steps, self.num_layers))
        object.__setattr__(self, "merge", _checked_merge(self.merge, self.steps, self.num_layers, self.kv))

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
        """Build from a JSON / YAML mapping in any of the structured forms, recognised by its keys.

        Each form allows only its own keys: a misspelt or unknown key is an error naming the allowed ones.
        """
        if not isinstance(data, dict):
            raise PlanError("a plan file must hold a mapping (JSON object or YAML mapping)")
        if "kv_sources" in data or "kv_merge" in data:
            rest = {key: value for key, value in data.items() if key not in ("kv_sources", "kv_merge")}
            plan = cls.from_dict(rest, num_layers)
            kv = parse_kv_sources(data["kv_sources"]) if "kv_sources" in data else ()
            return Plan(plan.steps, num_layers, tuple(kv), parse_kv_merge(data.get("kv_merge", []), num_layers))
        form = next((key for key in _FORMS if key in data), None)
        if form is None:
            raise PlanError(f"unknown plan mapping with keys {_keys(data)}: expected a 'steps', 'drop_attn_list'/"
                            "'drop_mlp_list', 'llama_cpp_skip_flags', 'slices' or 'plan' key")
        unknown = [key for key in data if key not in _FORMS[form]]
        if unknown:
            raise PlanError(f"unknown key {_show(unknown[0])} in a {form!r} plan; allowed: "
                            f"{', '.join(sorted(_FORMS[form]))}")
        declared = data.get("num_layers", num_layers)
        if declared != num_layers or isinstance(declared, bool):
            raise PlanError(f"the plan was written for {_show(declared)} layers, but the model has {num_layers}")
        if form == "steps":
            return _from_json(data, num_layers)
        if form in ("drop_attn_list", "drop_mlp_list"):
            return cls.from_llm_drop(data.get("drop_attn_list", []), data.get("drop_mlp_list", []), num_layers)
        if form == "llama_cpp_skip_flags":
            return cls.from_llama_cpp_flags(data["llama_cpp_skip_flags"], num_layers)
        if form == "slices":
            return cls.from_mergekit(data, num_layers)
        if not isinstance(data["plan"], str):
            raise PlanError(f"'plan' must be plan text such as 'skip:24-26', got {_show(data['plan'])}")
        return cls.parse(data["plan"], num_layers)

    @classmethod
    def load(cls, source: str, num_layers: int) -> Plan:
        """A plan from text, or from a .json / .yaml / .yml file holding a structured form."""
        path = Path(source)
        if path.suffix.lower() in PLAN_FILE_SUFFIXES:
            return cls.from_dict(read_plan_file(path), num_layers)
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
    def from_llama_cpp_flags(cls, flags: Iterable[int], num_layers: int | None = None) -> Plan:
        """One integer per layer: 0 runs it, 1 skips attention, 2 skips the MLP, 3 drops the layer."""
        flags = _int_list(flags, "llama_cpp_skip_flags")
        if num_layers is not None and len(flags) != num_layers:
            raise PlanError(f"llama_cpp_skip_flags has {len(flags)} entries, but the model has {num_layers} layers: "
                            "give one flag per layer")
        for i, flag in enumerate(flags):
            if flag not in (0, 1, 2, 3):
                raise PlanError(f"llama.cpp skip flag {_show(flag)} for layer {i} must be 0, 1, 2 or 3")
        steps = [Step(i, not flag & 1, not flag & 2) for i, flag in enumerate(flags)]
        return cls(tuple(s for s in steps if s.attention or s.mlp), len(flags))

    @classmethod
    def from_mergekit(cls, config: dict[str, Any] | str, num_layers: int) -> Plan:
        """A mergekit passthrough config (mapping or YAML text) whose slices all use one model."""
        if isinstance(config, str):
            try:
                config = yaml.safe_load(config)
            except yaml.YAMLError as exc:
                raise PlanError(f"the mergekit config is not valid YAML: {_first_line(exc)}") from None
            except RecursionError:
                raise PlanError("the mergekit config is nested too deeply to be a plan") from None
        if not isinstance(config, dict) or not isinstance(config.get("slices"), list) or not config["slices"]:
            raise PlanError("a mergekit passthrough config needs a non-empty 'slices' list")
        method = config.get("merge_method", "passthrough")
        if method != "passthrough":
            raise PlanError(f"mergekit merge_method {_show(method)} is not a layer plan; only 'passthrough' is")
        steps: list[Step] = []
        models = set()
        for i, piece in enumerate(config["slices"]):
            source = _mergekit_source(piece, i)
            models.add(str(source.get("model")))
            start, end = _layer_range(source.get("layer_range"), i, num_layers)
            if len(steps) + end - start > MAX_STEPS_PER_LAYER * num_layers:
                raise PlanError(f"the mergekit slices run more than {MAX_STEPS_PER_LAYER} x {num_layers} layers")
            steps.extend(Step(layer) for layer in range(start, end))
        if len(models) > 1:
            raise PlanError(f"mergekit slices use several models {sorted(models)}; a plan uses one")
        return cls(tuple(steps), num_layers)

    # ----------------------------------------------------------------------------------- printers
    def to_text(self) -> str:
        """The shortest clause form that parses back to this plan."""
        return _format_text(self) + _format_kv(self.kv) + _format_merge(self.merge)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        data = {
            "num_layers": self.num_layers,
            "steps": [{"layer": s.layer, "attention": s.attention, "mlp": s.mlp} for s in self.steps],
        }
        data |= {"kv_sources": {str(c): s for c, s in self.kv}} if self.kv else {}
        return data | ({"kv_merge": _merge_items(self.merge)} if self.merge else {})

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
        """The same steps and merges with this KV-source map (consumer layer, source layer) instead of the current."""
        return Plan(self.steps, self.num_layers, tuple(pairs), self.merge)

    def with_merge(self, pairs: Iterable[tuple[int, int, float]]) -> Plan:
        """The same steps and KV sources with these merged pairs (layer A, A+1, max angle) instead of the current."""
        return Plan(self.steps, self.num_layers, self.kv, tuple(pairs))

    def without_kv(self) -> Plan:
        """The same steps with every layer on its own full cache (no `kv:` and no `kvmerge:`)."""
        return Plan(self.steps, self.num_layers)

    @property
    def kv_source_steps(self) -> tuple[int | None, ...]:
        """Per step, the index of the step whose keys and values it attends over (None: its own)."""
        return _kv_source_steps(self.kv, self.steps)

    def _refuse_kv(self, form: str) -> None:
        if self.kv or self.merge:
            clauses = (_format_kv(self.kv) + _format_merge(self.merge))[2:]
            raise PlanError(f"{form} cannot express KV sharing ({clauses}); use the text or JSON form")

    def refuse_merge(self, what: str) -> None:
        """A one-line error for writers that cannot carry `kvmerge:` pairs (exports)."""
        if self.merge:
            raise PlanError(f"{what} cannot carry KV merges ({_format_merge(self.merge)[2:]}) yet; run them with "
                            "apply_plan, or drop the kvmerge: clause")

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
    if not isinstance(text, str) or len(text) > 100_000:
        raise PlanError(f"plan text must be a string of at most 100,000 characters, got {_show(text)}")
    clauses = [c.strip() for c in _CLAUSE_SPLIT.split(text.strip()) if c.strip()]
    if not clauses:
        raise PlanError("the plan text is empty: write for example 'all', '0-23,27-31' or 'skip:24-26'")
    sequence: list[Step] | None = None
    removed: set[int] = set()
    no_attn: set[int] = set()
    no_mlp: set[int] = set()
    kv: list[tuple[int, int]] = []
    merge: list[tuple[int, int, float]] = []
    for clause in clauses:
        keyword, colon, body = clause.partition(":")
        if colon:
            if keyword not in _KEYWORDS:
                raise PlanError(
                    f"unknown plan clause {_show(keyword + ':')} in {_show(text)}; "
                    "known: skip:, attn-skip:, mlp-skip:, kv:, kvmerge:"
                )
            if keyword == "kv":
                kv += _parse_kv(body, num_layers, text)
                continue
            if keyword == "kvmerge":
                merge += [_parse_merge_item(token.strip(), num_layers) for token in body.split(",")]
                continue
            layers = {s.layer for s in _parse_sequence(body, num_layers, text, allow_suffix=False)}
            {"skip": removed, "attn-skip": no_attn, "mlp-skip": no_mlp}[keyword].update(layers)
        elif sequence is not None:
            raise PlanError(f"plan {_show(text)} has two layer sequences; join them with ',' into one")
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
        raise PlanError(f"plan {_show(text)} leaves no layer to run; keep at least one")
    return Plan(tuple(steps), num_layers, tuple(kv), tuple(merge))


def _parse_sequence(body: str, num_layers: int, text: str, allow_suffix: bool) -> list[Step]:
    if body.strip() in ("all", "full"):
        return list(Plan.identity(num_layers).steps)
    steps: list[Step] = []
    for token in (t.strip() for t in body.split(",")):
        match = _ITEM.match(token)
        if not match or (match.group(5) and not allow_suffix):
            raise PlanError(f"bad plan token {_show(token)} in {_show(text)}: {_ITEM_HELP}")
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
            raise PlanError(f"bad plan token {token!r} in {_show(text)}: stride and repeat count must be at least 1")
        direction = 1 if end >= start else -1
        block = list(range(start, end + direction, direction * stride))
        if len(steps) + len(block) * repeat > MAX_STEPS_PER_LAYER * num_layers:
            raise PlanError(f"plan token {token!r} makes the plan longer than {MAX_STEPS_PER_LAYER} x the model's "
                            f"{num_layers} layers; lower the repeat count")
        steps.extend(Step(layer, half != "mlp", half != "attn") for layer in block * repeat)
    return steps


def _check_indices(values: Iterable[int], num_layers: int, name: str) -> set[int]:
    indices = set()
    for value in _int_list(values, name):
        if not 0 <= value < num_layers:
            raise PlanError(f"{name} entry {_show(value)} is not a layer index in 0-{num_layers - 1}")
        indices.add(value)
    return indices


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(values: Any, name: str) -> list[int]:
    """A list of plain integers (not booleans, strings or floats), or an error naming the bad entry."""
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"{name} must be a list of integers, got {_show(values)}")
    for value in values:
        if not _is_int(value):
            raise PlanError(f"{name} entry {_show(value)} is not an integer")
    return list(values)


def _show(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short: a 120,000-digit number must not become the message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _keys(data: dict) -> str:
    return ", ".join(_show(k, 20) for k in list(data)[:6]) or "none"


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_plan_file(path: Path) -> Any:
    """The mapping in a .json / .yaml plan file; any unreadable file is a one-line PlanError."""
    if not path.is_file():
        raise PlanError(f"plan file {str(path)!r} does not exist" if not path.exists()
                        else f"plan file {str(path)!r} is not a file")
    if path.stat().st_size > MAX_PLAN_FILE_BYTES:
        raise PlanError(f"plan file {str(path)!r} is larger than {MAX_PLAN_FILE_BYTES >> 20} MiB; is it a plan?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlanError(f"plan file {str(path)!r} is not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise PlanError(f"cannot read plan file {str(path)!r}: {exc.strerror}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise PlanError(f"plan file {str(path)!r} is not valid {kind}: {_first_line(exc)}") from None
    except RecursionError:
        raise PlanError(f"plan file {str(path)!r} is nested too deeply to be a plan") from None


def _mergekit_source(piece: Any, i: int) -> dict:
    """The one source of a passthrough slice."""
    if not isinstance(piece, dict) or set(piece) - {"sources", "parameters"}:
        raise PlanError(f"mergekit slice {i} must be a mapping with a 'sources' list, got {_show(piece)}")
    sources = piece.get("sources")
    if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
        count = len(sources) if isinstance(sources, list) else 0
        raise PlanError(f"mergekit slice {i} has {count} sources; passthrough needs exactly one")
    unknown = set(sources[0]) - {"model", "layer_range", "parameters"}
    if unknown:
        raise PlanError(f"unknown key {_show(sorted(map(str, unknown))[0])} in mergekit slice {i}; "
                        "allowed: model, layer_range, parameters")
    return sources[0]


def _layer_range(value: Any, i: int, num_layers: int) -> tuple[int, int]:
    """A slice's `[start, end)` layer range, checked against the model."""
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise PlanError(f"mergekit slice {i} needs layer_range: [start, end] with two integers, got {_show(value)}")
    start, end = value
    if not 0 <= start < end <= num_layers:
        raise PlanError(f"mergekit slice {i} layer_range [{start}, {end}] is outside 0..{num_layers} or reversed "
                        "(end is exclusive and must be larger than start)")
    return start, end


def _from_json(data: dict[str, Any], num_layers: int) -> Plan:
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list):
        raise PlanError(f"'steps' must be a list of steps, got {_show(raw_steps)}")
    if len(raw_steps) > MAX_STEPS_PER_LAYER * num_layers:
        raise PlanError(f"the plan lists {len(raw_steps)} steps, more than {MAX_STEPS_PER_LAYER} x the model's "
                        f"{num_layers} layers")
    return Plan(tuple(_json_step(raw, i) for i, raw in enumerate(raw_steps)), num_layers)


def _json_step(raw: Any, i: int) -> Step:
    """One step of the JSON form: a layer index, or a mapping with exactly the step keys and true booleans."""
    if _is_int(raw):
        return Step(raw)
    if not isinstance(raw, dict) or not _is_int(raw.get("layer")):
        raise PlanError(f"plan step {i} {_show(raw)} must be a layer index or "
                        "{'layer': N, 'attention': true/false, 'mlp': true/false}")
    unknown = [key for key in raw if key not in _STEP_KEYS]
    if unknown:
        raise PlanError(f"plan step {i} has unknown key {_show(unknown[0])}; allowed: {', '.join(_STEP_KEYS)}")
    for key in ("attention", "mlp"):
        if key in raw and not isinstance(raw[key], bool):
            raise PlanError(f"plan step {i} has {key}: {_show(raw[key])}; write true or false (JSON booleans)")
    return Step(raw["layer"], raw.get("attention", True), raw.get("mlp", True))


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
_KV_ITEM = re.compile(r"^(\d{1,6})(?:-(\d{1,6}))?<-(\d{1,6})$", re.ASCII)


def _parse_kv(body: str, num_layers: int, text: str) -> list[tuple[int, int]]:
    """`kv:` clause items: `C<-S` (layer C reads layer S's keys and values) or `A-B<-S` (each of A..B reads S)."""
    pairs = []
    for token in (t.strip() for t in body.split(",")):
        match = _KV_ITEM.match(token)
        if not match:
            raise PlanError(f"bad kv item {_show(token)} in {_show(text)}: expected C<-S or A-B<-S "
                            "(layer C reads layer S's keys and values)")
        first, last, source = int(match[1]), int(match[2] or match[1]), int(match[3])
        for layer in (first, last, source):
            if layer >= num_layers:
                raise PlanError(f"kv item {_show(token)} names layer {layer}, but the model has {num_layers} layers "
                                f"(0-{num_layers - 1})")
        pairs += [(consumer, source) for consumer in range(min(first, last), max(first, last) + 1)]
    return pairs


def parse_kv_sources(data: Any) -> list[tuple[int, int]]:
    """`kv_sources` of a plan file or an exported config: {consumer: source} (JSON keys are strings) or pairs."""
    items = data.items() if isinstance(data, dict) else data if isinstance(data, list) else None
    pairs = []
    for item in items if items is not None else [None]:
        pair = tuple(item) if isinstance(item, (list, tuple)) and len(item) == 2 else None
        if pair is None or not all(_layer_key(v) is not None for v in pair):
            raise PlanError(f"kv_sources {_show(data)} must map consumer layers to source layers, "
                            'e.g. {"19": 18}')
        pairs.append((_layer_key(pair[0]), _layer_key(pair[1])))
    return pairs


def _layer_key(value: Any) -> int | None:
    """A layer index given as an integer or (a JSON object key) a short string of ASCII digits."""
    if _is_int(value):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6:
        return int(value)
    return None


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


# --------------------------------------------------------------------------------------- KV merges
_MERGE_ITEM = re.compile(r"^(\d{1,6})\+(\d{1,6})(?:@(\d{1,3}(?:\.\d{1,6})?))?$", re.ASCII)


def _parse_merge_item(token: str, num_layers: int) -> tuple[int, int, float]:
    """`A+B` or `A+B@D`: layers A and B keep one merged cache; tokens more than D degrees apart stay unmerged."""
    match = _MERGE_ITEM.match(token)
    if not match:
        raise PlanError(f"bad kvmerge item {_show(token)}: expected A+B or A+B@D (adjacent layers A and A+1, "
                        "optional largest angle in degrees that still merges)")
    first, second = int(match[1]), int(match[2])
    for layer in (first, second):
        if layer >= num_layers:
            raise PlanError(f"kvmerge item {_show(token)} names layer {layer}, but the model has {num_layers} "
                            f"layers (0-{num_layers - 1})")
    return first, second, float(match[3]) if match[3] else DEFAULT_MERGE_ANGLE


def parse_kv_merge(data: Any, num_layers: int) -> tuple[tuple[int, int, float], ...]:
    """`kv_merge` of a plan file: a list of `A+B` / `A+B@D` items."""
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise PlanError(f'kv_merge {_show(data)} must be a list of items such as ["20+21", "22+23@45"]')
    return tuple(_parse_merge_item(item.strip(), num_layers) for item in data)


def _checked_merge(pairs: Iterable[tuple[int, int, float]], steps: tuple[Step, ...], num_layers: int,
                   kv: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int, float], ...]:
    """The merged pairs sorted, after checking the runtime can keep one cache for each (see the module docstring)."""
    pairs = tuple(sorted((int(a), int(b), float(angle)) for a, b, angle in pairs))
    seen: set[int] = set()
    consumers = {c for c, _ in kv}
    for first, second, angle in pairs:
        name = f"kvmerge pair {first}+{second}"
        if second != first + 1:
            raise PlanError(f"{name}: merged layers must be adjacent (A+{first + 1}); MiniCache merges neighbours")
        if not 0 <= first < second < num_layers:
            bad = first if first < 0 else second
            raise PlanError(f"{name} names layer {bad}, but the model has {num_layers} layers (0-{num_layers - 1})")
        if not 0 <= angle <= 180:
            raise PlanError(f"{name}@{angle:g}: the angle is in degrees, 0 to 180")
        if seen & {first, second}:
            raise PlanError(f"{name}: layer {min(seen & {first, second})} is in another kvmerge pair; "
                            "a layer merges with one neighbour at most")
        seen |= {first, second}
        runs = [[i for i, s in enumerate(steps) if s.layer == layer] for layer in (first, second)]
        for layer, found in zip((first, second), runs, strict=True):
            if len(found) != 1:
                raise PlanError(f"{name}: layer {layer} must run exactly once, but the plan runs it "
                                f"{len(found)} times")
            if not steps[found[0]].attention:
                raise PlanError(f"{name}: layer {layer} runs without attention, so it has no cache to merge")
            if layer in consumers:
                raise PlanError(f"{name}: layer {layer} reads another layer's keys and values (kv:), so it has no "
                                "cache of its own to merge; drop one of the two")
        if runs[0][0] > runs[1][0]:
            raise PlanError(f"{name}: layer {first} must run before layer {second}")
    return pairs


def merge_steps(plan: Plan) -> list[tuple[int, int, float]]:
    """(step of layer A, step of layer A+1, max angle) for each merged pair of the plan."""
    where = {s.layer: i for i, s in enumerate(plan.steps)}
    return [(where[a], where[b], angle) for a, b, angle in plan.merge]


def _merge_items(pairs: tuple[tuple[int, int, float], ...]) -> list[str]:
    return [f"{a}+{b}" + ("" if angle == DEFAULT_MERGE_ANGLE else "@" + f"{angle:.6f}".rstrip("0").rstrip("."))
            for a, b, angle in pairs]


def _format_merge(pairs: tuple[tuple[int, int, float], ...]) -> str:
    """`; kvmerge:...`, or '' without merged pairs."""
    return f"; kvmerge:{','.join(_merge_items(pairs))}" if pairs else ""
