"""Evaluating candidate plans in parallel on Ray: each worker loads the model once, plans travel as text.

Serial evaluation in one process stays the default and needs nothing; `ParallelSettings(workers=N)`
starts a local Ray runtime (`ray.init(num_cpus=N)`) with N workers whose torch threads split this
machine's cores fairly (cores // N each), and `ray_address` joins a running cluster instead. Ray is
the optional `ray` extra; `WorkerPool` reaches it only through `RayBackend`, so the pool's logic
(order, retries, resuming) is the same with any backend that starts workers and runs their methods.

What fans out (one pool, one worker class, for every caller):
- a greedy search round (`PoolEvaluator.round`): every candidate of the round is one task. The
  result is exactly the serial run's: the serial search aborts candidate i once its running loss
  exceeds the best complete loss among candidates 0..i-1, and since a loss only grows window by
  window, that is the same as "its full loss exceeds that best". Each task is therefore sent with the
  best complete loss known among the earlier candidates (never below the serial threshold, so a task
  aborts only when the serial run would), and the serial scores are rebuilt from the losses in the
  serial order once the round is in. Rankings, pruning (`keep`) and the chosen unit are then the same;
  only the count of layer forwards differs (each worker records the round's prefix once);
- plans to evaluate side by side (`evaluate_plans`: `layerlab eval --plans`, the method-quality
  table): one task per (plan, task) pair, measured by the same code as the serial evaluation
  (`evaluate.compare`), so the rows are identical; with a result store each result is saved as it
  comes back, so a stopped run resumes; speed is timed afterwards on one worker alone so its timing is
  not shared with other work;
- the one-shot scores (`similarity`): one task, the serial function on a worker;
- draft-plan candidates (`draft_search.search_draft_plan(pool=...)`): one task per candidate.

Faults: tasks are self-contained (the round's plan and the calibration windows travel with each one;
a worker records the round's prefix when it first sees it), workers restart (`max_restarts`) and
their tasks retry; a task whose worker is gone for good is sent to a fresh worker. Results that came
back are kept by the caller, and the search state is saved after every round (`--state`, `--resume`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from .errors import LayerlabError
from .plan import Plan
from .settings import EvalSettings, ModelSpec, ParallelSettings, SpeculativeSettings

FAULT_FILE = "LAYERLAB_WORKER_FAULT"  # tests: the first task that finds this file removes it and kills its worker

Call = Callable[[], tuple[str, tuple]]  # a task: the worker method's name and its arguments, built when sent


def task(method: str, *args) -> Call:
    """A task whose arguments are known now (the greedy rounds build theirs when sent)."""
    return lambda: (method, args)


class WorkerLost(Exception):
    """A worker died with its task; the pool sends the task to a fresh worker."""


class PlanWorker:
    """One worker: the model loaded once, plans evaluated as they arrive (as text)."""

    def __init__(self, spec: dict, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.spec = ModelSpec(**spec)
        self.model, self.tokenizer = self.spec.load()
        self.n_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        self._evaluators: dict[str, object] = {}  # calibration windows key -> LossEvaluator
        self._recorded: dict[str, str] = {}  # windows key -> the plan whose prefix is recorded
        self._base: dict[str, float] = {}
        self._inputs: dict[str, tuple] = {}  # evaluation settings -> (task data, perplexity text)

    def _evaluator(self, key: str, windows: list, reuse: bool, abort: bool):
        from .evaluate.perplexity import Window
        from .search import LossEvaluator

        if key not in self._evaluators:
            self._evaluators[key] = LossEvaluator(self.model, [Window(*w) for w in windows], reuse, abort)
        return self._evaluators[key]

    def record(self, key: str, windows: list, reuse: bool, abort: bool, plan: str) -> tuple[float, int]:
        """Record `plan`'s prefix for these windows (once): (its loss, layer forwards spent)."""
        evaluator = self._evaluator(key, windows, reuse, abort)
        if self._recorded.get(key) != plan:
            before = evaluator.layer_forwards
            self._base[key] = evaluator.record(Plan.parse(plan, self.n_layers)) if reuse else math.nan
            self._recorded[key] = plan
            return self._base[key], evaluator.layer_forwards - before
        return self._base[key], 0

    def loss(self, key: str, windows: list, reuse: bool, abort: bool, plan: str, candidate: tuple[str, str, int],
             abort_above: float) -> tuple[float, int]:
        """A greedy candidate's summed NLL (or inf once above `abort_above`), and the layer forwards spent."""
        from .search import Candidate

        _fault_injection()
        _, forwards = self.record(key, windows, reuse, abort, plan)
        evaluator = self._evaluators[key]
        before = evaluator.layer_forwards
        name, text, first_change = candidate
        value = evaluator.loss(Candidate(name, Plan.parse(text, self.n_layers), first_change), abort_above)
        return value, forwards + evaluator.layer_forwards - before

    def fingerprint(self) -> str:
        """The model's fingerprint (`evaluate.compare.model_fingerprint`), for the result store's keys."""
        from .evaluate.compare import model_fingerprint

        return model_fingerprint(self.model, self.tokenizer)

    def measure(self, plan: str, task: str, settings: dict):
        """One task under one plan, as the serial evaluation measures it (`evaluate.compare.measure`)."""
        from .evaluate.compare import measure, task_inputs

        _fault_injection()
        evaluation = EvalSettings(**settings)
        key = repr(evaluation)
        if key not in self._inputs:
            self._inputs[key] = task_inputs(evaluation)
        data, text = self._inputs[key]
        return measure(self.model, self.tokenizer, Plan.parse(plan, self.n_layers), task, evaluation, data, text,
                       progress=False)

    def speeds(self, plans: list[str], settings: dict) -> list[dict]:
        """The plans' speed rows, timed side by side here (`evaluate.compare.speed_rows`)."""
        from .evaluate.compare import speed_rows

        return speed_rows(self.model, self.tokenizer, [Plan.parse(p, self.n_layers) for p in plans],
                          EvalSettings(**settings))

    def similarity(self, text: str, ctx: int, windows: int) -> dict:
        """The hook metrics of the whole model on `text` (`metrics.similarity.similarity`), as plain data."""
        from .metrics.similarity import similarity

        _fault_injection()
        return similarity(self.model, self.tokenizer, text, ctx=ctx, windows=windows, progress=False).to_dict()

    def draft(self, plan: str, prompts: list[str], max_new_tokens: int, settings: dict) -> dict:
        """A draft plan's speculative statistics on the prompts (`draft_search.draft_stats`), with plain decoding
        timed here first, so the cost ratio compares two timings taken on this worker under the same load."""
        from .draft_search import draft_stats, encode, plain_seconds_per_token

        _fault_injection()
        encoded = encode(self.tokenizer, prompts, self.model.device)
        plain = plain_seconds_per_token(self.model, encoded, max_new_tokens)
        stats = draft_stats(self.model, encoded, Plan.parse(plan, self.n_layers), max_new_tokens,
                            SpeculativeSettings(**settings), plain)
        return asdict(stats)

    def memory(self) -> dict:
        """This worker's process id, torch threads and peak resident memory (VmHWM) in MB."""
        peak = None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
        return {"pid": os.getpid(), "threads": self.threads, "peak_rss_mb": peak}


def _fault_injection() -> None:
    """For tests of recovery: die once, at the first task that finds the fault file."""
    path = os.environ.get(FAULT_FILE)
    if path and Path(path).exists():
        Path(path).unlink()
        os._exit(1)


class RayBackend:
    """What `WorkerPool` needs of a runtime, on Ray: start workers (actors), run their methods, wait, kill."""

    def __init__(self, spec: ModelSpec, settings: ParallelSettings, threads: int) -> None:
        import ray

        self._started = False
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=settings.workers, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": _worker_env()})
            self._started = True
        self._class = ray.remote(num_cpus=1 if not settings.ray_address else threads,
                                 num_gpus=gpu_share(spec, settings), max_restarts=2, max_task_retries=2)(PlanWorker)

    def start(self, spec: dict, threads: int):
        return self._class.remote(spec, threads)

    def submit(self, worker, method: str, args: tuple):
        return getattr(worker, method).remote(*args)

    def wait(self, pending: list) -> list:
        import ray

        return ray.wait(pending, num_returns=1)[0]

    def get(self, ref):
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(ref)
        except RayActorError:
            raise WorkerLost from None

    def put(self, value):
        import ray

        return ray.put(value)

    def kill(self, worker) -> None:
        import ray

        ray.kill(worker)

    def shutdown(self) -> None:
        import ray

        if self._started:
            ray.shutdown()


class WorkerPool:
    """N workers holding one model each; a context manager that shuts down what it started.

    `backend` is Ray's (`RayBackend`) unless given: tests pass one that runs the workers in this process."""

    def __init__(self, spec: ModelSpec, settings: ParallelSettings, progress: bool = True, backend=None) -> None:
        self.settings = settings
        self.spec = spec
        self.progress = progress
        self.threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
        if spec.device.startswith("cuda"):  # Ray gives each worker its GPU (share) as its only visible one
            self.spec = replace(spec, device="cuda")
        self.backend = backend if backend is not None else RayBackend(spec, settings, self.threads)
        self.results: dict[int, object] = {}
        self.actors = [self._new_actor() for _ in range(settings.workers)]

    def _new_actor(self):
        return self.backend.start(asdict(self.spec), self.threads)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            self.backend.kill(actor)
        self.actors = []
        self.backend.shutdown()

    def memory(self) -> list[dict]:
        """Each worker's pid, threads and peak resident memory."""
        return self.run([task("memory")] * len(self.actors), "memory", spread=True)

    def one(self, method: str, *args):
        """One task on the first free worker (a fresh one if it dies)."""
        return self.run([task(method, *args)], method)[0]

    def run(self, calls: list[Call], desc: str, spread: bool = False) -> list:
        """`stream`'s results in call order."""
        for _ in self.stream(calls, desc, spread):
            pass
        return [self.results[i] for i in range(len(calls))]

    def stream(self, calls: list[Call], desc: str, spread: bool = False) -> Iterator[tuple[int, object]]:
        """Run `calls[i]()` -> (method, args) on free workers, in order; yield (i, result) as results come back.

        `calls[i]` may look at the results that are in (`self.results`) when it is sent. A task lost with its
        worker goes to a fresh worker; finished results are kept. `spread`: each worker takes one call at most
        (one call per worker, e.g. asking each for its memory)."""
        self.results = {}
        queue = list(range(len(calls)))
        free = list(self.actors)
        pending: dict[object, tuple[int, object]] = {}
        with tqdm(total=len(calls), desc=desc, unit="task", disable=not self.progress, leave=False) as bar:
            while queue or pending:
                while queue and free:
                    index, actor = queue.pop(0), free.pop(0)
                    method, args = calls[index]()
                    pending[self.backend.submit(actor, method, args)] = (index, actor)
                for ref in self.backend.wait(list(pending)):
                    index, actor = pending.pop(ref)
                    try:
                        self.results[index] = self.backend.get(ref)
                    except WorkerLost:  # the worker is gone for good: a fresh one takes the task
                        replacement = self._new_actor()
                        self.actors[self.actors.index(actor)] = replacement
                        queue.insert(0, index)
                        free.append(replacement)
                        continue
                    if not spread:
                        free.append(actor)
                    bar.update()
                    yield index, self.results[index]

    def evaluator(self, windows: list, reuse: bool = True, abort: bool = True) -> PoolEvaluator:
        """A greedy search's loss evaluator whose rounds fan out over the workers."""
        return PoolEvaluator(self, windows, reuse, abort)


class PoolEvaluator:
    """`search.LossEvaluator`'s interface (`record`, `round`, `layer_forwards`) over a worker pool."""

    def __init__(self, pool: WorkerPool, windows: list, reuse: bool, abort: bool) -> None:
        import hashlib

        self.pool = pool
        self.reuse, self.abort = reuse, abort
        plain = [(list(w.ids), w.score_from) for w in windows]
        self.key = hashlib.sha256(repr(plain).encode()).hexdigest()[:16]
        self.windows = pool.backend.put(plain)
        self.layer_forwards = 0
        self.plan: str | None = None

    def record(self, plan: Plan) -> float:
        """The current plan's loss (one worker records it now; the others when they first need it)."""
        self.plan = plan.to_text()
        loss, forwards = self.pool.one("record", self.key, self.windows, self.reuse, self.abort, self.plan)
        self.layer_forwards += forwards
        return loss

    def round(self, options: list, desc: str, progress: bool = True) -> dict[str, float]:
        """Scores of a round's candidates exactly as the serial search gives them (see the module docstring)."""
        totals: dict[int, float] = {}

        def threshold(index: int) -> float:
            known = [v for i, v in self.pool.results.items() if i < index and math.isfinite(v[0])]
            return min((v[0] for v in known), default=math.inf) if self.abort else math.inf

        def call(index: int) -> Call:
            c = options[index]
            return lambda: ("loss", (self.key, self.windows, self.reuse, self.abort, self.plan,
                                     (c.key, c.plan.to_text(), c.first_change), threshold(index)))

        self.pool.progress = progress
        for index, (loss, forwards) in enumerate(self.pool.run([call(i) for i in range(len(options))], desc)):
            totals[index] = loss
            self.layer_forwards += forwards
        scores, best = {}, math.inf
        for index, candidate in enumerate(options):  # the serial order and its running best
            score = totals[index] if not self.abort or totals[index] <= best else math.inf
            scores[candidate.key] = score
            best = min(best, score)
        return scores


class PoolMeasurer:
    """`evaluate.compare.evaluate_with`'s measurer on a pool: one task per (plan, task), speed on one worker."""

    def __init__(self, pool: WorkerPool, settings: EvalSettings) -> None:
        self.pool = pool
        self.settings = asdict(settings)

    def fingerprint(self) -> str:
        return self.pool.one("fingerprint")

    def measure(self, items: list[tuple[Plan, str]], data: dict, text: str | None) -> Iterator[tuple[int, object]]:
        """Each (plan, task) on a worker; `data` and `text` are not sent: each worker reads its own."""
        calls = [task("measure", plan.to_text(), name, self.settings) for plan, name in items]
        yield from self.pool.stream(calls, "evaluate")

    def speeds(self, plans: list[Plan]) -> list[dict]:
        return self.pool.one("speeds", [p.to_text() for p in plans], self.settings)


def evaluate_plans(pool: WorkerPool, plans: list[Plan], settings: EvalSettings, store: str | Path | None = None,
                   progress: bool = True) -> dict:
    """`evaluate.compare.evaluate_plans` with one task per (plan, task); the same rows, the same result store."""
    from .evaluate.compare import evaluate_with

    pool.progress = progress
    return evaluate_with(PoolMeasurer(pool, settings), plans, settings, store, progress)


def similarity(pool: WorkerPool, text: str, ctx: int, windows: int, num_layers: int):
    """`metrics.similarity.similarity` of the whole model, computed on a worker."""
    from .metrics.similarity import Similarity

    return Similarity.from_dict(pool.one("similarity", text, ctx, windows), num_layers)


def gpu_share(spec: ModelSpec, settings: ParallelSettings) -> float:
    """The GPUs each worker asks Ray for: none on CPU; on this machine its GPUs split evenly over the
    workers (several workers share one GPU); on a cluster one GPU each."""
    if not spec.device.startswith("cuda"):
        return 0
    if settings.ray_address:
        return 1
    import torch

    return min(1.0, torch.cuda.device_count() / settings.workers)


def _worker_env() -> dict[str, str]:
    """What local workers need from this process's environment (where layerlab and its cache are)."""
    names = ("PYTHONPATH", "LAYERLAB_CACHE", "HF_HUB_OFFLINE", "HF_HOME", FAULT_FILE)
    return {name: os.environ[name] for name in names if name in os.environ}


def structure_model(spec: ModelSpec):
    """The model's modules with every tensor on the meta device: shapes and plans without memory (the
    driver of a parallel search counts parameter bytes with it; the workers hold the weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import converted_folder, metadata_folder, read_config, resolve_source

    resolved = resolve_source(spec.source)
    if isinstance(resolved, Path) and resolved.suffix.lower() == ".gguf":
        folder = converted_folder(resolved)
        config = AutoConfig.from_pretrained(str(folder if (folder / "config.json").is_file()
                                                else metadata_folder(resolved)))
    else:
        config = read_config(spec.source, resolved, spec.trust_remote_code)
    if spec.trust_remote_code and getattr(config, "auto_map", None):
        raise LayerlabError("a parallel search of a model with its own code is not supported; run it serially")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype()).eval()
