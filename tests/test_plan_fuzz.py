"""Fuzzing the plan parser and the plan-file / mergekit loaders: any input gives a Plan or a PlanError, never
another exception (no MemoryError, ValueError, KeyError, TypeError or RecursionError escapes)."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerlab.errors import PlanError  # noqa: E402
from layerlab.plan import MAX_STEPS_PER_LAYER, Plan  # noqa: E402

LAYERS = 12
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text made of the grammar's own pieces, so the fuzzer reaches deep into the parser, plus arbitrary text
PIECES = st.sampled_from(["0", "1", "5", "11", "12", "99", "999999", "1234567", "-", "/", "x", "x0", "x99999",
                          ".attn", ".mlp", ".foo", ",", ";", " ", "skip:", "attn-skip:", "mlp-skip:", "all", "full",
                          "kv:", "<-", "bogus:", "\n", "\x00", "٣"])
PLAN_TEXT = st.one_of(st.lists(PIECES, max_size=12).map("".join), st.text(max_size=60))

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=True), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=20)
KEYS = st.sampled_from(["steps", "num_layers", "drop_attn_list", "drop_mlp_list", "llama_cpp_skip_flags",
                        "slices", "merge_method", "plan", "layer", "attention", "mlp", "sources", "model",
                        "layer_range", "atention", "dtype", "kv_sources"])
PLAN_MAPPING = st.dictionaries(KEYS, JSON_VALUES, max_size=4)


def _plan_or_plan_error(build) -> None:
    try:
        plan = build()
    except PlanError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    assert isinstance(plan, Plan)
    assert 1 <= len(plan.steps) <= MAX_STEPS_PER_LAYER * plan.num_layers
    assert Plan.parse(plan.to_text(), plan.num_layers) == plan  # what parses also prints and parses back
    assert Plan.from_dict(plan.to_dict(), plan.num_layers) == plan


@FAST
@given(PLAN_TEXT)
def test_plan_text(text):
    _plan_or_plan_error(lambda: Plan.parse(text, LAYERS))


@FAST
@given(st.sampled_from(["all", "skip:3", "0-5,5-11", "attn-skip:4; mlp-skip:2"]),
       st.dictionaries(st.one_of(st.integers(-1, 13), st.sampled_from(["7", "x", "07", "1.5"])),
                       st.one_of(st.integers(-1, 13), st.booleans()), max_size=4))
def test_kv_sources(text, sources):
    """KV maps next to a plan: valid ones round-trip through text and JSON, the rest are one PlanError."""
    _plan_or_plan_error(lambda: Plan.from_dict({"plan": text, "kv_sources": sources}, LAYERS))


@FAST
@given(PLAN_MAPPING)
def test_plan_mappings(data):
    _plan_or_plan_error(lambda: Plan.from_dict(data, LAYERS))


@FAST
@given(st.one_of(JSON_VALUES, st.lists(st.fixed_dictionaries({"sources": JSON_VALUES}), max_size=3)))
def test_mergekit_slices(slices):
    _plan_or_plan_error(lambda: Plan.from_mergekit({"merge_method": "passthrough", "slices": slices}, LAYERS))


@FAST
@given(st.text(max_size=200))
def test_mergekit_yaml_text(text):
    _plan_or_plan_error(lambda: Plan.from_mergekit(text, LAYERS))


@FAST
@given(st.one_of(JSON_VALUES, st.binary(max_size=64)))
def test_plan_files(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("p.json", "p.yaml"):
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        _plan_or_plan_error(lambda path=path: Plan.load(str(path), LAYERS))
