"""Evaluating candidate plans in parallel on Ray: each worker loads the model once, plans travel as text.

Serial evaluation in one process stays the default and needs nothing; `ParallelSettings(workers=N)`
starts a local Ray runtime (`ray.init(num_cpus=N)`) with N workers whose torch threads split this
machine's cores fairly (cores // N each), and `ray_address` joins a running cluster instead. Ray is
the optional `ray` extra.

What fans out:
- a greedy search round (`PoolEvaluator.round`): every candidate of the round is one task. The
  result is exactly the serial run's: the serial search aborts candidate i once its running loss
  exceeds the best complete loss among candidates 0..i-1, and since a loss only grows window by
  window, that is the same as "its full loss exceeds that best". Each task is therefore sent with the
  best complete loss known among the earlier candidates (never below the serial threshold, so a task
  aborts only when the serial run would), and the serial scores are rebuilt from the losses in the
  serial order once the round is in. Rankings, pruning (`keep`) and the chosen unit are then the same;
  only the count of layer forwards differs (each worker records the round's prefix once);
- plans to evaluate side by side (`evaluate_plans`): one task per plan, the speed task afterwards on
  one worker alone so its timing is not shared with other work.

Faults: tasks are self-contained (the round's plan and the calibration windows travel with each one;
a worker records the round's prefix when it first sees it), workers restart (`max_restarts`) and
their tasks retry; a task whose worker is gone for good is sent to a fresh worker. Results that came
back are kept by the caller, and the search state is saved after every round (`--state`, `--resume`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from .errors import LayerlabError
from .plan import Plan
from .settings import EvalSettings, ModelSpec, ParallelSettings, as_dict

FAULT_FILE = "LAYERLAB_WORKER_FAULT"  # tests: the first task that finds this file removes it and kills its worker


class PlanWorker:
    """One Ray actor: the model loaded once, plans evaluated as they arrive (as text)."""

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

    def evaluate(self, plans: list[str], settings: dict) -> list[dict]:
        """`evaluate.compare.evaluate_plans` rows of these plans (deltas are the caller's)."""
        from .evaluate.compare import evaluate_plans

        _fault_injection()
        parsed = [Plan.parse(p, self.n_layers) for p in plans]
        return evaluate_plans(self.model, self.tokenizer, parsed, EvalSettings(**settings), progress=False)["rows"]

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


class WorkerPool:
    """N Ray workers holding one model each; a context manager that shuts down what it started."""

    def __init__(self, spec: ModelSpec, settings: ParallelSettings, progress: bool = True) -> None:
        import ray

        self.settings = settings
        self.spec = spec
        self.progress = progress
        self._started = False
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=settings.workers, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": _worker_env()})
            self._started = True
        self.threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.workers)
        if spec.device.startswith("cuda"):  # Ray gives each worker its GPU (share) as its only visible one
            self.spec = replace(spec, device="cuda")
        self._actor_class = ray.remote(num_cpus=1 if not settings.ray_address else self.threads,
                                       num_gpus=gpu_share(spec, settings), max_restarts=2,
                                       max_task_retries=2)(PlanWorker)
        self.actors = [self._new_actor() for _ in range(settings.workers)]

    def _new_actor(self):
        return self._actor_class.remote(asdict(self.spec), self.threads)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started:
            ray.shutdown()

    def memory(self) -> list[dict]:
        """Each worker's pid, threads and peak resident memory."""
        import ray

        return ray.get([actor.memory.remote() for actor in self.actors])

    def run(self, calls: list, desc: str) -> list:
        """Run `calls[i](actor) -> ObjectRef` on free workers, in order; results in call order.

        `calls[i]` may look at the results that are in (`self.results`) when it is sent. A task lost with
        its worker goes to a fresh worker; finished results are kept.
        """
        import ray
        from ray.exceptions import RayActorError

        self.results: dict[int, object] = {}
        queue = list(range(len(calls)))
        free = list(self.actors)
        pending: dict[object, tuple[int, object]] = {}
        with tqdm(total=len(calls), desc=desc, unit="task", disable=not self.progress, leave=False) as bar:
            while queue or pending:
                while queue and free:
                    index, actor = queue.pop(0), free.pop(0)
                    pending[calls[index](actor)] = (index, actor)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    index, actor = pending.pop(ref)
                    try:
                        self.results[index] = ray.get(ref)
                    except RayActorError:  # the worker is gone for good: a fresh one takes the task
                        replacement = self._new_actor()
                        self.actors[self.actors.index(actor)] = replacement
                        queue.insert(0, index)
                        free.append(replacement)
                        continue
                    free.append(actor)
                    bar.update()
        return [self.results[i] for i in range(len(calls))]

    def evaluator(self, windows: list, reuse: bool = True, abort: bool = True) -> PoolEvaluator:
        """A greedy search's loss evaluator whose rounds fan out over the workers."""
        return PoolEvaluator(self, windows, reuse, abort)


class PoolEvaluator:
    """`search.LossEvaluator`'s interface (`record`, `round`, `layer_forwards`) over a worker pool."""

    def __init__(self, pool: WorkerPool, windows: list, reuse: bool, abort: bool) -> None:
        import hashlib

        import ray

        self.pool = pool
        self.reuse, self.abort = reuse, abort
        plain = [(list(w.ids), w.score_from) for w in windows]
        self.key = hashlib.sha256(repr(plain).encode()).hexdigest()[:16]
        self.windows = ray.put(plain)
        self.layer_forwards = 0
        self.plan: str | None = None

    def record(self, plan: Plan) -> float:
        """The current plan's loss (one worker records it now; the others when they first need it)."""
        import ray

        self.plan = plan.to_text()
        loss, forwards = ray.get(self.pool.actors[0].record.remote(self.key, self.windows, self.reuse, self.abort,
                                                                   self.plan))
        self.layer_forwards += forwards
        return loss

    def round(self, options: list, desc: str, progress: bool = True) -> dict[str, float]:
        """Scores of a round's candidates exactly as the serial search gives them (see the module docstring)."""
        totals: dict[int, float] = {}

        def threshold(index: int) -> float:
            known = [v for i, v in self.pool.results.items() if i < index and math.isfinite(v[0])]
            return min((v[0] for v in known), default=math.inf) if self.abort else math.inf

        def call(index: int):
            c = options[index]
            return lambda actor: actor.loss.remote(self.key, self.windows, self.reuse, self.abort, self.plan,
                                                   (c.key, c.plan.to_text(), c.first_change), threshold(index))

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


def evaluate_plans(pool: WorkerPool, plans: list[Plan], settings: EvalSettings) -> dict:
    """`evaluate.compare.evaluate_plans` with one task per plan; speed is timed afterwards on one worker alone."""
    from .evaluate.compare import add_deltas

    spread = tuple(t for t in settings.tasks if t != "speed")
    rows = [{"plan": p.to_text(), "steps": len(p.steps)} for p in plans]
    if spread:
        data = asdict(replace(settings, tasks=spread))
        calls = [lambda actor, p=p: actor.evaluate.remote([p.to_text()], data) for p in plans]
        for row, result in zip(rows, pool.run(calls, "plans"), strict=True):
            row |= {k: v for k, v in result[0].items() if k != "delta"}
    if "speed" in settings.tasks:
        import ray

        data = asdict(replace(settings, tasks=("speed",)))
        timed = ray.get(pool.actors[0].evaluate.remote([p.to_text() for p in plans], data))
        for row, result in zip(rows, timed, strict=True):
            row["speed"] = result["speed"]
    add_deltas(rows, settings.confidence, settings.seed)
    return {"settings": as_dict(settings), "tasks": list(settings.tasks), "rows": rows}


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
