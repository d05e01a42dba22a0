"""Parallel candidate evaluation on Ray: the serial search's plan and trace (a dying worker retried), the
serial evaluation's rows (kept in a result store), and a draft-plan search's counts. The tests share one
local Ray runtime (starting one takes a while) and are skipped when Ray is not installed; `test_pool.py`
covers the pool's logic without Ray."""

from __future__ import annotations

import os

import pytest

from layerlab import jobs
from layerlab.parallel import FAULT_FILE, _worker_env
from layerlab.settings import EvalJob, EvalSettings, ModelSpec, ParallelSettings, SearchSettings

ray = pytest.importorskip("ray")
TWO = ParallelSettings(workers=2, threads=1)


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    """A local Ray runtime for the module; the worker that first finds the returned path (once created) dies."""
    fault = tmp_path_factory.mktemp("fault") / "die-once"
    os.environ[FAULT_FILE] = str(fault)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": _worker_env()})
    yield fault
    ray.shutdown()
    del os.environ[FAULT_FILE]


@pytest.mark.slow
def test_parallel_search_is_the_serial_search_even_when_a_worker_dies(tiny_folder, fault_file):
    spec = ModelSpec(str(tiny_folder))
    common = dict(remove=2, ctx=32, windows=2)
    serial = jobs.search(SearchSettings(spec, **common))
    fault_file.write_text("")  # the first candidate task that sees it kills its worker
    parallel = jobs.search(SearchSettings(spec, **common, parallel=TWO))
    assert not fault_file.exists(), "no worker died: the retry was not exercised"
    assert parallel.plan == serial.plan
    fields = ("removed", "plan", "loss", "candidates", "aborted")
    assert [{k: t[k] for k in fields} for t in parallel.state.trace] == \
        [{k: t[k] for k in fields} for t in serial.state.trace]
    assert len(parallel.workers) == 2 and all(w["threads"] == 1 for w in parallel.workers)
    assert serial.peak_memory_mb > 0 and parallel.peak_memory_mb > 0


@pytest.mark.slow
def test_parallel_evaluation_is_the_serial_evaluation(tiny_folder, fault_file, tmp_path):
    evaluation = EvalSettings(tasks=("ppl", "arc_easy"), rows=3, ppl_text="wikitext2-valid", ctx=32, ppl_windows=2)
    job = EvalJob(ModelSpec(str(tiny_folder)), ("skip:1", "skip:2-3"), evaluation, str(tmp_path / "s.json"))
    serial = jobs.evaluate(job)
    parallel = jobs.evaluate(EvalJob(**{**job.__dict__, "out": str(tmp_path / "p.json"), "parallel": TWO,
                                        "store": str(tmp_path / "store")}))
    assert parallel["rows"] == serial["rows"] and len(parallel["workers"]) == 2
    assert len(list((tmp_path / "store").glob("[!.]*.json"))) == 6  # every (plan, task) result kept


@pytest.mark.slow
def test_parallel_draft_search_counts_are_the_serial_ones(tiny_folder, fault_file):
    from layerlab.settings import SpeculateSettings, SpeculativeSettings

    fixed = SpeculativeSettings(min_confidence=0, min_ratio=0, max_draft=3)
    common = dict(model=ModelSpec(str(tiny_folder)), prompt="The game", max_new_tokens=4, decoding=fixed)
    serial = jobs.speculate(SpeculateSettings(**common)).draft_search
    parallel = jobs.speculate(SpeculateSettings(**common, parallel=TWO)).draft_search
    names = ("new_tokens", "verifications", "draft_steps", "proposed", "accepted")
    assert {c.plan.to_text(): [getattr(c.stats, n) for n in names] for c in parallel.ranking} == \
        {c.plan.to_text(): [getattr(c.stats, n) for n in names] for c in serial.ranking}
