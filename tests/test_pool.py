"""The worker pool's logic without Ray (`fake_pool.InProcessBackend`: workers in this process, results out of
order, workers that die): a greedy search, a multi-plan evaluation (resumed after an interruption), the
one-shot scores and a draft-plan search each give the serial run's results. `test_parallel.py` runs the
same on a real local Ray runtime when Ray is installed."""

from __future__ import annotations

import pytest
from fake_pool import InProcessBackend

from layerlab import jobs, parallel
from layerlab.plan import Plan
from layerlab.settings import EvalJob, EvalSettings, ModelSpec, ParallelSettings, SearchSettings, SpeculativeSettings

TWO = ParallelSettings(workers=2, threads=1)
EVALUATION = EvalSettings(tasks=("ppl", "arc_easy"), rows=3, ppl_text="wikitext2-valid", ctx=32, ppl_windows=2)


@pytest.fixture
def backend(monkeypatch):
    """Every pool a job starts runs on this in-process backend (and Ray need not be installed)."""
    holder = {"backend": InProcessBackend()}
    monkeypatch.setattr(parallel, "RayBackend", lambda spec, settings, threads: holder["backend"])
    monkeypatch.setattr(ParallelSettings, "check", lambda self: None)
    return holder


def test_pool_search_is_the_serial_search_when_a_worker_dies(tiny_folder, backend, one_thread):
    backend["backend"] = InProcessBackend(die=(3,))  # a candidate task of the first round
    spec = ModelSpec(str(tiny_folder))
    common = dict(remove=2, ctx=32, windows=2)
    serial = jobs.search(SearchSettings(spec, **common))
    pooled = jobs.search(SearchSettings(spec, **common, parallel=TWO))
    assert backend["backend"].started == 3, "the dead worker was not replaced"
    assert pooled.plan == serial.plan
    fields = ("removed", "plan", "loss", "candidates", "aborted")
    assert [{k: t[k] for k in fields} for t in pooled.state.trace] == \
        [{k: t[k] for k in fields} for t in serial.state.trace]
    assert len(pooled.workers) == 2


def test_pool_evaluation_is_the_serial_evaluation_and_resumes(tiny_folder, backend, one_thread, tmp_path):
    job = EvalJob(ModelSpec(str(tiny_folder)), ("skip:1", "skip:2-3"), EVALUATION, str(tmp_path / "s.json"))
    serial = jobs.evaluate(job, progress=False)
    pooled = EvalJob(**{**job.__dict__, "out": str(tmp_path / "p.json"), "parallel": TWO,
                        "store": str(tmp_path / "store")})
    backend["backend"] = InProcessBackend(die=(2,), stop_after=4)  # a worker dies, then the run is interrupted
    with pytest.raises(KeyboardInterrupt):
        jobs.evaluate(pooled, progress=False)
    stored = len(list((tmp_path / "store").glob("[!.]*.json")))  # not the manifest
    assert stored >= 2, "results that came back before the interruption were not kept"
    backend["backend"] = InProcessBackend()
    resumed = jobs.evaluate(EvalJob(**{**pooled.__dict__, "force": True}), progress=False)
    assert backend["backend"].count("measure") == 6 - stored  # 3 plans x 2 tasks, the stored ones not again
    assert resumed["rows"] == serial["rows"]
    assert len(resumed["resumed"]["reused"]) == stored


def test_pool_scores_and_draft_search_are_the_serial_ones(tiny_folder, one_thread):
    from test_evaluate import TEXT

    from layerlab.draft_search import search_draft_plan
    from layerlab.metrics.similarity import similarity

    spec = ModelSpec(str(tiny_folder))
    model, tokenizer = spec.load()
    fixed = SpeculativeSettings(min_confidence=0, min_ratio=0, max_draft=3)
    prompts = ["The game", "In 1990 the"]
    serial = search_draft_plan(model, tokenizer, prompts, TEXT, max_new_tokens=6, settings=fixed, ctx=32, windows=2,
                               shares=(0.35, 0.65))
    with parallel.WorkerPool(spec, TWO, progress=False, backend=InProcessBackend(die=(1,))) as pool:
        scores = parallel.similarity(pool, TEXT, 32, 2, 6)
        pooled = search_draft_plan(parallel.structure_model(spec), tokenizer, prompts, TEXT, max_new_tokens=6,
                                   settings=fixed, ctx=32, windows=2, shares=(0.35, 0.65), pool=pool)
    assert scores.to_dict() == similarity(model, tokenizer, TEXT, ctx=32, windows=2, progress=False).to_dict()

    def counts(found) -> dict:  # the seconds are timings; every count is the serial run's
        names = ("new_tokens", "verifications", "draft_steps", "proposed", "accepted")
        return {(c.plan.to_text(), c.kind): [getattr(c.stats, n) for n in names] for c in found.ranking}

    assert counts(pooled) == counts(serial)
    assert all(c.stats.plain_seconds_per_token > 0 for c in pooled.ranking)
    assert isinstance(pooled.best.plan, Plan)
