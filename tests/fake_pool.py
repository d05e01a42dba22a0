"""A `parallel.WorkerPool` backend with its workers in this process, for tests that run without Ray.

Tasks run when they are sent, and `wait` hands back the one sent LAST first, so results come back out of
order; `die` lists task numbers (counted over the backend's life) whose worker dies with the task, once
each; `stop_after` raises KeyboardInterrupt when that many tasks of `stop_method` were sent (an interrupted
run)."""

from __future__ import annotations

from layerlab.parallel import PlanWorker, WorkerLost


class InProcessBackend:
    def __init__(self, die: tuple[int, ...] = (), stop_after: int | None = None, stop_method: str = "measure") -> None:
        self.die = set(die)
        self.stop_after, self.stop_method = stop_after, stop_method
        self.sent: list[str] = []  # every task's method, in the order sent
        self.started = 0
        self.dead: set[int] = set()
        self._done: dict[int, tuple[bool, object]] = {}

    def start(self, spec: dict, threads: int) -> PlanWorker:
        self.started += 1
        return PlanWorker(spec, threads)

    def submit(self, worker: PlanWorker, method: str, args: tuple) -> int:
        ref = len(self.sent)
        self.sent.append(method)
        if self.stop_after is not None and self.sent.count(self.stop_method) > self.stop_after:
            raise KeyboardInterrupt
        if ref in self.die or id(worker) in self.dead:
            self.dead.add(id(worker))
            self._done[ref] = (False, None)
        else:
            self._done[ref] = (True, getattr(worker, method)(*args))
        return ref

    def wait(self, pending: list) -> list:
        return pending[-1:]

    def get(self, ref: int):
        ok, value = self._done.pop(ref)
        if not ok:
            raise WorkerLost
        return value

    def put(self, value):
        return value

    def kill(self, worker) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def count(self, method: str) -> int:
        return self.sent.count(method)
