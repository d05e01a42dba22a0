"""Parallel candidate evaluation on Ray: the same plan and trace as the serial search, a dying worker retried."""

from __future__ import annotations

import pytest

from layerlab import jobs
from layerlab.parallel import FAULT_FILE
from layerlab.settings import ModelSpec, ParallelSettings, SearchSettings

pytest.importorskip("ray")


@pytest.mark.slow  # starts a local Ray runtime with two workers
def test_parallel_search_is_the_serial_search_even_when_a_worker_dies(tiny_folder, tmp_path, monkeypatch):
    spec = ModelSpec(str(tiny_folder))
    common = dict(remove=2, ctx=32, windows=2)
    serial = jobs.search(SearchSettings(spec, **common))
    fault = tmp_path / "die-once"
    fault.write_text("")
    monkeypatch.setenv(FAULT_FILE, str(fault))  # the first candidate task that sees it kills its worker
    parallel = jobs.search(SearchSettings(spec, **common, parallel=ParallelSettings(workers=2, threads=1)))
    assert not fault.exists(), "no worker died: the retry was not exercised"
    assert parallel.plan == serial.plan
    fields = ("removed", "plan", "loss", "candidates", "aborted")
    assert [{k: t[k] for k in fields} for t in parallel.state.trace] == \
        [{k: t[k] for k in fields} for t in serial.state.trace]
    assert len(parallel.workers) == 2 and all(w["threads"] == 1 for w in parallel.workers)
